"""Where runs live: the default run name, finding the most recent run, resolving ``resume``."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from trainer.typed_config import ConfigError

LATEST = "latest"
BEST = "best"


def timestamp_name() -> str:
    """A run name from the current local time, e.g. ``2026-11-22_23-05-38``."""
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


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
    if resume == LATEST:
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


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """The checkpoint directory ``resume`` names: ``latest`` of ``run_dir``, a run directory
    (its ``latest``), or a checkpoint directory itself."""
    if resume == LATEST:
        target = run_dir / LATEST
        if not target.exists():
            raise ConfigError(
                f"resume=latest: no checkpoint found in {run_dir} (no '{LATEST}' pointer); "
                "train first, or pass resume=PATH to a checkpoint directory"
            )
        return target.resolve()
    path = Path(resume)
    if (path / LATEST).exists():
        path = path / LATEST
    if not (path / "trainer_state.pt").is_file():
        raise ConfigError(
            f"resume={resume}: {path} is not a checkpoint directory (no trainer_state.pt); "
            "pass resume=latest or the path of a step-NNNNNN directory of a run"
        )
    return path.resolve()
