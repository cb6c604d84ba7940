"""OpenAI-compatible request and response bodies for /v1/completions and /v1/chat/completions.

Field names, defaults and ranges follow the OpenAI API reference. Fields this server does not
implement are accepted only at their neutral value, and unknown fields are refused, so a request
never silently gets less than it asked for; each refusal is a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qwen3.generate import MAX_SEED, MIN_SEED, Sampling

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_CHOICES = 8  # `n` above this is refused: each choice is a full generation
MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions' `logprobs`
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for /v1/chat/completions' `top_logprobs`


class RequestPart(BaseModel):
    """A request object whose unknown fields are refused, unless null (as good as absent)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_null_extras(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.model_fields}
        return data


class StreamOptions(RequestPart):
    """`stream_options`: `include_usage` adds a last chunk carrying the token counts."""

    include_usage: bool = False


class SamplingFields(RequestPart):
    """The sampling fields shared by both endpoints, with OpenAI's ranges."""

    model: str | None = Field(
        default=None, description="Served model id; omitted means the one served."
    )
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(
        default=None, ge=1, description="Extension (as in vLLM): keep the k likeliest."
    )
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    ignore_eos: bool = Field(
        default=False, description="Extension (as in vLLM): keep going past end-of-text tokens."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # who is asking, for the provider's records: nothing to do here
    # Accepted at their neutral values only (see module docstring).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _null_means_default(cls, value: Any) -> Any:
        return 1.0 if value is None else value

    @field_validator("n", mode="before")
    @classmethod
    def _null_n(cls, value: Any) -> Any:
        return 1 if value is None else value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _check_unsupported(self) -> SamplingFields:
        unsupported = {
            "presence_penalty": self.presence_penalty not in (0, None),
            "frequency_penalty": self.frequency_penalty not in (0, None),
            "logit_bias": bool(self.logit_bias),
        }
        for name, used in unsupported.items():
            if used:
                raise ValueError(f"{name} is not supported by this server; leave it unset")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> list[str]:
        """`stop` normalised to a list (the validator already made it one)."""
        return list(self.stop or [])

    def sampling(self, max_new_tokens: int, eos_ids: Sequence[int]) -> Sampling:
        """The request's settings as the generator takes them: top_p 1 is no limit, and the
        end-of-text ids stop a choice unless `ignore_eos`. (`stop` strings are matched in the
        text, not here.)"""
        return Sampling(
            max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p if self.top_p < 1.0 else None,
            stop_ids=() if self.ignore_eos else tuple(eos_ids),
            seed=self.seed,
        )


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt` is text, token ids, or a list of either (one choice set each)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's default for completions; 0 (with echo) scores the prompt without generating.
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = Field(default=False, description="Put the prompt before the completion.")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Each token's log-probability and this many likeliest alternatives "
        "(of the model's distribution before temperature, top_k and top_p).",
    )
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check_completion_only(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError(
                "max_tokens=0 generates nothing; it is only allowed with echo=true "
                "(to score the prompt with logprobs)"
            )
        if self.suffix:
            raise ValueError("suffix is not supported by this server; leave it unset")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported by this server; use n instead")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self


class ContentPart(RequestPart):
    """One part of a multi-part message; only text parts can be rendered."""

    type: Literal["text"]
    text: str


class ChatMessage(RequestPart):
    """A chat message; `content` is text or a list of text parts. An assistant message may carry
    its `reasoning_content` (the Qwen3 template shows it after the last user message)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    name: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value:  # the chat template has no place for it
            raise ValueError("names are not supported by this model's chat format; leave it unset")
        return value

    @model_validator(mode="after")
    def _check_reasoning(self) -> ChatMessage:
        if self.reasoning_content is not None and self.role != "assistant":
            raise ValueError("reasoning_content belongs to assistant messages only")
        return self

    def text(self) -> str:
        """The message content as one string."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    """`response_format`: only the default, plain text, can be honoured."""

    model_config = ConfigDict(extra="allow")  # json_schema's schema: refused with its type

    type: str


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions; messages are rendered with the model's chat format."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="Extension (as in vLLM): options of the chat template, e.g. "
        '{"enable_thinking": false} to have a Qwen3 model answer without thinking first.',
    )
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logprobs: bool = Field(
        default=False,
        description="Each generated token's log-probability (of the model's distribution "
        "before temperature, top_k and top_p).",
    )
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: this many likeliest alternatives at each token.",
    )

    @field_validator("logprobs", mode="before")
    @classmethod
    def _null_logprobs(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _check_template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        thinking = (value or {}).get("enable_thinking", False)
        if not isinstance(thinking, bool):  # the template tests `is false`: "false" would think
            raise ValueError(f"enable_thinking must be true or false, got {thinking!r}")
        return value

    @model_validator(mode="after")
    def _check_chat_only(self) -> ChatCompletionRequest:
        if self.tools or self.functions:
            raise ValueError("tools/functions are not supported by this server; leave them unset")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true; set both or leave it unset")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(
                f"response_format type '{self.response_format.type}' is not supported by this "
                'server (it cannot constrain the output); leave it unset or {"type": "text"}'
            )
        if self.max_completion_tokens is not None:  # the newer name wins, as in OpenAI's API
            self.max_tokens = self.max_completion_tokens
        return self

    def chat_messages(self) -> list[dict[str, str | None]]:
        """Messages as plain dicts for the tokenizer's chat template (developer -> system)."""
        role = {"developer": "system"}
        return [
            {
                "role": role.get(m.role, m.role),
                "content": m.text(),
                "reasoning_content": m.reasoning_content,
            }
            for m in self.messages
        ]


FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """`logprobs` of a completion choice, one entry per token (the echoed prompt's first):
    its text, its log-probability (null for a prompt's first token), the likeliest tokens with
    theirs (the chosen one among them), and where its text starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One choice of a text completion (also the shape of a streamed choice)."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    """Body of /v1/completions, and of each streamed chunk (then without usage)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    """A token with its log-probability and UTF-8 bytes (chat format)."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    """A generated token's log-probability and the likeliest tokens at its place."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """`logprobs` of a chat choice: one entry per generated token."""

    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    """The generated message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    """Body of /v1/chat/completions without streaming."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """The increment a streamed chat chunk carries."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a streamed chat chunk."""

    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """An entry of GET /v1/models; beyond OpenAI's fields it tells size and context length."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "local"
    max_model_len: int
    max_tokens_cap: int
    num_params: int
    device: str
    dtype: str


class ModelList(BaseModel):
    """Body of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
