"""Hugging Face parity against real transformers Qwen3ForCausalLM, both directions, and bad dirs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3 import Qwen3, Qwen3Config

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    max_position_embeddings=128,
)
CONFIGS = {
    "gqa1-tied-theta1e4": dict(
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        tie_word_embeddings=True,
        rope_theta=1e4,
    ),
    "gqa2-untied-theta1e6": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
        rope_theta=1e6,
    ),
    "gqa4-headdim24-tied": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=True,
        rope_theta=1e6,
    ),
    "gqa4-headdim8-untied-bias": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=False,
        rope_theta=1e4,
        attention_bias=True,
    ),
}


def _randomise(module: torch.nn.Module) -> None:
    # Beyond-init weights (norms != 1) so that every parameter matters for the comparison.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_theirs_loaded_into_ours_gives_the_same_logits(name: str, tmp_path) -> None:
    theirs_cfg = transformers.Qwen3Config(**BASE, **CONFIGS[name])
    theirs = transformers.Qwen3ForCausalLM(theirs_cfg).eval()
    _randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = Qwen3.from_pretrained(tmp_path)
    x = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ours_saved_and_loaded_by_theirs_gives_the_same_logits(name: str, tmp_path) -> None:
    ours = Qwen3(Qwen3Config(**BASE, **CONFIGS[name])).eval()
    _randomise(ours)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing/unexpected-weight warnings
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)[1]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff <= 1e-4


def test_sharded_checkpoint_loads(tmp_path) -> None:
    ours = Qwen3(Qwen3Config(**BASE, **CONFIGS["gqa2-untied-theta1e6"]))
    ours.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
    (tmp_path / "model.safetensors").unlink()
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = Qwen3.from_pretrained(tmp_path)
    x = torch.randint(0, BASE["vocab_size"], (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x))


def test_bf16_checkpoint_keeps_its_dtype_and_float32_rope(tmp_path) -> None:
    ours = Qwen3(Qwen3Config(**BASE, **CONFIGS["gqa1-tied-theta1e4"])).to(torch.bfloat16)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = Qwen3.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert loaded(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16
    assert loaded.model.rotary_emb.cos.dtype == torch.float32
    assert Qwen3.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


@pytest.fixture
def saved(tmp_path):
    model = Qwen3(Qwen3Config(**BASE, **CONFIGS["gqa2-untied-theta1e6"]))
    model.save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


def test_missing_tensor_is_named(saved) -> None:
    path, state = saved
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        Qwen3.from_pretrained(path)


def test_extra_tensor_is_named(saved) -> None:
    path, state = saved
    state["model.layers.9.bogus.weight"] = torch.zeros(2)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.9\.bogus\.weight"):
        Qwen3.from_pretrained(path)


def test_misshapen_tensor_is_named(saved) -> None:
    path, state = saved
    state["model.norm.weight"] = torch.ones(63)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(63,\)"):
        Qwen3.from_pretrained(path)


def test_not_a_model_dir_is_explained(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        Qwen3.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="needs a config.json"):
        Qwen3.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(Qwen3Config(**BASE).to_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Qwen3.from_pretrained(tmp_path)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_dropout_in_training_matches_transformers(impl: str, tmp_path) -> None:
    """attention_dropout drops attention weights in training mode exactly as transformers does
    (same seed, same numbers) and does nothing in eval mode."""
    cfg = Qwen3Config(**BASE, **CONFIGS["gqa2-untied-theta1e6"], attention_dropout=0.3)
    ours = Qwen3(cfg)
    _randomise(ours)
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl)
    assert theirs.config.attention_dropout == 0.3
    x = torch.randint(0, BASE["vocab_size"], (2, 24))
    ours.train(), theirs.train()
    with torch.no_grad():
        torch.manual_seed(5)
        dropped = ours(x)
        torch.manual_seed(5)
        torch.testing.assert_close(dropped, theirs(x).logits, rtol=1e-4, atol=1e-4)
        torch.manual_seed(6)
        assert (ours(x) - dropped).abs().max() > 1e-2  # another draw drops other weights
        ours.eval(), theirs.eval()
        full = ours(x)
        torch.testing.assert_close(full, theirs(x).logits, rtol=1e-4, atol=1e-4)
        assert (full - dropped).abs().max() > 1e-2
