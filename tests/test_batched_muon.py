"""BatchedMuon (optim.batched_muon): with a bf16 Newton-Schulz, torch.optim.Muon's step bit for
bit, same-shaped matrices orthogonalised as one batch; its state loads into torch.optim.Muon and
back; on CPU it iterates in float32 (optim.muon_math), as the trainer builds it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import Muon

from optim import batched_muon
from optim.batched_muon import BatchedMuon
from optim.config import OptimConfig
from optim.muon_math import as_matrices, default_dtype, newton_schulz
from optim.optimizer_set import build_optimizers
from optim.param_groups import split_parameters, split_rows
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
BF16 = dict(ns_dtype=torch.bfloat16)  # torch.optim.Muon's iteration dtype


@pytest.mark.parametrize("preset", ["tiny"])
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
    opt_ours, opt_ref = BatchedMuon(_matrices(ours), **kw, **BF16), Muon(_matrices(ref), **kw)
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
    first, second = _model("tiny"), _model("tiny")
    opt = BatchedMuon(_matrices(first), **kw, **BF16)
    other = BatchedMuon(_matrices(second), **kw, **BF16)
    _train(first, opt, range(2))
    _train(second, other, range(2))
    as_torch = Muon(_matrices(second), **kw)
    as_torch.load_state_dict(other.state_dict())
    for model, o in ((first, opt), (second, as_torch)):
        _train(model, o, range(2, 3))
    back = BatchedMuon(_matrices(second), **kw, **BF16)
    back.load_state_dict(as_torch.state_dict())
    assert back.state_dict()["param_groups"] == as_torch.state_dict()["param_groups"]
    for model, o in ((first, opt), (second, back)):
        _train(model, o, range(3, 4))
    for a, b in zip(_matrices(first), _matrices(second), strict=True):
        assert torch.equal(a, b)


def _muon_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The trainer's Muon groups (optim.optimizer_set): fused gate|up expert stacks apart."""
    matrices = split_parameters(model).matrices
    return [
        {"params": [p for n, p in matrices if split_rows(n) == 1]},
        {"params": [p for n, p in matrices if split_rows(n) == 2], "split_rows": 2},
    ]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_expert_stacks_step_as_torch_muon_on_each_expert_matrix(nesterov, adjust_lr_fn) -> None:
    """tiny-moe's 3-D expert parameters are batches of matrices: each expert's gate, up and down
    orthogonalised on its own, with its own shape's learning rate, exactly as torch.optim.Muon
    steps each one held as a 2-D parameter of its own (the layout before experts were fused)."""
    ours, ref = _model("tiny-moe"), _model("tiny-moe")
    kw = dict(KW, nesterov=nesterov, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    opt = BatchedMuon(_muon_groups(ours), **kw, **BF16)
    named = split_parameters(ref).matrices
    assert any(p.ndim == 3 for _, p in named)
    # The reference: every matrix a 2-D leaf of its own, stepped by torch, copied back.
    leaves = {n: list(as_matrices(p.detach(), split_rows(n)).clone().unbind(0)) for n, p in named}
    opt_ref = Muon([m for ms in leaves.values() for m in ms], **kw)
    for step in range(3):
        _train(ours, opt, range(step, step + 1))
        tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(step))
        ref.zero_grad()
        ref(tokens[:, :-1], targets=tokens[:, 1:]).backward()
        for n, p in named:
            for m, g in zip(leaves[n], as_matrices(p.grad, split_rows(n)), strict=True):
                m.grad = g.clone()
        opt_ref.step()
        with torch.no_grad():
            for n, p in named:
                as_matrices(p, split_rows(n)).copy_(torch.stack(leaves[n]))
    for (n, a), b in zip(named, [p for _, p in split_parameters(ours).matrices], strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("nesterov", [True, False])
def test_chunks_step_as_the_whole_batch(monkeypatch, nesterov) -> None:
    """With CHUNK_BYTES three expert matrices, each shape's batch is iterated in chunks (expert
    stacks cut between experts, chunks spanning layers), none over CHUNK_BYTES, and the step
    (float32 iteration, gradient scale and found_inf 0 given) is the unchunked one bit for bit,
    momentum included."""
    kw = dict(KW, nesterov=nesterov, weight_decay=0.1)
    ours, ref = _model("tiny-moe"), _model("tiny-moe")
    opt, opt_ref = BatchedMuon(_muon_groups(ours), **kw), BatchedMuon(_muon_groups(ref), **kw)
    sizes: dict[BatchedMuon, list[int]] = {opt: [], opt_ref: []}
    for o in (opt, opt_ref):
        o.orthogonalize = _recording(sizes[o])  # type: ignore[method-assign]
        o.grad_scale, o.found_inf = torch.tensor(2.0), torch.zeros(())
    _train(ref, opt_ref, range(3))
    chunk = 3 * 48 * 64 * 4  # three (48, 64) float32 matrices: a third of a gate|up stack
    monkeypatch.setattr(batched_muon, "CHUNK_BYTES", chunk)
    _train(ours, opt, range(3))
    assert max(sizes[opt]) <= chunk < max(sizes[opt_ref])
    assert len(sizes[opt]) > 2 * len(sizes[opt_ref])
    for a, b in zip(_matrices(ours), _matrices(ref), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["momentum_buffer"], opt_ref.state[b]["momentum_buffer"])


def _recording(sizes: list[int]) -> Any:
    """BatchedMuon.orthogonalize, noting the bytes of each batch it is given."""

    def orthogonalize(stacked: torch.Tensor, group: dict[str, Any], dtype: torch.dtype) -> Any:
        sizes.append(stacked.numel() * stacked.element_size())
        return BatchedMuon.orthogonalize(stacked, group, dtype)

    return orthogonalize


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


def test_the_iteration_dtype_follows_the_hardware(monkeypatch) -> None:
    """bf16 (torch's) on accelerators and on CPUs that multiply bf16 in hardware (AMX or
    AVX-512 BF16), float32 on other CPUs, where bf16 is emulated."""
    import qwen3.device

    for amx, avx512_bf16, on_cpu in (
        (False, False, torch.float32),
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
    ):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(
            torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False
        )
        qwen3.device.cpu_has_native_bf16_matmul.cache_clear()
        assert default_dtype(torch.device("cpu")) == on_cpu
        assert default_dtype(torch.device("meta")) == torch.bfloat16
    # A build without the probes.
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    qwen3.device.cpu_has_native_bf16_matmul.cache_clear()
    assert default_dtype(torch.device("cpu")) == torch.float32
    qwen3.device.cpu_has_native_bf16_matmul.cache_clear()  # the real answer for later tests


def test_in_float32_the_iteration_is_the_more_exact() -> None:
    """Muon on a CPU without native bf16 iterates in float32: the same iteration as in float64 to
    1e-5, where torch's bf16 one is off by about 1e-2."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C

    coeffs = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    g = torch.randn(4, 64, 192, generator=torch.Generator().manual_seed(0))
    exact = newton_schulz(g.double(), coeffs, 5, 1e-7, torch.float64)
    fp32 = newton_schulz(g, coeffs, 5, 1e-7, torch.float32)
    bf16 = newton_schulz(g, coeffs, 5, 1e-7)
    assert fp32.dtype == torch.float32
    assert (fp32.double() - exact).abs().max() < 1e-5
    assert (bf16.double() - exact).abs().max() > 1e-3

    opts = build_optimizers(_model("tiny"), OptimConfig(warmup_steps=1), max_steps=10)
    muon = opts.optimizers[opts.names.index("muon")]
    assert isinstance(muon, BatchedMuon) and muon.ns_dtype is None  # by device
