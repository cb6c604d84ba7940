"""Shape engine output as OpenAI bodies: whole responses and streamed chunks, per endpoint."""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel

from serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    FinishReason,
    Usage,
)

Part = tuple[int, str | None, FinishReason | None]  # (choice index, new text, finish reason)


class CompletionFormat:
    """Bodies of /v1/completions (object "text_completion", streamed or not)."""

    prefix = "cmpl"

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def chunk(self, parts: list[Part], usage: Usage | None = None) -> BaseModel:
        """One streamed event: text deltas and/or finish reasons, or only `usage` at the end."""
        choices = [CompletionChoice(index=i, text=t or "", finish_reason=f) for i, t, f in parts]
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def full(self, texts: list[str], reasons: list[FinishReason], usage: Usage) -> BaseModel:
        """The whole answer."""
        return self.chunk(
            [(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons, strict=True))], usage
        )


class ChatFormat(CompletionFormat):
    """Bodies of /v1/chat/completions ("chat.completion" and "chat.completion.chunk")."""

    prefix = "chatcmpl"

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self._started: set[int] = set()  # choices whose first chunk (naming the role) went out

    def chunk(self, parts: list[Part], usage: Usage | None = None) -> BaseModel:
        choices = []
        for i, text, finish in parts:
            first = i not in self._started
            self._started.add(i)
            delta = ChatDelta(role="assistant" if first else None, content=text)
            choices.append(ChatChunkChoice(index=i, delta=delta, finish_reason=finish))
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def full(self, texts: list[str], reasons: list[FinishReason], usage: Usage) -> BaseModel:
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=r)
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
