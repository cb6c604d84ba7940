"""Find the checkpoint to serve and check that a directory really holds a Qwen3 model.

The trainer writes ``checkpoints/<run>/step-NNNNNN/`` directories plus ``best`` and ``latest``
pointers in the run directory; a pointer is a symlink or a small text file naming the step
directory. Any Hugging Face Qwen3 directory (config.json + safetensors + tokenizer.json) works too.
"""

from __future__ import annotations

import json
from pathlib import Path

# The run layout (step dirs + best/latest pointers) is the trainer's; read it with its rules.
from trainer.run_dirs import BEST, LATEST, most_recent_run, read_pointer

TRAIN_HINT = "train one first with `python train.py model=tiny`, or pass --ckpt DIR"
POINTERS = (BEST, LATEST)


class CheckpointError(Exception):
    """A checkpoint cannot be found or is not a Qwen3 model; the message says what to do."""


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
    """Raise CheckpointError unless ``path`` has a Qwen3 config, weights and a tokenizer."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a Qwen3 model directory: config.json is missing")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{config_file} is not valid JSON ({err}); re-save the checkpoint"
        ) from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "qwen3":
        raise CheckpointError(
            f"{path} is not a Qwen3 model directory: config.json has model_type={model_type!r}, "
            "expected 'qwen3'"
        )
    if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise CheckpointError(
            f"{path} is not a Qwen3 model directory: model.safetensors is missing"
        )
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{path} has no tokenizer.json; save the tokenizer beside the model (Qwen3Tokenizer.save)"
        )


def model_name(path: Path) -> str:
    """A readable model id: ``<run>/<step dir>`` for trainer checkpoints, else the directory name."""
    path = path.resolve()
    if any(read_pointer(path.parent, p) == path for p in POINTERS):
        return f"{path.parent.name}/{path.name}"
    return path.name
