"""Train a Qwen-style byte-level BPE tokenizer with `tokenizers` (cached by fingerprint), or check
that a given one fits."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import pre_tokenizers, trainers

from data.atomic_dir import building, load_finished
from data.errors import DataError
from data.token_cache import fingerprint
from qwen3.tokenizer import SPECIAL_TOKENS, Qwen3Tokenizer, build_bpe_pipeline, make_added_tokens

# 256 byte symbols plus the special tokens are the least a byte-level BPE can hold.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def check_vocab_size(vocab_size: int, key: str = "vocab_size") -> None:
    """A vocabulary too small for the byte alphabet plus the special tokens cannot be trained."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"{key}={vocab_size} is too small: a byte-level BPE needs 256 byte tokens plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use a vocab_size of at least {MIN_VOCAB_SIZE}"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Qwen3Tokenizer:
    """Train byte-level BPE on `texts`: ids 0-2 are the control tokens, the think tags last.

    The vocabulary holds at most `vocab_size` ids; a small corpus may yield fewer merges.
    """
    check_vocab_size(vocab_size)
    special, think = make_added_tokens()
    tok = build_bpe_pipeline()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(think),
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens(think)
    return Qwen3Tokenizer(tok)


def check_tokenizer_fits(tokenizer: Qwen3Tokenizer, vocab_size: int, where: str) -> None:
    """A tokenizer whose ids reach past the model's embedding table cannot train that model."""
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"tokenizer {where} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{vocab_size}: set model.vocab_size >= {tokenizer.vocab_size} (or data.vocab_size) "
            f"or use a tokenizer with at most {vocab_size} tokens"
        )


# ---- the tokenizer of a run: given, or trained once and cached by fingerprint ---------------
# Bump when tokenizer training changes its output for the same text.
TOKENIZER_TRAINING_VERSION = 1


def read_tokenizer(path: Path) -> Qwen3Tokenizer:
    # Read the file first: an I/O error then surfaces as one (the tokenizers loader would turn
    # it into a parse error, which counts as damage).
    (path / "tokenizer.json").read_bytes()
    return Qwen3Tokenizer.from_dir(path)


def cached_tokenizer(
    cache_dir: Path,
    key: dict[str, Any],
    vocab_size: int,
    texts: Callable[[], Iterator[str]],
    empty: str,
    repair: bool,
    build: bool,
) -> tuple[Qwen3Tokenizer, Path] | None:
    """The tokenizer trained before from the inputs `key` describes, else trained on `texts()`
    and cached; None if there is none and not `build`. `empty`: the one-line error when
    `texts()` yields nothing."""
    key = {"version": TOKENIZER_TRAINING_VERSION, **key, "vocab_size": vocab_size}
    path = cache_dir / f"tokenizer-{vocab_size}-{fingerprint(key)}"
    cached = load_finished(path, read_tokenizer, "tokenizer cache", "retraining", repair)
    if cached is not None or not build:
        return None if cached is None else (cached, path)
    stream = texts()
    first = next(stream, None)
    if first is None:
        raise DataError(empty)
    tokenizer = train_tokenizer(itertools.chain([first], stream), vocab_size)
    with building(path) as tmp:
        tokenizer.save(tmp)
    # Reload what was published: if another process won the race, all use its files.
    return Qwen3Tokenizer.from_dir(path), path


def given_tokenizer(given: str, vocab_size: int) -> tuple[Qwen3Tokenizer, Path]:
    path = Path(given).expanduser()
    if not (path / "tokenizer.json").is_file():
        raise DataError(
            f"data.tokenizer={given!r} has no tokenizer.json: point it at a tokenizer "
            f"directory (e.g. a downloaded Qwen3 model), or set data.tokenizer=null to train one"
        )
    tokenizer = Qwen3Tokenizer.from_dir(path)
    check_tokenizer_fits(tokenizer, vocab_size, str(path))
    return tokenizer, path
