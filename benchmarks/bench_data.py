"""Data pipeline benchmark: the token cache build against `datasets.map`, at scale, and resume.

    .venv/bin/python benchmarks/bench_data.py                 # 500 MB corpus, all sections
    .venv/bin/python benchmarks/bench_data.py --quick         # 40 MB, to check it runs
    .venv/bin/python benchmarks/bench_data.py --only default  # the default corpus's cold/cached
    .venv/bin/python benchmarks/bench_data.py --only cores --corpus-mb 40 --rounds 3

Sections (each side runs in a fresh subprocess; peak RSS is the whole process tree's, sampled):
- default: the default corpus (Shakespeare): the cold `prepare_data` (tokenizer training +
  token cache) and the cached reload.
- scale: a local corpus of --corpus-mb built from the shipped texts (Shakespeare's paragraphs
  and the TinyStories sample, recombined into documents by a seeded generator), tokenized with
  the default corpus's tokenizer by `prepare_data` (ours: the sharded cache build) and by the
  usual `datasets.load_dataset("text") + .map(batched=True, num_proc=N)` writing one array
  (nanoGPT's prepare.py approach), alternating for --rounds; tokens/s, ratio and peak RSS.
  Both sides must produce the same number of tokens (same documents, same ids).
- cores: ours on 1 core against all cores (CPU affinity), tokens/s and the scaling (with
  `--only cores`, alternating for --rounds, medians).
- resume: ours killed (SIGKILL) once half the train tokens are in finished shards, then run
  again: the time to finish against a full build.
Targets: >= 1.3x the baseline's tokens/s; peak RSS < 1 GB; a resumed build <= 0.6x a full one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINYSTORIES = REPO.parent / "shared" / "corpora" / "tinystories-val-1k.txt"
VOCAB = 8192


# ---- the two sides, each run as `bench_data.py _side NAME JSON` in its own process ----------
def _side_ours(p: dict[str, Any]) -> dict[str, Any]:
    from data import DataConfig, prepare_data

    cfg = DataConfig(
        source="local",
        paths=[f"{p['corpus']}/*.txt"],
        tokenizer=p["tokenizer"],
        cache_dir=p["cache"],
        shard_tokens=p["shard_tokens"],
    )
    start = time.perf_counter()
    data = prepare_data(cfg, VOCAB, progress=False)
    seconds = time.perf_counter() - start
    m = data.meta
    return {"seconds": seconds, "tokens": m["train_tokens"] + m["val_tokens"], "meta": m}


def _side_baseline(p: dict[str, Any]) -> dict[str, Any]:
    """nanoGPT's prepare.py with a batched map: load, tokenize in N processes, write one array."""
    import datasets
    import numpy as np

    from qwen3.tokenizer import Qwen3Tokenizer

    tok = Qwen3Tokenizer.from_dir(p["tokenizer"])
    eos = tok.eos_id
    files = sorted(str(f) for f in Path(p["corpus"]).glob("*.txt"))
    start = time.perf_counter()
    ds = datasets.load_dataset(
        "text", data_files=files, sample_by="paragraph", split="train", cache_dir=p["cache"]
    )

    def process(batch: dict[str, list[str]]) -> dict[str, Any]:
        texts = [t for t in batch["text"] if t.strip()]  # as ours: empty documents dropped
        ids = [[*e, eos] for e in tok.encode_batch(texts)]
        return {"ids": ids, "len": [len(e) for e in ids]}

    ds = ds.map(process, batched=True, remove_columns=["text"], num_proc=p["procs"])
    total = int(np.sum(ds["len"], dtype=np.int64))
    arr = np.memmap(Path(p["cache"]) / "train.bin", dtype=np.uint16, mode="w+", shape=(total,))
    idx, shards = 0, 64
    for i in range(shards):
        part = ds.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
        block = np.concatenate(part["ids"])
        arr[idx : idx + len(block)] = block
        idx += len(block)
    arr.flush()
    return {"seconds": time.perf_counter() - start, "tokens": total}


def _run_side(name: str, params: dict[str, Any], cores: set[int] | None = None) -> dict[str, Any]:
    """Run one side in a fresh process; add its wall time and the tree's peak RSS."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "_side", name, json.dumps(params)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
    )
    peak = _watch_rss(proc.pid)
    out, _ = proc.communicate()
    peak.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak.peak / 2**20
    return result


class _watch_rss:  # used like a function
    """Samples the summed RSS of a process and its descendants until stopped."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.peak, self.done = 0, threading.Event()
        self.proc = psutil.Process(pid)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = 0
                for q in procs:
                    with contextlib.suppress(psutil.Error):  # a worker that just ended
                        rss += q.memory_info().rss
                self.peak = max(self.peak, rss)
            except psutil.Error:
                return
            self.done.wait(0.1)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


# ---- the corpus -----------------------------------------------------------------------------
def build_corpus(out: Path, megabytes: int) -> int:
    """Documents of 3-12 paragraphs drawn from the shipped texts, in 8 files; returns bytes."""
    from data.shakespeare import shakespeare_documents

    texts = shakespeare_documents("train", None, 0.05) + shakespeare_documents("val", None, 0.05)
    if TINYSTORIES.exists():
        texts.append(TINYSTORIES.read_text())
    paragraphs = [p.strip() for t in texts for p in t.split("\n\n") if p.strip()]
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    target, written = megabytes * 10**6, 0
    files = [open(out / f"part-{i:02d}.txt", "w") for i in range(8)]  # noqa: SIM115
    try:
        n = 0
        while written < target:
            doc = "\n".join(rng.choice(paragraphs) for _ in range(rng.randint(3, 12)))
            text = doc + "\n\n"
            files[n % 8].write(text)
            written += len(text.encode("utf-8"))
            n += 1
    finally:
        for f in files:
            f.close()
    return written


