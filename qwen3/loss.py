"""Cross-entropy of the LM head fused with the head's matmul, one chunk of rows at a time.

The plain path (``F.cross_entropy(lm_head(h).float(), y)``) materialises the (N, V) float32
logits, their log-softmax and, in backward, a zero-filled (N, V) gradient plus the softmax
gradient: on CPU that was about a third of a tiny model's training step. Here each chunk of
rows computes its logits, its loss and, when gradients are needed, its gradients with respect
to the hidden states and the head weight right away (softmax minus one-hot), so no (N, V)
tensor ever exists and the softmax is computed once. The backward pass only scales the stored
gradients by the incoming one. torch has no fused linear + cross-entropy op, hence this file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from qwen3.device import compute_dtype, cpu_has_native_bf16_matmul

# The float32 logits of one chunk on CPU: cache-sized (4 MiB, twice a 2 MiB L2; smaller and
# larger chunks were slower, eager or with the chunk step compiled, which fuses the passes
# over a chunk but does not make tall chunks pay: benchmarks/results/design-measurements.md).
_CPU_CHUNK_BYTES = 2**22
# On an accelerator the chunk matmuls must be tall enough to run at their peak: up to 2 GiB of
# float32 logits (about 3.3k rows at Qwen's 151,936-word vocabulary), at most 1/32 of the memory.
_ACCELERATOR_CHUNK_BYTES = 2**31


def default_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk of the fused loss on ``device`` (:func:`chunk_rows_for`)."""
    memory = None
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    return chunk_rows_for(vocab_size, device.type, memory)


