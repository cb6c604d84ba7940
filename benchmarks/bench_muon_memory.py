"""Peak memory of Muon's optimizer step on one MoE layer's experts (qwen3-30b-a3b's shapes,
3-D ``(E, 2F, C)`` gate|up and ``(E, C, F)`` down stacks, as the trainer groups them), with each
shape's batch worked whole and in chunks of ``optim.batched_muon.CHUNK_BYTES``, on CPU.

Memory is counted tensor by tensor, as tracemalloc counts Python objects: under a
``TorchDispatchMode`` every storage an op of the step creates is tracked until it is freed, and
the peak of their sum, taken after every op, is the step's transient memory (parameters,
gradients and momentum buffers exist before the step and are not in it). The same step with
``found_inf`` given, as the trainer steps; one Newton-Schulz iteration by default (the peak does
not depend on the count: each iteration's tensors replace the last's) to keep the CPU time down.

    .venv/bin/python benchmarks/bench_muon_memory.py --experts 64
    .venv/bin/python benchmarks/bench_muon_memory.py --quick
"""

from __future__ import annotations

import time
from typing import Any

import harness
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from optim import batched_muon
from optim.batched_muon import BatchedMuon
from qwen3 import Qwen3Config


class TensorPeak(TorchDispatchMode):
    """The most bytes held at once by storages that ops run under it created."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an input's storage: nothing new was allocated.
        inputs = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in inputs:
                    continue
                if key not in self.live or self.live[key][0].expired():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def experts(experts: int, hidden: int, inter: int, seed: int) -> list[torch.Tensor]:
    """One MoE layer's gate|up and down stacks with gradients and momentum, as after a step."""
    g = torch.Generator().manual_seed(seed)
    stacks: list[torch.Tensor] = []
    for shape in ((experts, 2 * inter, hidden), (experts, hidden, inter)):
        p = torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.02)
        p.grad = torch.randn(*shape, generator=g)
        stacks.append(p)
    return stacks


def measure(stacks: list[torch.Tensor], chunk: int | None, ns_steps: int) -> tuple[int, float]:
    """Peak transient bytes and seconds of one step (``chunk``: CHUNK_BYTES for it, None: the
    module's own)."""
    gate_up, down = stacks
    opt = BatchedMuon(
        [{"params": [gate_up], "split_rows": 2}, {"params": [down]}],
        lr=0.02,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        ns_steps=ns_steps,
        adjust_lr_fn="match_rms_adamw",
    )
    for p in stacks:  # momentum from an earlier step: not part of this step's transients
        opt.state[p]["momentum_buffer"] = p.grad.clone() if p.grad is not None else None
    opt.found_inf = torch.zeros(())
    saved = getattr(batched_muon, "CHUNK_BYTES", None)
    if chunk is not None:
        batched_muon.CHUNK_BYTES = chunk  # type: ignore[attr-defined]
    try:
        mode = TensorPeak()
        t0 = time.process_time()
        with mode:
            opt.step()
        return mode.peak, time.process_time() - t0
    finally:
        if saved is not None:
            batched_muon.CHUNK_BYTES = saved


def main() -> None:
    parser = harness.common_args(__doc__ or "")
    parser.add_argument("--experts", type=int, default=64, help="experts in the layer")
    parser.add_argument("--ns-steps", type=int, default=1, help="Newton-Schulz iterations")
    args = parser.parse_args()
    harness.setup("cpu", args.threads)
    cfg = Qwen3Config.from_preset("qwen3-30b-a3b")
    hidden, inter, e = cfg.hidden_size, cfg.moe_intermediate_size, args.experts
    default = getattr(batched_muon, "CHUNK_BYTES", None)
    if args.quick:  # a small layer, the chunk cut to keep several chunks per batch
        hidden, inter, e = 256, 96, 8
        default = None if default is None else 4 * 96 * 256 * 4
    stacks = experts(e, hidden, inter, args.seed)
    group = sum(p.numel() * p.element_size() for p in stacks)
    mib = 2**20
    print(harness.machine_line(torch.device("cpu")))
    print(f"experts {e}, gate|up {tuple(stacks[0].shape)}, down {tuple(stacks[1].shape)}")
    print(f"parameters {group / mib:.0f} MiB (float32), CHUNK_BYTES {default}")
    runs: list[tuple[str, int | None]] = [("whole batches", 2**62)]
    if default is not None:
        runs.append((f"chunks of {default / mib:g} MiB", default))
    else:  # optim from before chunks: its own step only
        runs = [("this optim (no CHUNK_BYTES)", None)]
    rows = []
    for name, chunk in runs:
        peak, took = measure(stacks, chunk, args.ns_steps)
        rows.append([name, f"{peak / mib:.0f}", f"{peak / group:.2f}", f"{took:.1f}"])
    harness.print_table(["step", "peak transient MiB", "/ parameters", "CPU s"], rows)


if __name__ == "__main__":
    main()