def _tokenizer(tmp: Path) -> tuple[str, float, float]:
    """The default corpus's tokenizer (trained here); the cold and cached prepare times."""
    from data import DataConfig, prepare_data

    cfg = DataConfig(cache_dir=str(tmp / "default"))
    start = time.perf_counter()
    cold = prepare_data(cfg, VOCAB, progress=False)
    t_cold = time.perf_counter() - start
    start = time.perf_counter()
    prepare_data(cfg, VOCAB, progress=False)
    return str(cold.tokenizer_dir), t_cold, time.perf_counter() - start


def _kill_at_half(params: dict[str, Any], train_tokens: int) -> int:
    """Run ours until half the train tokens are in recorded shards, then SIGKILL it; returns
    the shards kept. Fails (does not hang) if the build ends first."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "_side", "ours", json.dumps(params)], stdout=subprocess.DEVNULL
    )
    cache = Path(params["cache"])
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit("the build finished before half its tokens were written")
            done = 0
            for rec in cache.glob(".partial-tokens-*/shard-*.json"):
                with contextlib.suppress(OSError, ValueError):  # one being replaced right now
                    done += json.loads(rec.read_text())["tokens"]
            if done >= train_tokens / 2:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return len(list(cache.glob(".partial-tokens-*/shard-*.json")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 40 MB corpus")
    parser.add_argument("--corpus-mb", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per side")
    parser.add_argument("--procs", type=int, default=os.cpu_count())
    parser.add_argument("--shard-tokens", type=int, default=10_000_000)
    parser.add_argument("--only", choices=["default", "cores"])
    args = parser.parse_args()
    mb = 40 if args.quick else args.corpus_mb
    shard_tokens = 1_000_000 if args.quick else args.shard_tokens
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(
        dir=REPO / ".cache" if (REPO / ".cache").is_dir() else None
    ) as t:
        tmp = Path(t)
        tok_dir, t_cold, t_warm = _tokenizer(tmp)
        print(f"\n== default corpus: first prepare {t_cold:.2f} s, cached {t_warm:.3f} s")
        if args.only == "default":
            return
        corpus = tmp / "corpus"
        size = build_corpus(corpus, mb)
        print(f"\n== scale: local corpus of {size / 1e6:,.0f} MB in 8 .txt files")

        def params(name: str, i: int) -> dict[str, Any]:
            cache = tmp / f"{name}-{i}"
            cache.mkdir()
            return {
                "corpus": str(corpus),
                "tokenizer": tok_dir,
                "cache": str(cache),
                "shard_tokens": shard_tokens,
                "procs": args.procs,
            }

        if args.only == "cores":  # 1 core against all, alternating rounds, medians
            one_s, all_s = [], []
            for i in range(args.rounds):
                one_s.append(_run_side("ours", params("one", i), cores={0})["seconds"])
                all_s.append(_run_side("ours", params("all", i))["seconds"])
            one_m, all_m = statistics.median(one_s), statistics.median(all_s)
            print(
                f"\n== cores ({args.rounds} alternating rounds, medians): 1 core {one_m:.1f} s, "
                f"{os.cpu_count()} cores {all_m:.1f} s: {one_m / all_m:.2f}x"
            )
            return
        ours, base = [], []
        for i in range(args.rounds):  # alternating: both sides see the same machine load
            ours.append(_run_side("ours", params("ours", i)))
            base.append(_run_side("baseline", params("baseline", i)))
        assert all(o["tokens"] == b["tokens"] for o, b in zip(ours, base, strict=True)), (
            "the two sides disagree on the token count"
        )
        tokens = ours[0]["tokens"]
        o_s = statistics.median(r["seconds"] for r in ours)
        b_s = statistics.median(r["seconds"] for r in base)
        print(f"tokens            {tokens:>14,} (both sides)")
        print(
            f"ours              {tokens / o_s:>14,.0f} tokens/s  {o_s:8.1f} s  peak RSS "
            f"{max(r['peak_rss_mb'] for r in ours):,.0f} MB  ({len(ours[0]['meta']['train_shards'])} shards)"
        )
        print(
            f"datasets.map x{args.procs:<3} {tokens / b_s:>14,.0f} tokens/s  {b_s:8.1f} s  peak RSS "
            f"{max(r['peak_rss_mb'] for r in base):,.0f} MB"
        )
        print(f"ratio             {b_s / o_s:>14.2f}x  (median of {args.rounds} round(s))")

        one = _run_side("ours", params("one-core", 0), cores={0})
        print(
            f"\n== cores: ours on 1 core {tokens / one['seconds']:,.0f} tokens/s, on "
            f"{os.cpu_count()} cores {tokens / o_s:,.0f} tokens/s: {one['seconds'] / o_s:.2f}x"
        )

        kill = params("resume", 0)
        kept = _kill_at_half(kill, ours[0]["meta"]["train_tokens"])
        resumed = _run_side("ours", kill)
        same = resumed["meta"]["train_sha256"] == ours[0]["meta"]["train_sha256"]
        print(
            f"\n== resume: killed with {kept} shards recorded; finishing took "
            f"{resumed['seconds']:.1f} s against {o_s:.1f} s for a full build: "
            f"{resumed['seconds'] / o_s:.2f}x (reused {resumed['meta']['reused_shards']} shards; "
            f"checksum {'equals' if same else 'DIFFERS FROM'} the full build's)"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_side":
        side = {"ours": _side_ours, "baseline": _side_baseline}[sys.argv[2]]
        result = side(json.loads(sys.argv[3]))
        print(json.dumps(result, default=str))
    else:
        main()
