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
