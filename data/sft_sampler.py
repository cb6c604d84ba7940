"""Rows of whole conversations for SFT, a pure function of (seed, step, rank, world_size).

Each epoch's conversations are shuffled by (seed, epoch) and packed best-fit into rows of
seq_len + 1 tokens (nanochat's loader: each row takes, from a window of the next conversations,
the longest that still fits, until none does; the rest is padding). Step s takes rows
[s * G, (s + 1) * G) of the epochs' rows in order (G = world_size * batch_size) and rank r its
slice, so resuming needs only the step and 2 ranks x 8 rows are the 16 rows of 1 rank x 16.
A conversation longer than a row is cut to it (counted in `truncated`).

Targets are -100 (ignored) except where the next token is an assistant token of the same
conversation; `document_ids` number the conversations of a row (padding has its own id), so
attention never crosses from one conversation into another.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data.errors import DataError
from data.sampler import Batch
from data.sft_data import TokenizedConversations

IGNORE = -100
PACK_WINDOW = 64  # conversations a row chooses from (nanochat's best-fit buffer)
_STATE_VERSION = 1


def pack_rows(lengths: np.ndarray, order: np.ndarray, room: int) -> list[list[int]]:
    """Conversation indices per row, best-fit from a window of the next PACK_WINDOW of
    ``order``; a conversation longer than ``room`` gets a row of its own (cut to it)."""
    sizes = np.minimum(lengths, room)
    rows: list[list[int]] = []
    window: list[int] = []
    nxt = 0
    while nxt < len(order) or window:
        while nxt < len(order) and len(window) < PACK_WINDOW:
            window.append(int(order[nxt]))
            nxt += 1
        row: list[int] = []
        left = room
        while window:  # an empty row takes any conversation, so every row takes one
            here = sizes[window]
            fits = np.flatnonzero(here <= left)
            if not len(fits):
                break
            best = int(fits[np.argmax(here[fits])])
            left -= int(here[best])
            row.append(window.pop(best))
            if nxt < len(order):
                window.append(int(order[nxt]))
                nxt += 1
        rows.append(row)
    return rows


def build_rows(
    convs: TokenizedConversations, rows: list[list[int]], room: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, trained, document) arrays (len(rows), room): conversations side by side, cut to
    the row, then padding (not trained, a document of its own)."""
    ids = np.full((len(rows), room), pad_id, dtype=np.int64)
    trained = np.zeros((len(rows), room), dtype=np.bool_)
    doc = np.zeros((len(rows), room), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for d, c in enumerate(row):
            start, end = int(convs.offsets[c]), int(convs.offsets[c + 1])
            n = min(end - start, room - at)
            ids[r, at : at + n] = convs.ids[start : start + n]
            trained[r, at : at + n] = convs.mask[start : start + n]
            doc[r, at : at + n] = d
            at += n
        doc[r, at:] = len(row)
    return ids, trained, doc


def to_batch(ids: np.ndarray, trained: np.ndarray, doc: np.ndarray) -> Batch:
    """Inputs, targets (-100 unless the next token is an assistant token of the same
    conversation) and document ids, from (B, T + 1) rows."""
    keep = trained[:, 1:] & (doc[:, 1:] == doc[:, :-1])
    y = np.where(keep, ids[:, 1:], IGNORE)
    return Batch(
        torch.from_numpy(ids[:, :-1].copy()),
        torch.from_numpy(y),
        torch.from_numpy(doc[:, :-1].copy()),
    )


class SFTSampler:
    """Packed conversation rows for one rank; `batch(step)` depends on nothing but its arguments."""

    def __init__(
        self,
        convs: TokenizedConversations,
        batch_size: int,
        seq_len: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(convs) == 0:
            raise DataError("the SFT train split has no conversations: check the sft section")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        self.convs, self.batch_size, self.seq_len = convs, batch_size, seq_len
        self.seed, self.pad_id, self.rank, self.world_size = int(seed), pad_id, rank, world_size
        self.truncated = int((convs.lengths > seq_len + 1).sum())
        self._epochs: list[list[list[int]]] = []

    def _epoch(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            rng = np.random.Generator(np.random.PCG64([self.seed % (1 << 64), e]))
            order = rng.permutation(len(self.convs))
            self._epochs.append(pack_rows(self.convs.lengths, order, self.seq_len + 1))
        return self._epochs[epoch]

    def rows(self, step: int) -> list[list[int]]:
        """This rank's rows at ``step``: each a list of conversation indices."""
        first = step * self.world_size * self.batch_size + self.rank * self.batch_size
        out: list[list[int]] = []
        for g in range(first, first + self.batch_size):
            epoch = 0
            while g >= len(self._epoch(epoch)):
                g -= len(self._epoch(epoch))
                epoch += 1
            out.append(self._epoch(epoch)[g])
        return out

    def sample(self, step: int) -> Batch:
        """This rank's rows at ``step``: x, y and document_ids, int64 (batch_size, seq_len) each."""
        return to_batch(*build_rows(self.convs, self.rows(step), self.seq_len + 1, self.pad_id))

    def epochs_at(self, step: int) -> float:
        """How many passes over the train conversations ``step`` steps make (for the log)."""
        rows = len(self._epoch(0))
        return step * self.world_size * self.batch_size / max(rows, 1)

    def state_dict(self) -> dict[str, Any]:
        """What decides the batches (plain numbers, safe for `torch.load(weights_only=True)`)."""
        return {
            "version": _STATE_VERSION,
            "kind": "sft",
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "conversations": len(self.convs),
            "num_tokens": int(self.convs.offsets[-1]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the seed; refuse a state from other conversations (the batches would differ)."""
        mine = self.state_dict()
        for key in ("kind", "conversations", "num_tokens"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"sampler state is for {key}={state.get(key)}, this run has {mine[key]}: "
                    f"resume with the same sft settings and tokenizer, or start a new run"
                )
        self.seed = int(state["seed"])
        self._epochs = []


def sft_val_batches(
    convs: TokenizedConversations, batch_size: int, seq_len: int, num_batches: int, pad_id: int
) -> list[Batch]:
    """Up to ``num_batches`` fixed validation batches: the held-out conversations in order,
    packed as training packs them (the same every call)."""
    if len(convs) == 0:
        raise DataError("the SFT validation split has no conversations: hold some out")
    rows = pack_rows(convs.lengths, np.arange(len(convs)), seq_len + 1)
    rows = rows[: batch_size * num_batches]
    ids, trained, doc = build_rows(convs, rows, seq_len + 1, pad_id)
    return [
        to_batch(ids[i : i + batch_size], trained[i : i + batch_size], doc[i : i + batch_size])
        for i in range(0, len(rows), batch_size)
    ]
