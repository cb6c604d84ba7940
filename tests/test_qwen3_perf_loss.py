"""The fused LM-head cross-entropy equals F.cross_entropy in value and gradient."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import qwen3.loss
from qwen3 import Qwen3, Qwen3Config
from qwen3.loss import chunk_rows_for, compile_chunk, linear_cross_entropy


def _reference(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ w.t()).float().flatten(0, -2), y.flatten(), ignore_index=-100)


def _value_and_grads(fn, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, y)
    (loss * 3.0).backward()  # a non-unit upstream gradient must be honoured too
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_value_and_gradients_match_cross_entropy(chunk_rows: int) -> None:
    torch.manual_seed(0)
    h, w = torch.randn(2, 24, 16), torch.randn(97, 16)
    y = torch.randint(0, 97, (2, 24))
    y[0, :5] = -100  # ignored positions count neither in the mean nor in the gradient
    ref = _value_and_grads(_reference, h, w, y)
    got = _value_and_grads(
        lambda a, b, c: linear_cross_entropy(a, b, c, chunk_rows=chunk_rows), h, w, y
    )
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_ignored_rows_get_zero_gradient_and_all_ignored_is_nan() -> None:
    torch.manual_seed(1)
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    y = torch.tensor([3, -100, 5, -100, 0, 10])
    linear_cross_entropy(h, w, y, chunk_rows=4).backward()
    assert torch.equal(h.grad[1], torch.zeros(8)) and torch.equal(h.grad[3], torch.zeros(8))
    all_ignored = linear_cross_entropy(h, w, torch.full((6,), -100))
    assert torch.isnan(all_ignored)  # as F.cross_entropy: 0 / 0
    assert torch.isnan(F.cross_entropy(h @ w.t(), torch.full((6,), -100)))


def test_without_grad_computes_only_the_loss() -> None:
    torch.manual_seed(2)
    h, w, y = torch.randn(10, 8), torch.randn(13, 8), torch.randint(0, 13, (10,))
    with torch.no_grad():
        got = linear_cross_entropy(h, w, y, chunk_rows=3)
    torch.testing.assert_close(got, _reference(h, w, y))


def test_bf16_autocast_is_close_to_float32() -> None:
    torch.manual_seed(3)
    h, w = torch.randn(32, 16), torch.randn(50, 16) * 0.3
    y = torch.randint(0, 50, (32,))
    ref = _value_and_grads(_reference, h, w, y)
    with torch.autocast("cpu", torch.bfloat16):
        got = _value_and_grads(linear_cross_entropy, h, w, y)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=5e-2, atol=2e-2)


def test_model_loss_matches_logits_cross_entropy_in_value_and_gradient() -> None:
    cfg = Qwen3Config(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    torch.manual_seed(4)
    model = Qwen3(cfg)
    x, y = torch.randint(0, 101, (3, 20)), torch.randint(0, 101, (3, 20))
    y[1, 3:9] = -100
    loss = model(x, targets=y)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(x)
    ref = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_mismatched_targets_raise_a_clear_error() -> None:
    with pytest.raises(ValueError, match="targets hold 5 positions"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(9, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_rows=0"):
        linear_cross_entropy(
            torch.randn(4, 8), torch.randn(9, 8), torch.zeros(4, dtype=torch.long), chunk_rows=0
        )


def test_frozen_head_gets_no_gradient_and_hidden_gradient_still_matches() -> None:
    torch.manual_seed(5)
    h, w, y = torch.randn(9, 8), torch.randn(13, 8), torch.randint(0, 13, (9,))
    h_ref, h_got = h.clone().requires_grad_(), h.clone().requires_grad_()
    _reference(h_ref, w, y).backward()
    linear_cross_entropy(h_got, w, y, chunk_rows=4).backward()
    torch.testing.assert_close(h_got.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    assert w.grad is None


def test_chunk_rows_on_an_accelerator_are_thousands_and_tile_aligned() -> None:
    gib = 2**30
    rows = chunk_rows_for(151936, "cuda", 80 * gib)  # qwen3-0.6b's vocabulary on an H100
    assert 2048 <= rows <= 4096 and rows % 256 == 0
    smaller = chunk_rows_for(151936, "cuda", 16 * gib)  # a smaller GPU: smaller chunks, tall still
    assert 1024 <= smaller < rows
    assert chunk_rows_for(8192, "cuda", 80 * gib) == 32768  # ceiling for small vocabularies
    assert chunk_rows_for(8192, "cpu") == 128  # the CPU's cache-sized chunks


class _Allocations(TorchDispatchMode):
    """Counts the ops whose output is shaped like the head weight (V, C) and is new memory (not
    a view of, or written into, one of their inputs)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [*args, *(kwargs or {}).values()]
        given = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.shape == self.shape:
                self.count += t.untyped_storage().data_ptr() not in given
        return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_weight_gradient_accumulates_without_a_temporary_per_chunk(precision: str) -> None:
    """The (V, C) tensors the loss allocates do not grow with the number of chunks: each chunk's
    product is added into the float32 accumulator in place (no ``grad_w += g.T @ h``)."""
    torch.manual_seed(6)
    h, w, y = torch.randn(64, 16), torch.randn(97, 16), torch.randint(0, 97, (64,))
    counts = []
    for chunk_rows in (32, 8):  # 2 and 8 chunks
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        ctx = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else nullcontext()
        with _Allocations(w.shape) as seen, ctx:
            linear_cross_entropy(hh, ww, y, chunk_rows=chunk_rows)
        counts.append(seen.count)
    assert counts[0] == counts[1], counts


