"""Dependencies shared by the routes, as `Annotated` aliases: the app's settings, registry and
metrics; the API key check; and, for inference, one request's record, admission and model lease.

An inference request holds `serving(name)` until its response has been sent (streams included):
its record (metrics, the log line), its admission slot (404 for an unknown model, 429 over
max_concurrent_requests) and its model's lease (503 while loading or failed).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from ..errors import ApiError, ModelNotFound, as_api_error
from ..metrics import Metrics
from ..registry import Entry, Registry
from ..settings import Settings

log = logging.getLogger("service")
# Open even with an API key: liveness and readiness (what probes ask; no model data), and static
# pages that hold no model or request data (the playground asks for the key itself; the OpenAPI
# document names the models only to a caller who sent the key).
PUBLIC_PATHS = {"/health", "/v2/health/live", "/v2/health/ready", "/", "/docs", "/docs/oauth2-redirect",
                "/openapi.json", "/redoc"}


# async on purpose: FastAPI runs a plain `def` dependency on its thread pool, a round trip to a worker
# thread and back for each one, on every request (two of them cost a lone request a quarter of its
# latency: docs/performance.md, Serving). Dependencies that do not block are `async def` here.
async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _registry(request: Request) -> Registry:
    return request.app.state.registry


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[Registry, Depends(_registry)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]


def may_see_models(request: Request, settings: Settings) -> bool:
    """No API key is set, or the request carries it (`Authorization: Bearer <key>`)."""
    if settings.api_key is None:
        return True
    expected = settings.api_key.get_secret_value().encode()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With an API key set, every route but PUBLIC_PATHS needs `Authorization: Bearer <key>`."""
    if request.url.path in PUBLIC_PATHS:
        return
    if not may_see_models(request, settings):
        raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)", "unauthorized",
                       {"WWW-Authenticate": "Bearer"})


@dataclass
class InferenceRecord:
    """What the metrics and the log line say about one inference request."""

    name: str
    label: str  # the model name, or "unknown" (label values stay bounded)
    status: int = 200
    error_type: str | None = None
    task: str | None = None
    started: float = field(default_factory=time.perf_counter)


@contextlib.asynccontextmanager
async def serving(name: str, request: Request) -> AsyncIterator[Entry]:
    """One inference request on model `name`: its record (metrics and the log line, written when the
    block ends), admission (404 for an unknown model, then 429 over max_concurrent_requests) and the
    model's lease (503 while loading or failed). Routes hold it until the response has been sent."""
    state = request.app.state
    registry, settings, metrics = state.registry, state.settings, state.metrics
    record = InferenceRecord(name, name if name in registry.entries else "unknown")
    try:
        if name not in registry.entries:
            raise ModelNotFound(name, registry.names())
        if state.in_flight >= settings.max_concurrent_requests:
            metrics.rejected.inc()
            raise ApiError(429, f"server is at max_concurrent_requests ({settings.max_concurrent_requests}); retry later",
                           "overloaded", {"Retry-After": "1"})
        state.in_flight += 1
        metrics.in_flight.inc()
        try:
            async with registry.lease(name) as entry:
                record.task = entry.task
                yield entry
        finally:
            state.in_flight -= 1
            metrics.in_flight.dec()
    except Exception as exc:
        error = as_api_error(exc)
        record.status, record.error_type = (error.status, error.error_type) if error else (500, "internal")
        raise
    finally:
        elapsed = time.perf_counter() - record.started
        metrics.requests.labels(record.label, str(record.status)).inc()
        if record.error_type:
            metrics.errors.labels(record.label, record.error_type).inc()
        metrics.latency.labels(record.label).observe(elapsed)
        log.info("%s %s model=%s task=%s status=%s %.1fms", request.method, request.url.path, name, record.task,
                 record.status, elapsed * 1000)

