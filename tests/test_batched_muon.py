"""BatchedMuon (optim.batched_muon): torch.optim.Muon's step, bit for bit, with same-shaped
matrices orthogonalised as one batch; its state loads into torch.optim.Muon and back."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import Muon

from optim.batched_muon import BatchedMuon, newton_schulz
from optim.param_groups import split_parameters
from qwen3 import Qwen3, Qwen3Config

# tiny and tiny-moe cut to test size, keeping their many same-shaped (and tall and wide) matrices.
SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=64,
)
MOE = dict(num_experts=4, moe_intermediate_size=48)


def _model(preset: str, dtype: torch.dtype = torch.float32) -> Qwen3:
    torch.manual_seed(0)
    extra = MOE if preset == "tiny-moe" else {}
    return Qwen3(Qwen3Config.from_preset(preset, **SMALL, **extra)).to(dtype)


def _matrices(model: nn.Module) -> list[torch.Tensor]:
    return [p for _, p in split_parameters(model).matrices]


def _train(model: Qwen3, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
        opt.step()


KW: dict[str, Any] = dict(lr=0.02, momentum=0.95)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize(
    ("nesterov", "weight_decay", "adjust_lr_fn", "dtype"),
    [
        (True, 0.1, "match_rms_adamw", torch.float32),
        (False, 0.0, "original", torch.float32),
        # bf16 parameters with nesterov only: without it torch 2.13 corrupts its momentum
        (True, 0.1, "match_rms_adamw", torch.bfloat16),
    ],
)
def test_steps_equal_torch_muons(preset, nesterov, weight_decay, adjust_lr_fn, dtype) -> None:
    ours, ref = _model(preset, dtype), _model(preset, dtype)
    kw = dict(KW, nesterov=nesterov, weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn)
    opt_ours, opt_ref = BatchedMuon(_matrices(ours), **kw), Muon(_matrices(ref), **kw)
    shapes = [p.shape for p in _matrices(ours)]
    assert len(set(shapes)) < len(shapes) // 2  # many matrices per batch
    assert any(r > c for r, c in shapes) and any(r < c for r, c in shapes)  # tall and wide
    for model, opt in ((ours, opt_ours), (ref, opt_ref)):
        _train(model, opt, range(2))
    for a, b in zip(_matrices(ours), _matrices(ref), strict=True):
        assert torch.equal(a, b)  # the same ops on the same bf16 values: no tolerance needed
    for a, b in zip(_matrices(ours), _matrices(ref), strict=True):
        assert torch.equal(
            opt_ours.state[a]["momentum_buffer"], opt_ref.state[b]["momentum_buffer"]
        )


def test_state_dict_loads_into_torch_muon_and_back() -> None:
    """A checkpoint of either class resumes in the other, the next steps identical."""
    kw = dict(KW, weight_decay=0.1)
    first, second = _model("tiny-moe"), _model("tiny-moe")
    opt = BatchedMuon(_matrices(first), **kw)
    other = BatchedMuon(_matrices(second), **kw)
    _train(first, opt, range(2))
    _train(second, other, range(2))
    as_torch = Muon(_matrices(second), **kw)
    as_torch.load_state_dict(other.state_dict())
    for model, o in ((first, opt), (second, as_torch)):
        _train(model, o, range(2, 3))
    back = BatchedMuon(_matrices(second), **kw)
    back.load_state_dict(as_torch.state_dict())
    assert back.state_dict()["param_groups"] == as_torch.state_dict()["param_groups"]
    for model, o in ((first, opt), (second, back)):
        _train(model, o, range(3, 4))
    for a, b in zip(_matrices(first), _matrices(second), strict=True):
        assert torch.equal(a, b)


def test_newton_schulz_is_torchs_per_matrix() -> None:
    """The batched iteration against torch's private one-matrix function, wide and tall."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz

    coeffs = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    for shape in ((3, 5, 9), (3, 9, 5), (2, 6, 6)):
        g = torch.randn(shape)
        out = newton_schulz(g, coeffs, 5, 1e-7)
        assert out.dtype == torch.bfloat16 and out.shape == g.shape
        for i in range(shape[0]):
            assert torch.equal(out[i], _zeropower_via_newtonschulz(g[i], coeffs, 5, 1e-7))
