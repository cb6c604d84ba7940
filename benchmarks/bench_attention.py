"""Causal attention's forward + backward on CPU: ``qwen3.cpu_attention`` (two batched matmuls and
a softmax, hand-written backward) against ``F.scaled_dot_product_attention`` (torch's CPU flash
kernel), same q, k, v as the model lays them out (transposed (B, T, H, D) views), in bf16 and
float32, alternating rounds, median wall ms and the ratio SDPA / ours. Each shape is first
checked equal (float32 to 1e-4, bf16 to bf16's rounding).

Shapes: batch x positions x query heads / key-value heads x head_dim; the main job's
(tiny: 16 x 256, 4/2 x 32), small's heads (8/4 x 64) and longer sequences at the same tokens.

    .venv/bin/python benchmarks/bench_attention.py --threads 2 --rounds 7
    .venv/bin/python benchmarks/bench_attention.py --quick
"""

from __future__ import annotations

import time
from collections.abc import Callable

import harness
import torch
import torch.nn.functional as F

from qwen3.cpu_attention import causal_attention
from qwen3.device import cpu_has_native_bf16_matmul
from trainer.build import retain_freed_memory

# (batch, positions, query heads, key/value heads, head_dim)
SHAPES = [
    (16, 256, 4, 2, 32),
    (8, 512, 4, 2, 32),
    (4, 1024, 4, 2, 32),
    (16, 256, 8, 4, 64),
    (4, 1024, 8, 4, 64),
]
QUICK_SHAPES = [(2, 64, 4, 2, 32)]

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def runner(attend: Attend, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    """A closure timing one forward + backward of ``attend`` (wall ms), and its outputs once."""
    b, t, h, kv, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, t, n, d, generator=g).to(dtype).requires_grad_() for n in (h, kv, kv))
    grad = torch.randn(b, h, t, d, generator=g).to(dtype)

    def step() -> list[torch.Tensor]:
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return [out, *torch.autograd.grad(out, (q, k, v), grad)]

    def timed() -> float:
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3

    return timed, step


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    args = parser.parse_args()
    device = harness.setup("cpu", args.threads)
    retain_freed_memory()  # the trainer's CPU setting: fresh tensors cost no page faults
    rounds = args.rounds or (2 if args.quick else 7)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print(f"machine: {harness.machine_line(device)}")
    print(f"native bf16 matmuls: {cpu_has_native_bf16_matmul()}")
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
        for shape in shapes:
            contenders = {}
            outputs = []
            for name, attend in (("sdpa", _sdpa), ("ours", causal_attention)):
                timed, step = runner(attend, shape, dtype, args.seed)
                outputs.append(step())
                contenders[name] = timed
            for a, b in zip(*outputs, strict=True):
                torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
            for timed in contenders.values():  # warm-up
                timed()
            times = harness.alternate(contenders, rounds)
            sdpa_ms, ours_ms = harness.median(times["sdpa"]), harness.median(times["ours"])
            ratio = harness.median(
                [s / o for s, o in zip(times["sdpa"], times["ours"], strict=True)]
            )
            b, t, h, kv, d = shape
            rows.append(
                [
                    str(dtype).removeprefix("torch."),
                    f"{b} x {t}, {h}/{kv} x {d}",
                    f"{sdpa_ms:.2f}",
                    f"{ours_ms:.2f}",
                    f"{ratio:.2f}",
                ]
            )
            print(f"  {rows[-1]}", flush=True)
    print(
        f"\n{rounds} alternating rounds, median wall ms of one forward + backward; "
        "ratio = median over rounds of SDPA's time / ours in the same round"
    )
    harness.print_table(
        ["dtype", "batch x positions, heads x dim", "SDPA ms", "ours ms", "ratio"], rows
    )


if __name__ == "__main__":
    main()
