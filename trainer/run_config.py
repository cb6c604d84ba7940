"""The whole run's typed configuration, converted once from the composed Hydra config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
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


# The settable Qwen3Config fields (``extra`` only carries a config.json's unknown keys through).
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(Qwen3Config) if f.name != "extra")
MODEL_FIELDS_NODE = "model_fields"


def register_config_nodes() -> None:
    """Store, for ``conf/config.yaml``'s defaults list, a ``model`` section holding every
    Qwen3Config field as null, composed before the ``model`` group: Hydra overrides only keys
    that exist (``model.num_hidden_layers=2``), so every field must be there, while
    ``conf/model/*.yaml`` names a preset and sets only what differs from it. Call before
    Hydra composes the config."""
    node = dict.fromkeys(MODEL_FIELDS)
    ConfigStore.instance().store(name=MODEL_FIELDS_NODE, node=node, package="model")


def build_model_config(section: dict[str, Any]) -> Qwen3Config:
    """``preset`` with every other key of the ``model`` section applied over it. A null key
    keeps the preset's value: that is how the composed config leaves a field unset. The fields
    whose own value may be null (the special-token ids) are null in every preset, the model
    taking them from the tokenizer, so for them null means the same either way."""
    values = dict(section)
    preset = values.pop("preset", "tiny")
    if preset not in PRESETS:
        raise ConfigError(
            f"model.preset={preset!r} is unknown; choose one of: {', '.join(PRESETS)}."
        )
    base = Qwen3Config.from_preset(preset)
    merged = {name: getattr(base, name) for name in MODEL_FIELDS}
    merged.update((k, v) for k, v in values.items() if v is not None)
    return build_dataclass(Qwen3Config, merged, "model", skip=())


def run_record(data: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """``data`` (the composed config) as the run uses it, for the ``config.yaml`` saved with
    each checkpoint and for wandb: every model field with its value (the preset's where the
    composed config says null), and settings adapted to the run (a shortened warmup)."""
    record = dict(data)
    model = cfg.model
    preset = (data.get("model") or {}).get("preset", "tiny")
    record["model"] = {"preset": preset, **{name: getattr(model, name) for name in MODEL_FIELDS}}
    if isinstance(data.get("optim"), dict):
        record["optim"] = {**data["optim"], "warmup_steps": cfg.optim.warmup_steps}
    return record


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
        sample=build_dataclass(
            SampleConfig, data.get("sample") or {}, "sample", skip=SampleConfig.not_keys
        ),
        wandb=build_dataclass(WandbConfig, data.get("wandb") or {}, "wandb"),
        notes=[note] if note else [],
    )
