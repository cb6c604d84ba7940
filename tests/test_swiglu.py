"""qwen3.swiglu, the dense MLP's eager training path: equal to the three ``F.linear`` calls it
replaces (values and gradients, float32 and bf16 autocast), nothing but activations and the
weights saved for backward, and the MLP taking it only where it should (not under selective
checkpointing, without gradients, for int8 projections or inside a compiled graph)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3 import Qwen3, Qwen3Config
from qwen3.layers import MLP
from qwen3.quantize import quantize_int8
from qwen3.swiglu import swiglu

C, WIDTH = 48, 80


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, C, generator=g, dtype=dtype)
    weights = [
        torch.randn(*shape, generator=g) / shape[1] ** 0.5
        for shape in ((WIDTH, C), (WIDTH, C), (C, WIDTH))
    ]
    return tuple(t.requires_grad_() for t in (x, *weights))


def _reference(x: torch.Tensor, w_gate, w_up, w_down) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def _value_and_grads(fn, inputs: tuple[torch.Tensor, ...], autocast: bool = False):
    for t in inputs:
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*inputs)
    out.float().square().sum().backward()
    return out.detach(), [t.grad.clone() for t in inputs]


def test_values_and_gradients_equal_three_linears_in_float32() -> None:
    inputs = _inputs()
    out, grads = _value_and_grads(swiglu, inputs)
    ref, ref_grads = _value_and_grads(_reference, inputs)
    assert out.shape == ref.shape == (3, 7, C)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, g, r in zip(("x", "gate", "up", "down"), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


def test_bf16_autocast_computes_in_bf16_and_returns_float32_weight_gradients() -> None:
    inputs = _inputs()
    out, grads = _value_and_grads(swiglu, inputs, autocast=True)
    ref, ref_grads = _value_and_grads(_reference, inputs, autocast=True)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.float32] * 4  # as autocast gives nn.Linear
    # Both round to bf16 at every op; their sums differ in order: bf16-sized tolerances.
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for name, g, r in zip(("x", "gate", "up", "down"), grads, ref_grads, strict=True):
        assert float((g - r).norm() / r.norm()) < 2e-2, name


def test_only_activations_and_the_weights_are_saved_for_backward() -> None:
    x, *weights = _inputs()
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu(x, *weights)
    params = {w.data_ptr() for w in weights}
    copies = [
        t for t in saved if t.shape in {w.shape for w in weights} and t.data_ptr() not in params
    ]
    assert not copies  # no stacked or cast copy of a weight
    assert sum(t.data_ptr() in params for t in saved) == 3
    rows = x.shape[0] * x.shape[1]
    # x and the four (rows, WIDTH) buffers: gate's SiLU, up, their product and SiLU's slope.
    assert (
        sorted(tuple(t.shape) for t in saved if t.data_ptr() not in params)
        == [(rows, C)] + [(rows, WIDTH)] * 4
    )


def _mlp_path(mlp: MLP, x: torch.Tensor) -> str:
    """The first autograd node below the MLP output's reshapes ("none" without a graph)."""
    node = mlp(x).grad_fn
    while node is not None and type(node).__name__ in {"ViewBackward0", "UnsafeViewBackward0"}:
        node = node.next_functions[0][0]
    return "none" if node is None else type(node).__name__


def test_the_mlp_takes_the_function_only_where_it_helps() -> None:
    torch.manual_seed(0)
    cfg = Qwen3Config.from_preset("tiny", num_hidden_layers=2)
    model = Qwen3(cfg)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, cfg.hidden_size)
    assert _mlp_path(mlp, x) == "_SwiGLUBackward"
    with torch.no_grad():
        assert _mlp_path(mlp, x) == "none"
    model.set_activation_checkpointing("selective")  # saves the matmuls by op: autograd's ops
    assert _mlp_path(mlp, x) == "MmBackward0"
    model.set_activation_checkpointing("full")
    assert _mlp_path(mlp, x) == "_SwiGLUBackward"
    quantize_int8(model.eval())  # int8 projections are not nn.Linear: never the Function
    assert _mlp_path(mlp, x.requires_grad_()) != "_SwiGLUBackward"


@pytest.mark.parametrize("mode", ["none", "full"])
def test_mlp_training_step_equals_the_autograd_path(mode: str) -> None:
    torch.manual_seed(0)
    cfg = Qwen3Config.from_preset("tiny", num_hidden_layers=2)
    model = Qwen3(cfg)
    model.set_activation_checkpointing(mode)  # type: ignore[arg-type]
    x = torch.randint(0, cfg.vocab_size, (2, 32))

    def grads(hand_backward: bool) -> dict[str, torch.Tensor]:
        for layer in model.model.layers:
            layer.mlp.hand_backward = hand_backward
        model.zero_grad()
        model(x, targets=x).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    hand, plain = grads(True), grads(False)
    for name, g in plain.items():
        torch.testing.assert_close(hand[name], g, rtol=1e-4, atol=1e-6, msg=name)
