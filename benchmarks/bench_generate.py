"""Generation: our KV-cache decoding against transformers' generate, same weights, greedy.

The transformers side loads what our ``save_pretrained`` wrote, through AutoModelForCausalLM.
For every shape of the grid (GQA ratios 1, 2, 4, 5; head_dim 32 to 128; widths from tiny's 128
to small's 512) and batch size: the greedy tokens of both sides must be identical (the run stops
otherwise), then prefill time (prompt in, first token out), decode tokens/s (the remaining
tokens) and the ratio ours / transformers, taken within each round and then the median over
rounds. Rounds alternate the sides; one thread by default (``--threads``).

    .venv/bin/python benchmarks/bench_generate.py                 # the grid, batch 1 and 8
    .venv/bin/python benchmarks/bench_generate.py --shapes tiny,gqa5-160 --batches 1
    .venv/bin/python benchmarks/bench_generate.py --quick         # smoke run (tiny, few tokens)
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import harness
import torch

from qwen3 import Qwen3, Qwen3Config, Sampling, generate


def _shape(width: int, layers: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, Any]:
    return dict(
        hidden_size=width,
        intermediate_size=3 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
    )


# The shapes of the issue: GQA ratios 1, 2, 4, 5; head_dim 32 to 128; widths 128 to 512.
# Arguments: width, layers, query heads, KV heads, head_dim (vocabulary 8192 throughout).
GRID: dict[str, dict[str, Any]] = {
    "tiny": _shape(128, 3, 4, 2, 32),  # the tiny preset
    "mha-128": _shape(128, 3, 4, 4, 32),
    "gqa5-160": _shape(160, 4, 5, 1, 32),  # the shape the issue found short of 2x
    "gqa4-256": _shape(256, 4, 8, 2, 32),
    "mid": _shape(256, 4, 4, 2, 64),  # harness.MID
    "gqa4-d128-384": _shape(384, 4, 4, 1, 128),
    "mha-d128-512": _shape(512, 4, 4, 4, 128),
    "small": _shape(512, 8, 8, 4, 64),  # the small preset
}


def config_for(name: str) -> Qwen3Config:
    if name in GRID:
        return Qwen3Config(**{"vocab_size": 8192, "max_position_embeddings": 2048, **GRID[name]})
    return harness.config_for(name)


def _ours(model: Qwen3, prompts: torch.Tensor, n: int) -> list[list[int]]:
    return generate(model, prompts.tolist(), Sampling(n, temperature=0))


def _transformers(model: torch.nn.Module, prompts: torch.Tensor, n: int) -> list[list[int]]:
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, prompts.shape[1] :].tolist()


Generator = Callable[[torch.Tensor, int], list[list[int]]]


def _timer(
    gen: Generator, prompts: torch.Tensor, n: int, device: torch.device, cpu_time: bool
) -> Callable[[], float]:
    # CPU time of this process: on a busy machine it leaves out the time the scheduler gave to
    # others (one thread per side, so it is the work done; wall-clock otherwise).
    clock = time.process_time if cpu_time else time.perf_counter

    def run() -> float:
        harness.sync(device)
        t0 = clock()
        gen(prompts, n)
        harness.sync(device)
        return clock() - t0

    return run


def _measure(
    sides: dict[str, Generator],
    prompts: torch.Tensor,
    n: int,
    rounds: int,
    device: torch.device,
    cpu_time: bool,
) -> dict[str, tuple[float, float, float]]:
    """Per side: (prefill ms, decode tokens/s, ratio to transformers), medians over rounds."""
    timers = {}
    for name, gen in sides.items():
        timers[f"{name} 1"] = _timer(gen, prompts, 1, device, cpu_time)
        timers[f"{name} n"] = _timer(gen, prompts, n, device, cpu_time)
    runs = harness.alternate(timers, rounds)
    b = prompts.shape[0]
    # Per round: decode tokens/s of each side, from that round's full and prefill-only runs.
    decode = {
        name: [
            b * (n - 1) / max(full - pre, 1e-9)
            for full, pre in zip(runs[f"{name} n"], runs[f"{name} 1"], strict=True)
        ]
        for name in sides
    }
    ref = decode["transformers"]
    out = {}
    for name in sides:
        # The ratio pairs the sides within each round (measured back to back, so a slow phase
        # of a shared machine slows both), then takes the median over rounds.
        ratio = harness.median([o / t for o, t in zip(decode[name], ref, strict=True)])
        prefill = 1000 * harness.median(runs[f"{name} 1"])
        out[name] = (prefill, harness.median(decode[name]), ratio)
    return out


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", default=None, help=f"comma list of {', '.join(GRID)} (default all), or a preset"
    )
    parser.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 200 (quick: 16)")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time by process CPU time (a busy machine)"
    )
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 5)
    n = args.new_tokens or (16 if args.quick else 200)
    shapes = (args.shapes or ("tiny" if args.quick else ",".join(GRID))).split(",")
    batches = [int(s) for s in args.batches.split(",")]
    device = harness.setup(args.device, args.threads or 1)
    print(f"machine: {harness.machine_line(device)}")
    rows = []
    mismatches = []
    for shape in shapes:
        cfg = config_for(shape)
        torch.manual_seed(args.seed)
        ours = Qwen3(cfg).to(device).eval()
        with tempfile.TemporaryDirectory() as tmp:
            theirs = harness.transformers_twin_from_disk(ours, Path(tmp))
        sides: dict[str, Generator] = {
            "ours": partial(_ours, ours),
            "transformers": partial(_transformers, theirs),
        }
        for b in batches:
            prompts = torch.randint(1, cfg.vocab_size, (b, args.prompt_len), device=device)
            outputs = {name: gen(prompts, n) for name, gen in sides.items()}  # also warms up
            same = outputs["ours"] == outputs["transformers"]
            print(f"{shape} batch {b}: greedy tokens identical to transformers: {same}", flush=True)
            if not same:
                mismatches.append(f"{shape} batch {b}")
            got = _measure(sides, prompts, n, args.rounds, device, args.cpu_time)
            (pre_o, tok_o, ratio), (pre_t, tok_t, _) = got["ours"], got["transformers"]
            rows.append(
                [
                    shape,
                    cfg.num_attention_heads // cfg.num_key_value_heads,
                    cfg.head_dim,
                    cfg.hidden_size,
                    cfg.num_hidden_layers,
                    b,
                    f"{tok_o:,.0f}",
                    f"{tok_t:,.0f}",
                    f"{ratio:.2f}x",
                    f"{pre_o:.1f} / {pre_t:.1f}",
                ]
            )
    print(
        f"\nprompt {args.prompt_len} tokens, {n} new tokens, greedy, vocab 8192; medians over "
        f"{args.rounds} alternating rounds{', CPU time' if args.cpu_time else ''}; decode = (tokens after the first) / (time after "
        "prefill); ratio = median over rounds of ours / transformers within the round"
    )
    harness.print_table(
        [
            "shape",
            "GQA",
            "head_dim",
            "width",
            "layers",
            "batch",
            "ours tok/s",
            "transformers tok/s",
            "ratio",
            "prefill ms ours / theirs",
        ],
        rows,
    )
    for b in batches:
        ratios = [float(r[8].rstrip("x")) for r in rows if r[5] == b]
        print(f"minimum ratio at batch {b}: {min(ratios):.2f}x")
    if mismatches:
        sys.exit(f"greedy tokens differ from transformers: {', '.join(mismatches)}")


if __name__ == "__main__":
    main()
