"""OpenAI-compatible request and response bodies for /v1/completions and /v1/chat/completions.

Field names, defaults and ranges follow the OpenAI API reference. Fields this server does not
implement are accepted only at their neutral value, and unknown fields are refused, so a request
never silently gets less than it asked for; each refusal is a 400 naming the field.

Requests are validated strictly (JSON types as the schema says: `logprobs: false` is not the
integer 0, `"5"` is not 5), and each rule a validator enforces is also written into the JSON
schema (`json_schema_extra`; `serving.openapi` adds the limits of the served model), so a
request the schema allows is one the server takes, except where the schema cannot know (the
number of tokens a text renders to), which the field descriptions say.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict

from qwen3.generate import MAX_SEED, MIN_SEED, Sampling

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_CHOICES = 8  # `n` above this is refused: each choice is a full generation
MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions' `logprobs`
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for /v1/chat/completions' `top_logprobs`

NULL: JsonDict = {"type": "null"}


def only_with(field: str, needs: str) -> JsonDict:
    """JSON schema: `field` may be set (not null) only when the boolean `needs` is true. Pydantic
    cannot express a rule between fields; the model validator enforces it."""
    return {
        "if": {"properties": {needs: {"const": True}}, "required": [needs]},
        "else": {"properties": {field: NULL}},
    }


def neutral(value: JsonValue) -> JsonDict:
    """JSON schema of a field accepted only at its neutral value (or null)."""
    return {"anyOf": [{"const": value}, NULL]}


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema has it: 44.0 is one (strict pydantic alone would refuse it). Written
# after a field's bounds (`Annotated[int, Field(ge=1), Whole]`), so the schema keeps them.
Whole = BeforeValidator(_integral)


class RequestPart(BaseModel):
    """A request object whose unknown fields are refused, unless null (as good as absent)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_null_extras(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.model_fields}
        return data


class StreamOptions(RequestPart):
    """`stream_options`: `include_usage` adds a last chunk carrying the token counts."""

    include_usage: bool = False


StopText = Annotated[str, Field(min_length=1)]


