"""Config groups mirror the package dataclasses; bad values fail with one clear message."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from test_trainer_support import compose_config_dict, compose_run_config, run_train

from data import DataConfig
from optim import OptimConfig
from qwen3 import PRESETS, Qwen3Config
from trainer.cli import CONF_DIR
from trainer.config import MODEL_FIELDS, SampleConfig, TrainConfig, WandbConfig, run_record
from trainer.errors import ConfigError


def test_defaults_compose_into_typed_configs() -> None:
    cfg = compose_run_config([])
    assert cfg.model == Qwen3Config.from_preset("tiny")
    assert cfg.data == DataConfig()
    assert cfg.optim == OptimConfig()
    # time_budget auto resolves to the main job's budget (trainer/budget.py)
    assert cfg.trainer == TrainConfig(time_budget=250.0) and cfg.sample == SampleConfig()
    assert cfg.wandb == WandbConfig()
    assert cfg.trainer.batch_size == 16 and cfg.trainer.seq_len == 256
    assert cfg.out_dir == "checkpoints" and cfg.resume is None and cfg.run_name


def test_every_preset_has_a_model_yaml_that_mirrors_it() -> None:
    assert sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")) == sorted(PRESETS)
    for name in PRESETS:
        assert compose_run_config([f"model={name}"]).model == Qwen3Config.from_preset(name), name


def test_optim_and_data_groups_mirror_their_dataclasses() -> None:
    # AdamW alone has its own best learning rate (benchmarks/results/convergence.md) and keeps
    # the warmup it was measured with; Muon's 30 comes from the main job's recipe search.
    adamw = OptimConfig(name="adamw", lr=1.5e-3, adamw_lr=1.5e-3, warmup_steps=100)
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


def test_a_change_to_presets_reaches_the_run(monkeypatch) -> None:
    """The shape of a preset is written once, in ``PRESETS``: the model yaml only names it."""
    monkeypatch.setitem(PRESETS, "small", {**PRESETS["small"], "num_hidden_layers": 5})
    monkeypatch.setitem(PRESETS, "tiny", {**PRESETS["tiny"], "hidden_size": 96, "head_dim": 24})
    small = compose_run_config(["model=small"]).model
    assert small.num_hidden_layers == 5 and small == Qwen3Config.from_preset("small")
    tiny = compose_run_config(["model.num_key_value_heads=4"]).model
    assert (tiny.hidden_size, tiny.head_dim, tiny.num_key_value_heads) == (96, 24, 4)


def test_shipped_model_yamls_only_name_their_preset() -> None:
    from omegaconf import OmegaConf

    for path in (CONF_DIR / "model").glob("*.yaml"):
        assert OmegaConf.to_container(OmegaConf.load(path)) == {"preset": path.stem}, path


def test_every_model_field_can_be_set_on_the_command_line() -> None:
    """Hydra and the mistyped-key check accept ``model.FIELD=VALUE`` for every Qwen3Config field,
    though no yaml lists them."""
    from trainer.cli import unknown_override

    expected = Qwen3Config.from_preset("small", num_hidden_layers=2, rms_norm_eps=1e-5)
    values = {name: getattr(expected, name) for name in MODEL_FIELDS}
    args = [f"model.{k}={'null' if v is None else str(v).lower()}" for k, v in values.items()]
    assert unknown_override(args) is None
    assert compose_run_config(["model=small", *args]).model == expected


def test_null_keeps_the_preset_value_and_presets_never_set_nullable_fields() -> None:
    """A null model key means the preset's value; so no preset may set a field whose own value
    can be null (the special-token ids, which the tokenizer supplies), or null could not
    restore it."""
    nullable = [
        name
        for name in MODEL_FIELDS
        if type(None) in typing.get_args(typing.get_type_hints(Qwen3Config)[name])
    ]
    assert nullable == ["bos_token_id", "eos_token_id", "pad_token_id"]
    for name, shape in PRESETS.items():
        assert not set(nullable) & set(shape), name
    cfg = compose_run_config(["model=small", "model.hidden_size=null", "model.bos_token_id=null"])
    assert cfg.model == Qwen3Config.from_preset("small")


def test_the_saved_run_config_holds_the_effective_model_values() -> None:
    """The config.yaml saved with a checkpoint records every model value the run used, not the
    nulls of the composed config."""
    overrides = ["model=small", "model.num_hidden_layers=2", "trainer.max_steps=20"]
    data = compose_config_dict(overrides)
    assert data["model"]["hidden_size"] is None  # composed: left to the preset
    record = run_record(data, compose_run_config(overrides))
    model = dataclasses.replace(Qwen3Config.from_preset("small"), num_hidden_layers=2)
    assert record["model"] == {"preset": "small", **{n: getattr(model, n) for n in MODEL_FIELDS}}
    assert record["optim"]["warmup_steps"] == 2 and data["optim"]["warmup_steps"] == 30
    assert {k: v for k, v in record.items() if k not in ("model", "optim")} == {
        k: v for k, v in data.items() if k not in ("model", "optim")
    }


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


@pytest.mark.parametrize("max_steps", [1, 2, 20])
def test_short_runs_fit_the_shipped_warmup_with_one_note(max_steps: int) -> None:
    cfg = compose_run_config([f"trainer.max_steps={max_steps}"])
    assert cfg.optim == dataclasses.replace(OptimConfig(), warmup_steps=max_steps // 10)
    assert (
        len(cfg.notes) == 1 and f"optim.warmup_steps={OptimConfig().warmup_steps}" in cfg.notes[0]
    )
    adamw = compose_run_config([f"trainer.max_steps={max_steps}", "optim=adamw"])
    assert adamw.optim.warmup_steps == max_steps // 10 and len(adamw.notes) == 1


def test_a_run_long_enough_for_its_warmup_has_no_notes() -> None:
    assert compose_run_config([]).notes == []
    assert compose_run_config(["trainer.max_steps=31"]).optim.warmup_steps == 30
    assert compose_run_config(["trainer.max_steps=101", "optim=adamw"]).optim.warmup_steps == 100


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("trainer.maxsteps=1", "trainer.max_steps"),
        ("data.max_token=5000", "data.max_tokens"),
        ("model.hidden_sizes=64", "model.hidden_size"),
        ("optim.warmup=5", "optim.warmup_steps"),
        ("traner.max_steps=1", "trainer.max_steps"),
        ("seq_len=64", "trainer.seq_len"),
        ("modle=small", "model"),
    ],
)
def test_a_mistyped_key_is_named_with_the_closest_valid_keys(
    override: str, suggestion: str, tmp_path, capsys
) -> None:
    from trainer.cli import main

    argv = ["train.py", "model=small", override, f"out_dir={tmp_path}", "optim.lr=1e-3,3e-3"]
    assert main(argv, start_time=0.0) == 2
    key = override.split("=")[0]
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {key} is not a known config key; did you mean ")
    assert suggestion in err and err.count("\n") == 1
    assert "append" not in err and "+" not in err
    assert not list(tmp_path.iterdir())


def test_a_key_with_nothing_close_lists_its_section(capsys) -> None:
    from trainer.cli import main

    assert main(["train.py", "trainer.zzz=1"], start_time=0.0) == 2
    err = capsys.readouterr().err
    assert "trainer.zzz is not a known config key; valid keys of trainer: " in err
    assert "max_steps" in err and err.count("\n") == 1


def test_an_appended_unknown_key_also_gets_a_suggestion() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^optim\.warmup is not a known config key; did you mean optim\.warmup_steps\?$",
    ):
        compose_run_config(["+optim.warmup=5"])


def test_auto_precision_is_bf16_where_the_cpu_multiplies_bf16_in_hardware(monkeypatch) -> None:
    """bf16 autocast on CPUs with AMX or AVX-512 BF16 (a bf16 matmul there is 2x float32's or
    more), float32 on other CPUs, where bf16 is emulated; a named precision is kept as given."""
    import qwen3.device
    from trainer.build import resolve_precision

    cpu = torch.device("cpu")
    for amx, avx512_bf16, auto in (
        (False, False, "fp32"),
        (True, False, "bf16"),
        (False, True, "bf16"),
    ):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(
            torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False
        )
        qwen3.device.cpu_has_native_bf16_matmul.cache_clear()
        precision = resolve_precision("auto", cpu)
        assert precision.name == auto and precision.scaler is None
        assert precision.dtype == (torch.bfloat16 if auto == "bf16" else None)
        assert resolve_precision("fp32", cpu).dtype is None
    qwen3.device.cpu_has_native_bf16_matmul.cache_clear()  # the real answer for later tests
