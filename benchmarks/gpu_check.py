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
import faulthandler
import math
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

# A GPU node runs this with its own interpreter, where this project is not installed.
_REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(_REPO), str(_REPO / "benchmarks")) if p not in sys.path]

import harness  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gpu_check_distributed import group_of_one, torchrun_rows  # noqa: E402
from gpu_check_sizes import (  # noqa: E402
    QWEN_VOCAB,
    Row,
    Sizes,
    TrainShape,
    dry_run_sizes,
    dtype_name,
    error_line,
    flops_text,
    gib_text,
    gpu_sizes,
    peak_memory,
    precision_of,
    random_batch,
    seeded_model,
    sync_device,
)

from optim import OptimConfig, build_optimizers  # noqa: E402
from qwen3 import Sampling, generate  # noqa: E402
from qwen3.compile import compile_for_training  # noqa: E402
from qwen3.compile import graph_breaks as count_graph_breaks  # noqa: E402
from qwen3.moe import SparseMoeBlock  # noqa: E402
from trainer.build import Precision  # noqa: E402
from trainer.evaluation import evaluate  # noqa: E402
from trainer.metrics import mfu, peak_flops  # noqa: E402
from trainer.plan_memory import Setup, step_memory  # noqa: E402
from trainer.step import train_step  # noqa: E402

BUDGET_S = 480  # the whole check on one H100/H200
# No check should take this long on a GPU (the whole check takes BUDGET_S).
CHECK_WATCH_S = 180.0


# ---- rows ----------------------------------------------------------------------------------
def _timed_steps(step: Callable[[], object], warmup: int, steps: int, device: torch.device):
    """(seconds for ``steps`` calls of ``step``, every result) after ``warmup`` untimed calls;
    the device is synced before the clock starts and before it stops, so queued work of the
    warm-up is not counted and the timed work is."""
    results = [step() for _ in range(warmup)]
    sync_device(device)
    t0 = time.perf_counter()
    results += [step() for _ in range(steps)]
    sync_device(device)
    return time.perf_counter() - t0, results


def throughput(s: Sizes, shape: TrainShape, compiled: bool) -> Row:
    cfg, b, t = shape.cfg, shape.batch, shape.seq
    model = seeded_model(cfg, s.device)
    if compiled:  # block by block, as trainer.compile=true does
        compile_for_training(model, backend=s.compile_backend)
    forward = model
    optim = OptimConfig(name=s.optimizer, warmup_steps=1)
    opt = build_optimizers(model, optim, s.warmup_steps + s.train_steps)
    precision = precision_of(s)
    x, y = random_batch(cfg, b, t, s.device)
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
        f"train {dtype_name(s)} {shape.name}, {model.num_params() / 1e6:.1f}M params, {mode}, "
        f"{b}x{t}",
        f"{tps:,.0f} tok/s, MFU {util:.1%} of {flops_text(peak)}{target}",
        all(math.isfinite(v) for v in results),  # (a few steps: too few to require a decrease)
    )


def graph_breaks(s: Sizes) -> Row:
    """What ``torch._dynamo.explain`` finds in the training forward (the loss included) of the
    first throughput shape (:func:`qwen3.compile.graph_breaks`): the compiled model must trace as
    whole graphs, with no breaks."""
    shape = s.train[0]
    model = seeded_model(shape.cfg, s.device)
    x, y = random_batch(shape.cfg, shape.batch, shape.seq, s.device)
    with precision_of(s).autocast():
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
    model = seeded_model(shape.cfg, s.device)
    opt = build_optimizers(model, OptimConfig(name=s.optimizer, warmup_steps=1), 10)
    x, y = random_batch(shape.cfg, shape.batch, shape.seq, s.device)
    precision = precision_of(s)
    for _ in range(2):
        train_step(model, opt, x, y, 1, precision, 1.0)
    sync_device(s.device)
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
    model = seeded_model(shape.cfg, s.device)
    x, y = random_batch(shape.cfg, 1, shape.seq, s.device)
    precision = precision_of(s)
    with torch.no_grad(), precision.autocast():
        model(x, targets=y)  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x, targets=y)
    names = {e.key for e in prof.key_averages()}
    used = sorted({kernel for op, kernel in _SDPA_KERNELS.items() if op in names})
    gqa = shape.cfg.num_attention_heads != shape.cfg.num_key_value_heads
    return Row(
        f"SDPA kernel, training forward of {shape.name} {dtype_name(s)} 1x{shape.seq}"
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
        f"{cfg.num_experts_per_tok}), {s.moe_tokens} tokens {dtype_name(s)}: grouped_mm vs loop",
        f"{times['grouped_mm'] * 1e3:.1f} ms vs {times['loop'] * 1e3:.1f} ms "
        f"({times['loop'] / times['grouped_mm']:.2f}x), max diff {err:.1e}",
        # On CUDA the grouped kernel is what the model runs, so it must also be the faster.
        close and (s.device.type != "cuda" or times["grouped_mm"] < times["loop"]),
    )


