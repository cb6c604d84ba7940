"""Load with disconnects: many concurrent streaming clients, a share of them hanging up mid-stream.

    python benchmarks/bench_serve_disconnect.py --random tiny       # 64 clients, a third hang up
    python benchmarks/bench_serve_disconnect.py --ckpt DIR --clients 128 --rounds 5
    python benchmarks/bench_serve_disconnect.py --quick             # a small smoke run

Each round, `--clients` clients each stream one completion of `--max-tokens` tokens
(`ignore_eos`); every `--disconnect-every`-th client closes its connection after a random number
of events (between 1 and half the tokens, seeded). After the round the server must show no
running or waiting rows on /health (the disconnected rows were dropped, not decoded to the end),
its cancelled count must have grown by the number of clients that hung up, and the others must
have received every token. A first round warms the server up; the server's resident memory
(VmRSS) after it is the baseline, and after `--rounds` more rounds it must be within
`--rss-tolerance` of it (no memory kept per disconnected request).

Prints one line per round and the verdict; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_serve import PROMPT, random_checkpoint
from serving.launch import serve_process
from trainer.errors import CheckpointError
from trainer.run_layout import find_model_dir


@dataclass
class Round:
    """What one round of clients saw, and the server's /health after it."""

    finished: int  # clients that read their stream to the end with every token
    short: int  # clients that read to the end with fewer tokens (should be 0)
    hung_up: int  # clients that closed their connection mid-stream
    tokens: int  # tokens the finishing clients received
    wall_s: float
    drain_s: float  # from the last client's end to /health showing no rows
    health: dict[str, Any]


def rss_bytes(pid: int) -> int:
    """The process's resident memory (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def client(http: httpx.AsyncClient, body: dict[str, Any], hang_up_after: int | None) -> int:
    """Stream one completion; return the tokens received, or -1 after hanging up."""
    events = 0
    async with http.stream("POST", "/v1/completions", json=body) as res:
        res.raise_for_status()
        async for line in res.aiter_lines():
            if not line.startswith("data: {"):
                continue
            events += 1
            if hang_up_after is not None and events >= hang_up_after:
                return -1  # leaving the block closes the connection mid-stream
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                return int(chunk["usage"]["completion_tokens"])
    return 0


async def wait_idle(http: httpx.AsyncClient) -> dict[str, Any]:
    """/health once it shows no running and no waiting rows."""
    while True:
        health: dict[str, Any] = (await http.get("/health")).json()
        if not health["running"] and not health["waiting"]:
            return health
        await asyncio.sleep(0.05)


async def one_round(url: str, clients: int, max_tokens: int, every: int, seed: int) -> Round:
    rng = random.Random(seed)
    body = {
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    hang_ups = [
        rng.randint(1, max(1, max_tokens // 2)) if i % every == every - 1 else None
        for i in range(clients)
    ]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        start = time.perf_counter()
        got = await asyncio.gather(*(client(http, body, h) for h in hang_ups))
        wall = time.perf_counter() - start
        health = await wait_idle(http)
        drain = time.perf_counter() - start - wall
    done = [g for g in got if g >= 0]
    return Round(
        finished=sum(g == max_tokens for g in done),
        short=sum(g != max_tokens for g in done),
        hung_up=sum(g < 0 for g in got),
        tokens=sum(done),
        wall_s=wall,
        drain_s=drain,
        health=health,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", help="model directory (default: newest run's best)")
    parser.add_argument("--random", metavar="PRESET", help="serve random weights of this preset")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument(
        "--disconnect-every", type=int, default=3, help="every Nth client hangs up (default: 3)"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="rounds after the warm-up one")
    parser.add_argument("--rss-tolerance", type=float, default=0.10)
    parser.add_argument("--threads", type=int, help="serve.py --threads")
    parser.add_argument("--quick", action="store_true", help="16 clients, 32 tokens, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.max_tokens, args.rounds = 16, 32, 1
        args.random = args.random or (None if args.ckpt else "tiny")

    with tempfile.TemporaryDirectory() as tmp:
        try:
            ckpt = (
                random_checkpoint(args.random, Path(tmp) / args.random)
                if args.random
                else find_model_dir(args.ckpt, "checkpoints", "--ckpt ")
            )
        except CheckpointError as err:
            print(
                f"bench_serve_disconnect.py: error: {err} (or use --random tiny)", file=sys.stderr
            )
            return 1
        extra = ("--threads", str(args.threads)) if args.threads else ()
        with serve_process(ckpt, *extra) as (url, proc):
            model = httpx.get(f"{url}/v1/models").json()["data"][0]
            print(
                f"model {model['id']}: {model['num_params']:,} parameters on {model['device']}; "
                f"{args.clients} streaming clients x {args.max_tokens} tokens, every "
                f"{args.disconnect_every} hangs up mid-stream; 1 warm-up round + {args.rounds}"
            )
            rounds: list[Round] = []
            rss: list[int] = []
            cancelled = 0
            failures: list[str] = []
            for i in range(args.rounds + 1):
                rss.append(rss_bytes(proc.pid))
                r = asyncio.run(
                    one_round(url, args.clients, args.max_tokens, args.disconnect_every, i)
                )
                rounds.append(r)
                name = "warm-up" if i == 0 else f"round {i}"
                print(
                    f"{name:>8}: {r.finished} finished, {r.hung_up} hung up, {r.short} short; "
                    f"{r.tokens / r.wall_s:.0f} tok/s to finishing clients, {r.wall_s:.2f} s, "
                    f"drained {r.drain_s:.2f} s after; /health running {r.health['running']} "
                    f"waiting {r.health['waiting']} cancelled {r.health['cancelled']}; "
                    f"RSS before {rss[-1] / 2**20:.0f} MiB"
                )
                if r.short:
                    failures.append(f"{name}: {r.short} clients got fewer tokens than asked")
                if r.health["cancelled"] - cancelled != r.hung_up:
                    failures.append(
                        f"{name}: cancelled grew by {r.health['cancelled'] - cancelled}, "
                        f"{r.hung_up} clients hung up"
                    )
                cancelled = r.health["cancelled"]
            after = rss_bytes(proc.pid)
    base = rss[1] if len(rss) > 1 else rss[0]
    change = after / base - 1
    print(
        f"RSS: {rss[0] / 2**20:.0f} MiB before the warm-up, {base / 2**20:.0f} MiB after it, "
        f"{after / 2**20:.0f} MiB after {args.rounds} more round(s): {change:+.1%} "
        f"(tolerance {args.rss_tolerance:.0%})"
    )
    if abs(change) > args.rss_tolerance:
        failures.append(f"RSS changed {change:+.1%}, more than {args.rss_tolerance:.0%}")
    for failure in failures:
        print(f"FAIL {failure}")
    print(
        "PASS: no rows left running, every hang-up cancelled, memory steady" if not failures else ""
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
