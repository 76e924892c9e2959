"""What the OpenAPI document says beyond what FastAPI infers: the request bodies and responses of
POST /models/{name}, collected from every served task (service/tasks/), and our common error shape
for every error status."""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import schemas
from .tasks import TASKS


def ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


ERROR = {"model": schemas.ErrorResponse}
RETRY = {"headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}}
# What every route may answer besides its own codes: 401 when an API key is set; POST bodies can be
# too large (413) or too slow (408).
AUTH = {401: {**ERROR, "description": "Missing or wrong API key (only when one is configured)"}}
BODY = {408: {**ERROR, "description": "The body took longer than body_timeout_s"},
        413: {**ERROR, "description": "The body is larger than max_request_bytes"}}

READY_RESPONSES = {
    200: {"content": {"application/json": {"schema": {
        "type": "object", "required": ["status", "models"], "properties": {
            "status": {"type": "string", "enum": ["ready"]},
            "models": {"type": "object", "additionalProperties": {"type": "integer"},
                       "description": "How many models have each status"}}}}}},
    **AUTH, 503: {**ERROR, **RETRY, "description": "Models are still loading"},
}

def _inference_request() -> dict:
    content: dict = {"application/json": {"schema": {"oneOf": [ref(m) for t in TASKS.values() for m in t.json_requests]}}}
    for task in TASKS.values():
        content.update(task.other_request_content)
    return {"requestBody": {"required": True, "content": content}}


def _inference_responses() -> dict:
    content: dict = {"application/json": {"schema": {"anyOf": [t.response_schema for t in TASKS.values()]}}}
    for task in TASKS.values():
        content.update(task.stream_content)
    return {
        200: {"description": "; ".join(t.response_description for t in TASKS.values()), "content": content},
        **AUTH, **BODY,
        404: {**ERROR, "description": "No such model"},
        413: {**ERROR, "description": "The body is larger than max_request_bytes, or its text or image would cost more "
                                      "than max_request_chars / max_image_memory_mb"},
        415: {**ERROR, "description": "Not an image, or an image that does not decode"},
        422: {**ERROR, "description": "The body does not fit the model's task (the message names the field)"},
        429: {**ERROR, **RETRY, "description": "More than max_concurrent_requests in flight"},
        500: {**ERROR, "description": "The model failed on this input; the error id is in the server log"},
        503: {**ERROR, **RETRY, "description": "The model is loading, or its folder failed to load"},
    }


INFERENCE_REQUEST = _inference_request()
INFERENCE_RESPONSES = _inference_responses()


def install_openapi(app: FastAPI, extra_models: tuple[type[BaseModel], ...] = ()) -> None:
    """Generate the document once, with the request and response schemas of every task."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            models = [(m, "validation") for t in TASKS.values() for m in t.json_requests]
            models += [(m, "validation") for m in extra_models]
            models += [(m, "serialization") for m in dict.fromkeys(m for t in TASKS.values() for m in t.response_models)]
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
