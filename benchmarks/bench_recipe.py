"""Training-step cost of candidate main-job recipes against the current default, side by side.

The five-minute model (issue 19) is chosen by val bpb at a measured cost. On a shared machine
wall time swings severalfold, so each recipe's step is timed against the default's in the same
invocation: alternating rounds (Muon + AdamW, real optimizer step, random tokens), the ratio
of seconds per step taken within each round, then the median over rounds. A recipe is a name
and comma-separated overrides of the tiny preset's fields and of ``batch_size``/``seq_len``:

    .venv/bin/python benchmarks/bench_recipe.py --threads 2 \\
        v4096:vocab_size=4096 wide:vocab_size=4096,hidden_size=192,head_dim=48

The estimate of a recipe's quiet-machine time scales the default main job's measured seconds,
less its fixed part (imports, tokenizer and cache, samples), by the step-cost ratio and the
step count: ``fixed + (total - fixed) * ratio * steps / default_steps``.
"""

from __future__ import annotations

from collections.abc import Callable

import harness
import torch

from qwen3 import Qwen3, Qwen3Config

DEFAULT = {"batch_size": 16, "seq_len": 256}


def parse_recipe(text: str) -> tuple[str, dict[str, int]]:
    """``name:key=value,...`` -> (name, overrides); values are integers."""
    name, _, body = text.partition(":")
    overrides = {k: int(v) for k, v in (kv.split("=") for kv in body.split(",") if kv)}
    return name, overrides


def stepper(overrides: dict[str, int], seed: int) -> tuple[Callable[[], float], int]:
    """One Muon + AdamW training step of the recipe, and its tokens per step."""
    shape = {**DEFAULT, **overrides}
    batch_size, seq_len = shape.pop("batch_size"), shape.pop("seq_len")
    cfg = Qwen3Config.from_preset("tiny", **shape)
    torch.manual_seed(seed)
    model = Qwen3(cfg).train()
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1))
    return harness.train_stepper(model, harness.ours_loss, batch, "muon"), batch_size * seq_len


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help="name:key=value,... (tiny preset overrides)")
    parser.add_argument("--steps", type=int, default=5, help="steps per recipe per round")
    parser.add_argument("--total", type=float, default=195.0, help="default job's quiet seconds")
    parser.add_argument("--fixed", type=float, default=25.0, help="its step-independent part")
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 7)
    harness.setup("cpu", args.threads)
    recipes = dict([("default", {}), *(parse_recipe(r) for r in args.recipes)])
    runs = {}
    for name, overrides in recipes.items():
        step, tokens = stepper(overrides, args.seed)
        for _ in range(2):  # warm-up: allocator, first-call dispatch
            step()
        # harness.timed returns tokens/s; seconds per step is what the estimate needs.
        rate = harness.timed(step, args.steps, tokens)
        runs[name] = lambda rate=rate, tokens=tokens: tokens / rate()
    results = harness.alternate(runs, args.rounds)
    ref = results["default"]
    rows = []
    for name, secs in results.items():
        ratio = harness.median([s / r for s, r in zip(secs, ref, strict=True)])
        rows.append([name, f"{harness.median(secs) * 1000:.0f}", f"{ratio:.3f}"])
    print(harness.machine_line(torch.device("cpu")), f"{args.rounds} rounds x {args.steps} steps")
    harness.print_table(["recipe", "ms/step (median)", "step cost / default"], rows)
    print(f"estimate: {args.fixed:g} + {args.total - args.fixed:g} x ratio x steps / 560 seconds")


if __name__ == "__main__":
    main()
