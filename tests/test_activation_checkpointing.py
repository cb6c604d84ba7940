"""Activation checkpointing (trainer.activation_checkpointing): the same gradients in every mode,
each mode recomputing what it says it does, and the option working under FSDP2 and DDP (torchrun,
gloo) and torch.compile."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_distributed_support import STEPS, base_overrides, losses, run_torchrun
from test_distributed_support import single_process_losses as reference_losses
from test_trainer_support import compose_run_config, write_corpus
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from qwen3 import Qwen3, Qwen3Config
from qwen3.compile import compile_for_training
from trainer.errors import ConfigError

MODES = ("full", "selective")


def tiny_model() -> Qwen3:
    torch.manual_seed(0)
    return Qwen3(Qwen3Config.from_preset("tiny", num_hidden_layers=2))


def batch(cfg: Qwen3Config, t: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (2, t), generator=g)
    return x, torch.randint(0, cfg.vocab_size, (2, t), generator=g)


def loss_and_grads(model: Qwen3, x: torch.Tensor, y: torch.Tensor, call: nn.Module | None = None):
    """The loss and every parameter's gradient, calling ``call`` (e.g. the compiled model)."""
    model.zero_grad()
    loss = (model if call is None else call)(x, targets=y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", MODES)
def test_gradients_equal_those_without_checkpointing(mode: str) -> None:
    model = tiny_model()
    x, y = batch(model.config)
    model.set_activation_checkpointing(mode)
    # Selective checkpointing runs the MLP by autograd over its ops (the matmuls it saves by op),
    # the others by qwen3.swiglu's Function: the reference takes the same MLP path.
    hand_backward = [layer.mlp.hand_backward for layer in model.model.layers]
    model.set_activation_checkpointing("none")
    for layer, hand in zip(model.model.layers, hand_backward, strict=True):
        layer.mlp.hand_backward = hand
    ref_loss, ref = loss_and_grads(model, x, y)
    model.set_activation_checkpointing(mode)
    loss, grads = loss_and_grads(model, x, y)
    # The recomputation runs the very same kernels on the same inputs: equal to the bit on CPU.
    assert torch.equal(loss, ref_loss)
    for name, g in ref.items():
        assert torch.equal(grads[name], g), name


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def backward_ops(mode: str, hand_backward: bool = True) -> Counter[str]:
    model = tiny_model()
    model.set_activation_checkpointing(mode)  # type: ignore[arg-type]
    if not hand_backward:
        for layer in model.model.layers:
            layer.mlp.hand_backward = False
    x, y = batch(model.config)
    loss = model(x, targets=y)
    with OpCounter() as counter:
        loss.backward()
    return counter.counts


def test_each_mode_recomputes_what_it_promises() -> None:
    none, full, selective = (backward_ops(m) for m in ("none", "full", "selective"))
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    # The MLP's SiLU: one sigmoid in qwen3.swiglu's forward (none, full), aten silu under
    # selective (the MLP then runs by autograd over its ops).
    # Without checkpointing nothing of the forward runs again: no SiLU, no attention forward.
    assert none["sigmoid"] == 0 and none["silu"] == 0 and none[attention] == 0
    # full: every block runs again whole, its matmuls and attention included.
    layers = 2
    assert full["sigmoid"] == layers and full[attention] == layers
    assert full["mm"] > none["mm"]
    # selective: the cheap elementwise ops run again, the saved matmuls and attention do not.
    assert selective["silu"] == layers and selective["rsqrt"] > 0
    assert selective[attention] == 0
    assert selective["mm"] == backward_ops("none", hand_backward=False)["mm"]


def test_an_unknown_mode_is_one_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="trainer.activation_checkpointing"):
        compose_run_config(["trainer.activation_checkpointing=some"])
    with pytest.raises(ValueError, match="not one of none, full, selective"):
        tiny_model().set_activation_checkpointing("some")  # type: ignore[arg-type]


@pytest.mark.slow  # compiles a block and the loss chunk per mode (~30 s each on 2 CPU cores)
@pytest.mark.parametrize("mode", MODES)
def test_compiled_model_with_checkpointing_matches_eager(mode: str) -> None:
    model = tiny_model()
    x, y = batch(model.config)
    ref_loss, ref = loss_and_grads(model, x, y)
    model.set_activation_checkpointing(mode)  # type: ignore[arg-type]
    torch._dynamo.reset()
    compile_for_training(model)  # the trainer's order: checkpointing first, then compile
    loss, grads = loss_and_grads(model, x, y)
    # Inductor fuses and reorders float sums: equal to float32 rounding, not to the bit.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("ac") / "play.txt")


@pytest.mark.slow  # one 2-process run and one single-process reference each (15-40 s)
@pytest.mark.parametrize(("mode", "sharding"), [("selective", "fsdp"), ("full", "ddp")])
def test_checkpointed_multi_process_run_trains_as_the_plain_one(
    corpus, tmp_path, mode: str, sharding: str
) -> None:
    base = base_overrides(tmp_path, corpus, tmp_path / "cache")
    res = run_torchrun(
        tmp_path,
        2,
        *base,
        "run_name=ac",
        f"trainer.fsdp={sharding == 'fsdp'}",
        f"trainer.activation_checkpointing={mode}",
        "trainer.batch_size=8",
    )
    assert res.returncode == 0, res.stderr
    got = losses(tmp_path / "runs" / "ac")
    ref = reference_losses([*base, "trainer.batch_size=16"], tmp_path / "ref")
    assert len(got) == STEPS
    assert got == pytest.approx(ref, rel=1e-4)
