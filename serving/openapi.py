"""The schema at /openapi.json, as this server answers: every error status each route can send
(with the error body's schema, and no 422, which it never sends), the streamed media type, and
the limits of the served model and the server's flags written into the request schemas (token
ids below the vocabulary size, prompts within the context, max_tokens within the cap, prompts x n
within the batch, the chat template's own options).

What no schema can know (how many tokens a text or a chat renders to) stays in the fields'
descriptions; `serving.schemas` says the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serving.schemas import MAX_CHOICES, ErrorResponse

JsonObject = dict[str, Any]

ERRORS = {
    400: "Invalid request: the message names the field at fault and the fix.",
    401: "Missing or wrong API key (`Authorization: Bearer KEY`).",
    404: "Unknown model id.",
    413: "Request body above the server's --max-body-bytes.",
    429: "Too many requests waiting (the server's --max-queue); retry after `Retry-After` s.",
    500: "Generation failed (a server fault; the message says what failed).",
}
# Which statuses each operation can answer, besides 200 (401 only with an API key).
OPERATION_ERRORS = {
    ("post", "/v1/completions"): (400, 404, 413, 429, 500),
    ("post", "/v1/chat/completions"): (400, 404, 413, 429, 500),
    ("get", "/v1/models"): (),
    ("get", "/v1/models/{model_id}"): (404,),
}


SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {
            "type": "string",
            "description": "A chunk of the response as JSON (an error body if generation "
            "failed), or [DONE] after the last.",
        }
    },
    "required": ["data"],
}


@dataclass(frozen=True)
class ServerLimits:
    """What the served model and the server's flags allow a request."""

    vocab_size: int  # token ids below it
    context: int  # a prompt leaves room for one new token in it
    max_tokens_cap: int
    max_batch_size: int  # prompts x n
    template_options: frozenset[str]  # chat_template_kwargs keys
    api_key: bool


def _branches(prop: JsonObject) -> list[JsonObject]:
    return list(prop.get("anyOf", [prop]))


def _limit_requests(schemas: JsonObject, limits: ServerLimits) -> None:
    top_id = {"type": "integer", "minimum": 0, "maximum": limits.vocab_size - 1}
    most_n = min(MAX_CHOICES, limits.max_batch_size)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            for branch in _branches(props.get(field, {})):
                if branch.get("type") == "integer":
                    branch["maximum"] = limits.max_tokens_cap
        for branch in _branches(props["n"]):
            if branch.get("type") == "integer":
                branch["maximum"] = most_n
    for branch in _branches(schemas["CompletionRequest"]["properties"]["prompt"]):
        items = branch.get("items", {})
        if items.get("type") == "integer":  # one prompt of token ids
            branch.update(items=top_id, maxItems=limits.context - 1)
        elif items.get("type") == "array":  # several prompts of token ids
            items.update(items=top_id, maxItems=limits.context - 1)
            branch["maxItems"] = limits.max_batch_size
        elif items.get("type") == "string":
            branch["maxItems"] = limits.max_batch_size
    # prompts x n within the batch: with n >= k, at most max_batch_size // k prompts.
    several = {"type": "array", "items": {"type": ["string", "array"]}}
    rules = schemas["CompletionRequest"].setdefault("allOf", [])
    for k in range(2, most_n + 1):
        rules.append(
            {
                "if": {"properties": {"n": {"type": "integer", "minimum": k}}, "required": ["n"]},
                "then": {
                    "properties": {
                        "prompt": {"if": several, "then": {"maxItems": limits.max_batch_size // k}}
                    }
                },
            }
        )
    options: JsonObject = {name: {} for name in sorted(limits.template_options)}
    if "enable_thinking" in options:
        options["enable_thinking"] = {"type": "boolean"}
    schemas["ChatCompletionRequest"]["properties"]["chat_template_kwargs"]["anyOf"] = [
        {"type": "object", "properties": options, "additionalProperties": False},
        {"type": "null"},
    ]


def _document_errors(schema: JsonObject, api_key: bool) -> None:
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for (method, path), statuses in OPERATION_ERRORS.items():
        operation = schema["paths"][path][method]
        responses = operation["responses"]
        responses.pop("422", None)  # validation errors are 400s in OpenAI's format
        for status in (*statuses, *((401,) if api_key else ())):
            responses[str(status)] = {
                "description": ERRORS[status],
                "content": {"application/json": {"schema": error_ref}},
            }
        if method == "post":
            # With stream: true: server-sent events (OpenAPI 3.1: `schema` describes one event).
            responses["200"]["content"]["text/event-stream"] = {"schema": SSE_EVENT}
            responses["429"]["headers"] = {
                "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
            }
        if api_key:
            responses["401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    components = schema["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error.pop("$defs"))
    components["ErrorResponse"] = error


def install_openapi(app: FastAPI, limits: ServerLimits) -> None:
    """Serve the schema described above at /openapi.json (and /docs)."""

    def openapi() -> JsonObject:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _document_errors(schema, limits.api_key)
            _limit_requests(schema["components"]["schemas"], limits)
            app.openapi_schema = schema
        return app.openapi_schema

    # FastAPI's documented way to extend the schema is to replace this method.
    app.openapi = openapi  # type: ignore[method-assign]
