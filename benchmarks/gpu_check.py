"""One GPU check: everything the CUDA path has to do, in one table, in under 8 minutes on one
H100-class GPU.

    python benchmarks/gpu_check.py            # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --dry-run  # the same rows on CPU: toy sizes, fp32, gloo

Rows: bf16 training throughput (``small`` and a ~125M shape, eager and compiled; tokens/s and
MFU against the device's bf16 peak), a short fp16 + GradScaler run, ``train.py`` under
``torchrun`` (one process, DDP, FSDP: one step, a save, a resume), evaluation memory at
vocabulary 151,936 and 8 x 4096 tokens, ``qwen3-0.6b`` forward + backward at seq 2048 with
activation checkpointing off and on, and generation (greedy CUDA == CPU float32; decode tokens/s
at batch 1 and 8). Every row prints what ran, its figure and ok/FAIL; the exit status is 1 if
any row failed. A row that raises is a FAIL with its error, and the next row still runs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import harness
import numpy as np
import torch

from optim import OptimConfig, build_optimizers
from qwen3 import Qwen3, Qwen3Config, Sampling, generate
from trainer.build import Precision
from trainer.evaluation import evaluate
from trainer.metrics import mfu, peak_flops
from trainer.step import train_step

REPO = Path(__file__).resolve().parents[1]
QWEN_VOCAB = 151_936
# GPT-2 small's width and depth (no preset has it): the benchmarks' ``100m`` shape, 100.7M
# parameters with its 32k vocabulary tied to the head (the row keeps GPT-2's "125M" name).
SHAPE_125M = harness.config_for("100m")


@dataclass
class Sizes:
    """What each row runs at: the GPU sizes the issue names, or toy ones for --dry-run."""

    device: torch.device
    dtype: torch.dtype  # bf16 on the GPU; float32 on CPU, where bf16 matmuls can be 100x slower
    train: list[tuple[str, Qwen3Config]]
    train_batch: int
    train_seq: int
    train_steps: int
    warmup_steps: int  # untimed steps first (the compiled rows compile in the first)
    fp16_steps: int
    optimizer: str  # muon on the GPU; adamw on CPU, where Muon's bf16 Newton-Schulz is slow
    compile_backend: str
    eval_batch: int
    eval_seq: int
    big_name: str
    big: Qwen3Config
    big_batch: int
    big_seq: int
    gen: Qwen3Config
    decode_tokens: int
    nproc: int


def gpu_sizes() -> Sizes:
    return Sizes(
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        train=[("small", Qwen3Config.from_preset("small")), ("125M", SHAPE_125M)],
        train_batch=16,
        train_seq=1024,
        train_steps=10,
        warmup_steps=3,
        optimizer="muon",
        fp16_steps=30,
        compile_backend="inductor",
        eval_batch=8,
        eval_seq=4096,
        big_name="qwen3-0.6b",
        big=Qwen3Config.from_preset("qwen3-0.6b"),
        big_batch=4,
        big_seq=2048,
        gen=Qwen3Config.from_preset("small"),
        decode_tokens=128,
        nproc=torch.cuda.device_count(),
    )


def dry_run_sizes() -> Sizes:
    toy = Qwen3Config.from_preset("tiny", vocab_size=512, max_position_embeddings=256)
    return Sizes(
        device=torch.device("cpu"),
        dtype=torch.float32,
        train=[("small (toy shape)", toy), ("125M (toy shape)", replace(toy, num_hidden_layers=2))],
        train_batch=2,
        train_seq=64,
        train_steps=2,
        warmup_steps=1,
        optimizer="adamw",
        fp16_steps=6,
        compile_backend="aot_eager",  # traces the model like inductor, without a C++ build
        eval_batch=2,
        eval_seq=256,
        big_name="qwen3-0.6b (toy shape)",
        big=toy,
        big_batch=4,
        big_seq=256,
        gen=toy,
        decode_tokens=8,
        nproc=2,
    )


@dataclass
class Row:
    check: str
    figure: str
    ok: bool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Yields a list that holds, after the block, the block's peak memory above its start in
    bytes: CUDA's allocator peak, or on CPU the process's peak RSS (VmHWM, reset first)."""
    out: list[float] = []
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM to the current RSS
        base = _proc_kib("VmRSS") * 1024
    yield out
    _sync(device)
    if device.type == "cuda":
        out.append(torch.cuda.max_memory_allocated(device) - base)
    else:
        out.append(_proc_kib("VmHWM") * 1024 - base)


