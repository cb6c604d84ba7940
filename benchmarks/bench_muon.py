"""Muon's optimizer step: ours (optim.batched_muon.BatchedMuon, same-shaped matrices in one
batched Newton-Schulz, in the device's dtype: float32 on CPU) and the same with torch's bf16
iteration, against torch.optim.Muon (one matrix at a time, bf16), on the Muon share of tiny and
tiny-moe, at 1 and 2 threads, alternating rounds, medians. All hold the same parameters and
gradients; the bf16 one is checked equal to torch's bit for bit first, and ours' largest
difference from torch's is printed.

    .venv/bin/python benchmarks/bench_muon.py
    .venv/bin/python benchmarks/bench_muon.py --quick

``--ddp``: the DDP split instead. Two gloo processes (one thread each) hold the same matrices
and gradients, as DDP leaves them after its all-reduce, and step them replicated (every rank
runs the whole Newton-Schulz, as before) and split (``BatchedMuon(process_group=...)``: each rank
its share of every shape, then one all-gather per shape), alternating rounds; a round's time is
the slower rank's. The split's weights are checked equal to the replicated ones first.

    .venv/bin/python benchmarks/bench_muon.py --ddp --models tiny,mid,small
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import harness
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.optim import Muon, Optimizer

from optim import OptimConfig
from optim.batched_muon import BatchedMuon
from optim.muon_math import as_matrices, default_dtype
from optim.param_groups import split_parameters, split_rows
from qwen3 import Qwen3


def matrices(preset: str, device: torch.device, seed: int) -> list[torch.Tensor]:
    """The Muon share of ``preset`` as the 2-D matrices torch.optim.Muon takes (each expert's gate,
    up and down cut out of the 3-D expert stacks), each with a random gradient."""
    torch.manual_seed(seed)
    model = Qwen3(harness.config_for(preset)).to(device)
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


def _slowest_rank(step: Callable[[], float]) -> Callable[[], float]:
    """``step`` started together on every rank, timed as its slowest rank."""

    def run() -> float:
        dist.barrier()
        took = torch.tensor([step()])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        return float(took)

    return run


def _ddp_worker(rank: int, port: int, models: list[str], rounds: int, seed: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)  # one core per rank
    device = torch.device("cpu")
    rows = []
    for preset in models:
        mats = matrices(preset, device, seed)
        grads = [p.grad for p in mats if p.grad is not None]
        replicated = build(BatchedMuon, mats)
        split = build(BatchedMuon, mats, process_group=dist.group.WORLD)

        steps = {
            "replicated": _slowest_rank(stepper(replicated, grads, device)),
            "split": _slowest_rank(stepper(split, grads, device)),
        }
        for step in steps.values():
            step()
        pairs = zip(
            replicated.param_groups[0]["params"], split.param_groups[0]["params"], strict=True
        )
        diff = max((a - b).abs().max().item() for a, b in pairs)
        runs = harness.alternate(steps, rounds)
        t_rep, t_split = (harness.median(runs[k]) for k in steps)
        shapes = len({tuple(p.shape) for p in mats})
        params = sum(p.numel() for p in mats) / 1e6
        if rank == 0:  # as it comes: the larger shapes take a while
            print(
                f"{preset}: replicated {1000 * t_rep:.1f} ms, split {1000 * t_split:.1f} ms",
                flush=True,
            )
        rows.append(
            [
                preset,
                f"{len(mats)} in {shapes}",
                f"{params:.1f}",
                f"{1000 * t_rep:.1f}",
                f"{1000 * t_split:.1f}",
                f"{t_rep / t_split:.2f}",
                f"{diff:.1e}",
            ]
        )
    if rank == 0:
        print(f"machine: {harness.machine_line(device)}; 2 gloo processes, 1 thread each")
        print(f"Muon step under DDP, default OptimConfig; {rounds} alternating rounds, medians")
        harness.print_table(
            [
                "model",
                "matrices (shapes)",
                "Muon params (M)",
                "replicated ms",
                "split ms",
                "speedup",
                "largest weight difference",
            ],
            rows,
        )
    dist.destroy_process_group()


def ddp_main(models: list[str], rounds: int, seed: int) -> None:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, models, rounds, seed), nprocs=2)


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument("--ddp", action="store_true", help="time the DDP split (2 processes)")
    parser.add_argument("--models", default="tiny,mid", help="--ddp: presets, mid or 100m")
    args = parser.parse_args()
    if args.ddp:
        ddp_main(args.models.split(","), args.rounds or (3 if args.quick else 15), args.seed)
        return
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
