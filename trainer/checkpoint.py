"""Checkpoint directories: a Hugging Face model dir (``config.json``, the tokenizer and
``model-*.safetensors``, which every rank writes its part of: :mod:`trainer.train_state`),
``trainer_state.pt`` (step, schedules, sampler, RNG: small plain values), ``train_state/`` (the
optimizer state as per-rank DCP shards) and ``config.yaml``. The weights are stored once.

Every save is written to a temporary sibling (:func:`stage_checkpoint`) and renamed into place
(:func:`commit_checkpoint`); the ``latest`` and ``best`` pointers are relative symlinks swapped
in with ``os.replace``, so a reader (or a crash) only ever sees a complete checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from optim import OptimizerSet
from qwen3 import Qwen3, Qwen3Config
from qwen3.hf import write_config
from qwen3.tokenizer import Qwen3Tokenizer
from trainer.distributed import DistInfo, all_ranks, group_rank_world, rank_seed
from trainer.errors import CheckpointError
from trainer.run_layout import MODEL_CONFIG, STATE_FILE, step_dir_name
from trainer.train_state import finish_weights, save_train_state

CONFIG_FILE = "config.yaml"
# 3: weights only in model-*.safetensors; 2 (still read): weights in train_state/ as well
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
# Fields of Qwen3Config that change the shape or meaning of the weights.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "attention_bias",
    "rope_theta",
)


def tokenizer_hash(tokenizer: Qwen3Tokenizer) -> str:
    """A fingerprint of the tokenizer's vocabulary, merges and special tokens."""
    return hashlib.sha256(tokenizer.tokenizer.to_str().encode()).hexdigest()[:16]


def stage_checkpoint(run_dir: Path, step: int, create: bool) -> Path:
    """The temporary directory a checkpoint of ``step`` is written to before
    :func:`commit_checkpoint` renames it into place. Its name is the same on every rank (each
    writes its shards there); ``create`` (rank 0) clears what a crashed save left and makes it."""
    tmp = run_dir / f".tmp-{step_dir_name(step)}"
    if create:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def write_checkpoint_files(
    tmp: Path,
    model: Qwen3,
    tokenizer: Qwen3Tokenizer,
    state: dict[str, Any],
    config_yaml: str,
) -> None:
    """Rank 0: ``config.json``, the tokenizer, ``trainer_state.pt`` and ``config.yaml`` into
    ``tmp`` (the weights are every rank's: :func:`trainer.train_state.save_train_state`)."""
    write_config(model, tmp)
    tokenizer.save(tmp)
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(config_yaml)


def commit_checkpoint(run_dir: Path, tmp: Path, step: int) -> Path:
    """Rename the whole ``tmp`` into ``run_dir/step-NNNNNN`` (rank 0, once every rank's part of
    it is written)."""
    final = run_dir / step_dir_name(step)
    if final.exists():  # re-saving a step (resumed from an older checkpoint): swap, then drop
        old = run_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Qwen3,
    tokenizer: Qwen3Tokenizer,
    state: dict[str, Any],
    config_yaml: str,
    optimizers: OptimizerSet | None = None,
) -> Path:
    """One process: write ``run_dir/step-NNNNNN`` (model, tokenizer, trainer state, config, and
    with ``optimizers`` the training state) atomically. :class:`trainer.loop.Trainer` runs the
    same pieces across ranks, and in the background with ``trainer.async_save``."""
    tmp = stage_checkpoint(run_dir, step, create=True)
    write_checkpoint_files(tmp, model, tokenizer, state, config_yaml)
    if optimizers is None:
        model.save_pretrained(tmp)
    else:
        save_train_state(model, optimizers, tmp)
        finish_weights(tmp)
    return commit_checkpoint(run_dir, tmp, step)


def load_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of a checkpoint (tensors and plain values only: ``weights_only``)."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt_dir} has no {STATE_FILE}: it is not a training checkpoint of this framework "
            "(a plain Hugging Face model dir can be used by demo/serve, not resumed)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path} is corrupt or unreadable ({e}); resume from another checkpoint"
        ) from None
    if state.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has format version {state.get('format_version')}, this trainer reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))}; resume with the trainer version that wrote it"
        )
    assert isinstance(state, dict)
    return state


def _check_model_shape(ckpt_dir: Path, model_config: Qwen3Config, fields: tuple[str, ...]) -> None:
    try:
        saved = Qwen3Config.from_json_file(Path(ckpt_dir) / MODEL_CONFIG)
    except (FileNotFoundError, ValueError) as e:  # how qwen3 (standalone) reports a bad file
        raise CheckpointError(f"cannot resume from {ckpt_dir}: {e}") from e
    for name in fields:
        old, new = getattr(saved, name), getattr(model_config, name)
        if old != new:
            raise CheckpointError(
                f"cannot resume from {ckpt_dir}: model.{name} is {old} in the checkpoint but {new} "
                "in this run; resume with the model config it was trained with, or start a new run"
            )


