"""Tokenized conversations for SFT: both splits rendered, encoded and masked once, then cached
under `<cache_dir>/sft-<fingerprint>/` (complete-or-absent, like the token caches)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.atomic_dir import building, load_finished
from data.conversations import (
    Message,
    SFTDataConfig,
    conversations_fingerprint,
    encode_conversations,
    prepared,
    read_conversations,
)
from qwen3.tokenizer import Qwen3Tokenizer

log = logging.getLogger(__name__)
_CHUNK = 1024  # conversations rendered and encoded (Rust threads) at a time


@dataclass
class TokenizedConversations:
    """Conversations as one flat array of ids and one of assistant flags, with offsets."""

    ids: np.ndarray  # (N,) int32
    mask: np.ndarray  # (N,) bool: the token is the assistant's (trained as a target)
    offsets: np.ndarray  # (C + 1,) int64

    @classmethod
    def from_lists(cls, items: Sequence[tuple[list[int], list[bool]]]) -> TokenizedConversations:
        lengths = np.array([len(ids) for ids, _ in items], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.fromiter((i for seq, _ in items for i in seq), np.int32, int(offsets[-1]))
        mask = np.fromiter((m for _, seq in items for m in seq), np.bool_, int(offsets[-1]))
        return cls(ids, mask, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def assistant_tokens(self) -> int:
        return int(self.mask.sum())

    def save(self, path: Path) -> None:
        np.save(path / "ids.npy", self.ids)
        np.save(path / "mask.npy", self.mask)
        np.save(path / "offsets.npy", self.offsets)

    @classmethod
    def load(cls, path: Path) -> TokenizedConversations:
        ids, mask, offsets = (np.load(path / f"{n}.npy") for n in ("ids", "mask", "offsets"))
        if len(ids) != len(mask) or int(offsets[-1]) != len(ids):
            raise ValueError("ids, mask and offsets disagree")
        return cls(ids, mask, offsets)


@dataclass
class SFTData:
    """The tokenizer and both splits of the conversations, with the cache that holds them."""

    tokenizer: Qwen3Tokenizer
    train: TokenizedConversations
    val: TokenizedConversations
    fingerprint: str
    cache_path: Path


def _chunks(
    items: Iterator[tuple[bool, list[Message]]],
) -> Iterator[list[tuple[bool, list[Message]]]]:
    chunk: list[tuple[bool, list[Message]]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encode_splits(
    cfg: SFTDataConfig, tokenizer: Qwen3Tokenizer
) -> tuple[TokenizedConversations, TokenizedConversations]:
    splits: dict[bool, list[tuple[list[int], list[bool]]]] = {False: [], True: []}
    for chunk in _chunks(read_conversations(cfg)):
        encoded = encode_conversations(tokenizer, [prepared(chat, cfg) for _, chat in chunk])
        for (is_val, _), item in zip(chunk, encoded, strict=True):
            splits[is_val].append(item)
    return (
        TokenizedConversations.from_lists(splits[False]),
        TokenizedConversations.from_lists(splits[True]),
    )


def prepare_conversations(
    cfg: SFTDataConfig, tokenizer: Qwen3Tokenizer, cache_dir: str | Path, repair: bool = True
) -> SFTData:
    """Both splits of ``cfg``'s conversations, tokenized with ``tokenizer``'s chat template:
    read from the cache when it holds them, else built and cached. Only a process with
    ``repair`` (rank 0) deletes a damaged cache: others may be reading it."""
    key = conversations_fingerprint(cfg, tokenizer)
    path = Path(cache_dir) / f"sft-{key}"

    def load(where: Path) -> tuple[TokenizedConversations, TokenizedConversations]:
        return TokenizedConversations.load(where / "train"), TokenizedConversations.load(
            where / "val"
        )

    found = load_finished(path, load, "conversation cache", "rebuilding", repair=repair)
    if found is None:
        start = time.perf_counter()
        train, val = _encode_splits(cfg, tokenizer)
        with building(path) as tmp:
            for name, split in (("train", train), ("val", val)):
                (tmp / name).mkdir()
                split.save(tmp / name)
            meta = {"sft": cfg.spec(), "train": len(train), "val": len(val)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        log.info(
            "tokenized %d conversations in %.1f s",
            len(train) + len(val),
            time.perf_counter() - start,
        )
        found = (train, val)
    return SFTData(tokenizer, found[0], found[1], key, path)
