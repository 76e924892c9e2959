"""Operations: liveness, readiness, Prometheus metrics, reload, and the playground page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from ..errors import error_response
from ..openapi_doc import AUTH, BODY, ERROR, READY_RESPONSES, RETRY
from .deps import MetricsDep, RegistryDep

STATIC = Path(__file__).resolve().parents[1] / "static"
router = APIRouter()


@router.get("/health", tags=["ops"], summary="Alive (no auth)")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", tags=["ops"], summary="All models found at startup are loaded (or failed)",
            responses=READY_RESPONSES)
async def ready(registry: RegistryDep):
    if not registry.ready:
        return error_response(503, "models are loading", "loading", {"Retry-After": "1"})
    counts: dict[str, int] = {}
    for entry in registry.entries.values():
        counts[entry.status] = counts.get(entry.status, 0) + 1
    return {"status": "ready", "models": counts}


@router.get("/v2/health/live", tags=["ops"], summary="KServe Open Inference Protocol: the server is alive (no auth)")
async def v2_live() -> dict:
    return {"live": True}


@router.get("/v2/health/ready", tags=["ops"], summary="KServe Open Inference Protocol: every model found at startup "
            "is loaded, or failed (no auth)", responses={503: {**ERROR, **RETRY, "description": "Models are loading"}})
async def v2_ready(registry: RegistryDep):
    if not registry.ready:
        return error_response(503, "models are loading", "loading", {"Retry-After": "1"})
    return {"ready": True}


@router.get("/v2/models/{name}/ready", tags=["ops"], summary="KServe Open Inference Protocol: this model is loaded "
            "and answered its warm-up input", responses={**AUTH, 404: {**ERROR, "description": "No such model"},
                                                          503: {**ERROR, **RETRY, "description": "Not ready (loading, failed)"}})
async def v2_model_ready(name: str, registry: RegistryDep):
    entry = registry.get(name)
    if entry.status != "ready":
        return error_response(503, f"model {name!r} is {entry.status}" + (f": {entry.error}" if entry.error else ""),
                              "unavailable", {"Retry-After": "2"})
    return {"name": name, "ready": True}


@router.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}, **AUTH})
async def prometheus(metrics: MetricsDep):
    return Response(metrics.render(), media_type=metrics.content_type)


@router.post("/admin/reload", tags=["ops"], summary="Rescan models_dir now; returns what changed", responses={**AUTH, **BODY})
async def reload(registry: RegistryDep) -> dict:
    return await registry.scan()


@router.get("/", include_in_schema=False)
async def playground():
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))
