"""Training throughput: our Qwen3 against transformers' Qwen3ForCausalLM, same weights and batch;
with --compile, our compiled training step (``trainer.compile=true``) against our eager one.

Forward + backward + optimizer step, the contenders alternating within each round, median
tokens/s over the rounds, the ratio ours / transformers (both with AdamW), and MFU against
this machine's float32 (or bf16 with --amp) matmul peak, measured here first.

--compile: the main job's model and batch (tiny, 16 x 256, Muon + AdamW) and the ~100M shape,
each eager and compiled as the trainer compiles (``qwen3.compile.compile_for_training``: one
graph per decoder block, plus the loss's chunk step), alternating; the ratio is compiled / eager
within each round, and the compile time is the first compiled step's extra time over a steady
one, with an empty Inductor cache (``--warm-cache`` keeps the machine's). On CPU it also prints
the share of an eager step spent in the kernels compiling leaves as library calls (matmuls,
attention), profiled, and the ceiling that share puts on compiling's gain (Amdahl: 1 / share).

    .venv/bin/python benchmarks/bench_train.py                 # tiny, mid, small
    .venv/bin/python benchmarks/bench_train.py --quick         # short smoke run
    .venv/bin/python benchmarks/bench_train.py --compile       # compiled vs eager: tiny, 100m
"""

from __future__ import annotations

import os
import tempfile
import time

import harness
import torch

from qwen3 import Qwen3
from qwen3.compile import compile_for_training
from qwen3.layers import MLP
from trainer.build import retain_freed_memory

# Batch and sequence length per shape: tokens per step kept CPU-sized (tiny's is the main job's).
SHAPES = {"tiny": (16, 256), "mid": (16, 256), "small": (8, 256), "100m": (4, 256)}


def bench_shape(name: str, args, dtype: torch.dtype, device: torch.device) -> list[list[str]]:
    batch_size, seq_len = SHAPES[name]
    cfg = harness.config_for(name)
    torch.manual_seed(args.seed)
    base = Qwen3(cfg).to(device).train()
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=device)
    flops_per_token = base.estimate_flops(seq_len)

    def ours_copy(hand_backward: bool = True) -> Qwen3:
        m = Qwen3(cfg).to(device).train()
        m.load_state_dict(base.state_dict())
        for layer in m.model.layers:
            if isinstance(layer.mlp, MLP):
                layer.mlp.hand_backward = hand_backward
        return m

    contenders = {
        "transformers AdamW": (harness.transformers_twin(base), False, "adamw"),
        "ours AdamW": (ours_copy(), True, "adamw"),
        "ours Muon+AdamW": (ours_copy(), True, "muon"),
        # The dense MLP by autograd over its ops instead of qwen3.swiglu's Function.
        "ours Muon+AdamW, autograd MLP": (ours_copy(hand_backward=False), True, "muon"),
    }
    runs = {}
    for label, (model, is_ours, optim_name) in contenders.items():
        loss_fn = harness.ours_loss if is_ours else harness.transformers_loss
        step = harness.train_stepper(model, loss_fn, batch, optim_name, args.amp)
        print(f"  {name} {label}: first loss {step():.4f}")
        runs[label] = harness.timed(step, args.steps, batch_size * seq_len)
    # The peak is measured again in every round, so MFU follows the load on a shared machine.
    runs["peak"] = lambda: harness.matmul_peak_gflops(device, dtype, repeats=2)
    results = harness.alternate(runs, args.rounds)
    peaks = results.pop("peak")
    ref = results["transformers AdamW"]
    rows = []
    for label, rates in results.items():
        tps = harness.median(rates)
        # Ours / theirs within each round (back to back, so a slow phase of a shared machine
        # slows both), then the median over rounds.
        ratio = harness.median([r / t for r, t in zip(rates, ref, strict=True)])
        mfu = harness.median(
            [r * flops_per_token / (p * 1e9) for r, p in zip(rates, peaks, strict=True)]
        )
        rows.append(
            [
                name,
                f"{base.num_params() / 1e6:.1f}M",
                f"{batch_size}x{seq_len}",
                label,
                f"{tps:,.0f}",
                f"{ratio:.2f}",
                f"{100 * mfu:.0f}%",
            ]
        )
    return rows


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (Inductor's compiler runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed_both(step, steps: int):
    """A closure running ``steps`` steps; returns (wall seconds, CPU seconds) per step."""

    def run() -> tuple[float, float]:
        w0, c0 = time.perf_counter(), _cpu_seconds()
        for _ in range(steps):
            step()
        return (time.perf_counter() - w0) / steps, (_cpu_seconds() - c0) / steps

    return run


# CPU kernels Inductor calls as they are (oneDNN/MKL matmuls, SDPA's flash kernel) rather than
# generating code for: compiling can only shrink the rest of a step.
LIBRARY_KERNELS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::addmm_",
        "aten::bmm",
        "aten::baddbmm",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    }
)