class SamplingFields(RequestPart):
    """The sampling fields shared by both endpoints, with OpenAI's ranges."""

    model_config = ConfigDict(json_schema_extra={"allOf": [only_with("stream_options", "stream")]})

    model: str | None = Field(
        default=None, description="Served model id; omitted means the one served (others: 404)."
    )
    max_tokens: Annotated[int, Field(ge=1), Whole] | None = Field(
        default=None, description="At most the server's --max-tokens-cap (see /v1/models)."
    )
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    top_k: Annotated[int, Field(ge=1), Whole] | None = Field(
        default=None, description="Extension (as in vLLM): keep the k likeliest."
    )
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES), Whole] | None = Field(
        default=1,
        description="Choices per prompt; prompts x n may not exceed the server's --max-batch-size.",
    )
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    # `lt` 2**64 rather than `le` 2**64 - 1: the same integers, and a bound a JSON client's
    # doubles hold exactly (2**64 - 1 rounds up to 2**64, which would then pass it).
    seed: Annotated[int, Field(ge=MIN_SEED, lt=MAX_SEED + 1), Whole] | None = None
    ignore_eos: bool = Field(
        default=False, description="Extension (as in vLLM): keep going past end-of-text tokens."
    )
    stream: bool = False
    stream_options: StreamOptions | None = Field(
        default=None, description="Only with stream: true."
    )
    user: str | None = None  # who is asking, for the provider's records: nothing to do here
    # Accepted at their neutral values only (see module docstring).
    presence_penalty: float | None = Field(
        default=0.0, json_schema_extra=neutral(0), description="Not supported: 0 only."
    )
    frequency_penalty: float | None = Field(
        default=0.0, json_schema_extra=neutral(0), description="Not supported: 0 only."
    )
    logit_bias: dict[str, float] | None = Field(
        default=None,
        json_schema_extra={"maxProperties": 0},
        description="Not supported: empty only.",
    )

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
    def max_new_tokens(self) -> int | None:
        """The most tokens each choice may generate (None: the endpoint's default)."""
        return self.max_tokens

    @property
    def choices_per_prompt(self) -> int:
        """`n`, null meaning 1."""
        return 1 if self.n is None else self.n

    @property
    def stop_list(self) -> list[str]:
        """`stop` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, max_new_tokens: int, eos_ids: Sequence[int]) -> Sampling:
        """The request's settings as the generator takes them: null temperature and top_p are
        OpenAI's defaults (1), top_p 1 is no limit, and the end-of-text ids stop a choice unless
        `ignore_eos`. (`stop` strings are matched in the text, not here.)"""
        top_p = 1.0 if self.top_p is None else self.top_p
        temperature = 1.0 if self.temperature is None else self.temperature
        return Sampling(
            max_new_tokens,
            temperature=temperature,
            top_k=self.top_k,
            top_p=top_p if top_p < 1.0 else None,
            stop_ids=() if self.ignore_eos else tuple(eos_ids),
            seed=self.seed,
        )


TokenId = Annotated[int, Field(ge=0), Whole]  # below the vocabulary size: serving.openapi adds it
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt` is text, token ids, or a list of either (one choice set each)."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                only_with("stream_options", "stream"),
                {  # max_tokens 0 only scores an echoed prompt
                    "if": {"properties": {"echo": {"const": True}}, "required": ["echo"]},
                    "else": {"properties": {"max_tokens": {"not": {"const": 0}}}},
                },
            ]
        }
    )

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | TokenIds
        | Annotated[list[list[TokenId]], Field(min_length=1)]
    ) = Field(
        description="Text, a list of texts, token ids, or a list of token-id lists (not empty "
        "lists). Each prompt must leave room for one new token in the model's context "
        "(`max_model_len` of /v1/models; all of it when only scored: echo with max_tokens 0); "
        "a longer text prompt is refused with 400."
    )
    # OpenAI's default for completions; 0 (with echo) scores the prompt without generating.
    max_tokens: Annotated[int, Field(ge=0), Whole] | None = Field(
        default=16,
        description="At most the server's --max-tokens-cap; 0 only with echo (scores the prompt).",
    )
    echo: bool = Field(default=False, description="Put the prompt before the completion.")
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), Whole] | None = Field(
        default=None,
        description="Each token's log-probability and this many likeliest alternatives "
        "(of the model's distribution before temperature, top_k and top_p).",
    )
    suffix: str | None = Field(
        default=None, json_schema_extra={"maxLength": 0}, description="Not supported: empty only."
    )
    best_of: Annotated[int, Whole] | None = Field(
        default=None, json_schema_extra=neutral(1), description="Not supported: 1 only; use n."
    )

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
        return self


class ContentPart(RequestPart):
    """One part of a multi-part message; only text parts can be rendered."""

    type: Literal["text"]
    text: str


class ChatMessage(RequestPart):
    """A chat message; `content` is text or a list of text parts. An assistant message may carry
    its `reasoning_content` (the Qwen3 template shows it after the last user message)."""

    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"role": {"const": "assistant"}}, "required": ["role"]},
            "else": {"properties": {"reasoning_content": NULL}},
        }
    )

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = Field(default=None, description="Assistant messages only.")
    name: str | None = Field(
        default=None,
        json_schema_extra={"maxLength": 0},
        description="Not supported by the model's chat format: empty only.",
    )

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

    model_config = ConfigDict(extra="allow", strict=True)  # json_schema's schema: refused by type

    type: str = Field(json_schema_extra={"enum": ["text"]})


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions; messages are rendered with the model's chat format."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                only_with("stream_options", "stream"),
                only_with("top_logprobs", "logprobs"),
            ]
        }
    )

    messages: list[ChatMessage] = Field(
        min_length=1,
        description="Rendered with the model's chat template; the result must leave room for "
        "one new token in the model's context (`max_model_len` of /v1/models), else 400.",
    )
    max_completion_tokens: Annotated[int, Field(ge=1), Whole] | None = Field(
        default=None, description="At most the server's --max-tokens-cap."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="Extension (as in vLLM): options of the chat template, e.g. "
        '{"enable_thinking": false} to have a Qwen3 model answer without thinking first.',
    )
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = Field(
        default=None, max_length=0, description="Not supported: empty only."
    )
    functions: list[Any] | None = Field(
        default=None, max_length=0, description="Not supported: empty only."
    )
    logprobs: bool | None = Field(
        default=False,
        description="Each generated token's log-probability (of the model's distribution "
        "before temperature, top_k and top_p).",
    )
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), Whole] | None = Field(
        default=None,
        description="Only with logprobs: true; this many likeliest alternatives at each token.",
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _check_template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        thinking = (value or {}).get("enable_thinking", False)
        if not isinstance(thinking, bool):  # the template tests `is false`: "false" would think
            raise ValueError(f"enable_thinking must be true or false, got {thinking!r}")
        return value

    @model_validator(mode="after")
    def _check_chat_only(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true; set both or leave it unset")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(
                f"response_format type '{self.response_format.type}' is not supported by this "
                'server (it cannot constrain the output); leave it unset or {"type": "text"}'
            )
        return self

    @property
    def max_new_tokens(self) -> int | None:
        """`max_completion_tokens`, else `max_tokens` (the newer name wins, as in OpenAI's API)."""
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

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


class ErrorDetail(BaseModel):
    """What went wrong: `message` names the field at fault and the fix."""

    message: str
    type: str = Field(description="invalid_request_error, or server_error for 5xx.")
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error of this server, in OpenAI's shape."""

    error: ErrorDetail


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
