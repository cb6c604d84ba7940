"""POST /v1/completions and /v1/chat/completions: validate, queue on the engine, answer or stream.

Limits (documented in serve.py --help as well):
- `max_tokens` above the server's cap (`--max-tokens-cap`) is refused with 400; when the prompt
  leaves less room than `max_tokens` in the context, generation ends there (finish_reason
  "length"), as the KV cache and positions cannot go past the model's context.
- A prompt that fills the whole context (no room for one new token) is refused with 400, unless
  it is only scored (`echo` with `max_tokens` 0).
- `logprobs` (and chat's `top_logprobs`) are those of the model's distribution before
  temperature, top_k and top_p (see serving/logprobs.py).
- `model` names the served model (or is omitted); any other name gets 404.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from qwen3.tokenizer import Qwen3Tokenizer
from serving.engine import Choice, GenerationEngine, GenerationRequest, QueueFull
from serving.errors import APIError
from serving.formats import ChatFormat, CompletionFormat, Part
from serving.logprobs import TokenLogprob
from serving.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    FinishReason,
    SamplingFields,
    Usage,
)
from serving.served_model import ServedModel
from serving.text_stream import TextStream

router = APIRouter()
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
# Seconds a client refused for a full queue is told to wait (`Retry-After`): rows free up as
# requests finish, so a short wait usually finds room; the openai client honours it.
RETRY_AFTER_S = 1


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def _check_model(served: ServedModel, body: SamplingFields) -> None:
    if body.model not in (None, "", served.name):
        raise APIError(
            404,
            f"model '{body.model}' not found; this server serves '{served.name}' (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def _reason(value: str) -> FinishReason:
    return "length" if value == "length" else "stop"


def _prompt_ids(
    served: ServedModel, prompt: str | list[str] | list[int] | list[list[int]], field: str
) -> list[list[int]]:
    """Token ids of each prompt; text is encoded, ids are range-checked."""
    tok = served.tokenizer
    prompts: list[str | list[int]]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif all(isinstance(p, int) for p in prompt):  # one prompt of token ids
        prompts = [[int(p) for p in prompt]]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    out = []
    for p in prompts:
        ids = tok.encode(p) if isinstance(p, str) else list(p)
        bad = [i for i in ids if not 0 <= i < served.model.config.vocab_size]
        if bad:
            raise APIError(
                400,
                f"invalid '{field}': token id {bad[0]} is outside the vocabulary "
                f"(0..{served.model.config.vocab_size - 1})",
                param=field,
            )
        # An empty prompt starts from <|endoftext|>, as in OpenAI's API.
        out.append(ids or [tok.eos_id])
    return out


def chat_prompt_ids(tokenizer: Qwen3Tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The prompt of a chat request: its messages rendered by the chat template saved with the
    tokenizer, with the request's `chat_template_kwargs`, as transformers and vLLM render it."""
    options = body.chat_template_kwargs or {}
    unknown = sorted(set(options) - tokenizer.chat_template_options)
    if unknown:
        known = ", ".join(sorted(tokenizer.chat_template_options)) or "none"
        raise APIError(
            400,
            f"invalid 'chat_template_kwargs': the model's chat template has no option "
            f"'{unknown[0]}' (its options: {known})",
            param="chat_template_kwargs",
        )
    try:
        text = tokenizer.apply_chat_template(
            body.chat_messages(), add_generation_prompt=True, **options
        )
    except ValueError as err:
        raise APIError(400, f"invalid 'messages': {err}", param="messages") from err
    return tokenizer.encode(text)


def _build_request(
    http: Request,
    body: SamplingFields,
    prompts: list[list[int]],
    field: str,
    default_max: int,
    logprobs: int | None = None,
    echo: bool = False,
) -> GenerationRequest:
    served: ServedModel = http.app.state.served
    cap: int = http.app.state.max_tokens_cap
    for name in ("max_tokens", "max_completion_tokens"):  # each, though one wins
        asked = getattr(body, name, None)
        if asked is not None and asked > cap:
            raise APIError(
                400,
                f"{name}={asked} is above this server's cap of {cap} "
                "(start serve.py with a larger --max-tokens-cap)",
                param=name,
            )
    max_tokens = default_max if body.max_new_tokens is None else body.max_new_tokens
    ctx = served.context_length
    engine: GenerationEngine = http.app.state.engine
    most = engine.max_batch_size
    n = body.choices_per_prompt
    if len(prompts) * n > most:
        raise APIError(
            400,
            f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} sequences; "
            f"this server decodes at most {most} at once (serve.py --max-batch-size)",
            param=field,
        )
    choices = []
    for p_index, ids in enumerate(prompts):
        if len(ids) >= ctx + (max_tokens == 0):  # a prompt only scored may fill the context
            raise APIError(
                400,
                f"'{field}' is {len(ids)} tokens but the model's context is {ctx} "
                "tokens, leaving no room to generate; shorten it",
                param=field,
                code="context_length_exceeded",
            )
        for j in range(n):
            stream = TextStream(served.tokenizer, body.stop_list)
            room = min(max_tokens, ctx - len(ids))
            choices.append(Choice(p_index * n + j, ids, room, stream, logprobs, echo))
    sampling = body.sampling(max_tokens, engine.eos_ids)
    return GenerationRequest(choices=choices, sampling=sampling, loop=asyncio.get_running_loop())


