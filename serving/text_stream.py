"""Turn one choice's generated token ids into text deltas, honouring stop sequences.

Token ids become text through the tokenizer's incremental decoder (`qwen3.tokenizer.StreamDecoder`,
linear in the choice's length). Text that could be the start of a stop sequence is held back until
the next tokens settle it; a stop sequence can therefore only begin in the held-back text, and the
search never looks at what was already sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwen3.tokenizer import Qwen3Tokenizer


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
    """Accumulates the token ids of one choice and yields the text that is safe to send.

    `push(token)` returns the new text (possibly ""), and sets `stopped` once a stop
    sequence appears (the stop sequence itself is never sent, as in OpenAI's API).
    `flush()` returns the held-back tail when generation ends for another reason.
    """

    def __init__(self, tokenizer: Qwen3Tokenizer, stops: Sequence[str] = ()) -> None:
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self._stops = list(stops)
        self._held = ""  # decoded text not sent yet: it may begin a stop sequence
        self.tokens = 0  # ids pushed so far
        self.chars = 0  # characters decoded so far, held-back text included (logprob offsets)
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text delta that can be sent now."""
        if self.stopped:
            return ""
        self.tokens += 1
        text = self._decoder.step(token_id)
        self.chars += len(text)
        return self._release(text, final=False)

    def flush(self) -> str:
        """Return whatever was held back (a partial stop match, or an incomplete character)."""
        if self.stopped:
            return ""
        return self._release(self._decoder.flush(), final=True)

    def _release(self, new_text: str, final: bool) -> str:
        text = self._held + new_text
        if not self._stops:
            self._held = ""
            return text
        hits = [i for s in self._stops if (i := text.find(s)) >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        keep = 0 if final else _partial_stop_len(text, self._stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]
