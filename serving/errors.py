"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a fitting status.

Every bad request gets one message naming the field at fault; nothing a client sends can take
the server down.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# Pydantic names the branch of a union it tried (`str`, `list[int]`, `function-after[...]`).
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|list|dict)(\[.*\])?$|^function-")


class APIError(Exception):
    """An error to send back to the client as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # e.g. Retry-After on 429, WWW-Authenticate on 401

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse (`openai.APIStatusError.message` shows `message`)."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


def body_too_large(limit: int, path: str) -> APIError:
    """The 413 of a body above `--max-body-bytes`."""
    return APIError(
        413,
        f"request body too large for {path}: this server takes at most {limit} bytes "
        "(serve.py --max-body-bytes)",
        code="request_too_large",
    )


def _field_path(loc: tuple[Any, ...]) -> str:
    """`("body", "messages", 0, "role")` -> `messages[0].role`."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_BRANCH.match(str(part)):
            path += f".{part}" if path else str(part)
    return path


# What a field that takes one of several shapes accepts (pydantic reports one error per shape).
_FORMS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of up to 4 strings",
    "content": "a string or a list of text parts",
}


def validation_error(exc: RequestValidationError) -> APIError:
    """Turn FastAPI's validation report into one message naming the first field at fault."""
    errors = [dict(e) for e in exc.errors()] or [{"loc": (), "msg": "invalid request"}]
    first = errors[0]
    kind = first.get("type")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"request body is not valid JSON ({detail})", code="invalid_json")
    field = _field_path(tuple(first.get("loc", ())))
    if kind == "missing" and not field:
        return APIError(400, "request body is empty; send a JSON object", code="invalid_json")
    if kind == "model_attributes_type" and not field:
        return APIError(
            400,
            "request body must be a JSON object (sent with Content-Type: application/json)",
            code="invalid_json",
        )
    if kind == "missing":
        return APIError(400, f"missing required field '{field}'", param=field, code="missing_field")
    if kind == "extra_forbidden":
        return APIError(
            400,
            f"unknown field '{field}': this server does not support it; remove it "
            "(see /docs for the fields it takes)",
            param=field,
            code="unknown_field",
        )
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not field:  # a model-level check: its message already names the field
        return APIError(400, message, code="invalid_value")
    paths = [_field_path(tuple(e.get("loc", ()))) for e in errors]
    same_field = [p for p in paths if p == field or p.startswith((f"{field}[", f"{field}."))]
    form = _FORMS.get(field.rsplit(".", 1)[-1])
    if form and len(same_field) > 1:
        message = f"expected {form}"
    got = first.get("input")
    shown = f" (got {got!r})" if got is not None and not isinstance(got, dict | list) else ""
    return APIError(400, f"invalid '{field}': {message}{shown}", param=field, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Make every error response an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        hint = {404: "the API is under /v1 (see /docs)", 405: "see /docs for the methods"}
        message = f"{exc.detail}: {where}" + (
            f"; {hint[exc.status_code]}" if exc.status_code in hint else ""
        )
        err = APIError(
            exc.status_code, message, code="not_found" if exc.status_code == 404 else None
        )
        if exc.status_code == 413:  # serving.access.BodyLimit, counting the bytes read
            err = body_too_large(request.app.state.max_body_bytes, request.url.path)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)
