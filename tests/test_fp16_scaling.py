"""fp16 with loss scaling: the fused loss's forward-formed gradients survive fp16, and the
trainer's fp16 + GradScaler step (unscale, clip, step, skip on overflow) works. On CPU, with
``torch.amp.GradScaler("cpu")`` and fp16 autocast: the same code path as CUDA's."""

from __future__ import annotations

import pytest
import torch

from optim import OptimConfig, OptimizerSet, build_optimizers
from qwen3 import Qwen3, Qwen3Config
from qwen3.loss import linear_cross_entropy
from trainer.build import Precision
from trainer.step import train_step


def _grads(
    h0: torch.Tensor, w0: torch.Tensor, y: torch.Tensor, fp16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    if not fp16:
        linear_cross_entropy(h, w, y, chunk_rows=256).backward()
        return h.grad, w.grad
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = linear_cross_entropy(h, w, y, chunk_rows=256)
    scaler.scale(loss).backward()
    inv = 1.0 / scaler.get_scale()
    return h.grad * inv, w.grad * inv


def test_fp16_loss_gradients_match_float32_at_a_large_vocabulary() -> None:
    """1024 positions, vocabulary 65,536: most probabilities (~1/V) and h/N sit below fp16's
    normal range. Gradients unscaled from fp16 + GradScaler are within 2e-3 (relative norm) of
    float32's, also on the rows of ids that are no target, whose gradient is made of those
    small products alone (forming that product in fp16 before the scale arrived was 5% off)."""
    torch.manual_seed(0)
    n, c, v = 1024, 32, 65_536
    h0 = torch.nn.functional.rms_norm(torch.randn(n, c), (c,))
    w0 = torch.randn(v, c) * 0.02
    y = torch.randint(0, v, (n,))
    (gh16, gw16), (gh32, gw32) = _grads(h0, w0, y, fp16=True), _grads(h0, w0, y, fp16=False)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    absent = torch.ones(v, dtype=torch.bool)
    absent[y] = False
    assert rel(gh16, gh32) < 2e-3
    assert rel(gw16, gw32) < 2e-3
    assert rel(gw16[absent], gw32[absent]) < 2e-3
    assert (gw16[absent] != 0).all()  # nothing underflowed to zero


def _model_and_optimizers() -> tuple[Qwen3, OptimizerSet]:
    torch.manual_seed(0)
    model = Qwen3(
        Qwen3Config(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    )
    return model, build_optimizers(model, OptimConfig(name="adamw", warmup_steps=2), max_steps=10)


def _fp16(init_scale: float) -> Precision:
    return Precision("fp16", "cpu", torch.float16, torch.amp.GradScaler("cpu", init_scale))


def test_trainer_fp16_step_unscales_clips_and_steps() -> None:
    model, opt = _model_and_optimizers()
    x = torch.randint(0, 256, (4, 16))
    y = torch.randint(0, 256, (4, 16))
    ref, ref_opt = _model_and_optimizers()
    fp32 = train_step(ref, ref_opt, x, y, 2, Precision("fp32", "cpu", None), clip=0.0).read()
    before = [p.detach().clone() for p in model.parameters()]
    precision = _fp16(2.0**16)
    res = train_step(model, opt, x, y, 2, precision, clip=0.5).read()
    assert not res["skipped"] and not res["overflow"]
    # The norm is of the unscaled gradients (not 65536 times larger) and near float32's.
    assert res["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=2e-2)
    assert res["grad_norm"] > 0.5  # so clipping to 0.5 was in effect
    assert res["loss"] == pytest.approx(fp32["loss"], rel=1e-2)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert precision.scaler is not None and precision.scaler.get_scale() == 2.0**16
    assert all(p.grad is None for p in model.parameters())


def test_trainer_fp16_step_skips_on_overflow_and_lowers_the_scale() -> None:
    """A scale that overflows fp16 in backward: no parameter moves, the scale halves, the LR
    schedule still advances, and the step reports an overflow (not divergence)."""
    model, opt = _model_and_optimizers()
    x = torch.randint(0, 256, (2, 16))
    y = torch.randint(0, 256, (2, 16))
    before = [p.detach().clone() for p in model.parameters()]
    precision = _fp16(2.0**100)
    res = train_step(model, opt, x, y, 1, precision, clip=1.0).read()
    assert res["skipped"] and res["overflow"]
    assert res["loss"] == pytest.approx(5.55, abs=0.1)  # finite: ln(256) at init
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert precision.scaler is not None and precision.scaler.get_scale() == 2.0**99
    assert opt.steps == 1
    res = train_step(model, opt, x, y, 1, _fp16(2.0**8), clip=1.0).read()
    assert not res["skipped"]
