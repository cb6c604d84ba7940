"""Generation: our KV-cache decoding against transformers' generate, same weights, greedy.

The transformers side loads what our ``save_pretrained`` wrote, through AutoModelForCausalLM.
Per batch size: prefill time (prompt in, first token out), decode tokens/s (the remaining
tokens), the ratio ours / transformers, and our own path without a cache (full recompute).

    .venv/bin/python benchmarks/bench_generate.py            # tiny, batch 1 and 8
    .venv/bin/python benchmarks/bench_generate.py --quick
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness
import torch

from qwen3 import Qwen3, Sampling, generate


def _ours(model: Qwen3, prompts: torch.Tensor, n: int) -> list[list[int]]:
    return generate(model, prompts.tolist(), Sampling(n, temperature=0))


def _ours_no_cache(model: Qwen3, prompts: torch.Tensor, n: int) -> list[list[int]]:
    ids = prompts
    with torch.inference_mode():
        for _ in range(n):
            nxt = model(ids)[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompts.shape[1] :].tolist()


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
    gen: Generator, prompts: torch.Tensor, n: int, device: torch.device
) -> Callable[[], float]:
    def run() -> float:
        harness.sync(device)
        t0 = time.perf_counter()
        gen(prompts, n)
        harness.sync(device)
        return time.perf_counter() - t0

    return run


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", help="tiny | mid | small")
    parser.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=None)
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 5)
    n = args.new_tokens or (32 if args.quick else 256)
    device = harness.setup(args.device, args.threads)
    cfg = harness.config_for(args.shape)
    torch.manual_seed(args.seed)
    ours = Qwen3(cfg).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs = harness.transformers_twin_from_disk(ours, Path(tmp))
    print(f"machine: {harness.machine_line(device)}")
    sides: dict[str, Generator] = {
        "ours (KV cache)": lambda p, k: _ours(ours, p, k),
        "transformers generate": lambda p, k: _transformers(theirs, p, k),
        "ours (no cache)": lambda p, k: _ours_no_cache(ours, p, k),
    }
    rows = []
    for b in (int(s) for s in args.batches.split(",")):
        prompts = torch.randint(1, cfg.vocab_size, (b, args.prompt_len), device=device)
        outputs = {name: gen(prompts, n) for name, gen in sides.items()}  # also warms up
        same = outputs["ours (KV cache)"] == outputs["transformers generate"]
        print(f"batch {b}: greedy tokens identical to transformers: {same}")
        timers = {}
        for name, gen in sides.items():
            timers[f"{name} 1"] = _timer(gen, prompts, 1, device)
            timers[f"{name} n"] = _timer(gen, prompts, n, device)
        runs = harness.alternate(timers, args.rounds)
        # Per round: decode tokens/s of each side, from that round's full and prefill-only runs.
        decode = {
            name: [
                b * (n - 1) / (full - pre)
                for full, pre in zip(runs[f"{name} n"], runs[f"{name} 1"], strict=True)
            ]
            for name in sides
        }
        ref = decode["transformers generate"]
        for name in sides:
            # The ratio pairs the sides within each round (measured back to back, so a slow phase
            # of a shared machine slows both), then takes the median over rounds.
            ratio = harness.median([o / t for o, t in zip(decode[name], ref, strict=True)])
            prefill = 1000 * harness.median(runs[f"{name} 1"])
            speed = harness.median(decode[name])
            rows.append([b, name, f"{prefill:.1f}", f"{speed:,.0f}", f"{ratio:.2f}"])
    print(
        f"\n{args.shape}, prompt {args.prompt_len} tokens, {n} new tokens, greedy; medians over "
        f"{args.rounds} alternating rounds; decode = (tokens after the first) / (time after "
        "prefill); ratio = median over rounds of ours / transformers within the round"
    )
    harness.print_table(
        ["batch", "path", "prefill ms", "decode tokens/s", "ratio vs transformers"], rows
    )


if __name__ == "__main__":
    main()
