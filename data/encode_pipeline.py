"""Encoding a document stream with every core: read, encode and write overlap.

Three threads keep the Rust tokenizer's parallel batches busy: one reads documents and groups
them into batches, one encodes (the Rust call releases the GIL and spreads a batch over all
cores), and the caller's thread turns the ids into arrays and writes them. Queues of a few
batches bound the memory, whatever the corpus size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from qwen3.tokenizer import Qwen3Tokenizer

_BATCH_BYTES = 1 << 22  # text per parallel encode call: enough docs to keep every core busy
_BATCH_DOCS = 1024
_QUEUED_BATCHES = 4  # per queue

Batch = list[tuple[int, bool, str]]  # (document index in the stream, is_val, text)


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _read(
    docs: Iterable[tuple[bool, str]], skip: int, out: queue.Queue[Any], stop: threading.Event
) -> None:
    """Batches of documents after the first `skip` (consumed by kept shards), then None."""
    try:
        batch: Batch = []
        size = 0
        for index, (is_val, text) in enumerate(docs):
            if stop.is_set():
                return
            if index < skip:
                continue
            batch.append((index, is_val, text))
            size += len(text)
            if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
                if not _put(out, batch, stop):
                    return
                batch, size = [], 0
        if batch:
            _put(out, batch, stop)
    except BaseException as err:  # handed to the caller's thread, which raises it
        _put(out, err, stop)
    finally:
        _put(out, None, stop)


def _encode(
    tokenizer: Qwen3Tokenizer, src: queue.Queue[Any], out: queue.Queue[Any], stop: threading.Event
) -> None:
    try:
        while not stop.is_set():
            try:
                item = src.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                _put(out, item, stop)
                return
            if not _put(out, (item, tokenizer.encode_batch([t for _, _, t in item])), stop):
                return
    except BaseException as err:
        _put(out, err, stop)
    finally:
        _put(out, None, stop)


def encoded_batches(
    docs: Iterable[tuple[bool, str]], skip: int, tokenizer: Qwen3Tokenizer
) -> Iterator[tuple[Batch, list[list[int]]]]:
    """Encoded batches in stream order; reading and encoding run ahead in their own threads."""
    stop = threading.Event()
    texts: queue.Queue[Any] = queue.Queue(_QUEUED_BATCHES)
    encoded: queue.Queue[Any] = queue.Queue(_QUEUED_BATCHES)
    threads = [
        threading.Thread(target=_read, args=(docs, skip, texts, stop), daemon=True),
        threading.Thread(target=_encode, args=(tokenizer, texts, encoded, stop), daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        while (item := encoded.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # The encoder ends within a queue timeout; the reader may be inside a slow source's
        # next() and ends at its next document (it is a daemon and writes nothing).
        threads[1].join()
