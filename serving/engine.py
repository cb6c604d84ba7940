"""The generation engine: one worker thread that decodes every request in one running batch.

Continuous batching (`serving.batching`): a request that arrives while others are decoding is
prefilled and joins the running batch at the next decode step; a row that finishes, or whose
client went away, leaves it without stopping the others. Each step draws one token for every
row and feeds them back in one forward. A seeded request draws from its own generator, so its
output does not depend on the load. A choice that asks for log-probabilities gets them from the
logits each step's token is drawn from, and an echoed prompt is scored by one forward over it
when the request joins (`serving.logprobs`); requests that do not ask pay for neither. Tokens go
back to the event loop through each request's asyncio queue.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Sequence

import torch

from qwen3 import Qwen3
from qwen3.tokenizer import Qwen3Tokenizer
from serving.batching import DecodeBatch, Row
from serving.logprobs import Alternatives, TokenLogprob, score_prompts, score_step
from serving.requests import Choice, GenerationRequest, batch_key

__all__ = [
    "Choice",
    "GenerationEngine",
    "GenerationRequest",
    "QueueFull",
    "batch_key",
    "default_threads",
]

log = logging.getLogger("serving.engine")


def default_threads(device: torch.device) -> int | None:
    """CPU: all cores but one, which stays free for HTTP, tokenizing and the clients (torch's
    default of every core oversubscribes and slows decoding severalfold; see
    benchmarks/results/design-measurements.md).
    Other devices: None, torch's own choice."""
    if device.type != "cpu":
        return None
    return max(1, len(os.sched_getaffinity(0)) - 1)


class QueueFull(Exception):
    """`max_waiting` requests are already waiting for rows; the new one is refused."""


