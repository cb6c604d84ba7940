"""The faster code paths equal the plain formulas they replace: RoPE by roll with a signed sine
table, the one-call float32 RMSNorm, and the dense (unpadded) KV-cache bookkeeping."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from qwen3 import KVCache, Qwen3, Qwen3Config
from qwen3.layers import RMSNorm, RotaryEmbedding, apply_rope
from qwen3.loss import default_chunk_rows

CFG = Qwen3Config(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)


def test_rope_by_roll_equals_the_rotate_half_formula() -> None:
    torch.manual_seed(0)
    d, theta, t = 16, 10000.0, 9
    rope = RotaryEmbedding(d, theta, 32)
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    angles = torch.outer(torch.arange(t).float(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)  # (T, D), transformers' layout
    x = torch.randn(2, t, 3, d)  # (B, T, heads, D)
    x1, x2 = x.chunk(2, dim=-1)
    expected = x * emb.cos()[:, None] + torch.cat((-x2, x1), dim=-1) * emb.sin()[:, None]
    cos, sin = rope(t, None)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=1e-5, atol=1e-6)
    cos_p, sin_p = rope(t, torch.arange(t).expand(2, t))  # per-row positions: same angles
    torch.testing.assert_close(apply_rope(x, cos_p, sin_p), expected, rtol=1e-5, atol=1e-6)


def test_float32_rmsnorm_fast_path_equals_the_reference_order() -> None:
    torch.manual_seed(1)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(4, 16, requires_grad=True)
    expected = norm.weight * F.rms_norm(x.float(), (16,), eps=1e-6)
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)


def test_dense_cache_begin_equals_the_general_path() -> None:
    dense, general = KVCache(CFG, 2, 16), KVCache(CFG, 2, 16)
    for t in (5, 1, 1):
        start = dense.length
        pos_d, mask_d = dense.begin_dense(t)
        pos_g, mask_g = general.begin(torch.ones(2, t, dtype=torch.bool))
        # Dense positions are the slot indices, left implicit (None) for a RoPE table slice.
        assert pos_d is None and mask_d is None and mask_g is None
        assert torch.equal(pos_g, torch.arange(start, start + t).expand(2, t))
        assert torch.equal(dense.next_pos, general.next_pos)
        assert torch.equal(dense.valid, general.valid)
        for c in (dense, general):
            c.commit(torch.zeros(2, CFG.vocab_size))


def test_dense_begin_after_padding_falls_back_to_masks() -> None:
    cache = KVCache(CFG, 2, 16)
    cache.begin(torch.tensor([[False, True, True], [True, True, True]]))
    cache.commit(torch.zeros(2, CFG.vocab_size))
    positions, mask = cache.begin_dense(1)
    assert positions is not None and positions.tolist() == [
        [2],
        [3],
    ]  # each row continues its own count
    assert mask is not None and mask.shape == (2, 1, 1, 4)
    assert not bool(mask[0, 0, 0, 0])  # the padding slot stays hidden


def test_default_chunk_rows_is_cache_sized_on_cpu_and_bounded() -> None:
    cpu = torch.device("cpu")
    assert default_chunk_rows(8192, cpu) == 128  # 4 MiB of float32 logits
    assert default_chunk_rows(151936, cpu) == 64  # floor: matmuls stay reasonably tall
    assert default_chunk_rows(10, cpu) == 16384  # ceiling for tiny vocabularies


def test_stacked_qkv_training_path_equals_separate_projections() -> None:
    torch.manual_seed(2)
    cfg = dataclasses.replace(CFG, attention_bias=True)
    model = Qwen3(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        separate = model(x)  # no gradients: three matmuls
    stacked = model(x)  # gradients on: one matmul against the stacked weights
    torch.testing.assert_close(stacked, separate, rtol=1e-5, atol=1e-6)
    stacked.square().mean().backward()
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
        assert proj.bias.grad is not None and proj.bias.grad.abs().sum() > 0
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()  # HF names unchanged


def test_logits_to_keep_returns_the_last_positions_and_fills_the_cache_alike() -> None:
    torch.manual_seed(3)
    model = Qwen3(CFG).eval()
    x = torch.randint(0, CFG.vocab_size, (2, 6))
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(model(x, logits_to_keep=2), full[:, -2:])
        a, b = KVCache(CFG, 2, 8), KVCache(CFG, 2, 8)
        model(x, cache=a)
        model(x, cache=b, logits_to_keep=1)
    assert a.last_logits is not None and b.last_logits is not None
    torch.testing.assert_close(a.last_logits, b.last_logits)  # 1-row matmul: not bitwise
    assert a.length == b.length == 6


def _separate_forward(model: Qwen3, x: torch.Tensor) -> torch.Tensor:
    """The model's logits with the stacked inference caches bypassed (gradients on: no cache)."""
    with torch.enable_grad():
        return model(x).detach()


