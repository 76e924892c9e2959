"""POST /models/{name}: the Inference API URL shape. The model's task (service/tasks/) parses the
body, runs it through the model's batcher and formats the response; this route only leases the
model (service/routes/deps.py) and hands over."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..openapi_doc import INFERENCE_REQUEST, INFERENCE_RESPONSES
from ..tasks import TASKS, Call
from .deps import LeasedModel, MetricsDep, SettingsDep

router = APIRouter()


@router.post(
    "/models/{name}", tags=["inference"], openapi_extra=INFERENCE_REQUEST, response_class=JSONResponse,
    summary="Run a model (Inference API shapes: body and response depend on the model's task)",
    responses=INFERENCE_RESPONSES,
)
async def infer(name: str, request: Request, entry: LeasedModel, settings: SettingsDep, metrics: MetricsDep) -> Response:
    call = Call(entry.name, entry.runner, entry.worker, settings, metrics)
    return await TASKS[entry.task].handle(request, call)