class GenerationEngine:
    """Owns the model on one worker thread; `submit` queues a request, `cancel` drops it.

    ``max_waiting``: how many requests may wait for rows at once (None: no limit); `submit`
    refuses more with QueueFull, so a flood of clients cannot grow the queue without bound.

    ``stats``: requests completed and cancelled, tokens generated, and decode steps run (one
    forward over the whole running batch each), since start.
    """

    def __init__(
        self,
        model: Qwen3,
        tokenizer: Qwen3Tokenizer,
        max_batch_size: int = 32,
        eos_ids: Sequence[int] | None = None,
        threads: int | None = None,
        max_waiting: int | None = None,
    ) -> None:
        self.model = model
        self.max_waiting = max_waiting
        self.threads = threads if threads is not None else default_threads(model.device)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        # The end-of-text ids a request stops at unless it asks to ignore them.
        self.eos_ids = (
            tuple(eos_ids) if eos_ids is not None else (tokenizer.eos_id, tokenizer.im_end_id)
        )
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._batch = DecodeBatch(model, tokenizer.vocab_size)
        self._wake = threading.Condition()
        self._stopping = False
        self.stats = {"completed": 0, "cancelled": 0, "generated_tokens": 0, "decode_steps": 0}
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
        """Queue a request; its events start arriving on `request.events`. QueueFull when
        `max_waiting` requests are waiting already."""
        with self._wake:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(request)
            self._wake.notify()

    @property
    def load(self) -> dict[str, int]:
        """Requests waiting, rows being decoded, and totals since start (for /health)."""
        running = sum(not row.choice.done for row in list(self._batch.rows))
        return {"waiting": len(self._waiting), "running": running, **self.stats}

    # ---- the worker thread ---------------------------------------------------------------
    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # set here: the setting is per thread
        if self.model.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormal softmax tails slow CPU decoding severalfold
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._batch.rows:
                    self._wake.wait()
                if self._stopping:
                    return
                admitted = self._admit()
            if admitted:
                self._join(admitted)
            if self._batch.rows:
                self._step()

    def _admit(self) -> list[GenerationRequest]:
        """Take waiting requests, FIFO, while their rows fit beside the running ones (lock held)."""
        room = self.max_batch_size - len(self._batch.rows)
        admitted: list[GenerationRequest] = []
        while self._waiting:
            request = self._waiting[0]
            if request.cancelled.is_set():
                self._waiting.popleft()
                self.stats["cancelled"] += 1
                continue
            size = len(request.choices)
            if size > room and (self._batch.rows or admitted):
                break  # wait for rows to free up
            self._waiting.popleft()
            room -= size
            admitted.append(request)
        return admitted

    def _fail(self, requests: Sequence[GenerationRequest], err: Exception) -> None:
        """A failure ends the requests it touched, not the server."""
        log.exception("generation failed")
        for request in requests:
            if not all(c.done for c in request.choices):
                request.emit("error", value=f"generation failed: {err}")
                request.cancel()

    def _join(self, requests: list[GenerationRequest]) -> None:
        """Echo the prompts of the choices that ask for it (scored when they also want
        logprobs), finish the choices that generate nothing, and add the others to the batch."""
        try:
            self._echo_all(requests)
            for request in requests:
                for choice in request.choices:
                    if choice.max_tokens == 0 and not choice.done:
                        self._finish(request, choice, "length")
            rows = []
            for request in requests:
                unfinished = [c for c in request.choices if not c.done]
                if unfinished and request.cancelled.is_set():  # its client left while it waited
                    self.stats["cancelled"] += 1
                    for choice in unfinished:
                        choice.finish_reason = "cancelled"
                rows += [Row(request, c) for c in unfinished if not c.done]
            self._batch.join(rows)
        except Exception as err:
            self._fail(requests, err)

    def _echo_all(self, requests: list[GenerationRequest]) -> None:
        echoed = [
            (r, c) for r in requests for c in r.choices if c.echo and not r.cancelled.is_set()
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

    def _step(self) -> None:
        """Draw one token for every row, hand them out, and feed back those of the rows that go on."""
        batch = self._batch
        try:
            tokens, logits = batch.sample()
            values: list[int] = tokens.tolist()  # the step's one read-back from the device
            self.stats["decode_steps"] += 1  # before the events: a reader sees the step counted
            leaving = self._deliver(values, logits)
            batch.advance(tokens, leaving)
        except Exception as err:
            self._fail(list({row.request: None for row in batch.rows}), err)
            self._batch = DecodeBatch(self.model, self.tokenizer.vocab_size)

    def _deliver(self, tokens: list[int], logits: torch.Tensor) -> set[int]:
        """Send each row's token to its request; the indices of the rows that are done."""
        rows = self._batch.rows
        cancelled = {row.request for row in rows if row.request.cancelled.is_set()}
        self.stats["cancelled"] += len(cancelled)  # counted before /health sees them go
        scored = self._score_step(tokens, logits, cancelled)
        leaving = set()
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            request, choice = row.request, row.choice
            if request in cancelled:
                choice.finish_reason = "cancelled"
            elif token in request.sampling.stop_ids:
                self._finish(request, choice, "stop")
            else:
                self.stats["generated_tokens"] += 1
                if i in scored:
                    logprob, top = scored[i]
                    offset = choice.echo_chars + choice.text.chars
                    logprobs = [TokenLogprob(token, logprob, top, offset)]
                    request.emit("logprobs", choice.index, logprobs)
                delta = choice.text.push(token)
                if delta:
                    request.emit("delta", choice.index, delta)
                if choice.text.stopped:
                    self._finish(request, choice, "stop")
                elif choice.text.tokens >= choice.max_tokens:
                    self._finish(request, choice, "length")
            if choice.done:
                leaving.add(i)
        return leaving

    def _score_step(
        self, tokens: list[int], logits: torch.Tensor, cancelled: set[GenerationRequest]
    ) -> dict[int, tuple[float, Alternatives]]:
        """Logprobs of this step's tokens for the rows that want them, by row."""
        wanted = {}
        for i, (row, token) in enumerate(zip(self._batch.rows, tokens, strict=True)):
            k = row.choice.logprobs
            stop = token in row.request.sampling.stop_ids
            if k is not None and row.request not in cancelled and not stop:
                wanted[i] = (token, k)
        if not wanted:
            return {}
        top = max(k for _, k in wanted.values())
        scores = score_step(logits, list(wanted), [t for t, _ in wanted.values()], top)
        return {
            i: (logprob, alternatives[:k])
            for (i, (_, k)), (logprob, alternatives) in zip(wanted.items(), scores, strict=True)
        }

    def _finish(self, request: GenerationRequest, choice: Choice, reason: str) -> None:
        tail = choice.text.flush()
        if tail:
            request.emit("delta", choice.index, tail)
        choice.finish_reason = reason
        request.emit("finish", choice.index, reason)
        if all(c.done for c in request.choices):
            self.stats["completed"] += 1
            request.emit("end")
