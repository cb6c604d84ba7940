"""Train a Qwen-style byte-level BPE tokenizer with `tokenizers`, and check a given one fits."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import pre_tokenizers, trainers

from data.errors import DataError
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
