"""Optimizers for pretraining: Muon for hidden matrices, AdamW for the rest, and LR schedules."""

from optim.config import OptimConfig
from optim.optimizer_set import OptimizerSet, build_optimizers
from optim.param_groups import ParamSplit, split_parameters
from optim.schedules import (
    fit_warmup,
    lr_factor,
    lr_lambda,
    muon_momentum,
    wsd_decay_start,
    wsd_decay_steps,
)

__all__ = [
    "OptimConfig",
    "OptimizerSet",
    "ParamSplit",
    "build_optimizers",
    "fit_warmup",
    "lr_factor",
    "lr_lambda",
    "muon_momentum",
    "split_parameters",
    "wsd_decay_start",
    "wsd_decay_steps",
]
