"""The FastAPI app: settings, registry and metrics, middleware, routers, lifespan. Nothing else.

    uvicorn service.app:app          (settings from HF_SERVE_* env vars)
    hf-serve --models-dir models     (the same, with CLI flags)

Data flow of POST /models/{name}: route (service/routes/inference.py) -> lease of the model
(service/routes/deps.py, service/registry.py) -> the model's task (service/tasks/): request schema
-> the model's batcher (service/batching.py) -> the task's runner on the torch thread
(service/torch_thread.py) -> response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import torch_thread
from .body_limit import BodyLimit
from .errors import install_error_handlers
from .loading import warn_if_dtype_is_slow
from .memory import limit_arenas, trim_periodically
from .metrics import Metrics
from .openapi_doc import install_openapi
from .registry import Registry
from .routes import inference, models, openai, ops
from .routes.deps import PUBLIC_PATHS, require_api_key
from .settings import Settings

__all__ = ["PUBLIC_PATHS", "create_app"]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    limit_arenas()
    metrics = Metrics()
    registry = Registry(settings, metrics)
    logging.getLogger("service").setLevel(settings.log_level.upper())
    warn_if_dtype_is_slow(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch_thread.set_num_threads(settings.torch_threads)
        await registry.start()
        trimmer = asyncio.create_task(trim_periodically())
        try:
            yield
        finally:
            trimmer.cancel()
            await registry.stop()

    app = FastAPI(
        title="hf-serve",
        summary="Hugging Face Inference API-compatible server for the model folders in models_dir.",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(require_api_key)],
    )
    app.state.settings, app.state.registry, app.state.metrics = settings, registry, metrics
    app.state.in_flight = 0
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, timeout=settings.body_timeout_s)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
            allow_headers=["*"], expose_headers=["x-queue-time", "x-inference-time", "x-total-time"],
        )
    install_error_handlers(app)
    # Inference first: POST /models/{name} is what nearly every request is, and the router tries
    # routes in order (no other route takes POST on that path).
    app.router.routes.append(inference.route)
    for module in (ops, models, openai):
        app.include_router(module.router)
    install_openapi(app, settings, registry, openai.SCHEMAS, openai.schema_limits(settings))
    return app


def __getattr__(name: str):
    # `uvicorn service.app:app` reads settings from the environment only when it asks for `app`.
    if name == "app":
        with contextlib.suppress(KeyError):
            return globals()["_app"]
        globals()["_app"] = create_app()
        return globals()["_app"]
    raise AttributeError(name)
