"""The generation engine: one worker thread that batches requests and serves them round-robin.

Requests waiting at the same moment with the same sampling settings (`qwen3.Sampling`, whatever
their `max_new_tokens`, and no seed) are decoded as one left-padded batch (`qwen3.generate_steps`);
a seeded request gets a batch of its own so its output does not depend on the load. Each round
the worker advances every live batch by one token, so a new request starts while long ones are
still running and no batch starves another. A choice that asks for log-probabilities gets them
from the logits each step's token is drawn from (`on_logits`), and an echoed prompt is scored by
one forward over it when its batch starts (`serving.logprobs`); batches where no choice asks pay
for neither. Tokens go back to the event loop through each
request's asyncio queue; a cancelled request (its client went away) is dropped at the next step,
and a batch stops once none of its rows is wanted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from qwen3 import Qwen3, Sampling, generate_steps
from qwen3.tokenizer import Qwen3Tokenizer
from serving.logprobs import Alternatives, TokenLogprob, score_prompts, score_step
from serving.text_stream import TextStream

log = logging.getLogger("serving.engine")
# (kind, choice index or -1, text / finish reason / error message, or a "logprobs" event's tokens)
EventValue = str | list[TokenLogprob]
Event = tuple[str, int, EventValue]


def batch_key(sampling: Sampling) -> Sampling | None:
    """Requests with the same key can be decoded together (a batch runs as long as its longest
    choice needs); None: a batch of its own, as a seeded request's output must not depend on
    what else is running."""
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


@dataclass(eq=False)
class _Batch:
    requests: list[GenerationRequest]
    rows: list[tuple[GenerationRequest, Choice]]  # the choices that generate (max_tokens > 0)
    steps: Iterator[list[int | None]] = field(default_factory=lambda: iter(()))
    logits: torch.Tensor | None = None  # (B, V) of the last step, kept when a row wants logprobs

    def keep_logits(self, logits: torch.Tensor) -> None:
        self.logits = logits


def default_threads(device: torch.device) -> int | None:
    """CPU: all cores but one, which stays free for HTTP, tokenizing and the clients (torch's
    default of every core oversubscribes and slows decoding severalfold; see
    benchmarks/results/design-measurements.md).
    Other devices: None, torch's own choice."""
    if device.type != "cpu":
        return None
    return max(1, len(os.sched_getaffinity(0)) - 1)


