"""The FastAPI application: the page at `/`, health and model listing, and the completion routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from serving.access import BodyLimit, api_key_dependencies
from serving.completions import router as completions_router
from serving.engine import GenerationEngine
from serving.errors import APIError, install_error_handlers
from serving.logprobs import TokenNames
from serving.openapi import ServerLimits, install_openapi
from serving.schemas import ModelCard, ModelList
from serving.served_model import ServedModel

STATIC_DIR = Path(__file__).parent / "static"


def create_app(
    served: ServedModel,
    max_tokens_cap: int = 1024,
    max_batch_size: int = 32,
    threads: int | None = None,
    api_key: str | None = None,
    max_body_bytes: int | None = None,
    max_queue: int | None = None,
) -> FastAPI:
    """Build the app; the generation worker starts and stops with the app's lifespan.

    ``api_key``: every /v1 route wants `Authorization: Bearer KEY` (401 without it);
    ``max_body_bytes``: larger request bodies get 413; ``max_queue``: requests that would wait
    beyond this many get 429 with Retry-After. None: no key, no limit.
    """
    engine = GenerationEngine(
        served.model,
        served.tokenizer,
        max_batch_size=max_batch_size,
        threads=threads,
        max_waiting=max_queue,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="Qwen3 server",
        description="A page and an OpenAI-compatible API over one Qwen3 checkpoint.",
        lifespan=lifespan,
    )
    app.state.served = served
    app.state.engine = engine
    app.state.max_tokens_cap = max_tokens_cap
    app.state.token_names = TokenNames(served.tokenizer)
    app.state.api_key = api_key
    app.state.max_body_bytes = max_body_bytes
    install_error_handlers(app)
    if max_body_bytes is not None:
        app.add_middleware(BodyLimit, limit=max_body_bytes)
    guarded = api_key_dependencies(api_key)
    app.include_router(completions_router, dependencies=guarded)
    models = APIRouter(dependencies=guarded)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def card() -> ModelCard:
        return ModelCard(
            id=served.name,
            created=served.created,
            max_model_len=served.context_length,
            max_tokens_cap=max_tokens_cap,
            num_params=served.num_params,
            device=served.device,
            dtype=served.dtype,
        )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Liveness plus the engine's queue: requests waiting and rows being decoded."""
        return {"status": "ok", "model": served.name, **request.app.state.engine.load}

    @models.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """The one model this server serves, with its size and context length."""
        return ModelList(data=[card()])

    @models.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str) -> ModelCard:
        """Details of the served model; any other id is 404."""
        if model_id != served.name:
            raise APIError(
                404,
                f"model '{model_id}' not found; this server serves '{served.name}'",
                param="model",
                code="model_not_found",
            )
        return card()

    app.include_router(models)
    limits = ServerLimits(
        vocab_size=served.model.config.vocab_size,
        context=served.context_length,
        max_tokens_cap=max_tokens_cap,
        max_batch_size=max_batch_size,
        template_options=served.tokenizer.chat_template_options,
        api_key=api_key is not None,
    )
    install_openapi(app, limits)
    return app