def _saved_optimizer(ckpt_dir: Path) -> str | None:
    """``optim.name`` in the run config saved with the checkpoint; None if it cannot be read
    (the file is informative only: nothing else of a resume depends on it)."""
    try:
        saved = yaml.safe_load((Path(ckpt_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    optim = saved.get("optim") if isinstance(saved, dict) else None
    name = optim.get("name") if isinstance(optim, dict) else None
    return name if isinstance(name, str) else None


def check_setup_matches(ckpt_dir: Path, model_config: Qwen3Config, optimizer: str) -> None:
    """Before any data is built, raise :class:`CheckpointError` if the checkpoint's model shape
    or optimizer differs from this run's. The vocabulary size (set by the tokenizer) and the
    rest are compared once the run is built (:func:`check_compatible`)."""
    _check_model_shape(ckpt_dir, model_config, tuple(f for f in SHAPE_FIELDS if f != "vocab_size"))
    saved = _saved_optimizer(ckpt_dir)
    if saved is not None and saved != optimizer:
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: optim.name is {saved} in the checkpoint but "
            f"{optimizer} in this run, and optimizer state does not carry over; resume with "
            f"optim.name={saved}, or start a new run"
        )


def global_batch(batch_size: int, grad_accum: int, world_size: int, seq_len: int) -> dict[str, int]:
    """What decides the batches besides the seed: the sampler draws ``batch_size x grad_accum x
    world_size`` windows of ``seq_len`` per step as one function of the step, and each rank takes
    its slice, so any split of the same global batch sees the same windows."""
    return {
        "sequences": batch_size * grad_accum * world_size,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "world_size": world_size,
    }


def _describe(batch: dict[str, int]) -> str:
    return (
        f"{batch['sequences']} sequences of seq_len {batch['seq_len']} (batch_size "
        f"{batch['batch_size']} x grad_accum {batch['grad_accum']} x {batch['world_size']} "
        f"process{'es' if batch['world_size'] != 1 else ''})"
    )


def check_compatible(
    ckpt_dir: Path,
    state: dict[str, Any],
    model_config: Qwen3Config,
    tok_hash: str,
    batch: dict[str, int],
) -> None:
    """Raise :class:`CheckpointError` naming the first difference between the checkpoint's setup
    and this run's (model shape, tokenizer, global batch). Another number of processes with the
    same global batch and ``seq_len`` resumes: DCP reshards the state, the sampler slices the
    same windows."""
    _check_model_shape(ckpt_dir, model_config, SHAPE_FIELDS)
    if state.get("tokenizer_hash") != tok_hash:
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: the tokenizer differs from this run's "
            f"(checkpoint {state.get('tokenizer_hash')}, run {tok_hash}); resume with the same "
            "data/tokenizer settings, or start a new run"
        )
    saved = state["global_batch"]
    if (saved["sequences"], saved["seq_len"]) != (batch["sequences"], batch["seq_len"]):
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: it was trained with a global batch of "
            f"{_describe(saved)}, this run has {_describe(batch)}; set trainer.batch_size, "
            f"trainer.grad_accum and trainer.seq_len to give {saved['sequences']} sequences of "
            f"{saved['seq_len']} tokens per step on {batch['world_size']} "
            f"process{'es' if batch['world_size'] != 1 else ''}, or start a new run"
        )


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (``torch.load(weights_only=True)``
    can read them)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def capture_rng() -> dict[str, Any]:
    """Rank 0's RNG states, and under ``ranks`` every rank's (they differ:
    :func:`trainer.distributed.rank_seed`). Collective: every rank calls it."""
    own = _rng_state()
    return {**own, "ranks": all_ranks(own)}


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` saved: each rank its own states when the process count
    is the one that saved them. On another count (or from a checkpoint that kept only rank 0's),
    rank 0's states, and on the other ranks a torch seed drawn from them and offset per rank."""
    rank, world = group_rank_world()
    ranks = state.get("ranks")
    own = ranks[rank] if isinstance(ranks, list) and len(ranks) == world else state
    torch.set_rng_state(own["torch"])
    py = own["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = own["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    if "cuda" in own and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["cuda"])
    if own is state and rank > 0:
        drawn = int(torch.randint(0, 2**62, (1,)))
        torch.manual_seed(rank_seed(drawn, DistInfo(rank, world)))