def _flops(n: float) -> str:
    return f"{n / 1e12:,.0f} TFLOP/s" if n >= 1e12 else f"{n / 1e9:,.1f} GFLOP/s"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _random_batch(cfg: Qwen3Config, b: int, t: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=g)
    return x[:, :-1].to(device), x[:, 1:].to(device)


def _precision(s: Sizes) -> Precision:
    if s.dtype == torch.float32:
        return Precision("fp32", s.device.type, None)
    return Precision("bf16", s.device.type, torch.bfloat16)


def _dtype_name(s: Sizes) -> str:
    return "bf16" if s.dtype == torch.bfloat16 else "fp32"


def _model(cfg: Qwen3Config, device: torch.device, seed: int = 0) -> Qwen3:
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen3(cfg)


# ---- rows ----------------------------------------------------------------------------------
def throughput(s: Sizes, name: str, cfg: Qwen3Config, compiled: bool) -> Row:
    model = _model(cfg, s.device)
    forward = torch.compile(model, backend=s.compile_backend) if compiled else model
    warmup = s.warmup_steps
    optim = OptimConfig(name=s.optimizer, warmup_steps=1)
    opt = build_optimizers(model, optim, warmup + s.train_steps)
    precision = _precision(s)
    x, y = _random_batch(cfg, s.train_batch, s.train_seq, s.device)
    losses = [train_step(forward, opt, x, y, 1, precision, 1.0).loss for _ in range(warmup)]
    _sync(s.device)
    t0 = time.perf_counter()
    losses += [train_step(forward, opt, x, y, 1, precision, 1.0).loss for _ in range(s.train_steps)]
    dt = time.perf_counter() - t0
    tps = s.train_steps * s.train_batch * s.train_seq / dt
    peak = peak_flops(s.device, s.dtype, None)
    util = mfu(tps, model.estimate_flops(s.train_seq), peak)
    mode = f"compiled ({s.compile_backend})" if compiled else "eager"
    return Row(
        f"train {_dtype_name(s)} {name}, {model.num_params() / 1e6:.1f}M params, {mode}, "
        f"{s.train_batch}x{s.train_seq}",
        f"{tps:,.0f} tok/s, MFU {util:.1%} of {_flops(peak)}",
        all(math.isfinite(v) for v in losses),  # (a few steps: too few to require a decrease)
    )


def fp16_run(s: Sizes) -> Row:
    cfg = s.train[0][1]
    model = _model(cfg, s.device)
    steps = s.fp16_steps
    opt = build_optimizers(model, OptimConfig(name="adamw", warmup_steps=1), steps)
    scaler = torch.amp.GradScaler(s.device.type)
    precision = Precision("fp16", s.device.type, torch.float16, scaler)
    x, y = _random_batch(cfg, s.train_batch, s.train_seq, s.device)
    results = [train_step(model, opt, x, y, 1, precision, 1.0) for _ in range(steps)]
    taken = [r.loss for r in results if not r.skipped]
    overflows = sum(r.overflow for r in results)
    finite = all(math.isfinite(r.loss) for r in results)
    return Row(
        f"fp16 + GradScaler, {steps} steps on one batch",
        f"loss {taken[0]:.3f} -> {taken[-1]:.3f}, {overflows} overflow skips, "
        f"scale {scaler.get_scale():g}",
        finite and not results[-1].skipped and len(taken) > steps // 2 and taken[-1] < taken[0],
    )


