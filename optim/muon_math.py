"""Muon's arithmetic shared by one process (optim.batched_muon) and FSDP (optim.sharded_muon):
the quintic Newton-Schulz orthogonalisation, batched, in the dtype that is fast where it runs, and
the shape-dependent learning rate.

torch.optim.Muon's own (``_zeropower_via_newtonschulz``) is private, takes one 2-D matrix and
always iterates in bf16. Here it takes an ``(N, rows, cols)`` batch (each matrix normalised by its
own Frobenius norm) and a dtype: in bf16 it is torch's iteration bit for bit
(``tests/test_batched_muon.py`` pins that, and fails loudly if torch changes its own).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

from qwen3.device import cpu_has_native_bf16_matmul


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 (torch.optim.Muon's choice), except on a CPU that does not multiply bf16 in hardware:
    there a bf16 matmul is emulated, far slower than float32 (benchmarks/results/muon.md), and
    float32 is the more exact of the two. Where it does (AMX, AVX-512 BF16) bf16 runs 2-4x
    float32's iteration."""
    if device.type == "cpu" and not cpu_has_native_bf16_matmul():
        return torch.float32
    return torch.bfloat16


def newton_schulz(
    stacked: Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """The quintic iteration on an ``(N, rows, cols)`` batch, in ``dtype``; returns ``dtype``."""
    if stacked.ndim != 3:
        raise ValueError(f"expected an (N, rows, cols) batch, got shape {tuple(stacked.shape)}")
    a, b, c = coefficients
    x = stacked.to(dtype)
    # A tall batch is iterated as its transposed view, as torch transposes a tall matrix (a
    # contiguous transpose would round differently in bf16).
    tall = x.shape[1] > x.shape[2]
    if tall:
        x = x.mT
    norms = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
    x = x / norms.clamp_(min=eps)  # not in place: .to(dtype) may return the caller's tensor
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.mT if tall else x


def matrix_shape(shape: torch.Size | tuple[int, ...], split_rows: int = 1) -> tuple[int, int]:
    """(rows, cols) of each matrix Muon orthogonalises on its own in a parameter of ``shape``:
    its trailing two dimensions, the rows cut into ``split_rows`` equal blocks (a fused gate|up
    weight holds two matrices, gate and up)."""
    rows, cols = shape[-2:]
    if rows % split_rows:
        raise ValueError(f"{rows} rows do not split into {split_rows} equal matrices")
    return rows // split_rows, cols


def as_matrices(t: Tensor, split_rows: int = 1) -> Tensor:
    """``t`` as the ``(N, rows, cols)`` batch of the matrices Muon orthogonalises on its own
    (:func:`matrix_shape`): one for a 2-D weight, E for a 3-D stack of E experts' (E x
    ``split_rows`` for a fused gate|up). A view when ``t`` is contiguous."""
    return t.reshape(-1, *matrix_shape(t.shape, split_rows))


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size | tuple[int, ...]) -> float:
    """torch.optim.Muon's shape-dependent learning rate (``adjust_lr_fn``), rewritten because
    torch keeps it private: "original" scales by sqrt(max(1, rows/cols)), "match_rms_adamw" by
    0.2 * sqrt(max(rows, cols)), of the trailing two dimensions (a stack of matrices, such as an
    MoE layer's ``(E, out, in)`` experts, is scaled as each of its matrices)."""
    rows, cols = shape[-2:]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def matrix_batches(
    params: list[Tensor], key: Callable[[Tensor], Hashable] | None = None, split_rows: int = 1
) -> list[list[int]]:
    """Indices of ``params`` grouped into batches orthogonalised together: same matrix shape
    (:func:`matrix_shape` with ``split_rows``), device and dtype (and ``key``, if given), in order
    of first appearance (the same on every rank). A parameter of more than two dimensions is a
    stack of matrices, one batch member per slice of its leading dimensions."""
    batches: dict[Hashable, list[int]] = {}
    for i, p in enumerate(params):
        if p.ndim < 2:
            raise ValueError(
                f"Muon orthogonalises matrices; got a tensor of shape {tuple(p.shape)}"
            )
        shape = matrix_shape(p.shape, split_rows)
        k = (shape, p.device, p.dtype, key(p) if key is not None else None)
        batches.setdefault(k, []).append(i)
    return list(batches.values())