def test_inference_stacked_weights_follow_every_weight_change() -> None:
    """The cached stacked q/k/v, gate/up and q/k-norm weights (inference mode) are never stale:
    in-place updates (an optimizer step), a loaded state dict and a dtype round trip all show up
    in the next forward."""
    torch.manual_seed(4)
    model = Qwen3(dataclasses.replace(CFG, attention_bias=True))
    x = torch.randint(0, CFG.vocab_size, (2, 5))
    with torch.inference_mode():
        first = model(x)
    torch.testing.assert_close(first, _separate_forward(model, x), rtol=1e-5, atol=1e-6)
    assert "_stacked" in model.model.layers[0].mlp.__dict__  # the cache is in use
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for p in (attn.k_proj.weight, attn.v_proj.bias, mlp.up_proj.weight, attn.k_norm.weight):
        with torch.no_grad():
            p.mul_(1.5)  # in place, as an optimizer step would
        with torch.inference_mode():
            updated = model(x)
        assert not torch.allclose(updated, first)
        torch.testing.assert_close(updated, _separate_forward(model, x), rtol=1e-5, atol=1e-6)
    fresh = Qwen3(dataclasses.replace(CFG, attention_bias=True))
    model.load_state_dict(fresh.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), fresh(x), rtol=1e-5, atol=1e-6)
    expected = _separate_forward(model.double().float(), x)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_no_grad_forwards_see_weights_refilled_behind_the_version_counter() -> None:
    """What FSDP2 does to unsharded parameters before each forward (refill the same storage in
    place, no ``_version`` bump), done here through ``.data``: an evaluation between training
    steps (``no_grad``) must see the new weights, so the training model's forwards never cache."""
    torch.manual_seed(7)
    model, other = Qwen3(CFG), Qwen3(CFG)
    x = torch.randint(0, CFG.vocab_size, (2, 5))
    with torch.no_grad():
        model(x)  # would have cached the stacks
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            version = p._version
            p.data.copy_(q)
            assert p._version == version  # the key's version did not move
        torch.testing.assert_close(model(x), other(x), rtol=1e-5, atol=1e-6)
    assert "_stacked" not in model.model.layers[0].mlp.__dict__


def test_weights_made_in_inference_mode_decode_without_a_cache() -> None:
    """Inference tensors keep no version counter, so they are projected one by one, correctly."""
    torch.manual_seed(5)
    model = Qwen3(CFG)
    x = torch.randint(0, CFG.vocab_size, (1, 4))
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        clone = Qwen3(CFG)
        clone.load_state_dict(model.state_dict())
        torch.testing.assert_close(clone(x), expected, rtol=1e-5, atol=1e-6)


def test_large_stacks_project_one_by_one_alike(monkeypatch) -> None:
    """Above the size threshold q/k/v and gate/up run as separate matmuls (no stacked copy, no
    concatenated outputs), with the same logits and gradients, with and without autograd."""
    import qwen3.projections

    torch.manual_seed(6)
    cfg = dataclasses.replace(CFG, attention_bias=True)
    stacked, separate = Qwen3(cfg), Qwen3(cfg)
    separate.load_state_dict(stacked.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 6))
    stacked(x).square().mean().backward()
    with torch.no_grad():
        expected = stacked(x)
    monkeypatch.setattr(qwen3.projections, "_STACK_MAX_NUMEL", 0)
    monkeypatch.setattr(qwen3.projections, "_INFERENCE_STACK_MAX_NUMEL", 0)
    separate(x).square().mean().backward()
    for (name, a), b in zip(stacked.named_parameters(), separate.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.inference_mode():
        torch.testing.assert_close(separate(x), expected, rtol=1e-5, atol=1e-6)
    assert "_stacked" not in separate.model.layers[0].mlp.__dict__  # no stacked copy was made