class GenerationEngine:
    """Owns the model on one worker thread; `submit` queues a request, `cancel` drops it."""

    def __init__(
        self,
        model: Qwen3,
        tokenizer: Qwen3Tokenizer,
        max_batch_size: int = 32,
        eos_ids: Sequence[int] | None = None,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.threads = threads if threads is not None else default_threads(model.device)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        # The end-of-text ids a request stops at unless it asks to ignore them.
        self.eos_ids = (
            tuple(eos_ids) if eos_ids is not None else (tokenizer.eos_id, tokenizer.im_end_id)
        )
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._batches: list[_Batch] = []
        self._wake = threading.Condition()
        self._stopping = False
        self.stats = {"completed": 0, "cancelled": 0, "generated_tokens": 0}
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)

    # ---- called from the event loop ------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker thread after its current step."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; its events start arriving on `request.events`."""
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()

    @property
    def load(self) -> dict[str, int]:
        """Requests waiting, rows being decoded, and totals since start (for /health)."""
        running = sum(not c.done for b in list(self._batches) for _, c in b.rows)
        return {"waiting": len(self._waiting), "running": running, **self.stats}

    # ---- the worker thread ---------------------------------------------------------------
    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # set here: the setting is per thread
        if self.model.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormal softmax tails slow CPU decoding severalfold
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._batches:
                    self._wake.wait()
                if self._stopping:
                    return
                admitted = self._admit()
            for batch in admitted:
                if self._guard(batch, self._begin):
                    self._batches.append(batch)
            for batch in list(self._batches):
                if not self._guard(batch, self._advance):
                    self._batches.remove(batch)

    def _admit(self) -> list[_Batch]:
        """Form batches from waiting requests, FIFO, within the row budget (lock held)."""
        room = self.max_batch_size - sum(len(b.rows) for b in self._batches)
        groups: dict[object, list[GenerationRequest]] = {}  # batch key -> requests
        while self._waiting:
            request = self._waiting[0]
            if request.cancelled.is_set():
                self._waiting.popleft()
                self.stats["cancelled"] += 1
                continue
            size = len(request.choices)
            if size > room and (self._batches or groups):
                break  # wait for rows to free up
            self._waiting.popleft()
            room -= size
            key = batch_key(request.sampling) or id(request)
            groups.setdefault(key, []).append(request)
        return [self._start_batch(requests) for requests in groups.values()]

    def _start_batch(self, requests: list[GenerationRequest]) -> _Batch:
        """A batch of `requests` whose generator has not run yet (the lock is held here)."""
        rows = [(r, c) for r in requests for c in r.choices if c.max_tokens > 0]
        batch = _Batch(requests=requests, rows=rows)
        if rows:
            most = max(c.max_tokens for _, c in rows)
            sampling = replace(requests[0].sampling, max_new_tokens=most)
            hook = batch.keep_logits if any(c.logprobs is not None for _, c in rows) else None
            prompts = [c.prompt_ids for _, c in rows]
            batch.steps = generate_steps(
                self.model, prompts, sampling, on_logits=hook, vocab_size=self.tokenizer.vocab_size
            )
        return batch

    def _guard(self, batch: _Batch, work: Callable[[_Batch], bool]) -> bool:
        """Run `work` on `batch`; a failure ends the batch's requests, not the server."""
        try:
            return work(batch)
        except Exception as err:
            log.exception("generation failed")
            for request in batch.requests:
                if all(c.done for c in request.choices):
                    continue
                request.emit("error", value=f"generation failed: {err}")
                request.cancel()
            return False

    def _begin(self, batch: _Batch) -> bool:
        """Echo the prompts of the choices that ask for it (scored when they also want
        logprobs) and finish the choices that generate nothing; True if the batch goes on."""
        echoed = [
            (r, c) for r in batch.requests for c in r.choices if c.echo and not r.cancelled.is_set()
        ]
        prompts = {id(c.prompt_ids): c.prompt_ids for _, c in echoed if c.logprobs is not None}
        scores: dict[int, list[tuple[float, Alternatives]]] = {}
        if prompts:
            top = max(c.logprobs or 0 for _, c in echoed)
            scored = score_prompts(
                self.model, list(prompts.values()), top, self.tokenizer.vocab_size
            )
            scores = dict(zip(prompts, scored, strict=True))
        for request, choice in echoed:
            self._echo(request, choice, scores.get(id(choice.prompt_ids)))
        for request in batch.requests:
            for choice in request.choices:
                if choice.max_tokens == 0 and not choice.done:
                    self._finish(request, choice, "length")
        return bool(batch.rows)

    def _echo(
        self,
        request: GenerationRequest,
        choice: Choice,
        scores: list[tuple[float, Alternatives]] | None,
    ) -> None:
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=False)
        text = ""
        tokens = []
        for i, token in enumerate(choice.prompt_ids):
            offset = len(text)
            text += decoder.step(token)
            if scores is not None:  # nothing predicts the first token: no logprob for it
                logprob, top = scores[i - 1] if i else (None, ())
                tokens.append(TokenLogprob(token, logprob, top[: choice.logprobs], offset))
        text += decoder.flush()
        choice.echo_chars = len(text)
        if tokens:
            request.emit("logprobs", choice.index, tokens)
        request.emit("delta", choice.index, text)

    def _advance(self, batch: _Batch) -> bool:
        """Decode one token for every row of `batch`; False once the batch is finished."""
        self._drop_cancelled(batch)
        if all(c.done for _, c in batch.rows):
            return False  # dropping the batch frees its generator and KV cache
        tokens = next(batch.steps, None)
        scored = self._score_step(batch, tokens) if batch.logits is not None else {}
        for row, (request, choice) in enumerate(batch.rows):
            if choice.done:
                continue
            token = tokens[row] if tokens is not None else None
            if token is None:  # end of sequence (or the batch ran out of steps)
                self._finish(request, choice, "stop" if tokens is not None else "length")
                continue
            self.stats["generated_tokens"] += 1
            if row in scored:
                logprob, top = scored[row]
                offset = choice.echo_chars + choice.text.chars
                request.emit("logprobs", choice.index, [TokenLogprob(token, logprob, top, offset)])
            delta = choice.text.push(token)
            if delta:
                request.emit("delta", choice.index, delta)
            if choice.text.stopped:
                self._finish(request, choice, "stop")
            elif choice.text.tokens >= choice.max_tokens:
                self._finish(request, choice, "length")
        return tokens is not None

    def _score_step(
        self, batch: _Batch, tokens: list[int | None] | None
    ) -> dict[int, tuple[float, Alternatives]]:
        """Logprobs of this step's tokens for the rows that want them, by row."""
        assert batch.logits is not None
        wanted = {}
        for row, (_, choice) in enumerate(batch.rows):
            token = tokens[row] if tokens is not None else None
            if token is not None and choice.logprobs is not None and not choice.done:
                wanted[row] = (token, choice.logprobs)
        if not wanted:
            return {}
        top = max(k for _, k in wanted.values())
        scores = score_step(batch.logits, list(wanted), [t for t, _ in wanted.values()], top)
        return {
            row: (logprob, alternatives[:k])
            for (row, (_, k)), (logprob, alternatives) in zip(wanted.items(), scores, strict=True)
        }

    def _drop_cancelled(self, batch: _Batch) -> None:
        """Mark the unfinished choices of cancelled requests as done, counting each request once."""
        rows = [(r, c) for r, c in batch.rows if r.cancelled.is_set() and not c.done]
        self.stats["cancelled"] += len({r for r, _ in rows})  # counted before /health sees them go
        for _, choice in rows:
            choice.finish_reason = "cancelled"

    def _finish(self, request: GenerationRequest, choice: Choice, reason: str) -> None:
        tail = choice.text.flush()
        if tail:
            request.emit("delta", choice.index, tail)
        choice.finish_reason = reason
        request.emit("finish", choice.index, reason)
        if all(c.done for c in request.choices):
            self.stats["completed"] += 1
            request.emit("end")
