"""A checkpoint's training state (weights and optimizer state) as ``torch.distributed.checkpoint``
shards: each rank writes and reads only what it holds, and no rank ever gathers the optimizer
state. DCP records each tensor's global shape and reshards on load, so a run saved by N
processes resumes on M (with the same global batch: :func:`trainer.checkpoint.check_compatible`),
sharded or not. The same format serves one process, DDP (replicated tensors written once) and
FSDP2 (DTensor shards).

``async_save`` copies the state to CPU memory (DCP's stager) and writes it in a background
thread; training goes on, and the checkpoint is renamed into place once the write is whole
(:class:`trainer.loop.Trainer` polls :class:`PendingSave`)."""

from __future__ import annotations

import re
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from optim import OptimizerSet
from trainer.errors import CheckpointError

# DCP warns on every save and load without a process group (also from its background thread)
# that it assumes a single process: that is what we mean.
warnings.filterwarnings("ignore", message=r"torch\.distributed is .*single process")


def _state(model: nn.Module, optimizers: OptimizerSet) -> dict[str, Any]:
    """Weights and every optimizer's state keyed by parameter name (DTensor shards under FSDP).
    An optimizer that has not stepped yet gets its state created first (DCP's
    ``get_optimizer_state_dict`` steps it once at lr 0 on zero gradients), so the dict is also
    the template a load fills in."""
    return {
        "model": get_model_state_dict(model),
        "optim": {
            name: get_optimizer_state_dict(model, opt)
            for name, opt in zip(optimizers.names, optimizers.optimizers, strict=True)
        },
    }


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@dataclass
class PendingSave:
    """A checkpoint's training state being written (``future``; None once written), and what
    to do and say once it is whole."""

    future: Future[Any] | None
    step: int
    improved: bool
    started: float  # time.perf_counter() when the save began
    blocked: float  # seconds the training loop waited for it

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self) -> None:
        """Block until written; a failed write raises here, with its traceback."""
        if self.future is not None:
            self.future.result()


def save_train_state(
    model: nn.Module,
    optimizers: OptimizerSet,
    path: Path,
    background: dist.ProcessGroup | None = None,
    asynchronous: bool = False,
) -> Future[Any] | None:
    """Write ``path`` (a directory: ``.metadata`` and one ``.distcp`` file per writing rank).
    Collective: every rank calls it. ``asynchronous`` returns once the state is copied to CPU
    memory, with a future of the write; its coordination runs on ``background``, a process
    group of its own (the training's collectives keep the default one)."""
    state = _state(model, optimizers)
    if not asynchronous:
        dcp_save(state, checkpoint_id=str(path), no_dist=_no_dist())
        return None
    future = dcp_async_save(
        state, checkpoint_id=str(path), process_group=background, no_dist=_no_dist()
    )
    assert isinstance(future, Future)  # a response object only with a caller's own stager
    return future


# A mixture of experts' per-expert weights, as training states held them before the experts
# became 3-D parameters (``...mlp.experts.gate_up_proj``).
_PER_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")


def _check_expert_layout(model: nn.Module, path: Path) -> None:
    """A training state written with one parameter per expert matrix does not fit a model whose
    experts are 3-D: say so, and how to go on, in one line (its weights still load from the
    checkpoint's Hugging Face files)."""
    if not any(n.endswith("mlp.experts.gate_up_proj") for n, _ in model.named_parameters()):
        return
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if any(_PER_EXPERT.search(key) for key in saved):
        raise CheckpointError(
            f"{path} holds a mixture of experts' training state one tensor per expert matrix, "
            "written before the experts became 3-D parameters, so its optimizer state cannot be "
            f"resumed; start from its weights instead with init_from={path.parent}"
        )


def load_train_state(model: nn.Module, optimizers: OptimizerSet, path: Path) -> None:
    """Fill ``model`` and ``optimizers`` (built for this run, sharded or not) from ``path``;
    each rank reads the parts of each tensor it holds. The schedules are restored separately
    (:meth:`OptimizerSet.load_state_dict`, from ``trainer_state.pt``)."""
    if not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path / '.metadata'} is missing: the training state was not written whole; "
            "resume from another checkpoint"
        )
    _check_expert_layout(model, path)
    state = _state(model, optimizers)
    try:
        dcp_load(state, checkpoint_id=str(path), no_dist=_no_dist())
    except CheckpointException as err:
        first = next(iter(err.failures.values()), err)
        raise CheckpointError(
            f"cannot read the training state in {path} ({type(first).__name__}: "
            f"{' '.join(str(first).split())[:300]}); resume from another checkpoint"
        ) from err
    set_model_state_dict(model, state["model"])
    for name, opt in zip(optimizers.names, optimizers.optimizers, strict=True):
        set_optimizer_state_dict(model, opt, state["optim"][name])
