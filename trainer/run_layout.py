"""The run layout, the one place that knows it: where runs live (the default run name, the most
recent run), their step directories and ``best``/``latest`` pointers, what a checkpoint
directory must hold (checked before it is used), and which checkpoint a command means
(``resume`` for training, ``ckpt`` for demo/interactive/serve).

Light on purpose (no torch at import): ``serve.py`` reads the run layout with these rules and
reports a bad checkpoint before torch loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

from trainer.errors import CheckpointError, ConfigError

LATEST = "latest"
BEST = "best"
AUTO = "auto"  # resume=auto: latest when the run has one, else a fresh start
MODEL_CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
STATE_FILE = "trainer_state.pt"
TRAIN_STATE_DIR = "train_state"  # optimizer state, DCP shards (trainer/train_state.py)
_STEP_DIR = re.compile(r"step-(\d+)")


def timestamp_name() -> str:
    """A run name from the current local time, e.g. ``2026-11-22_23-05-38``."""
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def step_number(path: Path) -> int | None:
    """The step of a ``step-NNNNNN`` directory name, else None."""
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def step_dirs(run_dir: Path) -> list[Path]:
    """The step directories of a run, oldest first by step number (``step-1000000`` has seven
    digits, so name order would put it before ``step-999999``)."""
    found = [(step_number(p), p) for p in run_dir.glob("step-*") if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def read_pointer(run_dir: Path, name: str) -> Path | None:
    """The step directory a run's ``best``/``latest`` pointer names, or None if it names none.

    The trainer writes relative symlinks; a small text file naming the directory is read too.
    """
    pointer = run_dir / name
    if pointer.is_symlink() or pointer.is_dir():
        target = pointer.resolve()
        return target if target.is_dir() else None
    if pointer.is_file():
        named = pointer.read_text(encoding="utf-8").strip()
        if not named:
            return None
        target = Path(named) if Path(named).is_absolute() else run_dir / named
        return target.resolve() if target.is_dir() else None
    return None


def set_pointer(run_dir: Path, name: str, target: Path) -> None:
    """Point ``run_dir/name`` at ``target`` (a sibling directory) in one atomic rename."""
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target.name, tmp)
    os.replace(tmp, run_dir / name)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete step directories beyond the newest ``keep_last``, never ``best`` or ``latest``,
    and leftovers of interrupted saves."""
    keep = {read_pointer(run_dir, BEST), read_pointer(run_dir, LATEST)}
    for d in step_dirs(run_dir)[:-keep_last]:
        if d.resolve() not in keep:
            shutil.rmtree(d)
    for leftover in (*run_dir.glob(".tmp-step-*"), *run_dir.glob(".old-step-*")):
        if not leftover.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)


