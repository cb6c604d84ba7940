"""optim on the real Qwen3: parameter routing, stepping, schedules through the set, state round trip."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from optim import OptimConfig, OptimizerSet, build_optimizers, lr_factor
from qwen3.config import Qwen3Config
from qwen3.model import Qwen3

VOCAB = 256
BLOCK_MATRIX = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight"
)


def make_model(seed: int = 0, **overrides: object) -> Qwen3:
    torch.manual_seed(seed)
    config = Qwen3Config.from_preset("tiny", vocab_size=VOCAB, num_hidden_layers=2, **overrides)
    return Qwen3(config)


def fixed_batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(seed))


def loss_on(model: Qwen3, x: torch.Tensor) -> torch.Tensor:
    return model(x[:, :-1], x[:, 1:])


def train_step(model: Qwen3, opt: OptimizerSet, x: torch.Tensor) -> float:
    loss = loss_on(model, x)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def group_of(opt: OptimizerSet, model: Qwen3) -> dict[str, tuple[str, str, float]]:
    """parameter name -> (optimizer, group name, weight decay)."""
    where = {
        id(p): (name, g["name"], g["weight_decay"])
        for name, o in zip(opt.names, opt.optimizers, strict=True)
        for g in o.param_groups
        for p in g["params"]
    }
    return {n: where[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("name", ["muon", "adamw"])
@pytest.mark.parametrize("tied", [True, False])
def test_each_parameter_in_exactly_one_group(name: str, tied: bool) -> None:
    model = make_model(tie_word_embeddings=tied)
    opt = build_optimizers(model, OptimConfig(name=name, warmup_steps=1), max_steps=10)
    routed = [id(p) for o in opt.optimizers for g in o.param_groups for p in g["params"]]
    assert len(routed) == len(set(routed))
    assert set(routed) == {id(p) for p in model.parameters()}
    # 2 layers x (7 matrices + 4 norms) + final norm + embedding (+ untied head)
    assert len(routed) == 2 * 11 + 1 + (1 if tied else 2)


def test_muon_routing_matrices_to_muon_and_the_rest_to_adamw() -> None:
    model = make_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = build_optimizers(model, OptimConfig(name="muon", warmup_steps=1), max_steps=10)
    assert opt.names == ["muon", "adamw"]
    where = group_of(opt, model)
    matrices = [n for n in where if BLOCK_MATRIX.fullmatch(n)]
    assert len(matrices) == 14
    for n, (optimizer, group, wd) in where.items():
        if BLOCK_MATRIX.fullmatch(n):
            assert (optimizer, group, wd) == ("muon", "matrices", 0.1), n
        elif n in ("model.embed_tokens.weight", "lm_head.weight"):
            assert (optimizer, group, wd) == ("adamw", "embeddings", 0.0), n
        else:
            assert n.endswith("norm.weight"), n
            assert (optimizer, group, wd) == ("adamw", "no_decay", 0.0), n
    assert all(p.ndim == 2 for p in opt.optimizers[0].param_groups[0]["params"])


def test_ns_dtype_sets_the_newton_schulz_iteration_dtype() -> None:
    """optim.ns_dtype reaches Muon: float32 runs the iteration in float32 (the updates then
    differ from bf16's by bf16 rounding); auto leaves it to optim.muon_math.default_dtype."""
    from optim.muon_math import default_dtype

    updates = {}
    for ns_dtype in ("auto", "float32", "bfloat16"):
        torch.manual_seed(0)
        model = make_model()
        opt = build_optimizers(model, OptimConfig(ns_dtype=ns_dtype, warmup_steps=1), 10)
        muon = opt.optimizers[opt.names.index("muon")]
        want = (
            default_dtype(torch.device("cpu")) if ns_dtype == "auto" else getattr(torch, ns_dtype)
        )
        assert muon._ns_dtype(torch.device("cpu")) == want
        before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        model(torch.arange(16).view(2, 8), targets=torch.arange(16).view(2, 8)).backward()
        opt.step()
        updates[ns_dtype] = model.model.layers[0].mlp.up_proj.weight.detach() - before
    assert not torch.equal(updates["float32"], updates["bfloat16"])
    # The same step to bf16's rounding, which the quintic iteration amplifies (cosine 0.95 here).
    a, b = updates["float32"].flatten(), updates["bfloat16"].flatten()
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.9


def test_adamw_routing_puts_everything_in_adamw() -> None:
    model = make_model(tie_word_embeddings=False, attention_bias=True)
    cfg = OptimConfig(
        name="adamw", warmup_steps=1, adamw_weight_decay=0.05, embed_weight_decay=True
    )
    opt = build_optimizers(model, cfg, max_steps=10)
    assert opt.names == ["adamw"]
    for n, (optimizer, group, wd) in group_of(opt, model).items():
        assert optimizer == "adamw"
        if BLOCK_MATRIX.fullmatch(n):
            assert (group, wd) == ("matrices", 0.05), n
        elif n in ("model.embed_tokens.weight", "lm_head.weight"):
            assert (group, wd) == ("embeddings", 0.05), n
        else:
            assert n.endswith(("norm.weight", "_proj.bias")), n
            assert (group, wd) == ("no_decay", 0.0), n


def test_untied_head_stays_in_adamw_behind_a_wrapper() -> None:
    model = make_model(tie_word_embeddings=False)
    wrapped = nn.ModuleDict({"module": model})  # names now "module.*", as under DDP
    opt = build_optimizers(wrapped, OptimConfig(warmup_steps=1), max_steps=10)
    muon_ids = {id(p) for p in opt.optimizers[0].param_groups[0]["params"]}
    assert id(model.lm_head.weight) not in muon_ids
    assert len(muon_ids) == 14


def test_frozen_parameters_are_left_out() -> None:
    model = make_model()
    frozen = model.model.norm.weight.requires_grad_(False)
    opt = build_optimizers(model, OptimConfig(warmup_steps=1), max_steps=10)
    routed = [p for o in opt.optimizers for g in o.param_groups for p in g["params"]]
    assert len(routed) == 23 and all(p is not frozen for p in routed)


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(name: str) -> None:
    model = make_model()
    x = fixed_batch()
    opt = build_optimizers(model, OptimConfig(name=name, warmup_steps=0), max_steps=10)
    before = train_step(model, opt, x)
    with torch.no_grad():
        after = loss_on(model, x).item()
    assert after < before - 0.01, (before, after)


def test_schedulers_follow_each_optimizers_own_base_lr() -> None:
    cfg = OptimConfig(lr=0.02, adamw_lr=0.004, warmup_steps=3, min_lr_ratio=0.1)
    model = make_model()
    opt = build_optimizers(model, cfg, max_steps=12)
    for step in range(14):
        factor = lr_factor(step, schedule="cosine", warmup_steps=3, max_steps=12, min_lr_ratio=0.1)
        assert opt.lrs() == pytest.approx({"lr/muon": 0.02 * factor, "lr/adamw": 0.004 * factor})
        assert all(g["lr"] == pytest.approx(0.004 * factor) for g in opt.optimizers[1].param_groups)
        opt.step()  # no gradients: parameters stay, the schedule advances
    assert opt.steps == 14


def test_a_skipped_step_advances_the_schedules_without_updating() -> None:
    cfg = OptimConfig(lr=0.02, adamw_lr=0.004, warmup_steps=2, momentum_warmup_steps=4)
    model = make_model()
    opt, twin = (build_optimizers(model, cfg, max_steps=6) for _ in range(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_on(model, fixed_batch()).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler stepped before the optimizer" warning
        opt.skip()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    opt.zero_grad()
    twin.step()  # no gradients: the plain step's schedule bookkeeping, nothing to update
    assert opt.steps == twin.steps == 1 and opt.lrs() == twin.lrs()
    momentum = [o.param_groups[0].get("momentum") for o in (opt.optimizers[0], twin.optimizers[0])]
    assert momentum[0] == momentum[1]


def test_muon_momentum_warmup() -> None:
    cfg = OptimConfig(
        momentum=0.95, momentum_warmup_steps=4, momentum_warmup_start=0.85, warmup_steps=1
    )
    model = make_model()
    opt = build_optimizers(model, cfg, max_steps=10)
    seen = []
    for _ in range(6):
        seen.append(opt.optimizers[0].param_groups[0]["momentum"])
        opt.step()
    assert seen == pytest.approx([0.85, 0.875, 0.9, 0.925, 0.95, 0.95])


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_state_round_trip_gives_identical_next_steps(name: str, tmp_path: Path) -> None:
    cfg = OptimConfig(name=name, warmup_steps=2, momentum_warmup_steps=5)
    batches = [fixed_batch(seed) for seed in range(6)]
    model = make_model()
    opt = build_optimizers(model, cfg, max_steps=8)
    for x in batches[:3]:
        train_step(model, opt, x)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "state.pt")

    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed_opt = build_optimizers(resumed, cfg, max_steps=8)
    resumed_opt.load_state_dict(saved["optim"])
    assert resumed_opt.steps == 3 and resumed_opt.lrs() == opt.lrs()

    for x in batches[3:]:
        assert train_step(resumed, resumed_opt, x) == train_step(model, opt, x)
        assert resumed_opt.lrs() == opt.lrs()
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_loading_another_optimizers_state_says_how_to_resume() -> None:
    muon = build_optimizers(make_model(), OptimConfig(name="muon", warmup_steps=1), max_steps=10)
    adamw = build_optimizers(make_model(), OptimConfig(name="adamw", warmup_steps=1), max_steps=10)
    with pytest.raises(ValueError, match=r"optim\.name=muon"):
        adamw.load_state_dict(muon.state_dict())
    with pytest.raises(ValueError, match=r"missing names, steps"):
        adamw.load_state_dict({"optimizers": []})


def test_grad_scaler_step_matches_a_plain_step() -> None:
    plain, scaled = make_model(), make_model()
    cfg = OptimConfig(warmup_steps=1)
    plain_opt = build_optimizers(plain, cfg, max_steps=10)
    scaled_opt = build_optimizers(scaled, cfg, max_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = fixed_batch()
    train_step(plain, plain_opt, x)
    scaler.scale(loss_on(scaled, x)).backward()
    scaled_opt.step(scaler)
    scaled_opt.zero_grad()
    assert scaled_opt.steps == 1 and scaler.get_scale() == 1024.0
    for (n, a), b in zip(plain.state_dict().items(), scaled.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def test_bf16_muon_without_nesterov_is_refused() -> None:
    model = make_model().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"optim\.nesterov=true"):
        build_optimizers(model, OptimConfig(nesterov=False, warmup_steps=1), max_steps=10)
    build_optimizers(model, OptimConfig(nesterov=True, warmup_steps=1), max_steps=10)


@pytest.mark.parametrize(
    ("impl", "foreach", "fused"),
    # auto: fused where the device has the kernel (CPU too, since torch 2.4)
    [("auto", None, True), ("fused", None, True), ("foreach", True, None), ("loop", False, None)],
)
def test_adamw_impl_reaches_adamw(impl: str, foreach: bool | None, fused: bool | None) -> None:
    model = make_model()
    opt = build_optimizers(model, OptimConfig(adamw_impl=impl, warmup_steps=0), max_steps=10)
    adamw = opt.optimizers[opt.names.index("adamw")]
    assert (adamw.defaults["foreach"], adamw.defaults["fused"]) == (foreach, fused)
    x = fixed_batch()
    before = train_step(model, opt, x)
    assert loss_on(model, x).item() < before
