"""int8 inference (qwen3.quantize) against float32 and bfloat16: decode speed, memory, val loss.

Per model shape (random weights, seeded): greedy decode tokens/s at batch 1 (a 16-token prompt
included) for fp32, bf16 and int8, in alternating rounds (medians), and the ratio to fp32; the
resident memory a child process gains by loading each (RSS after load and one generation,
minus its RSS before building the model). With --ckpt: the val loss of that checkpoint on its
run's validation split through the trainer's own evaluation (``trainer.evaluation.evaluate``),
float32 against int8, and the relative change.

    .venv/bin/python benchmarks/bench_quantize.py                       # small and qwen3-0.6b
    .venv/bin/python benchmarks/bench_quantize.py --ckpt checkpoints/mainjob/best
    .venv/bin/python benchmarks/bench_quantize.py --quick                # tiny, 16 tokens
"""

from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
import torch

from qwen3 import Qwen3, Sampling, generate
from qwen3.quantize import quantize_int8

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fp32", "bf16", "int8")


def build(shape: str, variant: str, seed: int) -> Qwen3:
    torch.manual_seed(seed)
    model = Qwen3(harness.config_for(shape)).eval()
    if variant == "bf16":
        return model.to(torch.bfloat16)
    if variant == "int8":
        return quantize_int8(model)
    return model


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def rss_child(shape: str, variant: str, seed: int) -> None:
    """(in a child process) print the RSS gained by building ``variant`` and decoding once."""
    gc.collect()
    before = rss_bytes()
    model = build(shape, variant, seed)
    gc.collect()
    generate(model, [[1, 2, 3, 4]], Sampling(4, temperature=0))
    print(json.dumps({"rss": rss_bytes() - before}))


def resident(shape: str, variant: str, seed: int, threads: int | None) -> int:
    args = [sys.executable, __file__, "--rss-child", shape, variant, "--seed", str(seed)]
    if threads:
        args += ["--threads", str(threads)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return int(json.loads(out.strip().splitlines()[-1])["rss"])


def decode_rows(shape: str, args: Any, n: int) -> list[list[Any]]:
    models = {v: build(shape, v, args.seed) for v in VARIANTS}
    prompt = [list(range(1, 17))]  # 16 tokens
    sampling = Sampling(n, temperature=0)
    first = {v: generate(m, prompt, sampling)[0] for v, m in models.items()}  # warm-up

    def timer(model: Qwen3) -> Any:
        def run() -> float:
            t0 = time.perf_counter()
            generate(model, prompt, sampling)
            return n / (time.perf_counter() - t0)

        return run

    rates = harness.alternate({v: timer(m) for v, m in models.items()}, args.rounds)
    del models
    gc.collect()
    fp32 = harness.median(rates["fp32"])
    same = {v: sum(a == b for a, b in zip(first[v], first["fp32"], strict=True)) for v in first}
    rows = []
    for v in VARIANTS:
        mb = resident(shape, v, args.seed, args.threads) / 2**20
        tok_s = harness.median(rates[v])
        rows.append([shape, v, f"{tok_s:.1f}", f"{tok_s / fp32:.2f}x", f"{mb:.0f}", same[v]])
    return rows


def val_loss_rows(ckpt: Path, args: Any) -> list[list[Any]]:
    """fp32 and int8 val loss of ``ckpt`` on its run's validation split (its config.yaml)."""
    import yaml

    from data import prepare_data
    from trainer.build import Precision
    from trainer.config import build_run_config
    from trainer.evaluation import evaluate

    cfg = build_run_config(yaml.safe_load((ckpt / "config.yaml").read_text()))
    data = prepare_data(cfg.data, cfg.data.vocab_size or cfg.model.vocab_size, progress=False)
    model = Qwen3.from_pretrained(ckpt).eval()
    lengths = data.tokenizer.token_byte_lengths()
    token_bytes = torch.tensor(lengths + [0] * (model.config.vocab_size - len(lengths)))
    t = cfg.trainer
    batches = args.eval_batches or t.eval_batches

    def loss(m: Qwen3) -> dict[str, float]:
        precision = Precision("fp32", "cpu", None)
        return evaluate(
            m, data.val, t.batch_size, t.seq_len, batches, precision, m.device, token_bytes
        )

    fp32 = loss(model)
    int8 = loss(quantize_int8(copy.deepcopy(model)))
    change = (int8["val_loss"] - fp32["val_loss"]) / fp32["val_loss"]
    return [
        [str(ckpt), "fp32", f"{fp32['val_loss']:.4f}", f"{fp32.get('val_bpb', 0):.4f}", ""],
        [
            str(ckpt),
            "int8",
            f"{int8['val_loss']:.4f}",
            f"{int8.get('val_bpb', 0):.4f}",
            f"{change:+.3%}",
        ],
    ]


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma list of shapes (small,qwen3-0.6b; quick: tiny)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 100 (quick: 16)")
    parser.add_argument("--ckpt", type=Path, help="a checkpoint whose val loss to compare")
    parser.add_argument("--eval-batches", type=int, default=None, help="default: the run's")
    parser.add_argument(
        "--rss-child", nargs=2, metavar=("SHAPE", "VARIANT"), help=argparse_hidden()
    )
    args = parser.parse_args()
    device = harness.setup("cpu", args.threads)
    if args.rss_child:
        rss_child(*args.rss_child, args.seed)
        return
    args.rounds = args.rounds or (1 if args.quick else 3)
    n = args.new_tokens or (16 if args.quick else 100)
    models = args.models or ("tiny" if args.quick else "small,qwen3-0.6b")
    print(f"machine: {harness.machine_line(device)}")
    print(f"decode: batch 1, greedy, {n} new tokens after a 16-token prompt, {args.rounds} rounds")
    rows = []
    for shape in models.split(","):
        rows += decode_rows(shape, args, n)
    harness.print_table(
        ["model", "weights", "tokens/s", "vs fp32", "resident MB", f"tokens = fp32's (of {n})"],
        rows,
    )
    if args.ckpt:
        print()
        harness.print_table(
            ["checkpoint", "weights", "val loss", "val bpb", "change"],
            val_loss_rows(args.ckpt, args),
        )


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
