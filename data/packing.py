"""Rows of whole documents (``data.packing=bos``): every row starts at a document start, and
documents are packed best-fit from a window of upcoming ones, cropping what does not fit
(nanochat's BOS-aligned best-fit loader, as a pure function of the step).

The token cache ends every document with ``<|endoftext|>`` (data/cache_build.py). A packed
document is that separator followed by the document's tokens: the separator is the document's
beginning-of-sequence token, the document's last token learns to predict the next separator
(its own end), and no target ever asks a document to predict another one's text. The first
document of a split has no separator before it; it gets one all the same.

For one step, the rows of the whole global batch are filled in order from one stream of
documents that starts at a document drawn from (seed, step): keep ``window`` documents at hand;
each row opens with the one at hand longest (the stream's next; cut at the row's end if longer),
then takes the longest one that still fits whole, again and again; when none fits, the one at
hand longest is cropped to fill the row (its rest is dropped). So documents of one step never
repeat, a row wastes no compute, and the documents are used in about the stream's order,
whatever their length; best fit only chooses what fills the gaps.

Why the oldest and not, as nanochat, the shortest: each step starts a fresh window, and
cropping the shortest lets the documents that fit best win every step while those longer than a
row are never taken; opening each row with the longest that fits has the same bias, hence
the stream's next document first. Measured on the TinyStories sample (benchmarks/results/packing.md): with
the shortest cropped, 80 steps of 8 rows saw the same few stories again and again (train loss
0.69 against stream's 3.96, val bpb 2.10 against 1.41).

With ``data.document_mask=true`` a batch also carries each input token's document index in its
row, which keeps attention inside documents (qwen3.documents).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal

import numpy as np

from data.errors import DataError
from data.token_cache import TokenArray

PackingMode = Literal["stream", "bos"]


@dataclass(frozen=True)
class Packing:
    """How the sampler cuts rows (from ``DataConfig``, plus the tokenizer's separator id).

    mode: ``stream`` (windows at any offset of the token stream) or ``bos`` (whole documents).
    window: documents at hand for the best fit (``bos``).
    document_mask: batches carry document ids for the model's document mask (``bos`` only).
    separator: the id that ends every document in the cache (``<|endoftext|>``).
    """

    mode: PackingMode = "stream"
    window: int = 128
    document_mask: bool = False
    separator: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("stream", "bos"):
            raise DataError(f"data.packing={self.mode!r} is unknown: choose stream or bos")
        if self.window < 1:
            raise DataError(f"data.packing_window={self.window} must be at least 1, e.g. 128")
        if self.document_mask and self.mode != "bos":
            raise DataError(
                "data.document_mask=true needs rows that start at document starts: "
                "set data.packing=bos"
            )

    @property
    def whole_documents(self) -> bool:
        return self.mode == "bos"


def document_bounds(tokens: TokenArray, separator: int) -> np.ndarray:
    """Boundaries of the packed documents, (D + 1,) int64: document i is the tokens at
    [bounds[i], bounds[i + 1]), where index -1 stands for a separator before the first one.

    Each bound is a separator's position, so a document starts with the separator that ended the
    one before. Tokens after the last separator (a split cut by ``max_tokens``) are one more
    document; a final separator starts nothing."""
    n = len(tokens)
    ends = [np.array([-1], dtype=np.int64)]
    step = 1 << 24  # scan the memmap in pieces: a split can be far larger than memory
    for lo in range(0, n, step):
        piece = np.asarray(tokens[lo : min(n, lo + step)])
        ends.append(np.flatnonzero(piece == separator).astype(np.int64) + lo)
    bounds = np.concatenate(ends)
    if bounds[-1] != n - 1:  # the last document has no separator after it
        bounds = np.append(bounds, n)
    return bounds


@dataclass
class _Piece:
    """Part of a document placed in a row: ``length`` tokens from ``start``."""

    row: int
    offset: int  # where in the row
    start: int  # where in the split (-1: the separator before the first document)
    length: int


def _fill_rows(
    bounds: np.ndarray, first: int, rows: int, row_len: int, window: int
) -> list[_Piece]:
    """Best-fit placement of documents first, first + 1, ... (wrapping) into ``rows`` rows."""
    num_docs = len(bounds) - 1
    at_hand: list[tuple[int, int, int]] = []  # (length, arrival, document), sorted
    arrived = 0
    pieces: list[_Piece] = []

    def refill() -> None:
        nonlocal arrived
        while len(at_hand) < window:
            doc = (first + arrived) % num_docs
            length = int(bounds[doc + 1] - bounds[doc])
            bisect.insort(at_hand, (length, arrived, doc))
            arrived += 1

    for row in range(rows):
        offset = 0
        while offset < row_len:
            refill()
            space = row_len - offset
            # the longest document that fits whole, the earliest arrival among equals
            i = bisect.bisect_right(at_hand, (space, arrived, num_docs)) - 1
            if offset == 0:  # a row opens with the next document of the stream, whole or cut
                oldest = min(range(len(at_hand)), key=lambda j: at_hand[j][1])
                length, _, doc = at_hand.pop(oldest)
                length = min(length, space)
            elif i >= 0:
                i = bisect.bisect_left(at_hand, (at_hand[i][0], -1, -1))
                length, _, doc = at_hand.pop(i)
            else:  # none fits: crop the one at hand longest to the space left
                oldest = min(range(len(at_hand)), key=lambda j: at_hand[j][1])
                _, _, doc = at_hand.pop(oldest)
                length = space
            pieces.append(_Piece(row, offset, int(bounds[doc]), length))
            offset += length
    return pieces


def pack(
    tokens: TokenArray,
    bounds: np.ndarray,
    separator: int,
    first: int,
    rows: int,
    row_len: int,
    window: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` rows of ``row_len`` tokens packed from documents ``first`` on, and each token's
    document index in its row, both (rows, row_len) int64."""
    if len(bounds) < 2:
        raise DataError("the split holds no document: use a larger corpus")
    pieces = _fill_rows(bounds, first, rows, row_len, window)
    index = np.empty((rows, row_len), dtype=np.int64)
    doc_ids = np.empty((rows, row_len), dtype=np.int64)
    count = [0] * rows
    for p in pieces:
        index[p.row, p.offset : p.offset + p.length] = np.arange(p.start, p.start + p.length)
        doc_ids[p.row, p.offset : p.offset + p.length] = count[p.row]
        count[p.row] += 1
    out = np.asarray(tokens[np.maximum(index, 0)], dtype=np.int64)
    out[index < 0] = separator  # the separator before the split's first document
    return out, doc_ids


def draw_first_document(rng: np.random.Generator, bounds: np.ndarray) -> int:
    """Where a step's stream of documents starts."""
    return int(rng.integers(0, len(bounds) - 1))
