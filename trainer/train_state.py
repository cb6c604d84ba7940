"""A checkpoint's weights and training state, each stored once and written by every rank in
parallel: the weights through DCP's ``HuggingFaceStorageWriter`` into the checkpoint directory
itself (``model.safetensors``, or ``model-*.safetensors`` + index, Hugging Face names, consolidated so ``transformers``
loads the directory), the optimizer state as DCP shards in ``train_state/``. No rank gathers the
model or the optimizer state. DCP records each tensor's global shape and reshards on load, so a
run saved by N processes resumes on M (with the same global batch:
:func:`trainer.checkpoint.check_compatible`), sharded or not.

``async_save`` stages the state to CPU memory (pinned where CUDA is there: DCP's
``DefaultStager``) and writes it in a background thread; training waits only for the staging,
and the checkpoint is renamed into place once the write is whole (:class:`PendingSave`)."""

from __future__ import annotations

import re
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.hf_storage import (
    HuggingFaceStorageReader,
    HuggingFaceStorageWriter,
)
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
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
from trainer.run_layout import TRAIN_STATE_DIR, WEIGHTS, WEIGHTS_INDEX

# DCP warns on every save and load without a process group (also from its background thread)
# that it assumes a single process: that is what we mean.
warnings.filterwarnings("ignore", message=r"torch\.distributed is .*single process")


def _weights(model: nn.Module) -> dict[str, Any]:
    """The weights under their Hugging Face names (the module tree mirrors transformers'), the
    tied head stored once as transformers does; DTensor shards under FSDP."""
    state = get_model_state_dict(model)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def _optim(model: nn.Module, optimizers: OptimizerSet) -> dict[str, Any]:
    """Every optimizer's state keyed by parameter name. An optimizer that has not stepped yet
    gets its state created first (DCP's ``get_optimizer_state_dict`` steps it once at lr 0 on
    zero gradients), so the dict is also the template a load fills in."""
    return {
        name: get_optimizer_state_dict(model, opt)
        for name, opt in zip(optimizers.names, optimizers.optimizers, strict=True)
    }


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@dataclass
class PendingSave:
    """A checkpoint being written in the background (``futures``: weights, optimizer state;
    empty once written), and what to do and say once it is whole."""

    futures: list[Future[Any]]
    step: int
    improved: bool
    started: float  # time.perf_counter() when the save began
    blocked: float  # seconds the training loop waited for it

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> None:
        """Block until written; a failed write raises here, with its traceback."""
        for f in self.futures:
            f.result()


def _stager() -> DefaultStager:
    """DCP's stager: copies to pinned host memory where CUDA is there (the device-to-host copy
    runs at full speed), and returns once the copy is done, so training only waits for it."""
    pinned = torch.cuda.is_available()
    return DefaultStager(
        StagingOptions(
            use_pinned_memory=pinned,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=pinned,
        )
    )


def _save(
    state: dict[str, Any],
    writer: Any,
    background: dist.ProcessGroup | None,
    asynchronous: bool,
) -> Future[Any] | None:
    if not asynchronous:
        dcp_save(state, storage_writer=writer, no_dist=_no_dist())
        return None
    result = dcp_async_save(
        state,
        storage_writer=writer,
        process_group=background,
        async_stager=_stager(),
        no_dist=_no_dist(),
    )
    if isinstance(result, Future):
        return result
    result.staging_completion.result()  # training waits for the copy only
    future: Future[Any] = result.upload_completion
    return future


def save_train_state(
    model: nn.Module,
    optimizers: OptimizerSet,
    path: Path,
    background: tuple[dist.ProcessGroup | None, dist.ProcessGroup | None] = (None, None),
    asynchronous: bool = False,
) -> list[Future[Any]]:
    """Write the weights into the directory ``path`` (``model-*.safetensors``, each rank its
    shards, then rank 0 joins them into whole files) and the optimizer state into
    ``path/train_state`` (``.metadata`` and one ``.distcp`` file per writing rank). Collective:
    every rank calls it. ``asynchronous`` returns once the state is copied to CPU memory, with
    futures of the writes; their coordination runs on ``background``, a process group for each
    write (the training's collectives keep the default one, and the two writes run in threads of
    their own: on one group their collectives could interleave in another order on each rank and
    deadlock). Rank 0 then calls
    :func:`finish_weights` once they are written."""
    weights = _weights(model)
    # Under a process group each rank writes its parts, which rank 0 joins into whole files;
    # one process writes the whole file at once.
    parts = not _no_dist()
    writer = HuggingFaceStorageWriter(
        path=str(path),
        fqn_to_index_mapping=dict.fromkeys(weights, 1),  # one file, as a small model's
        save_distributed=parts,
        enable_consolidation=parts,
    )
    futures = [
        _save(weights, writer, background[0], asynchronous),
        _save(
            {"optim": _optim(model, optimizers)},
            FileSystemWriter(str(path / TRAIN_STATE_DIR)),
            background[1],
            asynchronous,
        ),
    ]
    return [f for f in futures if f is not None]


def finish_weights(path: Path) -> None:
    """Rank 0, after :func:`save_train_state` is whole: remove the per-rank weight files that
    the consolidated ``model-*.safetensors`` replace (else the weights would be stored twice),
    and name a one-file model ``model.safetensors`` without an index, the single-file layout that
    ``transformers``, the GGUF converters and the rest of this project look for first."""
    shutil.rmtree(path / "sharded", ignore_errors=True)
    files = sorted(path.glob("model-*-of-*.safetensors"))
    if len(files) == 1:
        files[0].rename(path / WEIGHTS)
        (path / WEIGHTS_INDEX).unlink(missing_ok=True)


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


def _load(state: dict[str, Any], path: Path, reader: Any) -> None:
    try:
        dcp_load(state, storage_reader=reader, no_dist=_no_dist())
    except CheckpointException as err:
        first = next(iter(err.failures.values()), err)
        raise CheckpointError(
            f"cannot read the training state in {path} ({type(first).__name__}: "
            f"{' '.join(str(first).split())[:300]}); resume from another checkpoint"
        ) from err


def load_train_state(model: nn.Module, optimizers: OptimizerSet, path: Path) -> None:
    """Fill ``model`` and ``optimizers`` (built for this run, sharded or not) from the checkpoint
    directory ``path``; each rank reads the parts of each tensor it holds. A checkpoint of
    format 2 (weights in ``train_state/`` too) still loads. The schedules are restored
    separately (:meth:`OptimizerSet.load_state_dict`, from ``trainer_state.pt``)."""
    state_dir = path / TRAIN_STATE_DIR
    if not (state_dir / ".metadata").is_file():
        raise CheckpointError(
            f"{state_dir / '.metadata'} is missing: the training state was not written whole; "
            "resume from another checkpoint"
        )
    _check_expert_layout(model, state_dir)
    saved = FileSystemReader(str(state_dir)).read_metadata().state_dict_metadata
    state: dict[str, Any] = {"optim": _optim(model, optimizers)}
    if any(key.startswith("model.") for key in saved):  # format 2
        state["model"] = get_model_state_dict(model)
    _load(state, state_dir, FileSystemReader(str(state_dir)))
    weights = state.get("model")
    if weights is None:
        weights = _weights(model)
        _load(weights, path, HuggingFaceStorageReader(str(path)))
    set_model_state_dict(model, weights, options=StateDictOptions(strict=False))
    for name, opt in zip(optimizers.names, optimizers.optimizers, strict=True):
        set_optimizer_state_dict(model, opt, state["optim"][name])
