"""qwen3.cpu_attention: causal attention by two batched matmuls and a softmax, with a hand-written
backward, equal to SDPA's; and when the model takes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_qwen3_perf_paths import CFG  # 2 layers, 4 query / 2 key-value heads of 8

import qwen3.cpu_attention
import qwen3.layers
from qwen3 import Qwen3
from qwen3.cpu_attention import MAX_POSITIONS, causal_attention, use_cpu_attention


def _qkv(heads: int, kv_heads: int, t: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, heads, t, 8), (2, kv_heads, t, 8), (2, kv_heads, t, 8))
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _sdpa(q, k, v):  # type: ignore[no-untyped-def]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_gradients_pass_gradcheck_in_float64(heads: int, kv_heads: int) -> None:
    q, k, v = _qkv(heads, kv_heads, 5, torch.float64)
    assert torch.autograd.gradcheck(causal_attention, (q, k, v))


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_equals_sdpa_in_value_and_gradients(heads: int, kv_heads: int) -> None:
    q, k, v = _qkv(heads, kv_heads, 37, torch.float32, seed=1)
    grad = torch.randn(2, heads, 37, 8)
    got = causal_attention(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want = _sdpa(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_bf16_is_as_close_to_float32_as_sdpa_in_bf16() -> None:
    q, k, v = _qkv(4, 2, 64, torch.float32, seed=2)
    grad = torch.randn(2, 4, 64, 8)
    exact = [_sdpa(q, k, v), *torch.autograd.grad(_sdpa(q, k, v), (q, k, v), grad)]
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    for attend in (causal_attention, _sdpa):
        out = attend(*low)
        got = [out, *torch.autograd.grad(out, low, grad.bfloat16())]
        for a, b in zip(got, exact, strict=True):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2)


def test_taken_for_bf16_training_up_to_max_positions_on_a_native_bf16_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qwen3.cpu_attention, "_native_bf16", lambda: True)
    q, k, v = _qkv(4, 2, MAX_POSITIONS, torch.bfloat16)
    assert use_cpu_attention(q, k, v)
    with torch.no_grad():  # evaluation and generation keep SDPA
        assert not use_cpu_attention(q, k, v)
    long = _qkv(4, 2, MAX_POSITIONS + 1, torch.bfloat16)
    assert not use_cpu_attention(*long)
    assert not use_cpu_attention(*_qkv(4, 2, 16, torch.float32))  # float32 keeps flash
    monkeypatch.setattr(qwen3.cpu_attention, "_native_bf16", lambda: False)
    assert not use_cpu_attention(q, k, v)  # emulated bf16 matmuls would be slower


def _train_grads(model: Qwen3, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, targets=x)
    loss.backward()
    return [loss.detach(), *(p.grad for p in model.parameters())]


def test_model_trains_the_same_through_either_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 autocast training step through qwen3.cpu_attention and through SDPA (both forced):
    the same loss and gradients within bf16's rounding; selective checkpointing turns the
    hand-written path off, as it does the MLP's."""
    torch.manual_seed(3)
    model = Qwen3(CFG).train()
    x = torch.randint(0, CFG.vocab_size, (2, 24))
    runs = {}
    for kernel in ("cpu", "sdpa"):
        monkeypatch.setattr(qwen3.layers, "use_cpu_attention", lambda *_, k=kernel: k == "cpu")
        runs[kernel] = _train_grads(model, x)
    for a, b in zip(runs["cpu"], runs["sdpa"], strict=True):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)
    model.set_activation_checkpointing("selective")
    assert not any(layer.self_attn.hand_backward for layer in model.model.layers)
    model.set_activation_checkpointing("full")
    assert all(layer.self_attn.hand_backward for layer in model.model.layers)
