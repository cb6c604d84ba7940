"""Qwen3Config: presets, parameter counts of the released models, HF dict round trip, validation."""

from __future__ import annotations

import json

import pytest
import torch

from qwen3 import PRESETS, Qwen3, Qwen3Config

# Parameter counts of the released models (model cards: 0.6B, 1.7B, 4.0B, 8.2B, 14.8B, 32.8B;
# the tied head counted once, as the non-embedding counts on the cards confirm).
OFFICIAL_COUNTS = {
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
    "qwen3-14b": 14_768_307_200,
    "qwen3-32b": 32_762_123_264,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_official_presets_match_released_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = Qwen3(Qwen3Config.from_preset(name))
    assert model.num_params() == OFFICIAL_COUNTS[name]
    assert model.lm_head.weight.is_meta  # nothing was allocated


def test_small_presets_are_sized_for_their_job() -> None:
    tiny = Qwen3(Qwen3Config.from_preset("tiny"))
    with torch.device("meta"):
        small = Qwen3(Qwen3Config.from_preset("small"))
    assert tiny.num_params() < 3_000_000
    assert 20_000_000 <= small.num_params() <= 50_000_000
    assert set(PRESETS) >= {"tiny", "small", *OFFICIAL_COUNTS}


def test_hf_dict_round_trip_and_transformers_reads_it(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = Qwen3Config.from_preset("qwen3-0.6b")
    assert Qwen3Config.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "tie_word_embeddings",
    ):
        assert getattr(theirs, key) == getattr(cfg, key), key
    # ...and theirs reads back into ours, rope_theta included (transformers 5 nests it).
    theirs.save_pretrained(tmp_path / "back")
    back = Qwen3Config.from_json_file(tmp_path / "back" / "config.json")
    assert back.rope_theta == cfg.rope_theta and back.hidden_size == cfg.hidden_size


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
        (dict(head_dim=33), "head_dim=33"),
        (dict(hidden_size=0), "hidden_size=0"),
        (dict(num_hidden_layers=-1), "num_hidden_layers=-1"),
        (dict(rope_theta=0.0), "rope_theta"),
    ],
)
def test_invalid_configs_name_field_value_and_fix(overrides: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as err:
        Qwen3Config(**overrides)
    assert "must" in str(err.value) or "pick" in str(err.value) or "use" in str(err.value)


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="Known presets: tiny, small, qwen3-0.6b"):
        Qwen3Config.from_preset("qwen3-huge")


def test_not_a_qwen3_config_is_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        Qwen3Config.from_json_file(tmp_path / "config.json")


def _hf_dict(**overrides: object) -> dict:
    """A config.json as transformers writes one for a small Qwen3."""
    transformers = pytest.importorskip("transformers")
    shape = dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    return transformers.Qwen3Config(**{**shape, **overrides}).to_dict()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
            "use_sliding_window",
        ),
        (
            dict(
                rope_parameters={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "rope_theta": 1e6,
                    "original_max_position_embeddings": 32,
                }
            ),
            "rope_parameters",
        ),
        (
            dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
            "'linear'",
        ),
    ],
)
def test_transformers_configs_that_change_the_maths_are_refused(
    overrides: dict, needle: str, tmp_path
) -> None:
    d = _hf_dict(**overrides)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=needle) as err:
        Qwen3Config.from_json_file(tmp_path / "config.json")
    assert "\n" not in str(err.value) and "not implemented here" in str(err.value)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
            r"rope_scaling with rope_type='dynamic'",
        ),
        (
            {"rope_scaling": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ({"rope_theta": 5e5}, r"rope_theta=500000.0 but rope_parameters.rope_theta=10000.0"),
        (
            {"layer_types": ["full_attention", "chunked_attention", "full_attention"]},
            "chunked_attention",
        ),
        (
            {"quantization_config": {"quant_method": "fp8"}},
            r"quantization_config \(quant_method='fp8'\)",
        ),
    ],
)
def test_other_settings_that_change_the_maths_are_refused(edit: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as err:
        Qwen3Config.from_dict({**_hf_dict(), **edit})
    assert "\n" not in str(err.value)


def test_settings_that_keep_full_attention_and_plain_rope_load() -> None:
    cfg = Qwen3Config.from_dict(_hf_dict())
    assert cfg.rope_theta == 10000.0 and cfg.num_hidden_layers == 3
    # A window switched off, or switched on for no layer (the released models' configs).
    for edit in (
        {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 1},
        {
            "use_sliding_window": True,
            "sliding_window": 8,
            "max_window_layers": 3,
            "layer_types": None,
        },
        {"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
    ):
        assert Qwen3Config.from_dict({**_hf_dict(), **edit}).hidden_size == 64, edit
    assert Qwen3Config.from_dict({**_hf_dict(), "hidden_act": "swish"}).hidden_act == "swish"


@pytest.mark.parametrize("value", [-0.1, 1.0, "0.1", True])
def test_attention_dropout_must_lie_in_zero_one(value: object) -> None:
    with pytest.raises(ValueError, match=r"attention_dropout=.*must lie in \[0, 1\)"):
        Qwen3Config(attention_dropout=value)  # type: ignore[arg-type]
