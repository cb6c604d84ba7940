"""Peak memory of the same short multi-process job under DDP and under FSDP (``trainer.fsdp``).

Two CPU processes (gloo) under ``torchrun`` run ``train.py``: a few AdamW steps of a
~210M-parameter Qwen3, an evaluation and a save. Each configuration runs in a fresh wrapper process whose
``RUSAGE_CHILDREN`` high-water mark is the peak resident set size of the largest process of the
job (the kernel keeps the largest waited-for descendant's). The token cache is built first
(``train.py prepare``), so no run pays for tokenization. Reported: each side's peak, their
ratio (target: FSDP at most 0.6 of DDP), the wall time of each job, and how long its save took
and how long training waited for it (the trainer's "saved ... in X s (training waited Y s)" line),
for a synchronous and an asynchronous (``trainer.async_save``) FSDP save.

Each side runs as the trainer sets it up: under FSDP on CPU that includes glibc's ``malloc`` mmap
threshold fixed at 4 MiB (``trainer.build.fix_malloc_mmap_threshold``), which DDP leaves at
glibc's default; the row "DDP at FSDP's threshold" runs DDP with the same setting, to show what
the setting alone is worth.

    .venv/bin/python benchmarks/bench_fsdp_memory.py            # ~210M parameters
    .venv/bin/python benchmarks/bench_fsdp_memory.py --quick    # a ~20M model, for CI
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.build import MALLOC_MMAP_THRESHOLD  # noqa: E402

# (hidden, layers, heads, kv heads, intermediate): with the 8,192-token Shakespeare vocabulary
# these are 210M and 20M parameters (tied embeddings).
SHAPES = {"full": (1024, 16, 16, 8, 3072), "quick": (256, 8, 4, 2, 768)}

# Runs a command and prints the largest descendant's peak RSS in KiB (Linux: ru_maxrss) and the
# CPU seconds (user + system) of all its descendants.
_WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]);"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN);"
    "print(u.ru_maxrss, u.ru_utime + u.ru_stime); sys.exit(r.returncode)"
)


def _overrides(shape: tuple[int, int, int, int, int], out: Path, steps: int) -> list[str]:
    hidden, layers, heads, kv, inter = shape
    return [
        "model=tiny",
        f"model.hidden_size={hidden}",
        f"model.num_hidden_layers={layers}",
        f"model.num_attention_heads={heads}",
        f"model.num_key_value_heads={kv}",
        f"model.head_dim={hidden // heads}",
        f"model.intermediate_size={inter}",
        f"data.cache_dir={out / 'cache'}",
        f"out_dir={out / 'runs'}",
        "trainer.device=cpu",
        "trainer.batch_size=2",
        "trainer.seq_len=256",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        "trainer.eval_batches=1",
        f"trainer.save_every={steps}",
        "sample.max_new_tokens=0",
        # AdamW: its two moments per weight are the state sharding divides; Muon's bf16
        # Newton-Schulz takes minutes per step at this size on a CPU.
        "optim=adamw",
        "optim.warmup_steps=1",
        "wandb.mode=disabled",
    ]


_SAVED = re.compile(r"saved step-\d+ in ([\d.]+) s \(training waited ([\d.]+) s\)")


def run_job(
    overrides: list[str],
    fsdp: bool,
    name: str,
    async_save: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[float, float, float, tuple[float, float]]:
    """(peak RSS of the largest process in MiB, wall seconds, CPU seconds of all processes,
    (save seconds, seconds training waited for it)) of one 2-process job."""
    cmd = [
        sys.executable,
        "-c",
        _WRAPPER,
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train.py"),
        *overrides,
        f"run_name={name}",
        f"trainer.fsdp={str(fsdp).lower()}",
        f"trainer.async_save={str(async_save).lower()}",
    ]
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"{name} failed:\n{res.stderr[-3000:]}")
    saved = _SAVED.findall(res.stdout + res.stderr)
    if not saved:
        sys.exit(f"{name} printed no save line:\n{res.stdout[-3000:]}")
    save = (float(saved[-1][0]), float(saved[-1][1]))
    maxrss_kib, cpu_seconds = res.stdout.strip().splitlines()[-1].split()
    return int(maxrss_kib) / 1024, seconds, float(cpu_seconds), save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~20M model (for CI)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="accepted for the test harness")
    parser.add_argument(
        "--activation-checkpointing",
        choices=("none", "selective", "full"),
        default="none",
        help="trainer.activation_checkpointing on both sides (activations are never sharded)",
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="run both sides with glibc's MALLOC_MMAP_THRESHOLD_ set: allocations this large are "
        "mmapped and returned on free, so RSS follows live memory (at a CPU cost: the CPU column)",
    )
    args = parser.parse_args()
    env = None
    if args.malloc_mmap_threshold is not None:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        overrides = _overrides(SHAPES["quick" if args.quick else "full"], out, args.steps)
        overrides.append(f"trainer.activation_checkpointing={args.activation_checkpointing}")
        prep = subprocess.run(
            [sys.executable, str(REPO / "train.py"), "prepare", *overrides],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if prep.returncode != 0:
            sys.exit(f"prepare failed:\n{prep.stderr[-3000:]}")
        rows = {"DDP": run_job(overrides, fsdp=False, name="ddp", env=env)}
        if env is None:
            fixed = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD)}
            rows["DDP at FSDP's threshold"] = run_job(
                overrides, fsdp=False, name="ddp-threshold", env=fixed
            )
        rows |= {
            "FSDP": run_job(overrides, fsdp=True, name="fsdp", env=env),
            "FSDP, async save": run_job(
                overrides, fsdp=True, name="fsdp-async", async_save=True, env=env
            ),
        }
    shape = "quick" if args.quick else "full"
    print(
        f"2 CPU processes (gloo), shape {shape} {SHAPES[shape]}, {args.steps} steps + eval + save, "
        f"activation checkpointing {args.activation_checkpointing}, MALLOC_MMAP_THRESHOLD_ "
        f"{args.malloc_mmap_threshold if args.malloc_mmap_threshold is not None else 'unset'}"
        " (unset: the trainer's choice, 4 MiB under FSDP)"
    )
    print(
        "| run | peak RSS, largest process (MiB) | ratio to DDP | wall (s) | CPU (s) | save (s) "
        "| training waited (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    ddp_mib = rows["DDP"][0]
    for name, (mib, wall, cpu, (save, waited)) in rows.items():
        print(
            f"| {name} | {mib:.0f} | {mib / ddp_mib:.2f} | {wall:.1f} | {cpu:.1f} | {save:.1f} "
            f"| {waited:.1f} |"
        )


if __name__ == "__main__":
    main()
