"""Build Muon + AdamW (or AdamW alone) with their schedulers, and step/save/load them as one."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from optim.batched_muon import BatchedMuon
from optim.config import OptimConfig
from optim.param_groups import ParamSplit, split_parameters, split_rows
from optim.schedules import fit_warmup, lr_lambda, muon_momentum
from optim.sharded_muon import ShardedMuon

# adamw_impl -> AdamW's (foreach, fused); None lets torch choose. "auto" tries fused first
# (build_optimizers): one kernel per step, and it skips a non-finite step on the device.
_ADAMW_IMPLS: dict[str, tuple[bool | None, bool | None]] = {
    "auto": (None, None),
    "fused": (None, True),
    "foreach": (True, None),
    "loop": (False, None),
}


class OptimizerSet:
    """The run's optimizers and LR schedulers, stepped, zeroed, saved and loaded together.

    ``optimizers`` and ``schedulers`` are parallel lists in the order of ``names``
    (``["muon", "adamw"]`` or ``["adamw"]``). ``steps`` counts completed ``step()`` calls.
    """

    def __init__(
        self,
        optimizers: dict[str, Optimizer],
        schedulers: list[LRScheduler],
        muon_momentum_fn: Callable[[int], float] | None = None,
        lr_schedule: Callable[[int], Callable[[int], float]] | None = None,
    ) -> None:
        self.names: list[str] = list(optimizers)
        self._lr_schedule = lr_schedule  # a run length -> the LambdaLR function for it
        self.optimizers: list[Optimizer] = list(optimizers.values())
        self.schedulers: list[LRScheduler] = schedulers
        self.steps = 0
        self._muon_momentum_fn = muon_momentum_fn
        self._apply_momentum()

    def _apply_momentum(self) -> None:
        if self._muon_momentum_fn is None or "muon" not in self.names:
            return
        momentum = self._muon_momentum_fn(self.steps)
        for group in self.optimizers[self.names.index("muon")].param_groups:
            group["momentum"] = momentum

    def step(
        self, scaler: torch.amp.GradScaler | None = None, found_inf: Tensor | None = None
    ) -> None:
        """Step every optimizer (through ``scaler`` when given, then ``scaler.update()``),
        then every scheduler, then the Muon momentum warmup.

        ``found_inf`` (a 0-d float tensor on the device, 1 = skip) drops the update on the
        device: Muon and fused AdamW take it as GradScaler hands it to fused optimizers, and
        leave parameters and state as they were without the host reading it; only an optimizer
        that cannot (``optim.adamw_impl=foreach`` or ``loop``) makes the host read it. The
        schedules advance either way, as in :meth:`skip`. With a ``scaler``, ``found_inf`` must
        already cover the scaler's own overflow check (the trainer's covers it: a gradient that
        overflowed has a non-finite norm), and the gradients must have been unscaled."""
        if found_inf is None:
            if scaler is None:
                for opt in self.optimizers:
                    opt.step()
            else:
                for opt in self.optimizers:
                    scaler.step(opt)
        else:
            for opt in self.optimizers:
                step_with_found_inf(opt, found_inf)
        if scaler is not None:
            scaler.update()  # from the overflow checks unscale_ recorded, on the device
        self._advance()

    def skip(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Account for a step whose update was dropped (a non-finite loss or gradient): nothing is
        updated, but the schedules advance as in :meth:`step`, so the learning rate stays a
        function of the trainer's step count and a run still ends at the end of its schedule."""
        if scaler is not None:
            scaler.update()
        with warnings.catch_warnings():
            # Stepping a scheduler before any optimizer step is intended here.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self._advance()

    def _advance(self) -> None:
        for sched in self.schedulers:
            sched.step()
        self.steps += 1
        self._apply_momentum()

    def set_max_steps(self, max_steps: int) -> None:
        """Change the run's length (trainer.time_budget decides it mid-run): the schedules follow
        the new one from the current step on, and the current learning rates are set from it."""
        if self._lr_schedule is None:
            raise ValueError("these optimizers were built without a schedule to change")
        factor = self._lr_schedule(max_steps)
        for sched in self.schedulers:
            assert isinstance(sched, LambdaLR)
            sched.lr_lambdas = [factor] * len(sched.optimizer.param_groups)
            lrs = [base * factor(sched.last_epoch) for base in sched.base_lrs]
            for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            sched._last_lr = lrs  # what get_last_lr() reports

    def zero_grad(self) -> None:
        """Drop all gradients (``set_to_none=True``: frees memory, skips a memset)."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def lrs(self) -> dict[str, float]:
        """Current (scheduled) base learning rate per optimizer, e.g. ``{"lr/muon": ..., "lr/adamw": ...}``.

        Muon's value is before its per-matrix shape adjustment (``adjust_lr_fn``).
        """
        return {
            f"lr/{n}": float(o.param_groups[0]["lr"])
            for n, o in zip(self.names, self.optimizers, strict=True)
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly; only tensors and plain Python values
        (loads with ``torch.load(weights_only=True)``)."""
        return {
            **self.schedule_state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
        }

    def schedule_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` without the optimizers' own state (names, steps, schedulers): what
        stays small when that state is saved apart, as per-rank shards (trainer/train_state.py)."""
        return {
            "names": list(self.names),
            "steps": self.steps,
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_schedule_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`schedule_state_dict` over optimizers whose state is already loaded."""
        self.load_state_dict({**state, "optimizers": [o.state_dict() for o in self.optimizers]})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the saved optimizers must match this set's.

        As in torch, hyperparameters (lr, betas, weight decay, momentum) come from the
        checkpoint, so the resumed run continues exactly the schedule it was on.
        """
        missing = [k for k in ("names", "steps", "optimizers", "schedulers") if k not in state]
        if missing:
            raise ValueError(
                f"not an OptimizerSet state (missing {', '.join(missing)}); pass the dict that "
                f"OptimizerSet.state_dict() returned"
            )
        saved = list(state["names"])
        if saved != self.names:
            raise ValueError(
                f"the checkpoint's optimizer state is for {saved} but this run builds {self.names}; "
                f"resume with the optimizer the checkpoint was trained with "
                f"(optim.name={'muon' if 'muon' in saved else 'adamw'}) or start a fresh run"
            )
        for name, opt, opt_state in zip(
            self.names, self.optimizers, state["optimizers"], strict=True
        ):
            try:
                opt.load_state_dict(opt_state)
            except ValueError as err:
                raise ValueError(
                    f"the checkpoint's {name} state does not fit this model's parameters ({err}); "
                    f"resume with the model config the checkpoint was trained with"
                ) from err
        for sched, sched_state in zip(self.schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(sched_state)
        self.steps = int(state["steps"])
        self._apply_momentum()


def step_with_found_inf(opt: Optimizer, found_inf: Tensor) -> None:
    """``opt.step()`` that leaves everything as it was when ``found_inf`` is 1."""
    if getattr(opt, "_step_supports_amp_scaling", False):
        # torch's fused optimizers (and BatchedMuon) read these attributes, as GradScaler sets
        opt.found_inf = found_inf  # type: ignore[attr-defined]
        opt.grad_scale = None  # type: ignore[attr-defined]
        try:
            opt.step()
        finally:
            del opt.found_inf, opt.grad_scale  # type: ignore[attr-defined]
    elif not found_inf.item():  # a host sync; only for optimizers that cannot skip on the device
        opt.step()


def _fused_adamw_runs_on(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for ``device`` (a step on a one-element tensor:
    AdamW's constructor accepts ``fused=True`` anywhere and refuses only at the first step)."""
    probe = torch.zeros(1, device=device, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        AdamW([probe], fused=True).step()
    except RuntimeError:
        return False
    return True


def _adamw(groups: list[dict[str, Any]], cfg: OptimConfig) -> AdamW:
    foreach, fused = _ADAMW_IMPLS[cfg.adamw_impl]
    if cfg.adamw_impl == "auto":
        devices = {p.device for g in groups for p in g["params"]}
        if all(d.type != "meta" and _fused_adamw_runs_on(d) for d in devices):
            fused = True
    return AdamW(groups, cfg.adamw_lr, cfg.betas, cfg.eps, foreach=foreach, fused=fused)


def _validate_run_length(max_steps: int) -> None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(
            f"max_steps={max_steps!r} must be a whole number >= 1; set max_steps=1000 or so"
        )


def _groups(entries: list[tuple[str, list[tuple[str, Tensor]], float]]) -> list[dict[str, Any]]:
    """AdamW param groups with a "name" each; empty ones dropped."""
    return [
        {"name": name, "params": [p for _, p in params], "weight_decay": wd}
        for name, params, wd in entries
        if params
    ]


def _check_muon_dtypes(cfg: OptimConfig, split: ParamSplit) -> None:
    bf16 = [name for name, p in split.matrices if p.dtype == torch.bfloat16]
    if bf16 and not cfg.nesterov:
        raise ValueError(
            f"optim.nesterov=False with bfloat16 parameters ({bf16[0]}, ...) corrupts Muon's momentum "
            f"in torch 2.13 (it is normalised in place); keep parameters in float32 and train with "
            f"autocast, or set optim.nesterov=true"
        )


def build_optimizers(
    model: nn.Module,
    cfg: OptimConfig,
    max_steps: int,
    data_parallel: dist.ProcessGroup | None = None,
) -> OptimizerSet:
    """Build the optimizers of ``cfg.name`` for ``model`` and a ``max_steps``-long LR schedule.

    ``data_parallel``: the group over which ``model`` is replicated (DDP); its ranks split
    Muon's Newton-Schulz work (every rank must step). FSDP-sharded models need none.

    muon: Muon for ``split.matrices``; AdamW for embeddings (decayed only if
    ``cfg.embed_weight_decay``), norms, 1-D parameters and MoE routers (never decayed).
    adamw: AdamW for everything, matrices decayed with ``cfg.adamw_weight_decay``.

    A warmup too long for the run is shortened (:func:`optim.schedules.fit_warmup`) with a
    warning; the trainer fits it beforehand and prints the note once.
    """
    _validate_run_length(max_steps)
    cfg, note = fit_warmup(cfg, max_steps)
    if note is not None:
        warnings.warn(note, stacklevel=2)
    split = split_parameters(model)
    embed_wd = cfg.adamw_weight_decay if cfg.embed_weight_decay else 0.0
    adamw_entries = [
        ("embeddings", split.embeddings, embed_wd),
        ("no_decay", split.no_decay, 0.0),
        ("routers", split.routers, 0.0),
        ("other", split.other, cfg.adamw_weight_decay),
    ]
    optimizers: dict[str, Optimizer] = {}
    momentum_fn = None
    if cfg.name == "muon":
        if not split.matrices:
            raise ValueError(
                "optim.name='muon' found no 2-D weight matrices in the model; use optim.name=adamw"
            )
        _check_muon_dtypes(cfg, split)
        # FSDP2-sharded matrices (DTensors) are orthogonalised whole, once per step.
        sharded = any(isinstance(p, DTensor) for _, p in split.matrices)
        # Fused gate|up expert stacks in a group of their own: two matrices per expert.
        muon_groups = [
            {"name": name, "params": ps, **({"split_rows": rows} if rows > 1 else {})}
            for name, rows in (("matrices", 1), ("fused_gate_up", 2))
            if (ps := [p for n, p in split.matrices if split_rows(n) == rows])
        ]
        optimizers["muon"] = (ShardedMuon if sharded else BatchedMuon)(
            muon_groups,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            ns_steps=cfg.ns_steps,
            adjust_lr_fn=cfg.adjust_lr_fn,
            ns_dtype=None if cfg.ns_dtype == "auto" else getattr(torch, cfg.ns_dtype),
            process_group=None if sharded else data_parallel,
        )
        if cfg.momentum_warmup_steps > 0:
            momentum_fn = partial(
                muon_momentum,
                momentum=cfg.momentum,
                warmup_steps=cfg.momentum_warmup_steps,
                start=cfg.momentum_warmup_start,
            )
    else:
        adamw_entries.insert(0, ("matrices", split.matrices, cfg.adamw_weight_decay))
    adamw_groups = _groups(adamw_entries)
    if adamw_groups:
        optimizers["adamw"] = _adamw(adamw_groups, cfg)
    schedule = lr_lambda(cfg, max_steps)
    schedulers: list[LRScheduler] = [LambdaLR(opt, schedule) for opt in optimizers.values()]
    return OptimizerSet(
        optimizers, schedulers, muon_momentum_fn=momentum_fn, lr_schedule=partial(lr_lambda, cfg)
    )
