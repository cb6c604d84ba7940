"""Who may use the API and how much one request may send: the `--api-key` check on every /v1
route, and the body-size limit's early answer.

The key travels as `Authorization: Bearer KEY`, as OpenAI clients send it (`api_key=`). It is a
FastAPI security dependency, so /openapi.json declares the scheme and clients and fuzzers know
which routes need it; /health and the page stay open (the page asks for the key itself).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import APIError, body_too_large

# auto_error=False: a missing or malformed header reaches our check, which answers in
# OpenAI's error format instead of FastAPI's {"detail": ...}.
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="The server's --api-key (or QWEN3_API_KEY), sent as `Authorization: Bearer KEY`.",
)


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """The dependency on every /v1 route of a server started with an API key: 401 without it."""
    expected: str = request.app.state.api_key
    if credentials is None:
        raise APIError(
            401,
            "this server needs an API key: send the header 'Authorization: Bearer KEY' "
            "(OpenAI clients: api_key=KEY)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Constant-time, so the answer's timing tells nothing about how much of a guess was right;
    # bytes, because compare_digest refuses non-ASCII str (a header may carry any byte).
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise APIError(
            401,
            "incorrect API key; send the key serve.py was started with (--api-key or QWEN3_API_KEY)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


def api_key_dependencies(api_key: str | None) -> list[DependsParam]:
    """What a /v1 router depends on: the key check when there is a key, else nothing (so the
    schema of a keyless server declares no security)."""
    return [Depends(require_api_key)] if api_key else []


class BodyTooLarge(HTTPException):
    """Raised while reading a body past the limit; the error handlers answer it with 413."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail="Content Too Large")


class BodyLimit:
    """Refuse request bodies above ``limit`` bytes with 413 in OpenAI's error format: at once
    when Content-Length says so, else when the bytes read (chunked bodies) pass it.

    Hand-written because FastAPI's `max_body_size` answers a too-long Content-Length in plain
    text, replacing whatever the error handlers send.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            err = body_too_large(self.limit, scope["path"])
            response = JSONResponse(err.body(), status_code=413, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI re-raises HTTPException from a body read
                raise BodyTooLarge
            return message

        await self.app(scope, counted, send)
