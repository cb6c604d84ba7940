"""Shape engine output as OpenAI bodies: whole responses and streamed chunks, per endpoint."""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel

from serving.logprobs import TokenLogprob, TokenNames
from serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    FinishReason,
    TopLogprob,
    Usage,
)

# (choice index, new text, finish reason, the logprobs of the tokens that text comes from)
Part = tuple[int, str | None, FinishReason | None, list[TokenLogprob]]


class CompletionFormat:
    """Bodies of /v1/completions (object "text_completion", streamed or not).

    `names` (given when the request asked for logprobs) turns token ids into the text and bytes
    the logprobs show.
    """

    prefix = "cmpl"

    def __init__(self, model: str, names: TokenNames | None = None) -> None:
        self.model = model
        self.names = names
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def logprobs(self, tokens: list[TokenLogprob], whole: bool) -> CompletionLogprobs | None:
        """OpenAI's completion logprobs: the likeliest tokens and, as OpenAI does, the chosen
        one (so up to logprobs + 1 of them). None when not asked for, or (`whole` False: a
        streamed chunk) when there are no tokens."""
        if self.names is None or not (tokens or whole):
            return None
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for t in tokens:
            name = self.names(t.token)[0]
            top = None
            if t.logprob is not None:
                top = {self.names(i)[0]: lp for i, lp in t.top}
                top.setdefault(name, t.logprob)
            out.tokens.append(name)
            out.token_logprobs.append(t.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(t.offset)
        return out

    def chunk(self, parts: list[Part], usage: Usage | None = None) -> BaseModel:
        """One streamed event: text deltas and/or finish reasons, or only `usage` at the end."""
        choices = [
            CompletionChoice(
                index=i, text=t or "", finish_reason=f, logprobs=self.logprobs(lp, False)
            )
            for i, t, f, lp in parts
        ]
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def full(
        self,
        texts: list[str],
        reasons: list[FinishReason],
        tokens: list[list[TokenLogprob]],
        usage: Usage,
    ) -> BaseModel:
        """The whole answer."""
        choices = [
            CompletionChoice(index=i, text=t, finish_reason=r, logprobs=self.logprobs(lp, True))
            for i, (t, r, lp) in enumerate(zip(texts, reasons, tokens, strict=True))
        ]
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )


class ChatFormat(CompletionFormat):
    """Bodies of /v1/chat/completions ("chat.completion" and "chat.completion.chunk")."""

    prefix = "chatcmpl"

    def __init__(self, model: str, names: TokenNames | None = None) -> None:
        super().__init__(model, names)
        self._started: set[int] = set()  # choices whose first chunk (naming the role) went out

    def chat_logprobs(self, tokens: list[TokenLogprob], whole: bool) -> ChatLogprobs | None:
        """OpenAI's chat logprobs: each token with its bytes and exactly the top_logprobs
        likeliest tokens."""
        names = self.names
        if names is None or not (tokens or whole):
            return None

        def top(token: int, logprob: float) -> TopLogprob:
            text, raw = names(token)
            return TopLogprob(token=text, logprob=logprob, bytes=raw)

        content = [
            ChatTokenLogprob(
                **top(t.token, t.logprob).model_dump(),
                top_logprobs=[top(i, lp) for i, lp in t.top],
            )
            for t in tokens
            if t.logprob is not None  # always: a chat answer has no echoed prompt
        ]
        return ChatLogprobs(content=content)

    def chunk(self, parts: list[Part], usage: Usage | None = None) -> BaseModel:
        choices = []
        for i, text, finish, tokens in parts:
            first = i not in self._started
            self._started.add(i)
            delta = ChatDelta(role="assistant" if first else None, content=text)
            logprobs = self.chat_logprobs(tokens, False)
            choices.append(
                ChatChunkChoice(index=i, delta=delta, finish_reason=finish, logprobs=logprobs)
            )
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def full(
        self,
        texts: list[str],
        reasons: list[FinishReason],
        tokens: list[list[TokenLogprob]],
        usage: Usage,
    ) -> BaseModel:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=t),
                finish_reason=r,
                logprobs=self.chat_logprobs(lp, True),
            )
            for i, (t, r, lp) in enumerate(zip(texts, reasons, tokens, strict=True))
        ]
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