def _usage(req: GenerationRequest) -> Usage:
    seen: dict[int, int] = {}
    for c in req.choices:
        seen[id(c.prompt_ids)] = len(c.prompt_ids)
    prompt = sum(seen.values())
    completion = sum(c.text.tokens for c in req.choices)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


Collected = tuple[list[str], list[FinishReason], list[list[TokenLogprob]]]


async def _collect(http: Request, req: GenerationRequest) -> Collected:
    """Wait for every choice to finish, cancelling if the client disconnects meanwhile."""
    texts = [""] * len(req.choices)
    reasons: list[FinishReason] = ["stop"] * len(req.choices)
    tokens: list[list[TokenLogprob]] = [[] for _ in req.choices]
    while True:
        try:
            kind, index, value = await asyncio.wait_for(req.events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await http.is_disconnected():
                raise ClientGone from None
            continue
        if isinstance(value, list):  # a "logprobs" event
            tokens[index] += value
        elif kind == "delta":
            texts[index] += value
        elif kind == "finish":
            reasons[index] = _reason(value)
        elif kind == "error":
            raise APIError(500, value)
        elif kind == "end":
            return texts, reasons, tokens


# Characters JSON may carry raw that Python's str.splitlines (and so httpx's aiter_lines and
# many clients' line readers) takes for line ends, cutting an event short: sent as \u escapes.
_LINE_BREAKING = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def _sse(payload: str) -> str:
    """One server-sent event carrying a JSON ``payload``, on one line for any line reader."""
    return f"data: {payload.translate(_LINE_BREAKING)}\n\n"


async def _events(
    req: GenerationRequest, fmt: CompletionFormat, include_usage: bool
) -> AsyncIterator[str]:
    """Stream the engine's events as SSE chunks, ending with `data: [DONE]`. Logprobs go out
    with the next chunk of their choice (a token's text may be held back a while)."""
    pending: dict[int, list[TokenLogprob]] = {}
    try:
        while True:
            kind, index, value = await req.events.get()
            if isinstance(value, list):  # a "logprobs" event
                pending.setdefault(index, []).extend(value)
            elif kind == "delta":
                part: Part = (index, value, None, pending.pop(index, []))
                yield _sse(fmt.chunk([part]).model_dump_json())
            elif kind == "finish":
                part = (index, None, _reason(value), pending.pop(index, []))
                yield _sse(fmt.chunk([part]).model_dump_json())
            elif kind == "error":
                yield _sse(json.dumps(APIError(500, value).body()))
                break
            elif kind == "end":
                if include_usage:
                    yield _sse(fmt.chunk([], usage=_usage(req)).model_dump_json())
                break
        yield "data: [DONE]\n\n"
    finally:
        req.cancel()  # normal end, client gone, or server shutting down


async def _respond(
    http: Request, req: GenerationRequest, body: SamplingFields, fmt: CompletionFormat
) -> Response | BaseModel:
    engine: GenerationEngine = http.app.state.engine
    try:
        engine.submit(req)
    except QueueFull:
        raise APIError(
            429,
            f"the server is busy: {engine.max_waiting} requests are already waiting; retry "
            f"after {RETRY_AFTER_S} s (serve.py --max-queue sets how many may wait)",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            _events(req, fmt, include_usage), media_type="text/event-stream", headers=headers
        )
    try:
        texts, reasons, tokens = await _collect(http, req)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    finally:
        req.cancel()
    return fmt.full(texts, reasons, tokens, _usage(req))


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, http: Request) -> Response | BaseModel:
    """Continue a prompt (OpenAI text completions)."""
    served: ServedModel = http.app.state.served
    _check_model(served, body)
    prompts = _prompt_ids(served, body.prompt, "prompt")
    req = _build_request(http, body, prompts, "prompt", 16, body.logprobs, body.echo)
    names = http.app.state.token_names if body.logprobs is not None else None
    return await _respond(http, req, body, CompletionFormat(served.name, names))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response | BaseModel:
    """Answer a conversation rendered with the model's chat format (OpenAI chat completions)."""
    served: ServedModel = http.app.state.served
    _check_model(served, body)
    prompts = _prompt_ids(served, chat_prompt_ids(served.tokenizer, body), "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    cap = http.app.state.max_tokens_cap
    req = _build_request(http, body, prompts, "messages", cap, top)
    names = http.app.state.token_names if body.logprobs else None
    return await _respond(http, req, body, ChatFormat(served.name, names))
