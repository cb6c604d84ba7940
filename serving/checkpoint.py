"""Find the checkpoint to serve and check that a directory really holds a Qwen3 model.

The trainer writes ``checkpoints/<run>/step-NNNNNN/`` directories plus ``best`` and ``latest``
pointers in the run directory; a pointer is a symlink or a small text file naming the step
directory. Any Hugging Face Qwen3 directory (config.json + safetensors + tokenizer.json) works too.
"""

from __future__ import annotations

from pathlib import Path

# The run layout (step dirs + best/latest pointers) and what a checkpoint directory must hold
# are the trainer's; read and check them with its rules, and report its one error type.
from trainer.run_dirs import BEST, LATEST, check_checkpoint, most_recent_run, read_pointer
from trainer.run_dirs import CheckpointError as CheckpointError

TRAIN_HINT = "train one first with `python train.py model=tiny`, or pass --ckpt DIR"
POINTERS = (BEST, LATEST)


def latest_best_checkpoint(root: Path) -> Path:
    """The ``best`` checkpoint of the most recent run under ``root`` (e.g. ``checkpoints/``):
    the run whose ``best`` pointer moved last, by the trainer's own rule."""
    if not root.is_dir():
        raise CheckpointError(f"no checkpoint yet: {root}/ does not exist; {TRAIN_HINT}")
    run = most_recent_run(root, BEST)
    best = read_pointer(run, BEST) if run is not None else None
    if best is None:
        raise CheckpointError(
            f"no checkpoint yet: no run under {root}/ has a `best` checkpoint; {TRAIN_HINT}"
        )
    return best


def resolve_checkpoint(ckpt: str | Path | None, root: str | Path = "checkpoints") -> Path:
    """The model directory to serve: ``ckpt`` itself, a run's ``best``, or the newest run's best."""
    if ckpt is None:
        path = latest_best_checkpoint(Path(root))
    else:
        path = Path(ckpt).expanduser()
        if not path.exists():
            raise CheckpointError(f"--ckpt {path}: no such directory")
        if not path.is_dir():
            raise CheckpointError(f"--ckpt {path}: not a directory; pass a checkpoint directory")
        run_best = read_pointer(path, BEST)
        if run_best is not None and not (path / "config.json").exists():
            path = run_best  # a run directory: serve its best checkpoint
    check_qwen3_dir(path)
    return path


def check_qwen3_dir(path: Path) -> None:
    """Raise CheckpointError unless ``path`` has a Qwen3 config, readable weights that match it,
    and a tokenizer (the checkpoint check shared with the trainer)."""
    check_checkpoint(path)


def model_name(path: Path) -> str:
    """A readable model id: ``<run>/<step dir>`` for trainer checkpoints, else the directory name."""
    path = path.resolve()
    if any(read_pointer(path.parent, p) == path for p in POINTERS):
        return f"{path.parent.name}/{path.name}"
    return path.name