def run_dirs(out_dir: str | os.PathLike[str], pointer: str) -> list[Path]:
    """Run directories under ``out_dir`` (and one level of multirun job dirs below them) whose
    ``pointer`` names a step directory, oldest first by when that pointer was last moved."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    found = [p.parent for p in (*root.glob(f"*/{pointer}"), *root.glob(f"*/*/{pointer}"))]
    found = [d for d in found if read_pointer(d, pointer) is not None]
    return sorted(found, key=lambda d: os.lstat(d / pointer).st_mtime)


def most_recent_run(out_dir: str | os.PathLike[str], pointer: str = BEST) -> Path | None:
    """The newest run directory under ``out_dir`` with a ``pointer`` (``best`` or ``latest``)."""
    runs = run_dirs(out_dir, pointer)
    return runs[-1] if runs else None


def default_run_name(out_dir: str | None, resume: str | None, stamp: str | None = None) -> str:
    """``run_name`` when the user gives none: the resumed run's name, else a timestamp
    (``stamp`` if given: under torchrun, rank 0's, so every rank names the same directory).

    Registered as the ``run_name_default`` OmegaConf resolver (cached, so one process agrees
    with itself); ``hydra.run.dir`` is built from it.
    """
    out = Path(out_dir or "checkpoints")
    if resume in (LATEST, AUTO):
        run = most_recent_run(out, LATEST)
        if run is not None:
            return run.relative_to(out).as_posix()
    elif resume:
        path = Path(resume).absolute()
        run = path if (path / LATEST).exists() else path.parent
        try:
            return run.relative_to(out.absolute()).as_posix()
        except ValueError:
            pass
    return stamp or timestamp_name()


# ---- checking a checkpoint directory ---------------------------------------------------------
def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is damaged: not valid JSON ({_one_line(err)})") from None


def _check_config(path: Path) -> dict[str, Any]:
    """``config.json``: present, valid JSON, a Qwen3 config."""
    file = path / MODEL_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: {path} is not a Qwen3 model directory")
    config = _read_json(file)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ("qwen3", "qwen3_moe"):
        raise CheckpointError(
            f"{path} is not a Qwen3 model directory: {MODEL_CONFIG} has "
            f"model_type={model_type!r}, expected 'qwen3' or 'qwen3_moe'"
        )
    assert isinstance(config, dict)
    return config


def _weight_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape from the safetensors headers (``safe_open`` parses the header and
    checks that the file holds every byte it announces, without reading the tensors)."""
    from safetensors import SafetensorError, safe_open

    if (path / WEIGHTS_INDEX).is_file():
        index = _read_json(path / WEIGHTS_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / WEIGHTS_INDEX} is damaged: it has no weight_map")
        files = sorted({path / str(name) for name in weight_map.values()})
    elif (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
    else:
        raise CheckpointError(f"{path / WEIGHTS} is missing: {path} is not a Qwen3 model directory")
    shapes: dict[str, list[int]] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file} is missing ({WEIGHTS_INDEX} names it)")
        try:
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shapes[name] = list(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is damaged ({_one_line(err)})") from None
    return shapes


def _check_weights_match(path: Path, config: dict[str, Any], shapes: dict[str, list[int]]) -> None:
    """The weights are the model ``config.json`` describes (embedding shape, layer count)."""
    where = f"{path / WEIGHTS} does not match {path / MODEL_CONFIG}"
    vocab, hidden = config.get("vocab_size"), config.get("hidden_size")
    embed = shapes.get("model.embed_tokens.weight")
    sizes_known = isinstance(vocab, int) and isinstance(hidden, int)
    if embed is not None and sizes_known and embed != [vocab, hidden]:
        raise CheckpointError(
            f"{where}: the embedding is {embed}, config.json says [vocab_size, hidden_size] "
            f"= [{vocab}, {hidden}]; the directory mixes files of two models"
        )
    layers = {int(m.group(1)) for n in shapes if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    n_layers = config.get("num_hidden_layers")
    if layers and isinstance(n_layers, int) and max(layers) + 1 != n_layers:
        raise CheckpointError(
            f"{where}: the weights have {max(layers) + 1} layers, config.json says "
            f"num_hidden_layers={n_layers}; the directory mixes files of two models"
        )


def _check_trainer_state(path: Path) -> None:
    """``trainer_state.pt`` is a whole ``torch.save`` archive: its zip directory sits at the end
    of the file, so a truncated or overwritten file fails here, without loading the tensors."""
    file = path / STATE_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing: {path} is not a training checkpoint of this framework "
            "(a plain Hugging Face model dir can be used by demo/serve, not resumed)"
        )
    try:
        with zipfile.ZipFile(file) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{file} is damaged ({_one_line(err)})") from None
    if not pickles:
        raise CheckpointError(f"{file} is damaged (no data.pkl in the archive)")


def _check_train_state(path: Path) -> None:
    """``train_state/``: DCP's ``.metadata`` reads, and every shard file it names holds the
    bytes it is said to hold (without reading the tensors)."""
    from torch.distributed.checkpoint.filesystem import (
        FileSystemReader,  # torch only for training checks
    )

    state = path / TRAIN_STATE_DIR
    meta = state / ".metadata"
    if not meta.is_file():
        raise CheckpointError(
            f"{meta} is missing: {path} has no whole training state (weights and optimizer "
            "shards); it can be used by demo/serve, not resumed"
        )
    try:
        metadata = FileSystemReader(str(state)).read_metadata()
    except Exception as err:  # unpickling a damaged file raises anything
        raise CheckpointError(f"{meta} is damaged ({_one_line(err)[:200]})") from None
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = state / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (the training state's .metadata names it)")
        if file.stat().st_size < end:
            raise CheckpointError(
                f"{file} is damaged (truncated: {file.stat().st_size} of {end} bytes)"
            )


def check_checkpoint(path: Path, training: bool = False) -> None:
    """Raise :class:`CheckpointError` naming the first missing or damaged file of the model
    directory ``path``: ``config.json`` (a Qwen3 config), readable weights that match it, and
    ``tokenizer.json``; with ``training``, also a loadable ``trainer_state.pt`` and a whole
    ``train_state/``."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass a checkpoint directory")
    config = _check_config(path)
    _check_weights_match(path, config, _weight_shapes(path))
    if not (path / TOKENIZER).is_file():
        raise CheckpointError(
            f"{path} has no {TOKENIZER}; save the tokenizer beside the model (Qwen3Tokenizer.save)"
        )
    _read_json(path / TOKENIZER)
    if training:
        _check_trainer_state(path)
        _check_train_state(path)


def intact_checkpoints(run_dir: Path, skip: Path | None = None) -> list[Path]:
    """The step directories of ``run_dir`` that can be resumed from, newest first."""
    found = [d for d in reversed(step_dirs(run_dir)) if skip is None or d.resolve() != skip]
    intact = []
    for d in found:
        try:
            check_checkpoint(d, training=True)
        except CheckpointError:
            continue
        intact.append(d.resolve())
    return intact


def _looks_like_checkpoint(path: Path) -> bool:
    names = (MODEL_CONFIG, WEIGHTS, WEIGHTS_INDEX, STATE_FILE)
    return step_number(path) is not None or any((path / n).exists() for n in names)


def resolve_auto(resume: str | None, run_dir: Path) -> str | None:
    """``resume=auto`` as ``latest`` when ``run_dir`` has a ``latest`` pointer, else None (a
    fresh start): one command line for a job's first launch and each requeue. Any other value
    is returned as it is."""
    if resume != AUTO:
        return resume
    has_latest = (run_dir / LATEST).is_symlink() or (run_dir / LATEST).exists()
    return LATEST if has_latest else None


def resolve_resume(resume: str, run_dir: Path) -> tuple[Path, str | None]:
    """The checkpoint to resume from, checked before any work, and a one-line note when it is
    not the one ``resume`` named.

    ``latest`` (of ``run_dir``) or a run directory (its ``latest``): a damaged checkpoint is
    skipped for the newest intact one of the run, and the note says which file was damaged and
    which checkpoint is used instead. A step directory named explicitly is used as it is or
    refused, listing the run's intact checkpoints.
    """
    path = run_dir if resume == LATEST else Path(resume)
    explicit = not ((path / LATEST).is_symlink() or (path / LATEST).exists())
    if explicit and resume == LATEST:
        raise ConfigError(
            f"resume=latest: no checkpoint found in {run_dir} (no '{LATEST}' pointer); "
            "train first, or pass resume=PATH to a checkpoint directory"
        )
    if not path.is_dir():
        raise ConfigError(
            f"resume={resume}: no such directory; pass resume=latest or the path of a "
            "step-NNNNNN directory of a run"
        )
    if explicit and not _looks_like_checkpoint(path):
        raise ConfigError(
            f"resume={resume}: {path} is not a checkpoint directory (no {STATE_FILE}); "
            "pass resume=latest or the path of a step-NNNNNN directory of a run"
        )
    run = path.resolve().parent if explicit else path
    target = path.resolve() if explicit else read_pointer(run, LATEST)
    try:
        if target is None:
            raise CheckpointError(f"{run / LATEST} points at a directory that does not exist")
        check_checkpoint(target, training=True)
        return target, None
    except CheckpointError as err:
        intact = intact_checkpoints(run, skip=target)
        if explicit:
            listing = (
                f"intact checkpoints of {run}: {', '.join(d.name for d in intact)} "
                "(pass one as resume=PATH)"
                if intact
                else f"no checkpoint of {run} is intact"
            )
            raise CheckpointError(f"resume={resume}: {err}; {listing}") from None
        if not intact:
            raise CheckpointError(
                f"{err}, and no other checkpoint of {run} is intact; start a new run "
                "(without resume)"
            ) from None
        return intact[0], f"{err}; resuming from {intact[0]}, the newest intact checkpoint"


# ---- the model directory demo, interactive and serve.py load -------------------------------
TRAIN_HINT = "train one with `python train.py model=tiny`"


def is_sft_checkpoint(path: Path) -> bool:
    """Whether the checkpoint at ``path`` was written by ``train.py sft`` (its saved config has
    an ``sft`` section): a chat model, whose prompts go through the chat template."""
    try:
        text = (path / "config.yaml").read_text(encoding="utf-8")
    except OSError:
        return False
    return re.search(r"^sft:\s*$", text, re.M) is not None


def default_init_from(out_dir: str) -> str:
    """What ``train.py sft`` starts from when ``init_from`` is not given: the ``best``
    checkpoint of the newest pretraining (not SFT) run under ``out_dir``."""
    for run in reversed(run_dirs(out_dir, BEST)):
        best = read_pointer(run, BEST)
        if best is not None and not is_sft_checkpoint(best):
            return str(best)
    raise ConfigError(
        f"train.py sft starts from a pretrained checkpoint and no run under {out_dir}/ has a "
        f"'{BEST}' one: run python train.py model=tiny first, or pass init_from=DIR"
    )


def find_model_dir(
    ckpt: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str] = "checkpoints",
    how: str = "ckpt=",
) -> Path:
    """The checked model directory a command loads: ``ckpt`` itself (a run directory means its
    ``best``), or with no ``ckpt`` the ``best`` of the most recent run under ``out_dir``.
    ``how`` is how the user names a directory in messages (``ckpt=`` or ``--ckpt ``)."""
    if ckpt is None or str(ckpt) == "":
        run = most_recent_run(out_dir, BEST)
        best = read_pointer(run, BEST) if run is not None else None
        if best is None:
            raise CheckpointError(
                f"no checkpoint yet: no trained run under {Path(out_dir)}/ has a '{BEST}' "
                f"checkpoint; {TRAIN_HINT}, or pass {how}DIR (any Hugging Face Qwen3 directory)"
            )
        path = best
    else:
        path = Path(ckpt).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"{how}{ckpt}: no such directory; pass a checkpoint or run directory"
            )
        if not path.is_dir():
            raise CheckpointError(f"{how}{ckpt}: not a directory; pass a checkpoint directory")
        run_best = read_pointer(path, BEST)
        if run_best is not None and not (path / MODEL_CONFIG).exists():
            path = run_best  # a run directory: its best checkpoint
    check_checkpoint(path)
    return path


def display_name(path: Path) -> str:
    """A readable model id: ``<run>/<step dir>`` for a run's checkpoint, else the directory name."""
    path = path.resolve()
    if any(read_pointer(path.parent, p) == path for p in (BEST, LATEST)):
        return f"{path.parent.name}/{path.name}"
    return path.name
