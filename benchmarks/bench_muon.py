"""Muon's optimizer step: ours (optim.batched_muon.BatchedMuon, same-shaped matrices in one
batched Newton-Schulz, in the device's dtype: float32 on CPU) and the same with torch's bf16
iteration, against torch.optim.Muon (one matrix at a time, bf16), on the Muon share of tiny and
tiny-moe, at 1 and 2 threads, alternating rounds, medians. All hold the same parameters and
gradients; the bf16 one is checked equal to torch's bit for bit first, and ours' largest
difference from torch's is printed.

    .venv/bin/python benchmarks/bench_muon.py
    .venv/bin/python benchmarks/bench_muon.py --quick
"""

from __future__ import annotations

import time
from collections.abc import Callable

import harness
import torch
from torch.optim import Muon, Optimizer

from optim import OptimConfig
from optim.batched_muon import BatchedMuon
from optim.muon_math import as_matrices, default_dtype
from optim.param_groups import split_parameters, split_rows
from qwen3 import Qwen3, Qwen3Config


def matrices(preset: str, device: torch.device, seed: int) -> list[torch.Tensor]:
    """The Muon share of ``preset`` as the 2-D matrices torch.optim.Muon takes (each expert's gate,
    up and down cut out of the 3-D expert stacks), each with a random gradient."""
    torch.manual_seed(seed)
    model = Qwen3(Qwen3Config.from_preset(preset)).to(device)
    mats = [
        m.clone().requires_grad_()
        for name, p in split_parameters(model).matrices
        for m in as_matrices(p.detach(), split_rows(name))
    ]
    for p in mats:
        p.grad = torch.randn_like(p)
    return mats


def build(cls: type[Muon], mats: list[torch.Tensor], **extra: object) -> Optimizer:
    cfg = OptimConfig()
    return cls(
        [p.detach().clone().requires_grad_() for p in mats],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        ns_steps=cfg.ns_steps,
        adjust_lr_fn=cfg.adjust_lr_fn,
        **extra,
    )


def stepper(opt: Optimizer, grads: list[torch.Tensor], device: torch.device) -> Callable[[], float]:
    params = [p for g in opt.param_groups for p in g["params"]]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()

    def run() -> float:
        t0 = time.perf_counter()
        opt.step()
        harness.sync(device)
        return time.perf_counter() - t0

    return run


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    args = parser.parse_args()
    device = harness.setup(args.device)
    rounds = args.rounds or (5 if args.quick else 30)
    print(f"machine: {harness.machine_line(device)}")
    print(f"Muon step, default OptimConfig; {rounds} alternating rounds, medians")
    rows = []
    for preset in ("tiny", "tiny-moe"):
        mats = matrices(preset, device, args.seed)
        grads = [p.grad for p in mats if p.grad is not None]
        ref, bf16 = build(Muon, mats), build(BatchedMuon, mats, ns_dtype=torch.bfloat16)
        ours = build(BatchedMuon, mats)
        steps = {
            "torch.optim.Muon": stepper(ref, grads, device),
            "batched bf16": stepper(bf16, grads, device),
            "ours": stepper(ours, grads, device),
        }
        for step in steps.values():
            step()
        params = [o.param_groups[0]["params"] for o in (ref, bf16, ours)]
        same = all(torch.equal(a, b) for a, b in zip(params[0], params[1], strict=True))
        diff = max((a - b).abs().max().item() for a, b in zip(params[0], params[2], strict=True))
        shapes = len({tuple(p.shape) for p in mats})
        print(
            f"{preset}: {len(mats)} matrices of {shapes} shapes; batched bf16 equal to torch's bit "
            f"for bit: {same}; ours (Newton-Schulz in {default_dtype(device)}) differs by at most "
            f"{diff:.2e}"
        )
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs = harness.alternate(steps, rounds)
            t_ref, t_bf16, t_ours = (harness.median(runs[k]) for k in steps)
            rows.append(
                [
                    preset,
                    threads,
                    f"{1000 * t_ref:.2f}",
                    f"{1000 * t_bf16:.2f}",
                    f"{1000 * t_ours:.2f}",
                    f"{t_ref / t_ours:.2f}",
                ]
            )
    harness.print_table(
        [
            "model",
            "threads",
            "torch.optim.Muon ms",
            "batched bf16 ms",
            "ours ms",
            "speedup (torch / ours)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
