"""prepare_data end to end: tokenizer + token cache, fingerprints, reuse, bad input."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from data import DataConfig, DataError, prepare_data
from qwen3.tokenizer import Qwen3Tokenizer

WORDS = [
    "the",
    "a",
    "king",
    "queen",
    "sword",
    "crown",
    "night",
    "day",
    "love",
    "speak",
    "hear",
    "lord",
    "lady",
    "fair",
    "foul",
    "ran",
]
VOCAB = 320


def _write_corpus(dir_, n_docs: int = 60, seed: int = 0) -> str:
    rng = random.Random(seed)
    docs = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(n_docs)
    ]
    (dir_ / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    return str(dir_ / "*.txt")


@pytest.fixture
def cfg(tmp_path) -> DataConfig:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    return DataConfig(
        source="local", paths=[_write_corpus(corpus)], cache_dir=str(tmp_path / "cache")
    )


def _prepare(cfg: DataConfig, vocab: int = VOCAB):
    return prepare_data(cfg, vocab, progress=False)


def test_local_build_contents(cfg) -> None:
    data = _prepare(cfg)
    assert data.train.dtype == np.uint16 and data.val.dtype == np.uint16
    assert isinstance(data.train, np.memmap)
    assert data.tokenizer.vocab_size <= VOCAB
    meta = data.meta
    assert meta["train_docs"] + meta["val_docs"] == 60 and meta["val_docs"] == 3  # 0, 20, 40
    assert len(data.train) == meta["train_tokens"] and len(data.val) == meta["val_tokens"]
    # every document is followed by EOS; decoding the val split gives its documents back
    eos = data.tokenizer.eos_id
    assert int(data.val[-1]) == eos and int(data.train[-1]) == eos
    assert int((data.val == eos).sum()) == 3 and int((data.train == eos).sum()) == 57
    docs = (Path(cfg.paths[0]).parent / "corpus.txt").read_text().split("\n\n")
    val_text = data.tokenizer.decode(data.val.tolist())
    assert val_text == "<|endoftext|>".join(docs[i].strip() for i in (0, 20, 40)) + "<|endoftext|>"
    assert data.val_bytes == sum(len(docs[i].strip().encode()) for i in (0, 20, 40))
    # the tokenizer directory is a saved, loadable tokenizer
    assert Qwen3Tokenizer.from_dir(data.tokenizer_dir).encode("the king") == data.tokenizer.encode(
        "the king"
    )


def test_cache_hit_reuses_files(cfg) -> None:
    first = _prepare(cfg)
    train_file = first.cache_path / "train-00000.bin"
    stamp = train_file.stat().st_mtime_ns
    second = _prepare(cfg)
    assert second.fingerprint == first.fingerprint
    assert train_file.stat().st_mtime_ns == stamp  # mapped, not rebuilt
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert second.tokenizer_dir == first.tokenizer_dir


@pytest.mark.parametrize(
    "change",
    [
        {"val_fraction": 0.1},
        {"val_docs": 4},
        {"max_docs": 30},
        {"max_tokens": 500},
        {"vocab_size": 300},
        {"doc_separator": "line"},
        "file_content",
    ],
    ids=str,
)
def test_cache_miss_on_any_change(cfg, change) -> None:
    base = _prepare(cfg)
    if change == "file_content":
        _write_corpus(Path(cfg.paths[0]).parent, seed=1)
        changed = cfg
    else:
        changed = dataclasses.replace(cfg, **change)
    other = _prepare(changed)
    assert other.fingerprint != base.fingerprint
    assert other.cache_path != base.cache_path and base.cache_path.is_dir()


def test_max_tokens_cuts_train_exactly(cfg) -> None:
    data = _prepare(dataclasses.replace(cfg, max_tokens=777))
    assert len(data.train) == 777 and data.meta["train_tokens"] == 777


def test_given_tokenizer_dir(cfg, tmp_path) -> None:
    trained = _prepare(cfg)
    given = dataclasses.replace(cfg, tokenizer=str(trained.tokenizer_dir), max_docs=40)
    data = _prepare(given)
    assert data.tokenizer_dir == trained.tokenizer_dir
    with pytest.raises(DataError, match=r"has \d+ tokens but the model's vocab_size is 270"):
        _prepare(given, vocab=270)
    with pytest.raises(DataError, match="has no tokenizer.json"):
        _prepare(dataclasses.replace(cfg, tokenizer=str(tmp_path / "nowhere")))


def test_truncated_cache_is_rebuilt(cfg, caplog) -> None:
    good = _prepare(cfg)
    expected = np.array(good.train)
    train_file = good.cache_path / "train-00000.bin"
    with open(train_file, "r+b") as f:
        f.truncate(train_file.stat().st_size - 10)
    with caplog.at_level(logging.WARNING, logger="data"):
        again = _prepare(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "corrupt" in warnings[0] and "rebuilding" in warnings[0]
    assert "\n" not in warnings[0]
    assert np.array_equal(np.array(again.train), expected)


def test_missing_metadata_is_rebuilt(cfg, caplog) -> None:
    good = _prepare(cfg)
    (good.cache_path / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="data"):
        again = _prepare(cfg)
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert (again.cache_path / "meta.json").is_file()


def test_empty_source(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    cfg = DataConfig(source="local", paths=[str(tmp_path / "*.txt")], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="yielded no training text"):
        _prepare(cfg)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_single_document_has_no_train_split(tmp_path) -> None:
    (tmp_path / "one.txt").write_text("only one document here, which goes to validation\n")
    cache = tmp_path / "c"
    cfg = DataConfig(source="local", paths=[str(tmp_path / "one.txt")], cache_dir=str(cache))
    with pytest.raises(DataError, match="yielded no training text"):
        _prepare(cfg)
    # with a given tokenizer the token cache itself refuses to publish an empty split
    tok_cfg = DataConfig(source="local", paths=[_write_corpus(tmp_path)], cache_dir=str(cache))
    tok_dir = _prepare(tok_cfg).tokenizer_dir
    with pytest.raises(DataError, match="the train split is empty"):
        _prepare(dataclasses.replace(cfg, tokenizer=str(tok_dir)))
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_model_vocab_smaller_than_data_vocab(cfg) -> None:
    with pytest.raises(DataError, match=re.escape("data.vocab_size=400 exceeds")):
        _prepare(dataclasses.replace(cfg, vocab_size=400), vocab=320)


def test_hub_dataset_offline_fails_clearly(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(source="hf", path="roneneldan/TinyStories", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="needs the network but Hugging Face offline mode is on"):
        _prepare(cfg)


def test_tinystories_sample(tinystories_path, tmp_path) -> None:
    cfg = DataConfig(source="local", paths=[str(tinystories_path)], cache_dir=str(tmp_path))
    data = prepare_data(cfg, 2048, progress=False)
    assert data.tokenizer.vocab_size == 2048
    assert 150_000 < len(data.train) < 400_000
    assert 0.03 < len(data.val) / (len(data.train) + len(data.val)) < 0.07
    assert data.tokenizer.decode(data.train[:200].tolist()).count("<|endoftext|>") >= 1


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    cache = tmp_path_factory.mktemp("shakespeare-cache")
    return prepare_data(DataConfig(cache_dir=str(cache)), 8192, progress=False)


def test_default_corpus(shakespeare) -> None:
    data = shakespeare
    assert data.tokenizer.vocab_size == 8192 and data.train.dtype == np.uint16
    assert 1_000_000 < len(data.train) + len(data.val) < 1_600_000
    assert data.meta["val_docs"] == 2 and data.meta["train_docs"] == 36
    assert data.tokenizer.decode(data.val[:50].tolist()).startswith(("Henry VIII", "The Taming"))
    again = prepare_data(DataConfig(cache_dir=str(data.cache_path.parent)), 8192, progress=False)
    assert again.fingerprint == data.fingerprint


def test_progress_bar_reports_docs_and_tokens(cfg, capsys) -> None:
    prepare_data(cfg, VOCAB, progress=True)
    err = capsys.readouterr().err
    assert "tokenizing" in err and "doc/s" in err and "tok_s=" in err


def _hf_dir(root: Path, splits: tuple[str, ...]) -> Path:
    """A dataset directory `datasets.load_dataset(path)` reads like a hub repo, offline."""
    rng = random.Random(0)
    for split in splits:
        (root / "data").mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"story": f"{split}: " + " ".join(rng.choice(WORDS) for _ in range(30))})
            for _ in range(40)
        ]
        (root / "data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_hf_source_uses_own_validation_split(tmp_path) -> None:
    path = _hf_dir(tmp_path / "ds", ("train", "validation"))
    cfg = DataConfig(source="hf", path=str(path), text_field="story", cache_dir=str(tmp_path / "c"))
    data = _prepare(cfg)
    assert data.meta["own_validation"] is True
    assert data.meta["train_docs"] == 40 and data.meta["val_docs"] == 40
    text = data.tokenizer.decode(data.val.tolist())
    assert text.count("validation:") == 40 and "train:" not in text
    capped = _prepare(dataclasses.replace(cfg, max_tokens=200, val_fraction=0.25))
    assert len(capped.train) == 200 and 50 <= len(capped.val) < 50 + 60
    assert _prepare(dataclasses.replace(cfg, val_docs=3)).meta["val_docs"] == 3
    # a cached run needs no access to the dataset (a hub dataset works offline once cached)
    path.rename(tmp_path / "gone")
    assert _prepare(cfg).fingerprint == data.fingerprint


def test_hf_source_without_validation_holds_out(tmp_path) -> None:
    path = _hf_dir(tmp_path / "ds", ("train",))
    cfg = DataConfig(source="hf", path=str(path), text_field="story", cache_dir=str(tmp_path / "c"))
    data = _prepare(cfg)
    assert data.meta["own_validation"] is False
    assert data.meta["train_docs"] == 38 and data.meta["val_docs"] == 2  # docs 0 and 20


def test_corrupt_tokenizer_cache_is_retrained(cfg, caplog) -> None:
    first = _prepare(cfg)
    (first.tokenizer_dir / "tokenizer.json").write_text("{truncated")
    with caplog.at_level(logging.WARNING, logger="data"):
        again = _prepare(cfg)
    assert any("tokenizer cache" in r.getMessage() for r in caplog.records)
    assert again.fingerprint == first.fingerprint


def test_vocab_too_small_fails_before_reading(tmp_path) -> None:
    cfg = DataConfig(source="local", paths=[str(tmp_path / "missing-*.txt")])
    # the vocabulary is checked first, so the missing files are not even looked at
    with pytest.raises(DataError, match=r"model.vocab_size=200 is too small.*at least 261"):
        prepare_data(cfg, 200, progress=False)
    with pytest.raises(DataError, match=r"data.vocab_size=100 is too small"):
        prepare_data(dataclasses.replace(cfg, vocab_size=100), 8192, progress=False)


def _damage(file: Path) -> None:
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 10)


def test_only_the_building_process_deletes_a_damaged_cache(cfg) -> None:
    good = _prepare(cfg)
    expected = np.array(good.train)
    train_file = good.cache_path / "train-00000.bin"
    _damage(train_file)
    damaged_size = train_file.stat().st_size
    with pytest.raises(DataError, match=r"token cache .* is damaged \(train-00000\.bin has") as err:
        prepare_data(cfg, VOCAB, progress=False, repair=False)
    assert "only the process that builds it" in str(err.value) and "\n" not in str(err.value)
    assert train_file.stat().st_size == damaged_size  # left for the builder
    assert np.array_equal(np.array(_prepare(cfg).train), expected)  # which rebuilds it


def test_only_the_building_process_deletes_a_damaged_tokenizer(cfg) -> None:
    first = _prepare(cfg)
    tokenizer_file = first.tokenizer_dir / "tokenizer.json"
    tokenizer_file.write_text("{truncated")
    with pytest.raises(DataError, match=r"tokenizer cache .* is damaged .*only the process"):
        prepare_data(cfg, VOCAB, progress=False, repair=False)
    assert tokenizer_file.read_text() == "{truncated"
    assert _prepare(cfg).fingerprint == first.fingerprint


@pytest.mark.parametrize("victim", ["meta.json", "tokenizer.json"])
def test_an_io_error_deletes_nothing(cfg, monkeypatch, victim: str) -> None:
    """A read that fails with EIO (a network filesystem hiccup) proves no damage: even the
    building process keeps the cache and fails with one line; the next run uses it."""
    good = _prepare(cfg)
    cache_files = sorted(p.name for p in good.cache_path.iterdir())
    tokenizer_json = (good.tokenizer_dir / "tokenizer.json").read_text()
    read_text, read_bytes = Path.read_text, Path.read_bytes

    def failing(read):
        def read_or_fail(self: Path, *args, **kwargs):
            if self.name == victim:
                raise OSError(errno.EIO, "Input/output error", str(self))
            return read(self, *args, **kwargs)

        return read_or_fail

    monkeypatch.setattr(Path, "read_text", failing(read_text))
    monkeypatch.setattr(Path, "read_bytes", failing(read_bytes))
    with pytest.raises(
        DataError, match=r"could not read the (token|tokenizer) cache .*Input/output"
    ):
        _prepare(cfg)
    monkeypatch.undo()
    assert sorted(p.name for p in good.cache_path.iterdir()) == cache_files
    assert (good.tokenizer_dir / "tokenizer.json").read_text() == tokenizer_json
    again = _prepare(cfg)
    assert again.meta["build_seconds"] == good.meta["build_seconds"]  # the same cache, not rebuilt


def test_a_streaming_source_is_read_once(cfg, monkeypatch) -> None:
    """Training the tokenizer and building the cache read the stream once: what the trainer
    took is replayed from a temporary file, then the same stream goes on."""
    import datasets

    opened = []
    real = datasets.load_dataset

    def counting(*args, **kwargs):
        opened.append(kwargs.get("streaming"))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", counting)
    budget = dataclasses.replace(cfg, tokenizer_max_bytes=2000)  # the trainer stops part way
    data = _prepare(budget)
    assert opened == [True]
    # The replayed head plus the rest equals reading the stream plainly (tokenizer cached).
    expected = np.array(data.train)
    shutil.rmtree(data.cache_path)
    again = _prepare(budget)
    assert opened == [True, True] and again.meta["train_sha256"] == data.meta["train_sha256"]
    assert np.array_equal(np.asarray(again.train), expected)
    assert not [p for p in Path(cfg.cache_dir).iterdir() if p.name.startswith("tmp")]


def _as_format1(data) -> Path:
    """Rewrite a finished cache as format 1 wrote it (one train.bin), under format 1's name."""
    from data.token_cache import fingerprint

    meta = data.meta
    key = {k: meta[k] for k in ("source", "split", "limits", "tokenizer_sha256")}
    old = data.cache_path.parent / f"tokens-{fingerprint({**key, 'format_version': 1})}"
    old.mkdir()
    (old / "train.bin").write_bytes(np.asarray(data.train).tobytes())
    (old / "val.bin").write_bytes(np.asarray(data.val).tobytes())
    kept = ("dtype", "train_tokens", "val_tokens", "train_docs", "val_docs", "val_bytes")
    (old / "meta.json").write_text(json.dumps({**{k: meta[k] for k in kept}, "format_version": 1}))
    shutil.rmtree(data.cache_path)
    return old


def test_a_format1_cache_is_read_or_rebuilt_with_one_line(cfg, caplog) -> None:
    new = _prepare(cfg)
    old = _as_format1(new)
    read = _prepare(cfg)  # the same ids: read as it is
    assert read.cache_path == old and read.fingerprint == old.name.removeprefix("tokens-")
    assert np.array_equal(np.asarray(read.train), np.asarray(new.train))

    capped = dataclasses.replace(cfg, max_tokens=500)
    old_capped = _as_format1(_prepare(capped))
    with caplog.at_level(logging.WARNING, logger="data"):
        rebuilt = _prepare(capped)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "format 1" in lines[0] and "\n" not in lines[0]
    assert rebuilt.cache_path != old_capped and rebuilt.meta["format_version"] == 2
