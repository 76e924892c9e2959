"""The FastAPI app: factory, lifespan and thin routes.

    uvicorn service.app:app          (settings from HF_SERVE_* env vars)
    hf-serve --models-dir models     (the same, with CLI flags)

Data flow of POST /models/{name}: body -> schema (service/request_parsing.py, service/schemas.py)
-> registry entry (service/registry.py) -> the model's batcher (service/batching.py) -> task runner
(service/pipelines.py) -> JSON, or server-sent events (service/streaming.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response

from . import schemas, torch_thread
from .body_limit import BodyLimit
from .errors import ApiError, error_response, install_error_handlers, job_error
from .images import decode_image, image_budget
from .memory import limit_arenas, trim_periodically
from .metrics import Metrics
from .openapi_doc import (
    AUTH,
    BODY,
    ERROR,
    INFERENCE_REQUEST,
    INFERENCE_RESPONSES,
    READY_RESPONSES,
    install_openapi,
)
from .registry import ModelNotFound, ModelUnavailable, Registry
from .request_parsing import read_image_request, read_json
from .settings import Settings
from .streaming import ReleasingStream, stream_generation

log = logging.getLogger("service")
STATIC = Path(__file__).parent / "static"
# Open even with an API key: liveness, and static pages that hold no model or request data (the
# playground asks for the key itself; the OpenAPI document is the same for every deployment).
PUBLIC_PATHS = {"/health", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    limit_arenas()
    metrics = Metrics()
    registry = Registry(settings, metrics)
    logging.getLogger("service").setLevel(settings.log_level.upper())

    # -- auth -------------------------------------------------------------------------------------
    async def require_api_key(request: Request) -> None:
        if settings.api_key is None or request.url.path in PUBLIC_PATHS:
            return
        expected = settings.api_key.get_secret_value().encode()
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)", "unauthorized",
                           {"WWW-Authenticate": "Bearer"})

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

    # -- plain routes ----------------------------------------------------------------------------
    @app.get("/health", tags=["ops"], summary="Alive (no auth)")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], summary="All models found at startup are loaded (or failed)",
             responses=READY_RESPONSES)
    async def ready():
        if not registry.ready:
            return error_response(503, "models are loading", "loading", {"Retry-After": "1"})
        counts: dict[str, int] = {}
        for entry in registry.entries.values():
            counts[entry.status] = counts.get(entry.status, 0) + 1
        return {"status": "ready", "models": counts}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}, **AUTH})
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/models", tags=["models"], summary="Every model folder: status, task, card metadata", responses={**AUTH})
    async def list_models() -> schemas.ModelList:
        return schemas.ModelList(models=[schemas.ModelInfo(**d) for d in registry.describe()])

    @app.get("/models/{name}", tags=["models"], summary="One model: labels, card metadata, eval metrics",
             responses={**AUTH, 404: {**ERROR, "description": "No such model"}})
    async def get_model(name: str) -> schemas.ModelInfo:
        try:
            return schemas.ModelInfo(**registry.get(name).describe())
        except ModelNotFound as exc:
            raise ApiError(404, str(exc), "not_found") from None

    @app.post("/admin/reload", tags=["ops"], summary="Rescan models_dir now; returns what changed", responses={**AUTH, **BODY})
    async def reload() -> dict:
        return await registry.scan()

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    # -- inference --------------------------------------------------------------------------------
    @app.post(
        "/models/{name}", tags=["inference"], openapi_extra=INFERENCE_REQUEST, response_class=JSONResponse,
        summary="Run a model (Inference API shapes: body and response depend on the model's task)",
        responses=INFERENCE_RESPONSES,
    )
    async def infer(name: str, request: Request):
        started = time.perf_counter()
        status, error_type, task = 500, "internal", None
        label = name if name in registry.entries else "unknown"
        if name not in registry.entries:
            status, error_type = 404, "not_found"
            metrics.requests.labels(label, "404").inc()
            metrics.errors.labels(label, error_type).inc()
            raise ApiError(404, str(ModelNotFound(name, registry.names())), "not_found")
        if app.state.in_flight >= settings.max_concurrent_requests:
            metrics.rejected.inc()
            metrics.requests.labels(label, "429").inc()
            metrics.errors.labels(label, "overloaded").inc()
            raise ApiError(429, f"server is at max_concurrent_requests ({settings.max_concurrent_requests}); retry later",
                           "overloaded", {"Retry-After": "1"})
        app.state.in_flight += 1
        metrics.in_flight.inc()
        entry = None
        handed_over = False  # a stream releases the model and the slot itself when it ends

        finished = False

        def finish() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            app.state.in_flight -= 1
            metrics.in_flight.dec()
            if entry is not None:
                registry.release(entry)

        try:
            try:
                entry = await registry.acquire(name)
            except ModelUnavailable as exc:
                raise ApiError(503, str(exc), "loading" if exc.loading else "unavailable", {"Retry-After": "2"}) from None
            task = entry.task
            if task == "text-classification":
                response = await classify_text(entry, request)
            elif task == "image-classification":
                response = await classify_image(entry, request)
            else:
                response = await generate(entry, request, finish)
                handed_over = isinstance(response, ReleasingStream)
            status, error_type = response.status_code, None
            return response
        except ApiError as exc:
            status, error_type = exc.status, exc.error_type
            raise
        finally:
            if not handed_over:
                finish()
            metrics.requests.labels(label, str(status)).inc()
            if error_type:
                metrics.errors.labels(label, error_type).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - started)
            log.info("POST /models/%s task=%s status=%s %.1fms", name, task, status, (time.perf_counter() - started) * 1000)

    async def run_job(entry, payload, params, size=1):
        job = entry.worker.submit(payload, params, size=size)
        try:
            result = await job.future
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        except Exception as exc:
            error = job_error(exc)
            if error is None:
                raise
            raise error from None
        metrics.queue_seconds.labels(entry.name).observe(job.queue_ms / 1000)
        return result, job

    def timing_headers(job, started: float, name: str) -> dict:
        return {
            "x-queue-time": f"{job.queue_ms:.3f}",
            "x-inference-time": f"{job.inference_ms:.3f}",
            "x-total-time": f"{(time.perf_counter() - started) * 1000:.3f}",
            "x-model-name": name,
        }

    def check_request_chars(texts: list[str]) -> None:
        """Bound the tokenizing one request can cost (each input is cut to max_input_chars first)."""
        total = sum(min(len(t), settings.max_input_chars) for t in texts)
        if total > settings.max_request_chars:
            raise ApiError(413, f"inputs: {total} characters in this request after cutting each input to "
                                f"max_input_chars ({settings.max_input_chars}); at most max_request_chars "
                                f"({settings.max_request_chars}) per request", "payload_too_large")

    async def classify_text(entry, request: Request) -> Response:
        started = time.perf_counter()
        body = await read_json(request, schemas.TextClassificationRequest)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        if len(texts) > settings.max_batch_size:
            raise ApiError(422, f"inputs: at most {settings.max_batch_size} texts per request (max_batch_size)", "validation")
        check_request_chars(texts)
        result, job = await run_job(entry, texts, body.parameters, size=len(texts))
        # Always one list per input, also for a single string: the Inference API's shape, and what
        # InferenceClient.text_classification parses (it takes element [0]).
        return JSONResponse(result, headers=timing_headers(job, started, entry.name))

    async def classify_image(entry, request: Request) -> Response:
        started = time.perf_counter()
        raw, params = await read_image_request(request)
        budget = image_budget(entry.runner.processor, settings.max_image_memory_mb * 2**20)
        image = await asyncio.to_thread(decode_image, raw, settings.max_image_pixels, budget)
        result, job = await run_job(entry, image, params)
        return JSONResponse(result, headers=timing_headers(job, started, entry.name))

    async def generate(entry, request: Request, finish) -> Response:
        started = time.perf_counter()
        body = await read_json(request, schemas.TextGenerationRequest)
        p = body.parameters
        if p.max_new_tokens is not None and p.max_new_tokens > settings.max_new_tokens:
            raise ApiError(422, f"parameters.max_new_tokens: at most {settings.max_new_tokens} on this server", "validation")
        check_request_chars([body.inputs])
        if body.stream:
            return await stream_generation(entry, body, finish, metrics)
        result, job = await run_job(entry, body.inputs, p)
        metrics.generated_tokens.labels(entry.name).inc(len(result.tokens))
        out: dict[str, Any] = {"generated_text": result.generated_text}
        if p.details:
            out["details"] = {
                "finish_reason": result.finish_reason,
                "generated_tokens": len(result.tokens),
                "seed": result.seed,
                "prefill": result.prefill,
                "tokens": result.tokens,
            }
        return JSONResponse([out], headers=timing_headers(job, started, entry.name))

    install_openapi(app)
    return app


def __getattr__(name: str):
    # `uvicorn service.app:app` reads settings from the environment only when it asks for `app`.
    if name == "app":
        with contextlib.suppress(KeyError):
            return globals()["_app"]
        globals()["_app"] = create_app()
        return globals()["_app"]
    raise AttributeError(name)
