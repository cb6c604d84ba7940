"""What the engine serves: a request's choices, the events it sends back, and which requests'
rows may draw their tokens together."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field, replace

from qwen3 import Sampling
from serving.logprobs import TokenLogprob
from serving.text_stream import TextStream

# (kind, choice index or -1, text / finish reason / error message, or a "logprobs" event's tokens)
EventValue = str | list[TokenLogprob]
Event = tuple[str, int, EventValue]


def batch_key(sampling: Sampling) -> Sampling | None:
    """Rows of requests with the same key draw their tokens together in one call, whatever their
    `max_new_tokens`; None: the request's rows draw from a generator of its own (its seed's), so
    its output does not depend on what else is running."""
    if sampling.seed is not None:
        return None
    return replace(sampling, max_new_tokens=0)


@dataclass
class Choice:
    """One generated sequence of a request (`n` choices per prompt)."""

    index: int
    prompt_ids: list[int]
    max_tokens: int
    text: TextStream
    logprobs: int | None = None  # None: none wanted; k: each token's logprob and k alternatives
    echo: bool = False  # the prompt comes first in the text (and in the logprobs)
    finish_reason: str | None = None
    echo_chars: int = 0  # length of the echoed prompt's text, where the new text starts

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class GenerationRequest:
    """A request's choices, the queue its events go to, and its cancellation flag.

    Events put on `events`: ("delta", index, text), ("logprobs", index, tokens) just before the
    delta their text belongs to, ("finish", index, reason), ("end", -1, "") after the last
    choice finished, or ("error", -1, message).
    """

    choices: list[Choice]
    sampling: Sampling  # max_new_tokens: the request's; each choice holds its own cap
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, index: int = -1, value: EventValue = "") -> None:
        """Hand an event to the event loop (callable from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, index, value))
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        """Stop generating for this request (safe from any thread)."""
        self.cancelled.set()