def library_share(step, steps: int = 2) -> float:
    """The fraction of ``steps`` steps' wall time spent inside :data:`LIBRARY_KERNELS` (their
    self time under ``torch.profiler``; CPU only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.key_averages()
    return sum(e.self_cpu_time_total for e in events if e.key in LIBRARY_KERNELS) / wall_us


def bench_compile(name: str, args) -> list[str]:
    """Our Muon + AdamW step on ``name``'s shape, eager against compiled block by block."""
    batch_size, seq_len = SHAPES[name]
    cfg = harness.config_for(name)
    device = torch.device(args.device_resolved)
    torch.manual_seed(args.seed)
    eager = Qwen3(cfg).to(device).train()
    compiled = Qwen3(cfg).to(device).train()
    compiled.load_state_dict(eager.state_dict())
    compile_for_training(compiled)
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=device)
    steps = {
        label: harness.train_stepper(model, harness.ours_loss, batch, "muon", args.amp)
        for label, model in (("eager", eager), ("compiled", compiled))
    }
    firsts = {}
    for label, step in steps.items():  # the compiled side compiles in its first step
        firsts[label] = _timed_both(step, 1)()
        print(f"  {name} {label}: first step {firsts[label][0]:.1f}s wall", flush=True)
    results = harness.alternate(
        {label: _timed_both(step, args.steps) for label, step in steps.items()}, args.rounds
    )
    tokens = batch_size * seq_len
    eager_s = harness.median([w for w, _ in results["eager"]])
    compiled_s = harness.median([w for w, _ in results["compiled"]])
    pairs = list(zip(results["eager"], results["compiled"], strict=True))
    wall_ratio, cpu_ratio = (harness.median([e[i] / c[i] for e, c in pairs]) for i in (0, 1))
    compile_wall = firsts["compiled"][0] - compiled_s
    compile_cpu = firsts["compiled"][1] - harness.median([c for _, c in results["compiled"]])
    saved = eager_s - compiled_s
    break_even = f"{compile_wall / saved:,.0f}" if saved > 0 else "never"
    if device.type == "cpu":
        share = library_share(steps["eager"])
        library = [f"{100 * share:.0f}%", f"{1 / share:.2f}"]
    else:  # CUDA kernels run asynchronously: host-side self time says nothing of them
        library = ["-", "-"]
    print(  # as soon as it is known: a large shape on a busy CPU takes long
        f"  {name}: compiled / eager {wall_ratio:.2f} (wall), {cpu_ratio:.2f} (CPU); compile "
        f"{compile_wall:.0f}s wall, {compile_cpu:.0f}s CPU",
        flush=True,
    )
    return [
        name,
        f"{eager.num_params() / 1e6:.1f}M",
        f"{batch_size}x{seq_len}",
        f"{tokens / eager_s:,.0f}",
        f"{tokens / compiled_s:,.0f}",
        f"{wall_ratio:.2f}",
        f"{cpu_ratio:.2f}",
        f"{compile_wall:.0f}s ({compile_cpu:.0f}s CPU)",
        break_even,
        *library,
    ]


def main_compile(args) -> None:
    if not args.warm_cache:  # what a first run on a machine pays
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-bench-")
    if args.device_resolved == "cpu":
        # The trainer's CPU setting (both sides alike): without it eager pays page faults for
        # fresh tensors that the trainer's steps do not, which inflated compile's gain here.
        print(f"malloc keeps freed memory, as the trainer does: {retain_freed_memory()}")
    rows = [bench_compile(name, args) for name in args.shapes.split(",")]
    cache = "the machine's Inductor cache" if args.warm_cache else "an empty Inductor cache"
    print(
        f"\n{args.rounds} alternating rounds x {args.steps} steps of Muon + AdamW, median wall "
        "tokens/s; ratio = median over rounds of compiled / eager speed in the same round (by "
        "wall time, and by the process's CPU time, steadier on a shared machine); compile = "
        f"first compiled step minus a steady one, with {cache}; break-even = steps until the "
        "compiled run has caught up (wall); library share = the eager step's wall time in "
        "matmul and attention kernels, which compiling leaves as calls, and ceiling = 1 / that "
        "share, the most compiling the rest could gain (CPU only)"
    )
    headers = ["shape", "params", "batch", "eager tok/s", "compiled tok/s", "ratio (wall)"]
    headers += ["ratio (CPU)", "compile", "break-even steps", "library share", "ceiling"]
    harness.print_table(headers, rows)


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma list of tiny, mid, small, 100m (default: "
        "tiny,mid,small; with --compile tiny,100m)",
    )
    parser.add_argument("--steps", type=int, default=None, help="steps per side per round")
    parser.add_argument(
        "--compile", action="store_true", help="compiled against eager (trainer.compile=true)"
    )
    parser.add_argument("--warm-cache", action="store_true", help="keep the Inductor cache")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (GPUs)")
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.steps = args.steps or (1 if args.quick else 2)
    args.shapes = args.shapes or ("tiny,100m" if args.compile else "tiny,mid,small")
    device = harness.setup(args.device, args.threads)
    args.device_resolved = str(device)
    if args.compile:
        print(f"machine: {harness.machine_line(device)}")
        main_compile(args)
        return
    dtype = torch.bfloat16 if args.amp else torch.float32
    print(f"machine: {harness.machine_line(device)}")
    print(f"{dtype} matmul peak now: {harness.matmul_peak_gflops(device, dtype):,.0f} GFLOP/s")
    rows = []
    for name in args.shapes.split(","):
        rows += bench_shape(name, args, dtype, device)
    print(
        f"\n{args.rounds} alternating rounds x {args.steps} steps, median tokens/s; "
        "ratio = median over rounds of tokens/s over transformers AdamW's in the same round; "
        "MFU = median over rounds of achieved FLOP/s over "
        "the matmul peak measured in the same round"
    )
    harness.print_table(
        ["shape", "params", "batch", "model + optimizer", "tokens/s", "ratio", "MFU"], rows
    )


if __name__ == "__main__":
    main()
