"""The fused loss's forward + backward (``qwen3.loss.linear_cross_entropy``): its chunk step
eager at the device's default chunk rows (and others, ``--eager-rows``) against compiled
(``qwen3.loss.compile_chunk``) at several chunk sizes, alternating rounds, medians of CPU time
(steadier than wall time on a shared machine) and wall time, ratios to eager. Each compiled size is
compiled and checked equal to eager (loss and both gradients) before timing.

--amp: under bf16 autocast, plus the eager default with the head's weight gradient formed as on a
CPU without native bf16 (one float32 GEMM per chunk) instead of the bf16 GEMM per group of chunks
that such a CPU gets (``qwen3.loss._WeightGradient``).

    .venv/bin/python benchmarks/bench_loss.py --shapes tiny --rows 64,128,192 --eager-rows 256
    .venv/bin/python benchmarks/bench_loss.py --shapes tiny,small --rows 128 --amp
    .venv/bin/python benchmarks/bench_loss.py --quick
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import harness
import torch

import qwen3.loss
from qwen3.loss import ChunkFn, compile_chunk, default_chunk_rows, linear_cross_entropy

# Rows of the main job's batch (16 x 256) for every shape: the loss sees batch x seq rows.
ROWS = 16 * 256


@contextlib.contextmanager
def weight_grad_per_chunk(on: bool) -> Iterator[None]:
    """With ``on``, the head's weight gradient as a CPU without native bf16 forms it: no group
    of chunks fits in zero rows, so every chunk gets its own float32 GEMM."""
    saved = qwen3.loss._CPU_GROUP_ROWS
    qwen3.loss._CPU_GROUP_ROWS = 0 if on else saved
    try:
        yield
    finally:
        qwen3.loss._CPU_GROUP_ROWS = saved


def runner(
    h: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    rows: int,
    fn: ChunkFn | None,
    amp: bool,
    per_chunk: bool = False,
) -> Callable[[], tuple[float, float]]:
    """One forward + backward: (CPU seconds, wall seconds)."""

    def run() -> tuple[float, float]:
        h.grad = w.grad = None
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=amp), weight_grad_per_chunk(per_chunk):
            loss = linear_cross_entropy(h, w, y, chunk_rows=rows, chunk_fn=fn)
        loss.backward()
        return time.process_time() - c0, time.perf_counter() - t0

    return run


def main() -> None:
    parser = harness.common_args(__doc__ or "")
    parser.add_argument("--shapes", default="tiny,small", help="presets (hidden and vocabulary)")
    parser.add_argument("--rows", default="128,256,1024", help="compiled chunk rows to try")
    parser.add_argument("--eager-rows", default="", help="eager chunk rows to try besides")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    device = harness.setup("cpu", args.threads)
    rounds = args.rounds or (1 if args.quick else 7)
    shapes = ["tiny"] if args.quick else args.shapes.split(",")
    sizes = [64, 256] if args.quick else [int(r) for r in args.rows.split(",")]
    eager_sizes = [int(r) for r in args.eager_rows.split(",") if r]
    n = 256 if args.quick else ROWS
    print(harness.machine_line(device))
    print(f"precision: {'bf16 autocast' if args.amp else 'float32'}")
    table = []
    for shape in shapes:
        cfg = harness.config_for(shape)
        g = torch.Generator().manual_seed(args.seed)
        h = (torch.randn(n, cfg.hidden_size, generator=g)).requires_grad_()
        w = (torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g) * 0.02).requires_grad_()
        y = torch.randint(0, cfg.vocab_size, (n,), generator=g)
        eager_rows = default_chunk_rows(cfg.vocab_size, device)
        amp = args.amp
        contenders = {f"eager, {eager_rows} rows": runner(h, w, y, eager_rows, None, amp)}
        if amp:
            contenders[f"eager, {eager_rows} rows, float32 weight GEMM per chunk"] = runner(
                h, w, y, eager_rows, None, amp, per_chunk=True
            )
        for rows in eager_sizes:
            contenders[f"eager, {rows} rows"] = runner(h, w, y, rows, None, amp)
        # bf16 rounds differently in a compiled chunk step; float32 must agree to its precision.
        rtol, atol = (2e-2, 1e-3) if amp else (1e-4, 1e-6)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            want = linear_cross_entropy(h, w, y, chunk_rows=eager_rows)
        want_grads = torch.autograd.grad(want, (h, w))
        for rows in sizes:
            fn = compile_chunk()
            t0 = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                got = linear_cross_entropy(h, w, y, chunk_rows=rows, chunk_fn=fn)
            grads = torch.autograd.grad(got, (h, w))
            took = time.perf_counter() - t0
            torch.testing.assert_close(got, want, rtol=rtol, atol=max(atol, 1e-5))
            for a, b in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
            print(f"{shape}: compiled at {rows} rows in {took:.1f} s, equal to eager")
            contenders[f"compiled, {rows} rows"] = runner(h, w, y, rows, fn, amp)
        for run in contenders.values():  # warm-up
            run()
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
        for _ in range(rounds):
            for name, run in contenders.items():
                times[name].append(run())
        base_cpu = harness.median([c for c, _ in times[next(iter(times))]])
        base_wall = harness.median([t for _, t in times[next(iter(times))]])
        for name, ts in times.items():
            cpu = harness.median([c for c, _ in ts])
            wall = harness.median([t for _, t in ts])
            table.append(
                [
                    shape,
                    f"{n}x{cfg.hidden_size}, V {cfg.vocab_size}",
                    name,
                    f"{cpu * 1e3:.1f}",
                    f"{base_cpu / cpu:.2f}",
                    f"{wall * 1e3:.1f}",
                    f"{base_wall / wall:.2f}",
                ]
            )
    harness.print_table(
        ["shape", "rows x C", "chunk step", "CPU ms", "ratio (CPU)", "wall ms", "ratio (wall)"],
        table,
    )


if __name__ == "__main__":
    main()