def _corpus(root: Path) -> Path:
    """400 documents of made-up text, separated by blank lines (deterministic; the machine may
    be offline)."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 7))) for _ in range(300)]
    lines = [" ".join(rng.choice(words, size=12)) + "." for _ in range(4000)]
    docs = ["\n".join(lines[i : i + 10]) for i in range(0, len(lines), 10)]
    path = root / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return path


def _train_py(s: Sizes, root: Path, corpus: Path, nproc: int, *args: str) -> None:
    device, precision = ("cuda", "bf16") if s.device.type == "cuda" else ("cpu", "fp32")
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    if nproc > 0:  # under torchrun
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, f"--nproc_per_node={nproc}", *cmd[1:]]
    cmd += [
        "model=tiny",
        "model.vocab_size=512",
        "data=local",
        f"data.paths=[{corpus}]",
        "data.vocab_size=512",
        f"data.cache_dir={root / 'cache'}",
        f"out_dir={root / 'runs'}",
        f"trainer.device={device}",
        f"trainer.precision={precision}",
        "trainer.batch_size=4",
        "trainer.seq_len=64",
        "trainer.eval_batches=1",
        "trainer.save_every=1",
        "optim.warmup_steps=1",
        "wandb.mode=disabled",
        "sample.max_new_tokens=4",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(args)}: exit {res.returncode}: {tail}")


def torchrun_rows(s: Sizes, root: Path) -> list[Row]:
    corpus = _corpus(root)
    _train_py(s, root, corpus, 0, "prepare")  # one build of tokenizer + cache for all runs
    backend = "NCCL" if s.device.type == "cuda" else "gloo"
    # One process per GPU: on a one-GPU machine torchrun starts one process, which (world size 1)
    # creates no process group, so NCCL itself is only exercised with two or more GPUs.
    world = f"{s.nproc} processes, {backend}" if s.nproc > 1 else "1 process (one GPU: no group)"
    rows = []
    for label, nproc, extra in (
        ("one process", 0, []),
        (f"DDP, {world}", s.nproc, []),
        (f"FSDP, {world}", s.nproc, ["trainer.fsdp=true"]),
    ):
        name = f"run-{len(rows)}"
        try:
            t0 = time.perf_counter()
            _train_py(s, root, corpus, nproc, f"run_name={name}", "trainer.max_steps=1", *extra)
            _train_py(
                s,
                root,
                corpus,
                nproc,
                f"run_name={name}",
                "trainer.max_steps=2",
                "resume=latest",
                *extra,
            )
            run = root / "runs" / name
            steps = sorted(p.name for p in run.glob("step-*"))
            ok = "step-000002" in steps and (run / "step-000002" / "model.safetensors").is_file()
            figure = f"step 1 saved, resumed to step 2 ({time.perf_counter() - t0:.0f} s)"
            rows.append(Row(f"train.py {label}: 1 step, save, resume", figure, ok))
        except Exception as e:  # a failed run is this row's FAIL
            rows.append(Row(f"train.py {label}: 1 step, save, resume", _error(e), False))
    return rows


def eval_memory(s: Sizes) -> Row:
    cfg = replace(s.train[0][1], vocab_size=QWEN_VOCAB, max_position_embeddings=s.eval_seq)
    model = _model(cfg, s.device)
    tokens = np.random.default_rng(0).integers(0, QWEN_VOCAB, s.eval_batch * (s.eval_seq + 1) + 1)
    precision = _precision(s)
    args = (tokens.astype(np.int32), s.eval_batch, s.eval_seq, 1, precision, s.device, None)
    evaluate(model, *args)  # warm: kernels, allocator
    with peak_memory(s.device) as peak:
        metrics = evaluate(model, *args)
    logits = s.eval_batch * s.eval_seq * QWEN_VOCAB * 4
    return Row(
        f"evaluation, vocabulary {QWEN_VOCAB:,}, {s.eval_batch}x{s.eval_seq} tokens",
        f"peak {_gib(peak[0])} (the float32 logits alone: {_gib(logits)})",
        # Far below the logits: at most half of them (toy sizes), and 4 GiB on a GPU, where
        # the chunks are 256 MiB (qwen3.loss.default_chunk_rows) and the logits 18.5 GiB.
        math.isfinite(metrics["val_loss"]) and peak[0] < min(logits / 2, 4 * 2**30),
    )


def big_model_rows(s: Sizes) -> list[Row]:
    model = _model(s.big, s.device)
    x, y = _random_batch(s.big, s.big_batch, s.big_seq, s.device)
    rows, peaks = [], {}
    for mode in ("none", "full"):
        model.set_activation_checkpointing(mode)
        model.zero_grad(set_to_none=True)
        with peak_memory(s.device) as peak:
            t0 = time.perf_counter()
            with _precision(s).autocast():
                loss = model(x, targets=y)
            loss.backward()
            _sync(s.device)
            dt = time.perf_counter() - t0
        peaks[mode] = peak[0]
        ok = math.isfinite(float(loss)) and (mode == "none" or peak[0] < peaks["none"])
        rows.append(
            Row(
                f"{s.big_name} fwd+bwd {_dtype_name(s)} {s.big_batch}x{s.big_seq}, "
                f"trainer.activation_checkpointing={mode}",
                f"peak {_gib(peak[0])} above the weights, {dt:.2f} s",
                ok,
            )
        )
    return rows


def generation_rows(s: Sizes) -> list[Row]:
    cfg = s.gen
    reference = _model(cfg, torch.device("cpu")).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (4, 16), generator=g).tolist()
    greedy = Sampling(max_new_tokens=32, temperature=0.0)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the comparison is of float32, not TF32
    try:
        want = generate(reference, prompts, greedy)
        got = generate(_model(cfg, torch.device("cpu")).to(s.device).eval(), prompts, greedy)
    finally:
        torch.set_float32_matmul_precision(before)
    same = sum(a == b for a, b in zip(got, want, strict=True))
    rows = [
        Row(
            f"greedy 32 tokens x 4 prompts, {s.device.type} fp32 == cpu fp32",
            f"{same}/4 rows equal",
            same == 4,
        )
    ]
    dtype = torch.bfloat16 if s.device.type == "cuda" else torch.float32  # the server's default
    model = _model(cfg, torch.device("cpu")).to(s.device, dtype).eval()
    for batch in (1, 8):
        sampling = Sampling(max_new_tokens=s.decode_tokens, temperature=0.0)
        prompts = torch.randint(0, cfg.vocab_size, (batch, 16), generator=g).tolist()
        generate(model, prompts, replace(sampling, max_new_tokens=4))  # warm
        _sync(s.device)
        t0 = time.perf_counter()
        out = generate(model, prompts, sampling)
        _sync(s.device)
        n = sum(len(o) for o in out)
        rows.append(
            Row(
                f"decode {str(dtype).removeprefix('torch.')}, batch {batch}, "
                f"{s.decode_tokens} new tokens",
                f"{n / (time.perf_counter() - t0):,.0f} tok/s",
                n == batch * s.decode_tokens,
            )
        )
    return rows


# ---- the table -----------------------------------------------------------------------------
def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def run_rows(s: Sizes, root: Path) -> list[Row]:
    jobs: list[tuple[str, Callable[[], Row | list[Row]]]] = []
    for name, cfg in s.train:
        for compiled in (False, True):
            label = f"train {_dtype_name(s)} {name} {'compiled' if compiled else 'eager'}"
            jobs.append((label, lambda n=name, c=cfg, k=compiled: throughput(s, n, c, k)))
    jobs += [
        ("fp16 + GradScaler", lambda: fp16_run(s)),
        ("train.py under torchrun", lambda: torchrun_rows(s, root)),
        ("evaluation memory", lambda: eval_memory(s)),
        (f"{s.big_name} fwd+bwd", lambda: big_model_rows(s)),
        ("generation", lambda: generation_rows(s)),
    ]
    rows: list[Row] = []
    for label, job in jobs:
        t0 = time.perf_counter()
        try:
            out = job()
            got = out if isinstance(out, list) else [out]
        except Exception as e:  # one failed row must not hide the others
            traceback.print_exc()
            got = [Row(label, _error(e), False)]
        for row in got:
            print(
                f"[{time.perf_counter() - t0:5.0f} s] {'ok' if row.ok else 'FAIL'}  {row.check}: "
                f"{row.figure}",
                file=sys.stderr,
                flush=True,
            )
        rows += got
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| check | figure | result |", "|---|---|---|"]
    lines += [f"| {r.check} | {r.figure} | {'ok' if r.ok else 'FAIL'} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="the same rows on CPU at toy sizes (gloo)"
    )
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run with --dry-run to check on CPU", file=sys.stderr)
        return 2
    sizes = dry_run_sizes() if args.dry_run else gpu_sizes()
    if args.dry_run:
        torch.set_flush_denormal(True)  # as the trainer does on CPU: denormals slow steps 4x
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        rows = run_rows(sizes, Path(tmp))
    where = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(sizes.device)
    print(f"\n{where}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s\n")
    print(table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