def chunk_rows_for(vocab_size: int, device_type: str, memory_bytes: int | None = None) -> int:
    """Rows per chunk so that a chunk's (rows, V) float32 logits stay cache-sized on a CPU and
    large on an accelerator (``memory_bytes``: its memory, which bounds the budget), where the
    rows are a multiple of 256 (tensor-core tiles) and at least 1024."""
    if device_type == "cpu":
        return max(64, min(16384, _CPU_CHUNK_BYTES // (4 * vocab_size)))
    budget = _ACCELERATOR_CHUNK_BYTES
    if memory_bytes is not None:
        budget = min(budget, memory_bytes // 32)
    return max(1024, min(32768, budget // (4 * vocab_size)) // 256 * 256)


def _chunk_nll_and_probs(
    h: torch.Tensor,  # (n, C) compute dtype
    w: torch.Tensor,  # (V, C) compute dtype
    tgt: torch.Tensor,  # (n, 1) int64, ignored rows already pointing at 0
    valid: torch.Tensor,  # (n,) bool
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed cross-entropy of one chunk's valid rows, and with ``need_grad`` softmax minus
    one-hot in float32 (n, V): d(sum nll)/d(logits). The memory-bound part of the loss (several
    passes over (n, V)), which torch.compile fuses; the matmuls around it stay cuBLAS/oneDNN."""
    logp = torch.log_softmax((h @ w.t()).float(), dim=-1)  # (n, V)
    nll = (-logp.gather(1, tgt).squeeze(1) * valid).sum()
    if not need_grad:
        return nll, None
    probs = logp.exp_()  # in place: eager keeps one (n, V) buffer, compile fuses either way
    return nll, probs.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=probs.dtype))


ChunkFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def compile_chunk(**options: Any) -> ChunkFn:
    """The loss's chunk step through ``torch.compile`` (one graph; compiled on first use, for
    the full chunk size and once more for a shorter last chunk). ``options`` go to
    ``torch.compile``."""
    options = {"fullgraph": True, "dynamic": False, **options}
    compiled: ChunkFn = torch.compile(_chunk_nll_and_probs, **options)
    return compiled


@functools.cache
def _addmm_accumulates_in_fp32(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` adds a bf16
    product into a float32 ``acc`` in place on ``device``: CUDA in recent torch (the
    ``addmm.dtype_out`` kernel, which older releases lack or restrict to inputs of one dtype).
    Probed once per device with a tiny product, so torch 2.11 takes the fallback cleanly."""
    if device.type != "cuda" or not hasattr(torch.ops.aten.addmm, "dtype_out"):
        return False
    a = torch.ones(2, 3, device=device, dtype=torch.bfloat16)
    acc = torch.ones(2, 2, device=device)
    try:
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool((acc == 4).all())


# A CPU with native bf16 matmuls forms the head's weight gradient over groups of up to this many
# rows (several chunks) in one bf16 GEMM: the loss 1.2-1.25x faster than with a float32 GEMM per
# chunk at vocabularies up to 32k (benchmarks/results/design-measurements.md). The group's bf16
# probabilities are held meanwhile, at most _CPU_GROUP_BYTES; where fewer than _MIN_GROUP_ROWS
# fit (Qwen's 151,936 words) grouping gained nothing and per-chunk float32 GEMMs stay.
_CPU_GROUP_ROWS = 1024
_MIN_GROUP_ROWS = 512
_CPU_GROUP_BYTES = 2**26


class _WeightGradient:
    """d(loss)/d(head weight) in float32: the sum over chunks of ``g.T @ hs`` (g: softmax minus
    one-hot, hs: the chunk's hidden states times their row scale), without a (V, C) temporary
    per chunk. Three ways, by device and compute dtype:

    - CUDA, bf16, where ``addmm(..., out_dtype=torch.float32)`` exists: bf16 operands, float32
      accumulation in the GEMM's epilogue, per chunk.
    - CPU with native bf16 matmuls (:func:`qwen3.device.cpu_has_native_bf16_matmul`), bf16: the
      bf16 ``g`` and ``hs`` of several chunks gathered, then one bf16 GEMM into a (V, C) bf16
      buffer added into the float32 sum. torch has no CPU ``out_dtype`` kernel; a bf16 GEMM per
      chunk lost to float32 on larger heads (the (V, C) buffer's traffic per 128 rows), a tall
      one does not. Each group's product is rounded to bf16 once, as autocast's own linear backward
      rounds its weight gradient.
    - Elsewhere a float32 GEMM per chunk into the sum (``addmm_``): on CPUs without native bf16
      it is faster than bf16 (emulated there), and fp16 has no room for these operands (h/N and
      the small probabilities fall below its normal range long before GradScaler's factor reaches
      them; that factor scales the result in backward)."""

    def __init__(self, weight: torch.Tensor, cdt: torch.dtype, rows: int, chunk_rows: int) -> None:
        self.grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        self.cdt = cdt
        self.out_dtype_gemm = (
            cdt == torch.bfloat16
            and not torch.compiler.is_compiling()
            and _addmm_accumulates_in_fp32(weight.device)
        )
        vocab, hidden = weight.shape
        group = min(rows, _CPU_GROUP_ROWS, _CPU_GROUP_BYTES // (2 * vocab))
        self.group_rows = 0
        if (
            weight.device.type == "cpu"
            and cdt == torch.bfloat16
            and group >= min(rows, _MIN_GROUP_ROWS)
            and group > chunk_rows
            and cpu_has_native_bf16_matmul()
        ):
            self.group_rows = group
            self.g = torch.empty(group, vocab, dtype=cdt)
            self.hs = torch.empty(group, hidden, dtype=cdt)
            self.product = torch.empty(weight.shape, dtype=cdt)
            self.filled = 0

    def add(self, probs: torch.Tensor, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Add one chunk: ``probs`` (n, V) float32 softmax minus one-hot, ``h`` (n, C) its hidden
        states, ``scale`` (n, 1) their row scale. Returns ``probs`` in the compute dtype (for the
        hidden states' gradient), valid until the next call."""
        n = probs.shape[0]
        if not self.group_rows:
            g = probs.to(self.cdt)
            if self.out_dtype_gemm:
                hs = (h.float() * scale).to(self.cdt)
                torch.addmm(self.grad, g.t(), hs, out_dtype=torch.float32, out=self.grad)
            else:
                self.grad.addmm_(probs.t(), h.float() * scale)
            return g
        if self.filled + n > self.group_rows:
            self._flush()
        rows = slice(self.filled, self.filled + n)
        self.g[rows].copy_(probs)
        torch.mul(h, scale, out=self.hs[rows])
        self.filled += n
        return self.g[rows]

    def _flush(self) -> None:
        if self.filled:
            rows = slice(0, self.filled)
            torch.mm(self.g[rows].t(), self.hs[rows], out=self.product)
            self.grad.add_(self.product)
            self.filled = 0

    def result(self) -> torch.Tensor:
        """The float32 sum over every chunk added."""
        if self.group_rows:
            self._flush()
        return self.grad


def _loss_and_grads(
    hidden: torch.Tensor,  # (N, C)
    weight: torch.Tensor,  # (V, C)
    targets: torch.Tensor,  # (N,) int64
    ignore_index: int,
    chunk_rows: int,
    need_h: bool,
    need_w: bool,
    chunk_fn: ChunkFn = _chunk_nll_and_probs,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss, and d(loss)/d(hidden), d(loss)/d(weight) where asked for, chunk by chunk."""
    cdt = compute_dtype(hidden)
    # Autocast would change dtypes between the steps below; every cast here is explicit.
    with torch.autocast(hidden.device.type, enabled=False):
        # Detached: gradients are formed here by hand (and a compiled step then sees the same
        # plain tensors in training and evaluation).
        h_all, w = hidden.detach().to(cdt), weight.detach().to(cdt)
        valid = targets != ignore_index  # (N,)
        count = valid.sum()
        # Mean over real targets; all-ignored gives 0/0 = nan like F.cross_entropy, zero grads.
        row_scale = valid.to(torch.float32) / count.clamp(min=1)  # (N,)
        safe_targets = targets.masked_fill(~valid, 0)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = _WeightGradient(weight, cdt, hidden.shape[0], chunk_rows) if need_w else None
        # A compiled step serves training; a forward without gradients is not worth a compile.
        step = chunk_fn if need_h or need_w else _chunk_nll_and_probs
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, tgt = h_all[rows], safe_targets[rows, None]  # (n, C), (n, 1)
            nll, probs = step(h, w, tgt, valid[rows], need_h or need_w)
            total += nll
            if probs is None:
                continue
            # d(mean nll)/d(logits) = (softmax - onehot) * row_scale; the scale is applied on the
            # narrow side of each matmul.
            scale = row_scale[rows, None]  # (n, 1)
            g = grad_w.add(probs, h, scale) if grad_w is not None else probs.to(cdt)
            if grad_h is not None:
                grad_h[rows] = ((g @ w).float() * scale).to(hidden.dtype)
        dw = grad_w.result().to(weight.dtype) if grad_w is not None else None
    return total / count, grad_h, dw


@torch.no_grad()
def linear_cross_entropy_stats(
    hidden: torch.Tensor,  # (..., C)
    weight: torch.Tensor,  # (V, C)
    targets: torch.Tensor,  # (...,) int64
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per position, float32 ``(..., 2)``: the cross-entropy of ``hidden @ weight.T`` against
    ``targets`` and 1.0 where the argmax is the target (0.0 otherwise); for evaluation. An
    ignored target (negative, e.g. -100) gets 0 and 0: the caller counts only the others.

    The same chunks as :func:`linear_cross_entropy` (logits in the autocast dtype, then float32),
    so no (N, V) tensor exists: at Qwen's vocabulary 8 x 4096 positions would be 20 GB."""
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], hidden.device)
    cdt = compute_dtype(hidden)
    out = torch.empty(hidden.shape[0], 2, dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(cdt)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            valid = targets[rows] >= 0  # (n,) an ignored (-100) target counts 0 and 0
            tgt = targets[rows, None].clamp(min=0)  # (n, 1)
            logp = torch.log_softmax((hidden[rows].to(cdt) @ w.t()).float(), dim=-1)  # (n, V)
            out[rows, 0] = -logp.gather(1, tgt).squeeze(1) * valid
            out[rows, 1] = (logp.argmax(-1) == targets[rows]) & valid
    return out.view(*shape, 2)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        chunk_rows: int,
        chunk_fn: ChunkFn,
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[:2]
        loss, ctx.grad_h, ctx.grad_w = _loss_and_grads(
            hidden, weight, targets, ignore_index, chunk_rows, need_h, need_w, chunk_fn
        )
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_out.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,  # (..., C)
    weight: torch.Tensor,  # (V, C)
    targets: torch.Tensor,  # (...,) int64
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    chunk_fn: ChunkFn | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, equal in value and gradient
    to ``F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten(),
    ignore_index=ignore_index)`` but without materialising the full logits or their gradient.
    ``chunk_rows`` defaults to :func:`default_chunk_rows`; ``chunk_fn`` replaces the chunk
    step by its compiled form (:func:`compile_chunk`)."""
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], hidden.device)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: must be >= 1.")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"targets hold {targets.shape[0]} positions but the hidden states {hidden.shape[0]}; "
            "pass targets with the same (batch, seq) shape as input_ids."
        )
    loss: torch.Tensor = _LinearCrossEntropy.apply(  # type: ignore[no-untyped-call]
        hidden, weight, targets, ignore_index, chunk_rows, chunk_fn or _chunk_nll_and_probs
    )
    return loss
