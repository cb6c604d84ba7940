"""The sparse MoE layer: ours (qwen3.moe.SparseMoeBlock) against transformers'
Qwen3MoeSparseMoeBlock with the same weights, forward + backward, at batch x seq tokens.

transformers runs its experts through the implementation its models pick by default
(``grouped_mm``: torch's grouped matmul) and through its ``eager`` loop; both are timed. The
outputs and input gradients of all three are checked to agree before timing.

    .venv/bin/python benchmarks/bench_moe.py                 # tiny-moe's layer, 16 x 256
    .venv/bin/python benchmarks/bench_moe.py --quick
"""

from __future__ import annotations

import time
from collections.abc import Callable

import harness
import torch

from qwen3 import Qwen3Config
from qwen3.moe import SparseMoeBlock


def transformers_block(ours: SparseMoeBlock, cfg: Qwen3Config, impl: str) -> torch.nn.Module:
    """transformers' Qwen3MoeSparseMoeBlock holding ``ours``' weights (its experts fused as
    (E, 2F, C) gate_up and (E, C, F) down, as transformers 5 stores them)."""
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_cfg = transformers.Qwen3MoeConfig(**cfg.to_dict())
    hf_cfg._experts_implementation = impl
    block = Qwen3MoeSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(ours.gate.weight)
        gate_up = [torch.cat((e.gate_proj.weight, e.up_proj.weight)) for e in ours.experts]
        block.experts.gate_up_proj.copy_(torch.stack(gate_up))
        block.experts.down_proj.copy_(torch.stack([e.down_proj.weight for e in ours.experts]))
    return block


def fwd_bwd(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xi = x.detach().requires_grad_()
    out = block(xi)
    out.square().mean().backward()
    assert xi.grad is not None
    return out.detach(), xi.grad


def timer(block: torch.nn.Module, x: torch.Tensor) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        fwd_bwd(block, x)
        block.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return run


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny-moe", help="an MoE preset whose layer to time")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    device = harness.setup(args.device, args.threads)
    rounds = args.rounds or (3 if args.quick else 15)
    batch, seq = (4, 64) if args.quick else (args.batch, args.seq)
    torch.manual_seed(args.seed)
    cfg = Qwen3Config.from_preset(args.shape)
    ours = SparseMoeBlock(cfg)
    with torch.no_grad():  # the model's initialisation: N(0, 0.02)
        for p in ours.parameters():
            p.normal_(0.0, cfg.initializer_range)
    ours.to(device)
    contenders = {
        "ours": ours,
        "transformers grouped_mm": transformers_block(ours, cfg, "grouped_mm").to(device),
        "transformers eager": transformers_block(ours, cfg, "eager").to(device),
    }
    x = torch.randn(batch, seq, cfg.hidden_size, device=device)
    ref_out, ref_grad = fwd_bwd(ours, x)
    for name, block in contenders.items():
        out, grad = fwd_bwd(block, x)
        same = torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(grad, ref_grad, atol=1e-6)
        print(f"{name}: output and input gradient equal to ours: {same}")
        block.zero_grad(set_to_none=True)
    print(f"machine: {harness.machine_line(device)}")
    print(
        f"layer of {args.shape}: {cfg.num_experts} experts of {cfg.moe_intermediate_size}, "
        f"top {cfg.num_experts_per_tok}, hidden {cfg.hidden_size}; batch {batch} x {seq}; "
        f"{rounds} alternating rounds, medians"
    )
    runs = harness.alternate({n: timer(b, x) for n, b in contenders.items()}, rounds)
    ours_ms = harness.median(runs["ours"])
    rows = [
        [name, f"{1000 * harness.median(t):.1f}", f"{harness.median(t) / ours_ms:.2f}"]
        for name, t in runs.items()
    ]
    harness.print_table(["MoE layer fwd+bwd", "ms", "ratio (their time / ours)"], rows)


if __name__ == "__main__":
    main()
