"""Serving throughput and latency on loopback: 1, 4 and 16 concurrent clients, or staggered arrivals.

    python benchmarks/bench_serve.py                 # the newest run's best checkpoint
    python benchmarks/bench_serve.py --ckpt DIR      # any Qwen3 directory
    python benchmarks/bench_serve.py --random tiny   # random weights of a preset (no training needed)
    python benchmarks/bench_serve.py --random tiny --clients 16 --stagger-ms 50   # staggered arrivals
    git worktree add /tmp/old-serve <commit>        # then, against that commit's server:
    python benchmarks/bench_serve.py --random tiny --baseline-checkout /tmp/old-serve --no-baseline

Each client sends `--requests` streamed completions one after another (a fixed prompt, exactly
`--max-tokens` new tokens thanks to `ignore_eos`); with `--stagger-ms`, client i sends its first
one i * that many milliseconds after the start, so requests arrive while others are decoding.
Reported per concurrency: requests/s, generated tokens/s, p50/p95 latency and p50 time to first
token, the medians of `--rounds` rounds. The same load runs side by side, round after round,
against a server that decodes one request at a time (`--max-batch-size 1`; the ratio shows what
batching buys) and, with `--baseline-checkout`, against another checkout's serve.py (the ratio
shows what changed since).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.launch import SERVE_PY, serve_in_subprocess
from trainer.errors import CheckpointError
from trainer.run_layout import find_model_dir

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streamed request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as res:
        res.raise_for_status()
        async for line in res.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - start, first or 0.0, tokens


async def run_load(
    url: str, clients: int, requests: int, max_tokens: int, stagger_s: float = 0.0
) -> dict[str, float]:
    body = {
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        await one_request(client, {**body, "max_tokens": 4})  # warm-up

        async def worker(i: int) -> list[tuple[float, float, int]]:
            await asyncio.sleep(i * stagger_s)
            return [await one_request(client, body) for _ in range(requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*map(worker, range(clients))) for r in rs]
        wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {
        "clients": clients,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "ttft_p50_s": statistics.median(r[1] for r in results),
    }


def random_checkpoint(preset: str, out: Path) -> Path:
    """A random-weight model of `preset` with a BPE tokenizer trained on a few Shakespeare plays."""
    import dataclasses

    from data.shakespeare import shakespeare_documents
    from data.tokenizer_training import train_tokenizer
    from qwen3 import Qwen3, Qwen3Config

    config = Qwen3Config.from_preset(preset)
    tokenizer = train_tokenizer(shakespeare_documents("train", None, 0.1)[:5], config.vocab_size)
    Qwen3(
        dataclasses.replace(config, vocab_size=max(config.vocab_size, tokenizer.vocab_size))
    ).save_pretrained(out)
    tokenizer.save(out)
    return out


def median_rows(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over rounds."""
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ckpt", help="model directory (default: newest run's best under checkpoints/)"
    )
    parser.add_argument(
        "--random", metavar="PRESET", help="serve random weights of this preset instead"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--requests", type=int, default=4, help="requests per client (default: %(default)s)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="tokens per request (default: %(default)s)"
    )
    parser.add_argument(
        "--stagger-ms",
        type=float,
        default=0.0,
        help="client i starts i * this many ms late (default: %(default)s, all at once)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternating rounds, medians (default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, help="serve.py --threads (default: serve.py's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the one-at-a-time server")
    parser.add_argument(
        "--baseline-checkout",
        type=Path,
        metavar="DIR",
        help="also serve DIR/serve.py (e.g. a git worktree of an older commit) as 'baseline'",
    )
    args = parser.parse_args()
    if args.baseline_checkout and not (args.baseline_checkout / "serve.py").is_file():
        print(f"bench_serve.py: error: no serve.py in {args.baseline_checkout}", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory() as tmp:
        try:
            ckpt = (
                random_checkpoint(args.random, Path(tmp) / args.random)
                if args.random
                else find_model_dir(args.ckpt, "checkpoints", "--ckpt ")
            )
        except CheckpointError as err:
            print(f"bench_serve.py: error: {err} (or use --random tiny)", file=sys.stderr)
            return 1
        common = ("--threads", str(args.threads)) if args.threads else ()
        setups: dict[str, tuple[Path, tuple[str, ...]]] = {"batched": (SERVE_PY, common)}
        if args.baseline_checkout:
            setups["baseline"] = (args.baseline_checkout.resolve() / "serve.py", common)
        if not args.no_baseline:
            setups["one-at-a-time"] = (SERVE_PY, (*common, "--max-batch-size", "1"))
        rounds: dict[tuple[str, int], list[dict[str, float]]] = {}
        with contextlib.ExitStack() as stack:
            urls = {
                name: stack.enter_context(serve_in_subprocess(ckpt, *extra, serve_py=serve_py))
                for name, (serve_py, extra) in setups.items()
            }
            model = httpx.get(f"{urls['batched']}/v1/models").json()["data"][0]
            stagger = args.stagger_ms / 1000
            for i in range(args.rounds):
                # Interleaved, so a busy moment hits every server; who goes first alternates.
                order = list(urls) if i % 2 == 0 else list(reversed(urls))
                for clients in args.clients:
                    for name in order:
                        url = urls[name]
                        load = run_load(url, clients, args.requests, args.max_tokens, stagger)
                        rounds.setdefault((name, clients), []).append(asyncio.run(load))
    results = {key: median_rows(rs) for key, rs in rounds.items()}

    print(
        f"model {model['id']}: {model['num_params']:,} parameters on {model['device']}; "
        f"{args.requests} requests/client x {args.max_tokens} tokens, streamed, loopback, "
        f"clients {args.stagger_ms:g} ms apart, medians of {args.rounds} round(s)"
    )
    header = f"{'server':<14}{'clients':>8}{'req/s':>9}{'tok/s':>9}{'p50 s':>8}{'p95 s':>8}{'TTFT p50':>10}"
    print(header)
    for name, clients in sorted(results, key=lambda key: list(setups).index(key[0])):
        r = results[name, clients]
        print(
            f"{name:<14}{r['clients']:>8.0f}{r['requests_per_s']:>9.2f}{r['tokens_per_s']:>9.0f}"
            f"{r['p50_s']:>8.2f}{r['p95_s']:>8.2f}{r['ttft_p50_s']:>10.3f}"
        )
    for other in setups:
        if other == "batched":
            continue
        for clients in args.clients:
            b, o = results["batched", clients], results[other, clients]
            print(
                f"batched / {other} at {clients:>2} clients: tokens/s "
                f"{b['tokens_per_s'] / o['tokens_per_s']:.2f}x, p95 latency "
                f"{b['p95_s'] / o['p95_s']:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
