"""Packing: ``data.packing=stream`` against ``bos`` and ``bos`` + ``data.document_mask`` on a
corpus of many short documents.

    .venv/bin/python benchmarks/bench_packing.py            # 80 steps each (results/packing.md)
    .venv/bin/python benchmarks/bench_packing.py --quick    # a few steps, to check it runs

1. Corpus: the TinyStories sample (``../shared/corpora/tinystories-val-1k.txt``), regrouped into
   stories (a story starts at a paragraph opening "Once upon a time"; the file separates stories
   and paragraphs alike by blank lines) and written as JSON Lines, one story per document.
2. Quality at equal steps: one real ``train.py`` run per variant (same seed, model, steps and
   schedule). Each final checkpoint is then evaluated on the same two val sets of the same val
   stories: ``windows`` (evenly spread windows across story boundaries: what a stream run
   reports) and ``documents`` (every story alone, from its start: bos rows with the mask).
3. Cost: tokens/s of the three variants' training steps (the trainer's sampler, model and
   optimizers, built as ``train.py`` builds them; batches read from the sampler inside the
   timed region, as on a CPU, where the prefetch is not overlapped), alternating in one process
   for --rounds rounds of --round-steps steps each, medians, ratios to stream. Equal time: the
   ratio says how many steps each variant makes in stream's time.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import alternate, machine_line, median, print_table
from hydra import compose, initialize_config_dir

from data.packing import Packing
from qwen3 import Qwen3
from trainer.build import build_parts, prepare_run_data, resolve_device
from trainer.cli import CONF_DIR, register_resolvers
from trainer.config import (
    RunConfig,
    build_run_config,
    register_config_nodes,
    to_container,
)
from trainer.distributed import DistInfo
from trainer.evaluation import evaluate
from trainer.run_layout import step_dirs
from trainer.step import train_step

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpora" / "tinystories-val-1k.txt"
VARIANTS: dict[str, list[str]] = {
    "stream": ["data.packing=stream"],
    "bos": ["data.packing=bos"],
    "bos+mask": ["data.packing=bos", "data.document_mask=true"],
}


def write_stories(corpus: Path, out: Path) -> int:
    """The sample's stories as JSON Lines (one per line); returns how many."""
    stories: list[list[str]] = []
    for para in corpus.read_text().split("\n\n"):
        para = para.strip()
        if not para:
            continue
        if not stories or para.startswith("Once upon a time"):
            stories.append([])
        stories[-1].append(para)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for story in stories:
            f.write(json.dumps({"text": "\n\n".join(story)}) + "\n")
    return len(stories)


def overrides(args: argparse.Namespace, stories: Path, variant: str) -> list[str]:
    return [
        f"model={args.model}",
        "data=local",
        f"data.paths=[{stories}]",
        f"data.cache_dir={args.out_dir / 'cache'}",
        f"out_dir={args.out_dir / 'runs'}",
        f"run_name={variant}",
        f"trainer.max_steps={args.steps}",
        f"trainer.seq_len={args.seq_len}",
        f"trainer.batch_size={args.batch_size}",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.keep_last=1",
        "trainer.peak_flops=1e11",  # MFU is not the point: skip the matmul measurement
        f"optim.warmup_steps={max(1, args.steps // 10)}",
        "sample.max_new_tokens=0",
        "wandb.mode=disabled",
        f"seed={args.seed}",
        *([f"trainer.num_threads={args.threads}"] if args.threads else []),
        *VARIANTS[variant],
    ]


def run_config(items: list[str]) -> RunConfig:
    register_resolvers()
    register_config_nodes()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return build_run_config(to_container(compose("config", overrides=items)))


def train(args: argparse.Namespace, stories: Path, variant: str) -> tuple[Path, dict[str, Any]]:
    """One real training run (reused when finished); its final checkpoint and summary row."""
    run_dir = args.out_dir / "runs" / variant
    done = run_dir / "bench-done.json"
    if not done.exists():
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides(args, stories, variant)]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "val_bpb" in r][-1]
        summary = {"seconds": time.perf_counter() - t0, "own_val_bpb": last["val_bpb"]}
        done.write_text(json.dumps(summary))
    return step_dirs(run_dir)[-1], json.loads(done.read_text())


