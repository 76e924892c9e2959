"""The FastAPI app: factory, lifespan and thin routes.

    uvicorn service.app:app          (settings from HF_SERVE_* env vars)
    hf-serve --models-dir models     (the same, with CLI flags)

Data flow of POST /models/{name}: body -> schema (service/schemas.py) -> registry entry
(service/registry.py) -> the model's batcher (service/batching.py) -> task runner
(service/pipelines.py) -> JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import re
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import schemas
from .batching import InferenceFailed
from .memory import limit_arenas, trim_periodically
from .metrics import Metrics
from .pipelines import InputError
from .registry import ModelNotFound, ModelUnavailable, Registry
from .settings import Settings

log = logging.getLogger("service")
STATIC = Path(__file__).parent / "static"
# Open even with an API key: liveness, and static pages that hold no model or request data (the
# playground asks for the key itself; the OpenAPI document is the same for every deployment).
PUBLIC_PATHS = {"/health", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}
URL_INPUT = re.compile(r"^\s*[a-z][a-z0-9+.-]*://", re.IGNORECASE)


class ApiError(Exception):
    """Becomes `{"error", "error_type"}` with `status`."""

    def __init__(self, status: int, message: str, error_type: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers = status, message, error_type, headers


def error_response(status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}


def describe_validation(errors: list[dict]) -> str:
    """Pydantic errors -> "parameters.top_k: Input should be greater than or equal to 1; ..."."""
    parts = []
    for err in errors[:5]:
        # drop "body" and the union-member tags pydantic adds ("str", "list[str]", "function-after[...]")
        loc = ".".join(str(p) for p in err.get("loc", ())
                       if p != "body" and not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))) or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413: by Content-Length (before reading any of it), and by
    counting streamed bytes; refuse bodies that take longer than `timeout` seconds with 408.

    The body is read here (bounded by the limit and the timeout) and replayed to the app, so the app
    never sees more than `limit` bytes and a slow client never holds a model or a concurrency slot.
    """

    def __init__(self, app, limit: int, timeout: float = 60.0):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        too_large = error_response(413, f"request body is larger than {self.limit} bytes", "payload_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                slow = error_response(408, f"the request body took longer than {self.timeout:g}s to arrive",
                                      "request_timeout", {"Connection": "close"})
                return await slow(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class _Stream(StreamingResponse):
    """A streaming response that frees its model and concurrency slot however the stream ends."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


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
            import torch

            torch.set_num_threads(settings.torch_threads)
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

    # -- errors: always {"error", "error_type"}, never a stack trace ------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.error_type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(422, describe_validation(exc.errors()), "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        return error_response(exc.status_code, str(exc.detail), kind, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        error_id = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error (error id {error_id})", "internal")

    err = {"model": schemas.ErrorResponse}
    retry = {"headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}}
    # What every route may answer besides its own codes: 401 when an API key is set; POST bodies
    # can be too large (413) or too slow (408).
    auth = {401: {**err, "description": "Missing or wrong API key (only when one is configured)"}}
    body = {408: {**err, "description": "The body took longer than body_timeout_s"},
            413: {**err, "description": "The body is larger than max_request_bytes"}}

    # -- plain routes ----------------------------------------------------------------------------
    @app.get("/health", tags=["ops"], summary="Alive (no auth)")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], summary="All models found at startup are loaded (or failed)",
             responses={200: {"content": {"application/json": {"schema": {
                 "type": "object", "required": ["status", "models"], "properties": {
                     "status": {"type": "string", "enum": ["ready"]},
                     "models": {"type": "object", "additionalProperties": {"type": "integer"},
                                "description": "How many models have each status"}}}}}},
                        **auth, 503: {**err, **retry, "description": "Models are still loading"}})
    async def ready():
        if not registry.ready:
            return error_response(503, "models are loading", "loading", {"Retry-After": "1"})
        counts: dict[str, int] = {}
        for entry in registry.entries.values():
            counts[entry.status] = counts.get(entry.status, 0) + 1
        return {"status": "ready", "models": counts}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}, **auth})
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/models", tags=["models"], summary="Every model folder: status, task, card metadata", responses={**auth})
    async def list_models() -> schemas.ModelList:
        return schemas.ModelList(models=[schemas.ModelInfo(**d) for d in registry.describe()])

    @app.get("/models/{name}", tags=["models"], summary="One model: labels, card metadata, eval metrics",
             responses={**auth, 404: {**err, "description": "No such model"}})
    async def get_model(name: str) -> schemas.ModelInfo:
        try:
            return schemas.ModelInfo(**registry.get(name).describe())
        except ModelNotFound as exc:
            raise ApiError(404, str(exc), "not_found") from None

    @app.post("/admin/reload", tags=["ops"], summary="Rescan models_dir now; returns what changed", responses={**auth, **body})
    async def reload() -> dict:
        return await registry.scan()

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    # -- inference --------------------------------------------------------------------------------
    def ref(model: type[BaseModel]) -> dict:
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    request_body_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"oneOf": [
                    ref(schemas.TextClassificationRequest), ref(schemas.TextGenerationRequest),
                    ref(schemas.ImageClassificationRequest),
                ]}},
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {"schema": {"type": "object", "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "parameters": {"type": "string", "description": "JSON of the parameters"},
                    "top_k": {"type": "string"},
                    "function_to_apply": {"type": "string"},
                }}},
            },
        }
    }
    classification = {"type": "array", "items": ref(schemas.ClassificationOutput)}
    inference_responses = {
        200: {
            "description": "text-classification: one list of labels per input; image-classification: one list of "
                           "labels; text-generation: one generated text, or server-sent events with `stream`",
            "content": {
                "application/json": {"schema": {"anyOf": [
                    {"type": "array", "items": classification, "title": "TextClassificationOutput"},
                    {**classification, "title": "ImageClassificationOutput"},
                    {"type": "array", "items": ref(schemas.GenerationOutput), "title": "TextGenerationOutput"},
                ]}},
                "text/event-stream": {"schema": {
                    "type": "object", "required": ["data"],
                    "properties": {"data": {"type": "string", "contentMediaType": "application/json",
                                            "description": "JSON: {index, token, top_tokens, generated_text, "
                                                           "details} as TGI's /generate_stream, or {error, error_type}"}},
                }, "description": "One server-sent event per token"},
            },
        },
        **auth, **body,
        404: {**err, "description": "No such model"},
        415: {**err, "description": "Not an image, or an image that does not decode"},
        422: {**err, "description": "The body does not fit the model's task (the message names the field)"},
        429: {**err, **retry, "description": "More than max_concurrent_requests in flight"},
        500: {**err, "description": "The model failed on this input; the error id is in the server log"},
        503: {**err, **retry, "description": "The model is loading, or its folder failed to load"},
    }

    @app.post(
        "/models/{name}", tags=["inference"], openapi_extra=request_body_doc, response_class=JSONResponse,
        summary="Run a model (Inference API shapes: body and response depend on the model's task)",
        responses=inference_responses,
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
                handed_over = isinstance(response, _Stream)
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

    async def read_json(request: Request, model: type[BaseModel]) -> Any:
        body = await request.body()
        if not body:
            raise ApiError(422, "empty body: send JSON like {\"inputs\": ...}", "validation")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(422, f"body is not valid JSON ({exc})", "validation") from None
        except RecursionError:  # [[[[...]]]] nested deeper than the parser's stack
            raise ApiError(422, "body is not valid JSON (nested too deeply)", "validation") from None
        return validate(model, data, strict=True)  # JSON has types: 0 is not false, "5" is not 5

    def validate(model: type[BaseModel], data: Any, strict: bool = False) -> Any:
        try:
            return model.model_validate(data, strict=strict)
        except ValidationError as exc:
            raise ApiError(422, describe_validation(exc.errors()), "validation") from None

    async def run_job(entry, payload, params, size=1, emit=None):
        job = entry.worker.submit(payload, params, size=size, emit=emit)
        try:
            result = await job.future
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        except InputError as exc:
            raise ApiError(422, f"{exc.field}: {exc}", "validation") from None
        except InferenceFailed as exc:
            raise ApiError(500, f"the model failed on this input (error id {exc.error_id})", "inference") from None
        metrics.queue_seconds.labels(entry.name).observe(job.queue_ms / 1000)
        return result, job

    def timing_headers(job, started: float, name: str) -> dict:
        return {
            "x-queue-time": f"{job.queue_ms:.3f}",
            "x-inference-time": f"{job.inference_ms:.3f}",
            "x-total-time": f"{(time.perf_counter() - started) * 1000:.3f}",
            "x-model-name": name,
        }

    async def classify_text(entry, request: Request) -> Response:
        started = time.perf_counter()
        body = await read_json(request, schemas.TextClassificationRequest)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        if len(texts) > settings.max_batch_size:
            raise ApiError(422, f"inputs: at most {settings.max_batch_size} texts per request (max_batch_size)", "validation")
        result, job = await run_job(entry, texts, body.parameters, size=len(texts))
        # Always one list per input, also for a single string: the Inference API's shape, and what
        # InferenceClient.text_classification parses (it takes element [0]).
        return JSONResponse(result, headers=timing_headers(job, started, entry.name))

    async def classify_image(entry, request: Request) -> Response:
        started = time.perf_counter()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        params = schemas.ClassificationParameters()
        if content_type == "application/json":
            body = await read_json(request, schemas.ImageClassificationRequest)
            params = body.parameters
            data = body.inputs
            if URL_INPUT.match(data):  # never fetched: the server makes no outgoing requests
                raise ApiError(422, "inputs: URLs are not fetched by this server; send the image itself "
                                    "(raw bytes, base64 in 'inputs', or a multipart upload)", "validation")
            if data.startswith("data:"):
                data = data.partition(",")[2]
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(422, "inputs: not valid base64", "validation") from None
        elif content_type == "multipart/form-data":
            try:
                form = await request.form(max_files=4, max_fields=16)
            except StarletteHTTPException as exc:  # malformed multipart, too many parts
                raise ApiError(422, f"multipart body: {exc.detail}", "validation") from None
            files = [v for v in form.values() if hasattr(v, "read")]
            if len(files) != 1:
                raise ApiError(422, "multipart body: send exactly one file field (e.g. 'file')", "validation")
            raw = await files[0].read()
            fields: dict[str, Any] = {}
            if "parameters" in form:
                try:
                    fields = json.loads(str(form["parameters"]))
                except (ValueError, RecursionError):
                    raise ApiError(422, "parameters: not valid JSON", "validation") from None
                if not isinstance(fields, dict):
                    raise ApiError(422, "parameters: must be a JSON object", "validation")
            for key in ("top_k", "function_to_apply"):
                if key in form:
                    fields[key] = str(form[key])
            params = validate(schemas.ClassificationParameters, fields)
        elif content_type in ("", "application/octet-stream") or content_type.startswith("image/"):
            raw = await request.body()
        else:
            raise ApiError(415, f"unsupported content type {content_type!r}: send an image (image/*), "
                                "JSON with base64 'inputs', or a multipart upload", "unsupported_media_type")
        if not raw:
            raise ApiError(422, "inputs: empty image", "validation")
        image = await asyncio.to_thread(decode_image, raw, settings.max_image_pixels)
        result, job = await run_job(entry, image, params)
        return JSONResponse(result, headers=timing_headers(job, started, entry.name))

    async def generate(entry, request: Request, finish) -> Response:
        started = time.perf_counter()
        body = await read_json(request, schemas.TextGenerationRequest)
        p = body.parameters
        if p.max_new_tokens is not None and p.max_new_tokens > settings.max_new_tokens:
            raise ApiError(422, f"parameters.max_new_tokens: at most {settings.max_new_tokens} on this server", "validation")
        if not body.stream:
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
        return await generate_stream(entry, body, finish, started)

    async def generate_stream(entry, body, finish, started: float) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        done = object()
        job = entry.worker.submit(body.inputs, body.parameters, emit=lambda tok: loop.call_soon_threadsafe(events.put_nowait, tok))
        job.future.add_done_callback(lambda _f: events.put_nowait(done))
        try:
            first = await events.get()  # wait for the first token, so that input errors still get a 4xx
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        if first is done:
            await run_job_result(job)  # raises the right ApiError
            first = None

        def sse(obj: dict) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()

        async def stream():
            try:
                previous, index = first, 0
                while previous is not None:
                    item = await events.get()
                    if item is done:
                        try:
                            result = job.future.result()
                        except InferenceFailed as exc:
                            yield sse({"error": f"generation failed (error id {exc.error_id})", "error_type": "generation"})
                            return
                        except InputError as exc:
                            yield sse({"error": str(exc), "error_type": "validation"})
                            return
                        metrics.generated_tokens.labels(entry.name).inc(len(result.tokens))
                        index += 1
                        yield sse({"index": index, "token": previous, "top_tokens": None,
                                   "generated_text": result.generated_text,
                                   "details": {"finish_reason": result.finish_reason, "generated_tokens": len(result.tokens),
                                               "seed": result.seed, "input_length": result.input_length}})
                        return
                    index += 1
                    yield sse({"index": index, "token": previous, "top_tokens": None, "generated_text": None, "details": None})
                    previous = item
            finally:
                job.cancel.set()  # a client that went away stops the generation

        headers = {
            "x-queue-time": f"{job.queue_ms:.3f}",
            "x-inference-time": f"{(time.perf_counter() - job.started) * 1000:.3f}" if job.started else "0",
            "x-model-name": entry.name,
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
        }
        return _Stream(stream(), on_close=finish, media_type="text/event-stream", headers=headers)

    async def run_job_result(job):
        try:
            return job.future.result()
        except InputError as exc:
            raise ApiError(422, f"{exc.field}: {exc}", "validation") from None
        except InferenceFailed as exc:
            raise ApiError(500, f"the model failed on this input (error id {exc.error_id})", "inference") from None

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            models = [(m, "validation") for m in (schemas.TextClassificationRequest, schemas.TextGenerationRequest,
                                                   schemas.ImageClassificationRequest)]
            models += [(m, "serialization") for m in (schemas.ClassificationOutput, schemas.GenerationOutput)]
            _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.get("$defs", {}))
            # FastAPI documents its own 422 body; ours is the common {"error", "error_type"}.
            for operations in spec["paths"].values():
                for operation in operations.values():
                    response = operation.get("responses", {}).get("422")
                    if response and "HTTPValidationError" in json.dumps(response):
                        response["content"] = {"application/json": {"schema": ref(schemas.ErrorResponse)}}
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def decode_image(raw: bytes, max_pixels: int = 40_000_000):
    """Bytes -> an RGB PIL image, refusing what is not one plain picture of a sane size.

    The size comes from the header (`Image.open` reads no pixels), so a decompression bomb is refused
    before any pixel is decoded. Animated images are refused; other modes (CMYK, 16-bit, palette,
    alpha) are converted to 8-bit RGB here, off the event loop.
    """
    from PIL import Image

    def unsupported(what: str) -> ApiError:
        return ApiError(415, f"could not decode the image ({what})", "unsupported_media_type")

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ApiError(413, f"image dimensions exceed {max_pixels} pixels (max_image_pixels)",
                           "payload_too_large") from None
        except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, struct.error, ...) on garbage
            raise unsupported(type(exc).__name__) from None
        width, height = image.size
        if width * height > max_pixels:
            raise ApiError(413, f"image is {width}x{height} = {width * height} pixels, more than max_image_pixels "
                                f"({max_pixels})", "payload_too_large")
        if width == 0 or height == 0:
            raise unsupported("empty image")
        if getattr(image, "is_animated", False):
            raise ApiError(422, f"inputs: animated {image.format} images are not supported; send a single frame",
                           "validation")
        try:
            image.load()
            return _to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ApiError(413, f"image dimensions exceed {max_pixels} pixels (max_image_pixels)",
                           "payload_too_large") from None
        except Exception as exc:
            reason = "truncated or corrupt image data" if isinstance(exc, OSError) else type(exc).__name__
            raise unsupported(f"{image.format or 'unknown format'}: {reason}") from None


def _to_rgb(image):
    """8-bit RGB from any PIL mode; 16/32-bit integer images are scaled, not clipped."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # I;16, I;16B, I (16-bit PNG / TIFF)
        import numpy as np

        pixels = np.asarray(image).astype(np.float64)
        top = 65535.0 if pixels.max(initial=0) > 255 else 255.0
        gray = (pixels / top * 255.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "F":
        import numpy as np

        gray = np.nan_to_num(np.asarray(image, dtype=np.float64)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, LA, PA, RGBA, CMYK, YCbCr, LAB, HSV


def __getattr__(name: str):
    # `uvicorn service.app:app` reads settings from the environment only when it asks for `app`.
    if name == "app":
        with contextlib.suppress(KeyError):
            return globals()["_app"]
        globals()["_app"] = create_app()
        return globals()["_app"]
    raise AttributeError(name)