def fp16_run(s: Sizes) -> Row:
    shape = s.train[0]
    model = seeded_model(shape.cfg, s.device)
    steps = s.fp16_steps
    opt = build_optimizers(model, OptimConfig(name="adamw", warmup_steps=1), steps)
    scaler = torch.amp.GradScaler(s.device.type)
    precision = Precision("fp16", s.device.type, torch.float16, scaler)
    x, y = random_batch(shape.cfg, shape.batch, shape.seq, s.device)
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


def eval_memory(s: Sizes) -> Row:
    cfg = replace(s.train[0].cfg, vocab_size=QWEN_VOCAB, max_position_embeddings=s.eval_seq)
    model = seeded_model(cfg, s.device)
    tokens = np.random.default_rng(0).integers(0, QWEN_VOCAB, s.eval_batch * (s.eval_seq + 1) + 1)
    precision = precision_of(s)
    args = (tokens.astype(np.int32), s.eval_batch, s.eval_seq, 1, precision, s.device, None)
    evaluate(model, *args)  # warm: kernels, allocator
    with peak_memory(s.device) as peak:
        metrics = evaluate(model, *args)
    logits = s.eval_batch * s.eval_seq * QWEN_VOCAB * 4
    return Row(
        f"evaluation, vocabulary {QWEN_VOCAB:,}, {s.eval_batch}x{s.eval_seq} tokens",
        f"peak {gib_text(peak[0])} (the float32 logits alone: {gib_text(logits)})",
        # Far below the logits: at most half of them (toy sizes), and 4 GiB on a GPU, where
        # the chunks are 256 MiB (qwen3.loss.default_chunk_rows) and the logits 18.5 GiB.
        math.isfinite(metrics["val_loss"]) and peak[0] < min(logits / 2, 4 * 2**30),
    )


def big_model_rows(s: Sizes) -> list[Row]:
    model = seeded_model(s.big, s.device)
    x, y = random_batch(s.big, s.big_batch, s.big_seq, s.device)
    rows, peaks, times = [], {}, {}

    def fwd_bwd() -> float:
        model.zero_grad(set_to_none=True)
        with precision_of(s).autocast():
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
                f"{s.big_name} fwd+bwd {dtype_name(s)} {s.big_batch}x{s.big_seq}, "
                f"trainer.activation_checkpointing={mode}",
                f"peak {gib_text(peak[0])} above the weights, {dt:.2f} s",
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
    model = seeded_model(cfg, s.device)
    model.set_activation_checkpointing(shape.checkpointing)  # type: ignore[arg-type]
    opt = build_optimizers(model, OptimConfig(name=s.optimizer, warmup_steps=1), 10)
    x, y = random_batch(cfg, b, t, s.device)
    precision = precision_of(s)

    def step() -> object:
        return train_step(model, opt, x, y, 1, precision, 1.0)

    step()  # the optimizer state exists from here on, as in every later step
    sync_device(s.device)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
        step()
        sync_device(s.device)
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
        f"train.py plan vs a measured {shape.name} step, {dtype_name(s)} {b}x{t}, "
        f"{s.optimizer}{checkpointing}",
        f"estimate {gib_text(estimate)} / measured {gib_text(measured)} = {ratio:.2f}",
        abs(ratio - 1) <= 0.15,
    )


def generation_rows(s: Sizes) -> list[Row]:
    cfg = s.gen
    reference = seeded_model(cfg, torch.device("cpu")).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (4, 16), generator=g).tolist()
    greedy = Sampling(max_new_tokens=32, temperature=0.0)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the comparison is of float32, not TF32
    try:
        want = generate(reference, prompts, greedy)
        got = generate(seeded_model(cfg, torch.device("cpu")).to(s.device).eval(), prompts, greedy)
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
    model = seeded_model(cfg, torch.device("cpu")).to(s.device, dtype).eval()
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


Job = tuple[str, Callable[[], Row | list[Row]]]  # a label (for its FAIL row) and what it runs


def jobs_for(s: Sizes, root: Path) -> list[Job]:
    """Every check of the table, in its order."""
    jobs: list[Job] = []
    for shape in s.train:
        for compiled in (False, True):
            label = f"train {dtype_name(s)} {shape.name} {'compiled' if compiled else 'eager'}"
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
            got = [Row(label, error_line(e), False)]
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
