"""Config groups mirror the package dataclasses; bad values fail with one clear message."""

from __future__ import annotations

import dataclasses

import pytest
from test_trainer_support import compose_run_config, run_train

from data import DataConfig
from optim import OptimConfig
from qwen3 import PRESETS, Qwen3Config
from trainer.cli_entry import CONF_DIR
from trainer.config import SampleConfig, TrainConfig, WandbConfig
from trainer.typed_config import ConfigError


def test_defaults_compose_into_typed_configs() -> None:
    cfg = compose_run_config([])
    assert cfg.model == Qwen3Config.from_preset("tiny")
    assert cfg.data == DataConfig()
    assert cfg.optim == OptimConfig()
    assert cfg.trainer == TrainConfig() and cfg.sample == SampleConfig()
    assert cfg.wandb == WandbConfig()
    assert cfg.trainer.batch_size == 16 and cfg.trainer.seq_len == 256
    assert cfg.out_dir == "checkpoints" and cfg.resume is None and cfg.run_name


def test_every_preset_has_a_model_yaml_that_mirrors_it() -> None:
    assert sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")) == sorted(PRESETS)
    for name in PRESETS:
        assert compose_run_config([f"model={name}"]).model == Qwen3Config.from_preset(name), name


def test_optim_and_data_groups_mirror_their_dataclasses() -> None:
    # AdamW alone has its own best learning rate (benchmarks/results/convergence.md).
    adamw = OptimConfig(name="adamw", lr=1.5e-3, adamw_lr=1.5e-3)
    assert compose_run_config(["optim=adamw"]).optim == adamw
    optim_fields = {f.name for f in dataclasses.fields(OptimConfig)}
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    from omegaconf import OmegaConf

    for path in (CONF_DIR / "optim").glob("*.yaml"):
        assert set(OmegaConf.load(path)) == optim_fields, path
    for path in (CONF_DIR / "data").glob("*.yaml"):
        assert set(OmegaConf.load(path)) == data_fields, path
    tiny = compose_run_config(["data=tinystories"]).data
    assert tiny.source == "hf" and tiny.path == "roneneldan/TinyStories"
    assert compose_run_config(["data=fineweb-edu"]).data.name == "sample-10BT"
    assert compose_run_config(["data=local", "data.paths=[a.txt]"]).data.paths == ["a.txt"]


def test_model_overrides_apply_over_the_preset() -> None:
    cfg = compose_run_config(["model=small", "model.num_hidden_layers=2"])
    assert cfg.model == dataclasses.replace(Qwen3Config.from_preset("small"), num_hidden_layers=2)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["trainer.precision=fp8"], ["trainer.precision", "auto", "fp32", "bf16", "fp16"]),
        (["trainer.max_steps=abc"], ["trainer.max_steps", "integer"]),
        (["trainer.batch_size=0"], ["trainer.batch_size", ">= 1"]),
        (["trainer.device=tpu"], ["trainer.device", "cuda"]),
        (["wandb.mode=sometimes"], ["wandb.mode", "offline", "disabled"]),
        (["+trainer.max_step=5"], ["trainer.max_step", "max_steps"]),
        (["optim.schedule=linear"], ["optim.schedule", "cosine", "wsd"]),
        (["model.num_key_value_heads=3"], ["num_key_value_heads"]),
        (["data=local"], ["data.paths"]),
        (["sample.top_p=2"], ["sample.top_p"]),
    ],
)
def test_bad_values_raise_one_message_naming_the_key(
    override: list[str], expected: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        compose_run_config(override)
    for word in expected:
        assert word in str(err.value), (word, str(err.value))


def test_cli_config_errors_end_before_any_work(tmp_path) -> None:
    """Unknown group option (Hydra's message) and a nonsense value (ours): a message naming the
    key and the choices, a failing exit code, and no run directory left behind."""
    out = tmp_path / "runs"
    res = run_train(tmp_path, "model=huge", f"out_dir={out}")
    assert res.returncode != 0
    assert "model" in res.stderr and "tiny" in res.stderr and "qwen3-0.6b" in res.stderr
    res = run_train(tmp_path, "trainer.precision=fp8", f"out_dir={out}", "wandb.mode=disabled")
    assert res.returncode == 2
    assert "trainer.precision" in res.stderr and "bf16" in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists() or not any(out.iterdir())
