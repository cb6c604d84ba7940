"""The sparse MoE layer: ours (qwen3.moe.SparseMoeBlock) against transformers'
Qwen3MoeSparseMoeBlock with the same weights, forward + backward, at batch x seq tokens.

transformers runs its experts through the implementation its models pick by default
(``grouped_mm``: torch's grouped matmul) and through its ``eager`` loop; both are timed. The
outputs and input gradients of all three are checked to agree before timing. With ``--amp`` the
layers run under bf16 autocast (float32 parameters), as the trainer runs them where its ``auto``
precision is bf16.

With ``--models``: training tokens/s of whole models instead, tiny against tiny-moe (tiny's
active parameters), Muon + AdamW, the load-balancing loss included, alternating steps, in the
precision the trainer's ``auto`` picks here (bf16 autocast on CPUs with native bf16 matmuls).

    .venv/bin/python benchmarks/bench_moe.py                 # tiny-moe's layer, 16 x 256
    .venv/bin/python benchmarks/bench_moe.py --amp           # the same under bf16 autocast
    .venv/bin/python benchmarks/bench_moe.py --models        # tiny vs tiny-moe training steps
    .venv/bin/python benchmarks/bench_moe.py --quick
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import harness
import torch

from qwen3 import Qwen3Config
from qwen3.moe import SparseMoeBlock, expert_counts
from qwen3.moe_experts import padded_counts, row_multiple_for
from trainer.build import Precision, resolve_precision


def transformers_block(ours: SparseMoeBlock, cfg: Qwen3Config, impl: str) -> torch.nn.Module:
    """transformers' Qwen3MoeSparseMoeBlock holding ``ours``' weights (both keep the experts fused
    as (E, 2F, C) gate_up and (E, C, F) down, transformers 5's layout)."""
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_cfg = transformers.Qwen3MoeConfig(**cfg.to_dict())
    hf_cfg._experts_implementation = impl
    block = Qwen3MoeSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(ours.gate.weight)
        block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        block.experts.down_proj.copy_(ours.experts.down_proj)
    return block


def default_experts_implementation(cfg: Qwen3Config) -> str:
    """The experts implementation transformers picks for a Qwen3-MoE model when none is asked for
    (checked, not assumed: it depends on the installed transformers and torch)."""
    import transformers

    small = {**cfg.to_dict(), "num_hidden_layers": 1, "vocab_size": 64}
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**small))
    return str(model.config._experts_implementation)