def val_bpb(args: argparse.Namespace, stories: Path, checkpoint: Path) -> dict[str, float]:
    """The checkpoint's val bpb on the windows and on the documents alone."""
    cfg = run_config(overrides(args, stories, "stream"))
    data = prepare_run_data(cfg, DistInfo())
    device, precision = resolve_device(cfg)
    model = Qwen3.from_pretrained(checkpoint, device=device, dtype=torch.float32)
    lengths = data.tokenizer.token_byte_lengths()
    table = torch.tensor(lengths + [0] * (model.config.vocab_size - len(lengths)))
    val = data.sources[0].val
    rows = max(1, len(val) // (args.seq_len + 1))  # the val stories about once
    batches = max(1, rows // args.batch_size)
    docs = Packing("bos", 128, document_mask=True, separator=data.tokenizer.eos_id)
    out = {}
    for name, packing in (("windows", None), ("documents", docs)):
        ev = evaluate(
            model, val, args.batch_size, args.seq_len, batches, precision, device, table, packing
        )
        out[name] = ev["val_bpb"]
    return out


def throughput(args: argparse.Namespace, stories: Path) -> dict[str, list[float]]:
    """tokens/s of each variant's training steps, alternating rounds (see the module doc)."""
    runners = {}
    for variant in VARIANTS:
        cfg = run_config(overrides(args, stories, variant))
        device, precision = resolve_device(cfg)
        parts = build_parts(cfg, DistInfo(), device, precision)
        state = {"step": 0}

        def run(parts: Any = parts, cfg: RunConfig = cfg, state: dict[str, int] = state) -> float:
            t = cfg.trainer
            t0 = time.perf_counter()
            for _ in range(args.round_steps):
                batch = parts.sampler.sample(state["step"])
                res = train_step(
                    parts.forward,
                    parts.optimizers,
                    batch.x,
                    batch.y,
                    t.grad_accum,
                    parts.precision,
                    t.clip,
                    document_ids=batch.document_ids,
                )
                state["step"] += 1
            res.read()  # waits for the device
            tokens = args.round_steps * t.batch_size * t.grad_accum * t.seq_len
            return tokens / (time.perf_counter() - t0)

        run()  # warm-up (allocations, first-call costs), not timed
        runners[variant] = run
    return alternate(runners, args.rounds)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--out-dir", type=Path, default=None, help="default .cache/bench_packing")
    p.add_argument("--quick", action="store_true", help="a few steps: check that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.round_steps, args.seq_len = 4, 1, 1, 64
    if args.out_dir is None:  # finished runs are reused from here
        args.out_dir = ROOT / ".cache" / ("bench_packing-quick" if args.quick else "bench_packing")
    if not args.corpus.exists():
        sys.exit(f"{args.corpus} is missing: pass --corpus with a text file of blank-line stories")
    stories = args.out_dir / "stories.jsonl"
    count = write_stories(args.corpus, stories)
    print(f"{count} stories from {args.corpus.name}; {machine_line(torch.device('cpu'))}")

    rows = []
    for variant in VARIANTS:
        checkpoint, summary = train(args, stories, variant)
        bpb = val_bpb(args, stories, checkpoint)
        rows.append(
            [
                variant,
                args.steps,
                f"{bpb['windows']:.4f}",
                f"{bpb['documents']:.4f}",
                f"{summary['own_val_bpb']:.4f}",
                f"{summary['seconds']:.0f}",
            ]
        )
    print(
        f"\nval bits per byte after {args.steps} steps (seq_len {args.seq_len}, batch "
        f"{args.batch_size}, model {args.model}):\n"
    )
    heads = ["packing", "steps", "val bpb, windows", "val bpb, documents", "run's own", "run s"]
    print_table(heads, rows)

    speeds = throughput(args, stories)
    base = median(speeds["stream"])
    print(f"\ntraining tokens/s, {args.rounds} alternating rounds of {args.round_steps} steps:\n")
    table = []
    for variant, values in speeds.items():
        ratios = [v / s for v, s in zip(values, speeds["stream"], strict=True)]
        table.append(
            [
                variant,
                f"{median(values):.0f}",
                f"{median(values) / base:.3f}",
                f"{min(ratios):.3f}-{max(ratios):.3f}",
            ]
        )
    print_table(["packing", "tokens/s (median)", "x stream", "per-round ratio range"], table)
    if any(not math.isfinite(float(r[2])) for r in rows):
        sys.exit("a run ended with a non-finite val bpb")


if __name__ == "__main__":
    main()
