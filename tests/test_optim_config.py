"""OptimConfig validation: each message names the field, the value and the fix."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from optim import OptimConfig, build_optimizers, fit_warmup


def test_defaults_are_the_documented_ones() -> None:
    cfg = OptimConfig()
    assert (cfg.name, cfg.lr, cfg.adamw_lr, cfg.weight_decay) == ("muon", 8e-3, 1.2e-2, 0.1)
    assert cfg.warmup_steps == 30  # the main job's recipe (benchmarks/results/recipe.md)
    assert (cfg.adjust_lr_fn, cfg.nesterov, cfg.schedule) == ("match_rms_adamw", True, "cosine")


def test_unknown_optimizer_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"optim\.name='sgd' .*choose one of: muon, adamw"):
        OptimConfig(name="sgd")


@pytest.mark.parametrize("field", ["lr", "adamw_lr"])
@pytest.mark.parametrize("value", [0.0, -1e-3, float("nan")])
def test_learning_rates_must_be_positive(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"optim\.{field}=.*set .*optim\.{field}=3e-3"):
        OptimConfig(**{field: value})


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"schedule": "linear"}, r"optim\.schedule='linear' .*cosine, wsd, constant"),
        ({"adjust_lr_fn": "none"}, r"optim\.adjust_lr_fn='none' .*match_rms_adamw, original"),
        ({"adamw_impl": "apex"}, r"optim\.adamw_impl='apex' .*auto, fused, foreach, loop"),
        ({"momentum": 1.0}, r"optim\.momentum=1\.0 must lie in \[0\.0, 1\.0\)"),
        ({"betas": (0.9,)}, r"optim\.betas=\(0\.9,\) must hold two numbers"),
        ({"betas": [0.9, 1.5]}, r"optim\.betas\[1\]=1\.5 must lie in"),
        ({"weight_decay": -0.1}, r"optim\.weight_decay=-0\.1 must lie in"),
        ({"warmup_steps": -1}, r"optim\.warmup_steps=-1 must be a whole number >= 0"),
        ({"warmup_steps": 2.5}, r"optim\.warmup_steps=2\.5 must be a whole number"),
        ({"min_lr_ratio": 1.5}, r"optim\.min_lr_ratio=1\.5 must lie in \[0\.0, 1\.0\]"),
        ({"decay_fraction": 0.0}, r"optim\.decay_fraction=0\.0 must be > 0"),
        ({"nesterov": "yes"}, r"optim\.nesterov='yes' must be true or false"),
        ({"ns_steps": 0}, r"optim\.ns_steps=0 must lie in \[1, 100\)"),
        ({"ns_dtype": "fp16"}, r"optim\.ns_dtype='fp16' is not a known choice"),
        ({"eps": 0}, r"optim\.eps=0 must be > 0"),
    ],
)
def test_bad_values_are_named(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        OptimConfig(**kwargs)


def test_betas_from_yaml_list_become_a_tuple() -> None:
    assert OptimConfig(betas=[0.8, 0.99]).betas == (0.8, 0.99)


@pytest.mark.parametrize("name", ["muon", "adamw"])
@pytest.mark.parametrize("max_steps", [1, 2, 20])
def test_a_run_shorter_than_the_shipped_warmup_still_builds(name: str, max_steps: int) -> None:
    cfg = OptimConfig(name=name, warmup_steps=100)  # conf/optim/adamw.yaml's warmup
    fitted, note = fit_warmup(cfg, max_steps)
    assert fitted.warmup_steps == max_steps // 10 and fitted.warmup_steps < max_steps
    assert note is not None and "\n" not in note
    assert "optim.warmup_steps=100" in note and f"trainer.max_steps={max_steps}" in note
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match=r"optim\.warmup_steps=100 does not fit the run"):
        opt = build_optimizers(model, cfg, max_steps=max_steps)
    peak = opt.lrs()[f"lr/{name}"]
    base = cfg.adamw_lr if name == "adamw" else cfg.lr
    assert peak == pytest.approx(base if fitted.warmup_steps == 0 else base / 2)
    lrs = []
    for _ in range(max_steps):
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        lrs.append(opt.lrs()[f"lr/{name}"])
    assert lrs[-1] == pytest.approx(base * cfg.min_lr_ratio)  # the decay still ends the run


def test_a_warmup_that_fits_is_kept_silently() -> None:
    cfg = OptimConfig(name="adamw", warmup_steps=100)
    assert fit_warmup(cfg, 101) == (cfg, None)
    assert fit_warmup(OptimConfig(warmup_steps=0), 1) == (OptimConfig(warmup_steps=0), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_optimizers(nn.Linear(4, 4), cfg, max_steps=101)


def test_wsd_warmup_is_shortened_to_end_before_the_decay() -> None:
    cfg = OptimConfig(name="adamw", schedule="wsd", warmup_steps=90, decay_fraction=0.2)
    fitted, note = fit_warmup(cfg, 100)
    assert fitted.warmup_steps == 10
    assert note is not None and "before its final decay" in note
    assert fit_warmup(dataclasses.replace(cfg, warmup_steps=80), 100)[1] is None
    # one step: the decay is the whole run, so there is no room for warmup
    assert fit_warmup(cfg, 1)[0].warmup_steps == 0


def test_max_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"max_steps=0 must be a whole number >= 1"):
        build_optimizers(nn.Linear(4, 4), OptimConfig(warmup_steps=0), max_steps=0)


def test_muon_without_matrices_suggests_adamw() -> None:
    with pytest.raises(ValueError, match=r"no 2-D weight matrices .*optim\.name=adamw"):
        build_optimizers(nn.LayerNorm(4), OptimConfig(warmup_steps=0), max_steps=10)
