"""``train.py``: the ``demo``/``interactive`` subcommands, or a Hydra training run."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.distributed import (
    DistInfo,
    barrier,
    dist_info,
    from_main,
    init_process_group,
    shutdown,
)
from trainer.run_dirs import default_run_name, timestamp_name

SUBCOMMANDS = ("demo", "interactive")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def register_resolvers(stamp: str | None = None) -> None:
    """``${run_name_default:out_dir,resume}`` (cached: one process, one timestamp; ``stamp``:
    the timestamp to use, so that all processes of a torchrun job agree on it)."""
    OmegaConf.register_new_resolver(
        "run_name_default",
        lambda out_dir, resume: default_run_name(out_dir, resume, stamp),
        use_cache=True,
        replace=True,
    )


def _rank_overrides(dist: DistInfo) -> list[str]:
    """Hydra overrides for processes other than rank 0: Hydra neither creates a directory for
    them (its output dir is the working directory) nor writes there (no .hydra/, no log file);
    they learn rank 0's run directory from rank 0."""
    if dist.is_main:
        return []
    return [
        "hydra.run.dir=.", "hydra.sweep.dir=.", "hydra.sweep.subdir=.",
        "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none",
    ]  # fmt: skip


def _only_hydra_files(run_dir: Path) -> bool:
    return run_dir.is_dir() and all(
        p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()
    )


def train_from_hydra(cfg: DictConfig, start_time: float) -> int:
    """Convert and check the composed config, then train; a config mistake, or Ctrl-C before
    the first checkpoint, leaves no run dir."""
    hc = HydraConfig.get()
    run_dir = Path(from_main(hc.runtime.output_dir))  # under torchrun: rank 0's
    try:
        code = _train(cfg, hc, run_dir, start_time)
    except KeyboardInterrupt:
        if dist_info().is_main and _only_hydra_files(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    barrier()  # every rank has made (or used) the run dir before rank 0 may remove it
    if code == 2 and dist_info().is_main and _only_hydra_files(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
    return code


def _train(cfg: DictConfig, hc: Any, run_dir: Path, start_time: float) -> int:
    from trainer.main import run_training
    from trainer.run_config import build_run_config, to_container
    from trainer.typed_config import ConfigError

    try:
        data = to_container(cfg)
        run_cfg = build_run_config(data)
    except ConfigError as e:
        if dist_info().is_main:  # every rank composed the same config: say it once
            print(f"config error: {e}", file=sys.stderr)
        return 2
    yaml = OmegaConf.to_yaml(OmegaConf.create(data))
    return run_training(run_cfg, run_dir, yaml, data, list(hc.overrides.task), start_time)


def main(argv: list[str], start_time: float) -> int:
    """Dispatch on the first word: a subcommand, else Hydra's own command line."""
    if len(argv) > 1 and argv[1] in SUBCOMMANDS:
        from trainer.generation_cli import run_subcommand

        return run_subcommand(argv[1], argv[2:])
    try:
        dist = dist_info()
        init_process_group(dist)  # before Hydra: the ranks agree on the run directory's name
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    register_resolvers(from_main(timestamp_name()) if dist.is_distributed else None)
    codes: list[int] = []

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _hydra_main(cfg: DictConfig) -> None:
        codes.append(train_from_hydra(cfg, start_time))

    sys.argv = [*argv, *_rank_overrides(dist)]
    try:
        _hydra_main()
    except KeyboardInterrupt:
        # Training itself turns Ctrl-C into a clean stop and save (trainer.signals); this is one
        # outside the loop (data preparation, evaluation, samples). Every file is written
        # atomically, so there is nothing to repair: say so instead of printing a traceback.
        shutdown(wait_for_others=False)
        if dist.is_main:
            print(
                "\ninterrupted: nothing is left half-written (the token cache and checkpoints are "
                "complete or absent). Run the same command again; resume=latest continues a run.",
                file=sys.stderr,
            )
        return 130
    except BaseException:
        shutdown(wait_for_others=False)
        raise
    shutdown()
    return max(codes, default=0)
