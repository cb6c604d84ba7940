"""GGUF export of a Qwen3-MoE checkpoint: llama.cpp's qwen3moe layout (experts stacked per
projection), refused in one line where llama.cpp would compute other numbers, and llama.cpp's
greedy continuations equal ours."""

from __future__ import annotations

import re
import subprocess

import gguf
import pytest
import torch
from safetensors.torch import load_file
from test_gguf_llama_cpp import MIXED, build_llama_cpp

from data.tokenizer_training import train_tokenizer
from qwen3 import Qwen3, Qwen3Config, Sampling, generate
from qwen3.gguf import export_gguf, main
from qwen3.hf import save_pretrained

SHAPE = dict(
    vocab_size=448,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rope_theta=1e6,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([MIXED] * 40, 420)


def _checkpoint(path, tokenizer, std: float = 0.02, **overrides: object) -> Qwen3:
    torch.manual_seed(0)
    model = Qwen3(Qwen3Config(**{**SHAPE, "initializer_range": std, **overrides})).eval()
    save_pretrained(model, path)
    tokenizer.save(path)
    return model


def test_moe_file_holds_stacked_experts_and_their_hyperparameters(tokenizer, tmp_path) -> None:
    model = _checkpoint(tmp_path / "ckpt", tokenizer)
    reader = gguf.GGUFReader(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf"))
    fields = {k: reader.fields[k].contents() for k in reader.fields}
    assert fields["general.architecture"] == "qwen3moe"
    assert fields["qwen3moe.expert_count"] == 4
    assert fields["qwen3moe.expert_used_count"] == 2
    assert fields["qwen3moe.expert_feed_forward_length"] == 32
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    state = load_file(tmp_path / "ckpt" / "model.safetensors")  # the released per-expert names
    assert torch.equal(  # and those are the halves of the fused parameter
        state["model.layers.0.mlp.experts.3.up_proj.weight"],
        model.model.layers[0].mlp.experts.gate_up_proj[3, 32:],
    )
    for i in range(2):
        assert torch.equal(
            tensors[f"blk.{i}.ffn_gate_inp.weight"], state[f"model.layers.{i}.mlp.gate.weight"]
        )
        for proj, name in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            stacked = torch.stack(
                [state[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(4)]
            )
            assert torch.equal(tensors[f"blk.{i}.ffn_{name}_exps.weight"], stacked)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (dict(mlp_only_layers=[1]), "layer 1 of this mixture of experts is dense"),
        (dict(norm_topk_prob=False), "norm_topk_prob=false"),
    ],
)
def test_what_llama_cpp_would_compute_otherwise_is_refused(
    tokenizer, tmp_path, capsys, overrides, needle
) -> None:
    _checkpoint(tmp_path / "ckpt", tokenizer, **overrides)
    with pytest.raises(SystemExit) as code:
        main([str(tmp_path / "ckpt"), str(tmp_path / "m.gguf")])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_llama_cpp_greedy_continuation_equals_ours(tokenizer, tmp_path) -> None:
    # Weights of std 0.4 spread the logits, so each greedy pick wins by a clear margin.
    model = _checkpoint(tmp_path / "ckpt", tokenizer, std=0.4)
    path = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    prompt = "The little fox ran"
    (ours,) = generate(
        model,
        [tokenizer.encode(prompt)],
        Sampling(
            max_new_tokens=16, temperature=0, stop_ids=(tokenizer.eos_id, tokenizer.im_end_id)
        ),
    )
    done = subprocess.run(
        [str(build_llama_cpp() / "llama-simple"), "-m", str(path), "-n", "16", prompt],
        capture_output=True,
        check=True,
    )
    theirs = done.stdout[len(prompt.encode()) : -1].decode("utf-8", errors="replace")
    decoded = re.search(rb"decoded (\d+) tokens", done.stderr)
    assert decoded is not None, done.stderr.decode(errors="replace")[-2000:]
    assert int(decoded.group(1)) == len(ours)
    assert theirs == tokenizer.decode(ours)
