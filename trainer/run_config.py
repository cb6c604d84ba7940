"""The whole run's typed configuration, converted once from the composed Hydra config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from data import DataConfig
from optim import OptimConfig, fit_warmup
from qwen3 import PRESETS, Qwen3Config
from trainer.config import SampleConfig, TrainConfig, WandbConfig
from trainer.typed_config import ConfigError, build_dataclass, unknown_key_message

TOP_LEVEL_KEYS = ("run_name", "out_dir", "seed", "resume")
SECTIONS = ("model", "data", "optim", "trainer", "sample", "wandb")


@dataclass
class RunConfig:
    """Every section of a run, typed and validated. ``notes``: one line for each setting that was
    adapted to the run (e.g. a warmup longer than the run, shortened), for the CLI to print."""

    run_name: str
    out_dir: str
    seed: int
    resume: str | None
    model: Qwen3Config
    data: DataConfig
    optim: OptimConfig
    trainer: TrainConfig
    sample: SampleConfig
    wandb: WandbConfig
    notes: list[str] = field(default_factory=list)


def build_model_config(section: dict[str, Any]) -> Qwen3Config:
    """``preset`` plus every other key of ``conf/model/*.yaml`` applied over it."""
    values = dict(section)
    preset = values.pop("preset", "tiny")
    if preset not in PRESETS:
        raise ConfigError(
            f"model.preset={preset!r} is unknown; choose one of: {', '.join(PRESETS)}."
        )
    base = Qwen3Config.from_preset(preset)
    merged = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, **values}
    return build_dataclass(Qwen3Config, merged, "model", skip=())


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python values, without Hydra's own node."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(
            f"{e.full_key} must be set (it has no default); add {e.full_key}=VALUE."
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"{getattr(e, 'full_key', '') or 'config'}: {e.msg if hasattr(e, 'msg') else e}"
        ) from None
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return data


def build_run_config(data: dict[str, Any]) -> RunConfig:
    """Check and convert every section; the first problem raises one :class:`ConfigError`."""
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS) - set(SECTIONS))
    if unknown:
        raise ConfigError(unknown_key_message(unknown[0], TOP_LEVEL_KEYS + SECTIONS))
    seed = data.get("seed", 1337)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer, e.g. seed=1337.")
    resume = data.get("resume")
    if resume is not None and not isinstance(resume, str):
        raise ConfigError(f"resume={resume!r} must be null, latest, or a checkpoint path.")
    model = build_model_config(data.get("model") or {})
    data_cfg = build_dataclass(DataConfig, data.get("data") or {}, "data")
    optim = build_dataclass(OptimConfig, data.get("optim") or {}, "optim")
    trainer = build_dataclass(TrainConfig, data.get("trainer") or {}, "trainer")
    optim, note = fit_warmup(optim, trainer.max_steps)
    return RunConfig(
        run_name=str(data.get("run_name") or ""),
        out_dir=str(data.get("out_dir") or "checkpoints"),
        seed=seed,
        resume=resume,
        model=model,
        data=data_cfg,
        optim=optim,
        trainer=trainer,
        sample=build_dataclass(SampleConfig, data.get("sample") or {}, "sample"),
        wandb=build_dataclass(WandbConfig, data.get("wandb") or {}, "wandb"),
        notes=[note] if note else [],
    )
