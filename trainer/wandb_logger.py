"""Weights & Biases logging: resolve the mode, start the run with the resolved config, log rows."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from trainer.config import WandbConfig

_ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline"}


def resolve_mode(mode: str) -> str:
    """``auto`` becomes WANDB_MODE if set, else online when logged in (an API key is found
    without prompting), else offline (sync later with ``wandb sync``)."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in _ENV_MODES:
        return _ENV_MODES[env]
    import wandb

    return "online" if wandb.login(prompt=False, verify=False) else "offline"


class WandbLogger:
    """One wandb run per run directory (a resumed run continues the same wandb run id)."""

    def __init__(
        self, cfg: WandbConfig, run_dir: Path, run_name: str, config: dict[str, Any]
    ) -> None:
        self.mode = resolve_mode(cfg.mode)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        wandb_dir = Path(os.environ.get("WANDB_DIR") or run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=run_name,
                id=run_id,
                resume="allow",
                tags=list(cfg.tags),
                dir=str(wandb_dir),
                mode=self.mode,
                config=config,
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as e:  # wandb raises many types (network, auth, service start)
            print(f"wandb: could not start a {self.mode} run ({e}); training continues without "
                  "wandb (set wandb.mode=offline, or disabled to silence this)", file=sys.stderr)  # fmt: skip
            self.run = None

    @property
    def run_path(self) -> Path | None:
        """The local folder wandb writes this run's files to."""
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            step = record["step"]
            self.run.log(
                {k: v for k, v in record.items() if k != "step" and v is not None}, step=step
            )

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
