"""Training throughput: our Qwen3 against transformers' Qwen3ForCausalLM, same weights and batch.

Forward + backward + optimizer step, the contenders alternating within each round, median
tokens/s over the rounds, the ratio ours / transformers (both with AdamW), and MFU against
this machine's float32 (or bf16 with --amp) matmul peak, measured here first.

    .venv/bin/python benchmarks/bench_train.py                 # tiny, mid, small
    .venv/bin/python benchmarks/bench_train.py --quick         # short smoke run
    .venv/bin/python benchmarks/bench_train.py --compile       # add torch.compile rows
"""

from __future__ import annotations

import time

import harness
import torch

from qwen3 import Qwen3

# Batch and sequence length per shape: tokens per step kept CPU-sized.
SHAPES = {"tiny": (16, 256), "mid": (16, 256), "small": (8, 256)}


def bench_shape(name: str, args, dtype: torch.dtype, device: torch.device) -> list[list[str]]:
    batch_size, seq_len = SHAPES[name]
    cfg = harness.config_for(name)
    torch.manual_seed(args.seed)
    base = Qwen3(cfg).to(device).train()
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=device)
    flops_per_token = base.estimate_flops(seq_len)

    def ours_copy() -> Qwen3:
        m = Qwen3(cfg).to(device).train()
        m.load_state_dict(base.state_dict())
        return m

    contenders = {
        "transformers AdamW": (harness.transformers_twin(base), False, "adamw", False),
        "ours AdamW": (ours_copy(), True, "adamw", False),
        "ours Muon+AdamW": (ours_copy(), True, "muon", False),
    }
    if args.compile:
        contenders["transformers AdamW compiled"] = (
            harness.transformers_twin(base),
            False,
            "adamw",
            True,
        )
        contenders["ours AdamW compiled"] = (ours_copy(), True, "adamw", True)
    runs = {}
    for label, (model, is_ours, optim_name, compiled) in contenders.items():
        if compiled:
            model = torch.compile(model)
        loss_fn = harness.ours_loss if is_ours else harness.transformers_loss
        step = harness.train_stepper(model, loss_fn, batch, optim_name, args.amp)
        t0 = time.perf_counter()
        first_loss = step()
        for _ in range(2 if compiled else 0):
            step()
        print(f"  {name} {label}: warm-up {time.perf_counter() - t0:.1f}s, loss {first_loss:.4f}")
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


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,mid,small", help="comma list: tiny, mid, small")
    parser.add_argument("--steps", type=int, default=None, help="steps per side per round")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (GPUs)")
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.steps = args.steps or (1 if args.quick else 2)
    device = harness.setup(args.device, args.threads)
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
