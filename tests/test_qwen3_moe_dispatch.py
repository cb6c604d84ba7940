"""What the MoE block's dispatch keeps for backward and reads back from the device: nothing but
activations and the expert parameters themselves are saved (no stacked or cast copy of the
weights, which FSDP could not free), the grouped path never reads a value back to the host, and
in bf16 the block compiles as one graph (fullgraph=True). The CPU runs the CUDA path's code
here: ``F.grouped_mm`` has a CPU kernel (float32 and bf16)."""

from __future__ import annotations

import pytest
import torch

from qwen3 import Qwen3Config
from qwen3.moe import RouterLosses, SparseMoeBlock

C, F, E = 64, 24, 6
CFG = Qwen3Config(
    vocab_size=211,
    hidden_size=C,
    intermediate_size=112,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=E,
    num_experts_per_tok=2,
    moe_intermediate_size=F,
)


def _block(dtype: torch.dtype, implementation: str) -> SparseMoeBlock:
    torch.manual_seed(0)
    block = SparseMoeBlock(CFG).to(dtype)
    block.experts.implementation = implementation  # type: ignore[assignment]
    return block


def _saved_for_backward(block: SparseMoeBlock, x: torch.Tensor) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)
    out.float().square().sum().backward()
    return saved


@pytest.mark.parametrize(
    ("dtype", "implementation"),
    [
        (torch.float32, "loop"),
        (torch.float32, "grouped_mm"),
        (torch.bfloat16, "grouped_mm"),  # what FSDP's bf16 gather hands the CUDA path
    ],
)
def test_only_activations_and_the_parameters_themselves_are_saved(dtype, implementation) -> None:
    """Every saved tensor either shares a parameter's storage (the parameter, or a view of it:
    the transposed expert weights the grouped matmul saves) or is an activation, none shaped like
    a weight matrix: a stack or cast of the expert weights would be a new (E, ...) tensor here.
    The expert parameters are saved (as themselves) at all: the test sees the weights go by."""
    block = _block(dtype, implementation)
    x = torch.randn(2, 20, C, dtype=dtype, requires_grad=True)  # 40 tokens, 80 routed rows
    params = {p.untyped_storage().data_ptr(): n for n, p in block.named_parameters()}
    saved = _saved_for_backward(block, x)
    aliased = {
        params[t.untyped_storage().data_ptr()]
        for t in saved
        if t.untyped_storage().data_ptr() in params
    }
    assert {"experts.gate_up_proj", "experts.down_proj"} <= aliased
    weight_shapes = {(2 * F, C), (C, 2 * F), (C, F), (F, C)}
    for t in saved:
        if t.untyped_storage().data_ptr() in params:
            continue
        assert tuple(t.shape[-2:]) not in weight_shapes, (tuple(t.shape), t.dtype)
    assert all(p.grad is not None for p in block.parameters())


def test_grouped_path_and_router_losses_never_read_the_device() -> None:
    """Routing, the grouped experts, backward, and the load-balancing loss with the experts' load,
    all on the meta device, whose tensors have no values: any read back to the host (``.item()``,
    ``.tolist()``, ``bincount`` sizing its output) would raise. The loop path does read the E row
    counts (it slices by Python ints, on CPU where that is no sync), and so fails here."""
    block = _block(torch.bfloat16, "grouped_mm").to("meta")
    x = torch.randn(2, 20, C, dtype=torch.bfloat16, device="meta", requires_grad=True)
    losses = RouterLosses(block)
    (block(x).float().square().mean() + losses.take()).backward()
    assert x.grad is not None and block.experts.gate_up_proj.grad is not None
    block.experts.implementation = "loop"
    with pytest.raises(NotImplementedError, match="meta"):
        block(x)


def test_bf16_block_compiles_as_one_graph_equal_to_eager() -> None:
    """In bf16 (the CUDA path's dtype) the block traces whole: fullgraph=True, forward and
    backward (aot_eager: the graph Dynamo and AOTAutograd capture, without Inductor's minutes of
    C++ compilation on CPU), equal to eager."""
    x = torch.randn(2, 20, C, dtype=torch.bfloat16)
    results = []
    for compiled in (False, True):
        block = _block(torch.bfloat16, "auto")  # grouped_mm when compiling, the loop in eager
        run = torch.compile(block, fullgraph=True, backend="aot_eager") if compiled else block
        xi = x.clone().requires_grad_()
        out = run(xi)
        out.float().square().sum().backward()
        results.append(
            [out.float(), xi.grad.float(), *(p.grad.float() for p in block.parameters())]
        )
    for eager, compiled in zip(*results, strict=True):
        assert torch.allclose(eager, compiled, rtol=0.02, atol=0.02 * eager.abs().max().item())


def test_float32_block_breaks_where_the_loop_reads_its_counts() -> None:
    """float32 on CPU has no grouped kernel under compile (its meta function takes bf16 only), so
    the block runs the loop, which reads the E row counts as Python ints: Dynamo breaks the graph
    there (3 breaks in torch 2.13). Counted, so a change shows; compile per block
    (trainer.compile) keeps the breaks inside the MoE block."""
    block = _block(torch.float32, "auto")
    explained = torch._dynamo.explain(block)(torch.randn(2, 20, C))
    assert explained.graph_break_count == 3
    reasons = " ".join(str(r.reason) for r in explained.break_reasons)
    assert "_local_scalar_dense" in reasons
    bf16 = torch._dynamo.explain(_block(torch.bfloat16, "auto"))(torch.randn(2, 20, C).bfloat16())
    assert bf16.graph_break_count == 0 and bf16.graph_count == 1


def test_selective_checkpointing_keeps_the_grouped_matmuls() -> None:
    """Selective checkpointing saves the experts' grouped matmuls as it saves every matmul: its
    backward recomputes the routing and SiLU, never a grouped matmul."""
    from test_activation_checkpointing import OpCounter

    from qwen3.checkpointing import run_block

    block = _block(torch.float32, "grouped_mm")
    x = torch.randn(2, 20, C, requires_grad=True)
    counts = {}
    for mode in ("none", "selective", "full"):
        out = run_block(block, mode, x)
        with OpCounter() as counter:
            out.square().sum().backward()
        counts[mode] = counter.counts
    # Backward alone: 2 grouped matmuls per forward one (input and weight gradients).
    assert counts["none"]["_grouped_mm"] == counts["selective"]["_grouped_mm"] == 4
    assert counts["full"]["_grouped_mm"] == 6  # the forward's two run again
    assert counts["selective"]["silu"] == 1


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpoint_recompute_keeps_no_routing(mode) -> None:
    """Activation checkpointing runs the block again in backward; that run keeps no routing
    (its probabilities and their graph would be held until the next forward), and the gradients, auxiliary
    loss included, are the unchecked block's."""
    from qwen3.checkpointing import run_block

    grads = {}
    for m in ("none", mode):
        block = _block(torch.float32, "loop")
        x = torch.randn(2, 20, C, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = run_block(block, m, x)
        aux = RouterLosses(block).take()
        (out.square().sum() + aux).backward()
        assert block.routing is None
        grads[m] = [x.grad, *(p.grad for p in block.parameters())]
    for a, b in zip(grads["none"], grads[mode], strict=True):
        torch.testing.assert_close(a, b)
