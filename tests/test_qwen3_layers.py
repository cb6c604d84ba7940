"""Each layer on its own: RMSNorm, RoPE, attention (GQA, causality), and whole-model shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen3 import Qwen3, Qwen3Config
from qwen3.layers import Attention, RMSNorm, RotaryEmbedding, apply_rope

SMALL = Qwen3Config(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)


def test_rmsnorm_matches_its_formula_and_returns_input_dtype() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16)
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)
    # A float32 weight is cast to the input's dtype, not promoted with it (autocast keeps bf16).
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    assert norm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_rope_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, theta=10000.0, max_positions=8)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i: int, j: int) -> float:
        cos, sin = rope(1, torch.tensor([[i]]))
        qi = apply_rope(q, cos, sin)
        cos, sin = rope(1, torch.tensor([[j]]))
        kj = apply_rope(k, cos, sin)
        return float((qi * kj).sum())

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-4, abs=1e-5)
    assert score(0, 0) == pytest.approx(
        score(50, 50), rel=1e-4, abs=1e-5
    )  # past the table: extended
    assert rope.cos.shape[0] >= 51
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def test_rope_tables_are_not_saved_in_the_state_dict() -> None:
    model = Qwen3(SMALL)
    assert not any("rotary" in k for k in model.state_dict())


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads() -> None:
    torch.manual_seed(0)
    gqa = Attention(SMALL, 0)
    mha_cfg = dataclasses.replace(SMALL, num_key_value_heads=SMALL.num_attention_heads)
    mha = Attention(mha_cfg, 0)
    groups = SMALL.kv_groups
    with torch.no_grad():
        for name in ("q_proj", "o_proj", "q_norm", "k_norm"):
            getattr(mha, name).load_state_dict(getattr(gqa, name).state_dict())
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(SMALL.num_key_value_heads, SMALL.head_dim, -1)
            getattr(mha, name).weight.copy_(
                w.repeat_interleave(groups, dim=0).reshape(-1, w.shape[-1])
            )
    rope = RotaryEmbedding(SMALL.head_dim, SMALL.rope_theta, 64)
    x = torch.randn(2, 7, SMALL.hidden_size)
    cos, sin = rope(7, None)
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin), rtol=1e-5, atol=1e-6)


def test_changing_a_future_token_never_changes_earlier_logits() -> None:
    torch.manual_seed(0)
    model = Qwen3(SMALL).eval()
    x = torch.randint(0, SMALL.vocab_size, (2, 12))
    y = x.clone()
    y[:, 8] = (y[:, 8] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_model_shapes_tied_head_and_loss() -> None:
    model = Qwen3(SMALL)
    x = torch.randint(0, SMALL.vocab_size, (3, 10))
    assert model(x).shape == (3, 10, SMALL.vocab_size)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    targets = torch.randint(0, SMALL.vocab_size, (3, 10))
    loss = model(x, targets=targets)
    assert loss.shape == () and torch.isfinite(loss)
    # Fresh init: loss near ln(V) (small logits), not a huge value from N(0, 1) embeddings.
    assert abs(loss.item() - torch.log(torch.tensor(float(SMALL.vocab_size)))) < 0.5
    ignored = x.clone()
    ignored[:, :5] = -100
    torch.testing.assert_close(
        model(x, targets=ignored),
        torch.nn.functional.cross_entropy(
            model(x)[:, 5:].reshape(-1, SMALL.vocab_size), x[:, 5:].reshape(-1)
        ),
    )
    untied = Qwen3(dataclasses.replace(SMALL, tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_params() == model.num_params() + SMALL.vocab_size * SMALL.hidden_size


def test_init_scales_residual_projections_by_depth() -> None:
    cfg = Qwen3Config.from_preset("small")
    model = Qwen3(cfg)
    layer = model.model.layers[0]
    std_q = float(layer.self_attn.q_proj.weight.std())
    std_o = float(layer.self_attn.o_proj.weight.std())
    assert std_q == pytest.approx(0.02, rel=0.05)
    assert std_o == pytest.approx(0.02 / (2 * cfg.num_hidden_layers) ** 0.5, rel=0.05)
    assert torch.all(layer.input_layernorm.weight == 1)


def test_estimate_flops_counts_every_matmul_once_plus_attention() -> None:
    cfg = Qwen3Config.from_preset("tiny")
    model = Qwen3(cfg)
    # tied head: the embedding's matmul is counted once, as the head
    matmul_params = model.num_params() - sum(
        p.numel() for n, p in model.named_parameters() if "norm" in n
    )
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 256
    assert model.estimate_flops(256) == 6 * matmul_params + attention