class _WeightGemms(TorchDispatchMode):
    """Counts the matrix products whose output is shaped like the head weight (V, C)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        products = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
        if func.overloadpacket in products and out.shape == self.shape:
            self.count += 1
        return out


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_weight_gradient_per_chunk_or_grouped_matches_float32(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool
) -> None:
    """Under bf16 autocast a CPU with native bf16 matmuls forms the head's weight gradient in one
    bf16 GEMM per group of chunks, another CPU in one float32 GEMM per chunk: both equal the
    float32 loss within bf16's tolerance (ignored rows, a short last chunk and a short last group
    included)."""
    monkeypatch.setattr(qwen3.loss, "cpu_has_native_bf16_matmul", lambda: native_bf16)
    monkeypatch.setattr(qwen3.loss, "_MIN_GROUP_ROWS", 48)
    monkeypatch.setattr(qwen3.loss, "_CPU_GROUP_ROWS", 48)  # 2 chunks of 24 per group
    torch.manual_seed(8)
    h, w = torch.randn(200, 16), torch.randn(97, 16) * 0.3
    y = torch.randint(0, 97, (200,))
    y[:5] = -100
    ref = _value_and_grads(_reference, h, w, y)
    with _WeightGemms(w.shape) as gemms, torch.autocast("cpu", torch.bfloat16):
        got = _value_and_grads(
            lambda a, b, c: linear_cross_entropy(a, b, c, chunk_rows=24), h, w, y
        )
    assert gemms.count == (5 if native_bf16 else 9)  # 200 rows: 9 chunks, in 5 groups
    assert got[2].dtype == torch.float32
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=5e-2, atol=2e-2)


@pytest.mark.slow  # compiles the chunk step (~20 s on 2 CPU cores)
def test_compiled_chunk_step_equals_the_unchunked_loss() -> None:
    torch.manual_seed(7)
    h, w = torch.randn(2, 24, 16), torch.randn(97, 16)
    y = torch.randint(0, 97, (2, 24))
    y[1, :6] = -100
    ref = _value_and_grads(_reference, h, w, y)
    step = compile_chunk()
    got = _value_and_grads(
        lambda a, b, c: linear_cross_entropy(a, b, c, chunk_rows=20, chunk_fn=step), h, w, y
    )  # 48 rows: two full chunks and a shorter last one
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
