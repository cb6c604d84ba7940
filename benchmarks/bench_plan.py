"""``train.py plan``'s memory estimate against the measured peak of a real training step on CPU.

Each row builds the run's config from ``train.py`` overrides, asks the plan for the peak bytes of
one device, then runs two real training steps (``trainer.step.train_step``: the fused loss,
activation checkpointing, Muon + AdamW, clipping) and measures the second, steady-state one:
the bytes alive before it (weights, optimizer state, batch) plus the highest tensor-memory
growth torch's profiler records during it (``profile_memory``: every CPU allocation and free,
with the running total). Prints estimate / measured per shape and checkpointing mode; then, with
``--figures``, the plans of the GPU runs named in benchmarks/results/plan.md.

    python benchmarks/bench_plan.py [--quick] [--threads N] [--figures]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, with no install
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import harness
import torch

from optim import build_optimizers
from qwen3 import Qwen3
from trainer.budget import planned_vocab_size
from trainer.build import resolve_precision
from trainer.config import RunConfig, build_run_config, to_container
from trainer.plan import Target, plan_run
from trainer.step import train_step

# (name, train.py overrides): three shapes (stacked and separate projections, a mixture of
# experts), each measured under every activation checkpointing mode.
SHAPES: list[tuple[str, list[str]]] = [
    ("small b4 s256", ["model=small", "trainer.batch_size=4", "trainer.seq_len=256"]),
    (
        "100m/4 layers b2 s1024",
        [
            "model.vocab_size=32768",
            "data.vocab_size=32768",
            "model.hidden_size=768",
            "model.intermediate_size=2048",
            "model.num_hidden_layers=4",
            "model.num_attention_heads=12",
            "model.num_key_value_heads=4",
            "model.head_dim=64",
            "trainer.batch_size=2",
            "trainer.seq_len=1024",
        ],
    ),
    ("tiny-moe b4 s256", ["model=tiny-moe", "trainer.batch_size=4", "trainer.seq_len=256"]),
]
QUICK = [("tiny b4 s128", ["model=tiny", "trainer.batch_size=4", "trainer.seq_len=128"])]
MODES = ("none", "selective", "full")
# The GPU runs whose plans results/plan.md records.
FIGURES: list[tuple[str, list[str], Target]] = [
    (
        "qwen3-0.6b, 1 GPU, seq 4096",
        ["model=qwen3-0.6b", "trainer.seq_len=4096", "trainer.batch_size=8"],
        Target(devices=1, device_memory=80 * 10**9),
    ),
    (
        "qwen3-8b, FSDP x 8, seq 4096, selective",
        [
            "model=qwen3-8b",
            "trainer.seq_len=4096",
            "trainer.batch_size=2",
            "trainer.fsdp=true",
            "trainer.activation_checkpointing=selective",
        ],
        Target(devices=8, device_memory=80 * 10**9),
    ),
    (
        "qwen3-30b-a3b, FSDP x 8, seq 4096, selective",
        [
            "model=qwen3-30b-a3b",
            "trainer.seq_len=4096",
            "trainer.batch_size=1",
            "trainer.fsdp=true",
            "trainer.activation_checkpointing=selective",
        ],
        Target(devices=8, device_memory=80 * 10**9),
    ),
]


def run_config(overrides: list[str]) -> RunConfig:
    """The RunConfig ``train.py OVERRIDES`` would train with."""
    from trainer.cli import compose_config

    return build_run_config(to_container(compose_config(overrides)))


def estimated_peak(cfg: RunConfig) -> int:
    """The plan's peak bytes of one CPU process (float32, no GPU chunk sizes)."""
    return plan_run(cfg, Target(devices=1, device_memory=2**40, on_gpu=False)).memory.peak


def _live_bytes(tensors: list[torch.Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measured_peak(cfg: RunConfig) -> int:
    """Peak tensor bytes of the second of two training steps of ``cfg`` on this CPU: what is
    alive before it plus the profiler's highest running total of allocations during it."""
    vocab = planned_vocab_size(cfg.model, cfg.data, cfg.init_from)
    t = cfg.trainer
    torch.manual_seed(0)
    model = Qwen3(dataclasses.replace(cfg.model, vocab_size=vocab))
    model.set_activation_checkpointing(t.activation_checkpointing)
    model.train()
    opts = build_optimizers(model, cfg.optim, t.max_steps)
    precision = resolve_precision("fp32", torch.device("cpu"))
    rows = t.batch_size * t.grad_accum
    x = torch.randint(0, vocab, (rows, t.seq_len))
    y = torch.randint(0, vocab, (rows, t.seq_len))

    def step() -> None:
        train_step(model, opts, x, y, t.grad_accum, precision, t.clip)

    step()  # the optimizer state now exists, as in every later step
    state = [v for o in opts.optimizers for s in o.state.values() for v in s.values()]
    alive = [*model.parameters(), *model.buffers(), x, y]
    alive += [v for v in state if isinstance(v, torch.Tensor)]
    before = _live_bytes(alive)
    return before + harness.cpu_tensor_growth(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny shape (a smoke run)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--figures", action="store_true", help="also print the GPU runs' plans")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(
        "| shape | activation checkpointing | estimate MiB | measured MiB | estimate / measured |"
    )
    print("|---|---|---|---|---|")
    for name, overrides in QUICK if args.quick else SHAPES:
        for mode in MODES:
            cfg = run_config(
                [*overrides, "trainer.device=cpu", f"trainer.activation_checkpointing={mode}"]
            )
            est, got = estimated_peak(cfg), measured_peak(cfg)
            print(
                f"| {name} | {mode} | {est / 2**20:,.0f} | {got / 2**20:,.0f} | {est / got:.2f} |",
                flush=True,
            )
    if args.figures:
        for name, overrides, target in FIGURES:
            plan = plan_run(run_config(overrides), target)
            print(
                f"\n### {name}: train.py plan {' '.join(overrides)} devices={target.devices} "
                f"device_memory={target.device_memory // 10**9}GB\n"
            )
            print(plan.text())


if __name__ == "__main__":
    main()
