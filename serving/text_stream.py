"""Turn a growing list of generated token ids into text deltas, honouring stop sequences.

A byte-level BPE token can end in the middle of a UTF-8 character, and the text just emitted
could be the start of a stop sequence; both are held back until the next token settles them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"  # what decode() makes of an incomplete UTF-8 tail


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextStream:
    """Accumulates token ids of one choice and yields the text that is safe to send.

    `push(token)` returns the new text (possibly ""), and sets `stopped` once a stop
    sequence appears (the stop sequence itself is never sent, as in OpenAI's API).
    `flush()` returns the held-back tail when generation ends for another reason.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stops = list(stops)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self.token_ids: list[int] = []
        self.sent = ""  # text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text delta that can be sent now."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        # Re-decoding the whole choice keeps byte-level merges exact; choices are short.
        text = self._decode(self.token_ids)
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        if self._stops:
            search_from = max(0, len(self.sent) - self._max_stop)
            hits = [i for s in self._stops if (i := text.find(s, search_from)) >= 0]
            if hits:
                self.stopped = True
                return self._advance(text[: min(hits)])
            text = text[: len(text) - _partial_stop_len(text, self._stops)]
        return self._advance(text)

    def flush(self) -> str:
        """Return whatever was held back (a partial stop match, or an incomplete character)."""
        if self.stopped:
            return ""
        return self._advance(self._decode(self.token_ids))

    def _advance(self, text: str) -> str:
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        if delta:
            self.sent += delta
        return delta