def fwd_bwd(
    block: torch.nn.Module, x: torch.Tensor, amp: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    xi = x.detach().requires_grad_()
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        out = block(xi)
    out.float().square().mean().backward()
    assert xi.grad is not None
    return out.detach().float(), xi.grad


def timer(
    block: torch.nn.Module,
    inputs: list[torch.Tensor],
    clock: Callable[[], float] = time.perf_counter,
    amp: bool = False,
) -> Callable[[], float]:
    """Times one forward + backward per call, on the next of ``inputs``: a fresh routing each
    call, as in training, where the rows per expert change every step (in bf16 on CPU, oneDNN
    builds a kernel per new matmul shape: one input timed over and over would hide that)."""
    calls = iter(inputs)

    def run() -> float:
        x = next(calls)
        t0 = clock()
        fwd_bwd(block, x, amp)
        block.zero_grad(set_to_none=True)
        harness.sync(x.device)
        return clock() - t0

    return run


def matmuls_only(
    ours: SparseMoeBlock,
    inputs: list[torch.Tensor],
    clock: Callable[[], float] = time.perf_counter,
    dtype: torch.dtype = torch.float32,
) -> Callable[[], float]:
    """The experts' matmuls of one forward + backward and nothing else: per expert, on the rows
    ``ours`` routes to it (the next of ``inputs`` each call), gate|up and down forward, then the
    input and weight gradients of both (6 matmuls, the same shapes as ours and transformers'
    eager loop; in bf16 on CPU ours' rows padded to a multiple of 32, as ours runs them). No
    layer that computes these can be faster, so their time / this is the most any dispatch
    could gain."""
    calls = iter(inputs)
    gate_up = ours.experts.gate_up_proj.detach().to(dtype).unbind(0)
    down = ours.experts.down_proj.detach().to(dtype).unbind(0)

    def run() -> float:
        x = next(calls)
        with torch.no_grad():
            _, _, ids = ours.route(x.reshape(-1, x.shape[-1]))
        counts = expert_counts(ids, ours.num_experts).tolist()
        counts = padded_counts(counts, row_multiple_for(x.device.type, dtype))
        c, f = x.shape[-1], down[0].shape[1]
        # Inputs of each matmul, made before the clock starts (values do not matter): rows,
        # SwiGLU product, output gradient, gate|up gradient.
        operands = [
            [torch.randn(n, d, device=x.device, dtype=dtype) for d in (c, f, c, 2 * f)]
            for n in counts
        ]
        t0 = clock()
        for (xs, h, grad_y, grad_gu), w_gu, w_d in zip(operands, gate_up, down, strict=True):
            xs @ w_gu.t(), h @ w_d.t()  # forward: gate|up, down
            grad_y @ w_d, grad_y.t() @ h  # down: input and weight gradients
            grad_gu @ w_gu, grad_gu.t() @ xs  # gate|up: input and weight gradients
        harness.sync(x.device)
        return clock() - t0

    return run


def model_stepper(
    name: str, batch: torch.Tensor, precision: Precision, clock: Callable[[], float]
) -> Callable[[], float]:
    """One training step of preset ``name`` on ``batch`` as the trainer runs it, in
    ``precision``; returns seconds."""
    from optim import OptimConfig, build_optimizers
    from qwen3 import Qwen3
    from qwen3.moe import RouterLosses

    model = Qwen3(Qwen3Config.from_preset(name)).train()
    opt = build_optimizers(model, OptimConfig(warmup_steps=0, schedule="constant"), 10**9)
    x, y = batch[:, :-1], batch[:, 1:]

    def step() -> float:
        t0 = clock()
        router = RouterLosses(model)
        with precision.autocast():
            loss = model(x, targets=y) + router.take()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return clock() - t0

    return step


def compare_models(
    rounds: int, batch: int, seq: int, clock: Callable[[], float] = time.perf_counter
) -> None:
    tokens = torch.randint(0, Qwen3Config.from_preset("tiny").vocab_size, (batch, seq + 1))
    precision = resolve_precision("auto", tokens.device)  # the trainer's default choice
    steppers = {
        name: model_stepper(name, tokens, precision, clock) for name in ("tiny", "tiny-moe")
    }
    for step in steppers.values():
        step()  # warm-up
    print(
        f"training steps of {batch} x {seq} in {precision.name}, Muon + AdamW; {rounds} "
        "alternating rounds, medians"
    )
    runs = harness.alternate(steppers, rounds)
    tiny = harness.median(runs["tiny"])
    rows = [
        [name, f"{batch * seq / harness.median(t):,.0f}", f"{tiny / harness.median(t):.2f}"]
        for name, t in runs.items()
    ]
    harness.print_table(["model", "tokens/s", "speed vs tiny"], rows)


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny-moe", help="an MoE preset whose layer to time")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--models", action="store_true", help="tiny vs tiny-moe training steps")
    parser.add_argument("--amp", action="store_true", help="the layer under bf16 autocast")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by this process's CPU time, not wall-clock (CPU only; steadier on a loaded "
        "machine, where waiting for a core is not the layer's or the step's cost)",
    )
    args = parser.parse_args()
    device = harness.setup(args.device, args.threads)
    rounds = args.rounds or (3 if args.quick else 15)
    batch, seq = (4, 64) if args.quick else (args.batch, args.seq)
    print(f"machine: {harness.machine_line(device)}")
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"timed by {'CPU time' if args.cpu_time else 'wall-clock'}")
    if args.models:
        compare_models(rounds, batch, seq, clock)
        return
    torch.manual_seed(args.seed)
    cfg = Qwen3Config.from_preset(args.shape)
    ours = SparseMoeBlock(cfg)
    with torch.no_grad():  # the model's initialisation: N(0, 0.02)
        for p in ours.parameters():
            p.normal_(0.0, cfg.initializer_range)
    ours.to(device)
    ours_grouped = copy.deepcopy(ours)
    ours_grouped.experts.implementation = "grouped_mm"  # the CUDA path, here on torch's CPU kernel
    contenders = {
        "ours": ours,
        "ours grouped_mm": ours_grouped,
        "transformers grouped_mm": transformers_block(ours, cfg, "grouped_mm").to(device),
        "transformers eager": transformers_block(ours, cfg, "eager").to(device),
    }
    import transformers

    default = default_experts_implementation(cfg)
    print(f"transformers {transformers.__version__}: default experts implementation {default}")
    x = torch.randn(batch, seq, cfg.hidden_size, device=device)
    ref_out, ref_grad = fwd_bwd(ours, x, args.amp)
    # bf16: the contenders round differently (expert order, where the routing weight is applied)
    atol = (2e-3, 2e-8) if args.amp else (1e-5, 1e-6)
    for name, block in contenders.items():
        out, grad = fwd_bwd(block, x, args.amp)
        same = torch.allclose(out, ref_out, atol=atol[0]) and torch.allclose(
            grad, ref_grad, atol=atol[1]
        )
        print(f"{name}: output and input gradient equal to ours: {same}")
        block.zero_grad(set_to_none=True)
    print(
        f"layer of {args.shape}: {cfg.num_experts} experts of {cfg.moe_intermediate_size}, "
        f"top {cfg.num_experts_per_tok}, hidden {cfg.hidden_size}; batch {batch} x {seq}; "
        f"{'bf16 autocast' if args.amp else 'float32'}; {rounds} alternating rounds, medians"
    )
    # One fresh input per round, the same for every contender in it (alternate calls each
    # once per round).
    inputs = [torch.randn_like(x) for _ in range(rounds)]
    timers = {n: timer(b, inputs, clock, args.amp) for n, b in contenders.items()}
    matmul_dtype = torch.bfloat16 if args.amp else torch.float32
    timers["experts' matmuls alone"] = matmuls_only(ours, inputs, clock, matmul_dtype)
    runs = harness.alternate(timers, rounds)
    ours_ms = harness.median(runs["ours"])
    rows = [
        [name, f"{1000 * harness.median(t):.1f}", f"{harness.median(t) / ours_ms:.2f}"]
        for name, t in runs.items()
    ]
    harness.print_table(["MoE layer fwd+bwd", "ms", "ratio (their time / ours)"], rows)


if __name__ == "__main__":
    main()
