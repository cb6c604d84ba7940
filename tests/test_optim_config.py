"""OptimConfig validation: each message names the field, the value and the fix."""

from __future__ import annotations

import pytest
from torch import nn

from optim import OptimConfig, build_optimizers


def test_defaults_are_the_documented_ones() -> None:
    cfg = OptimConfig()
    assert (cfg.name, cfg.lr, cfg.adamw_lr, cfg.weight_decay) == ("muon", 1.2e-2, 1.2e-2, 0.1)
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
        ({"eps": 0}, r"optim\.eps=0 must be > 0"),
    ],
)
def test_bad_values_are_named(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        OptimConfig(**kwargs)


def test_betas_from_yaml_list_become_a_tuple() -> None:
    assert OptimConfig(betas=[0.8, 0.99]).betas == (0.8, 0.99)


def test_warmup_must_be_shorter_than_the_run() -> None:
    model = nn.Linear(4, 4)
    cfg = OptimConfig(name="adamw", warmup_steps=100)
    with pytest.raises(
        ValueError,
        match=r"optim\.warmup_steps=100 must be shorter than the run \(max_steps=50\); set optim\.warmup_steps below 50",
    ):
        build_optimizers(model, cfg, max_steps=50)
    build_optimizers(model, cfg, max_steps=101)


def test_wsd_warmup_and_decay_must_fit_the_run() -> None:
    cfg = OptimConfig(name="adamw", schedule="wsd", warmup_steps=90, decay_fraction=0.2)
    with pytest.raises(ValueError, match=r"= 20 steps\) exceed the run; lower optim\.warmup_steps"):
        build_optimizers(nn.Linear(4, 4), cfg, max_steps=100)


def test_max_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"max_steps=0 must be a whole number >= 1"):
        build_optimizers(nn.Linear(4, 4), OptimConfig(warmup_steps=0), max_steps=0)


def test_muon_without_matrices_suggests_adamw() -> None:
    with pytest.raises(ValueError, match=r"no 2-D weight matrices .*optim\.name=adamw"):
        build_optimizers(nn.LayerNorm(4), OptimConfig(warmup_steps=0), max_steps=10)
