"""What the OpenAPI document says beyond what FastAPI infers: the request bodies and responses of
POST /models/{name}, collected from every served task (service/tasks/), one path per served model
(the bodies a model takes depend on its task), the server's caps as schema limits, and our common
error shape for every error status."""

from __future__ import annotations

import copy
import json
import re

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import schemas
from .registry import Registry
from .routes.deps import may_see_models
from .settings import Settings
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

def task_request(tasks) -> dict:
    """The request bodies `tasks` take (all of them: the template path; one: a model's own path)."""
    content: dict = {"application/json": {"schema": {"oneOf": [ref(m) for t in tasks for m in t.json_requests]}}}
    for task in tasks:
        content.update(task.other_request_content)
    return {"requestBody": {"required": True, "content": content}}


def task_responses(tasks) -> dict:
    """What POST /models/<name> answers for a model of one of `tasks`."""
    content: dict = {"application/json": {"schema": {"anyOf": [t.response_schema for t in tasks]}}}
    for task in tasks:
        content.update(task.stream_content)
    extra = {code: {**ERROR, "description": text} for t in tasks for code, text in t.error_responses.items()}
    return {
        200: {"description": "; ".join(t.response_description for t in tasks), "content": content},
        **AUTH, **BODY,
        404: {**ERROR, "description": "No such model"},
        413: {**ERROR, "description": "The body is larger than max_request_bytes, or its text or image would cost more "
                                      "than max_request_chars / max_image_memory_mb"},
        422: {**ERROR, "description": "The body does not fit the model's task (the message names the field)"},
        429: {**ERROR, **RETRY, "description": "More than max_concurrent_requests in flight"},
        500: {**ERROR, "description": "The model failed on this input; the error id is in the server log"},
        503: {**ERROR, **RETRY, "description": "The model is loading, or its folder failed to load"},
        **extra,
    }


def _inference_request() -> dict:
    return task_request(TASKS.values())


def _inference_responses() -> dict:
    return task_responses(TASKS.values())


INFERENCE_REQUEST = _inference_request()
INFERENCE_RESPONSES = _inference_responses()


def _constrain(schema: dict, keywords: dict) -> None:
    """Add `keywords` (maximum, maxItems, ...) to a property schema, or to those of its anyOf
    branches they apply to (`int | None` is anyOf integer / null)."""
    kind = {"maximum": ("integer", "number"), "maxItems": ("array",)}
    branches = schema.get("anyOf", [schema])
    for branch in branches:
        for key, value in keywords.items():
            if branch.get("type") in kind.get(key, (branch.get("type"),)):
                branch[key] = value


def apply_limits(components: dict, limits: dict[str, dict[str, dict]]) -> None:
    """The server's own caps (settings) in the request schemas: {schema: {property: keywords}}. A
    value over a cap is then invalid by the document, as the server's 422 says."""
    for name, properties in limits.items():
        for prop, keywords in properties.items():
            _constrain(components[name]["properties"][prop], keywords)


def _constrained_request(task, constraints: dict[str, dict[str, dict]]) -> dict:
    """The task's request bodies, with one model's own constraints on top (allOf)."""
    request = task_request([task])
    json_body = request["requestBody"]["content"]["application/json"]["schema"]
    json_body["oneOf"] = [
        {"allOf": [option, {"properties": constraints[name]}]} if (name := option["$ref"].split("/")[-1]) in constraints
        else option for option in json_body["oneOf"]]
    return request


def model_paths(spec: dict, entries: list[tuple[str, str | None, dict]]) -> dict:
    """The document for one set of served models: /models/{name} is replaced by one path per model
    (GET its details, POST exactly the bodies of its task), since the body a name takes depends on
    the model: a template path would document a multipart upload as valid for a text model.
    `entries` are (name, task, constraints) of the registry's folders, constraints being what the
    loaded model adds (ServedTask.model_constraints); a folder of unknown task keeps the template's
    bodies (it answers 503 until it loads)."""
    if not entries:  # nothing served: every name is a 404, which the template says
        return spec
    spec = copy.deepcopy(spec)
    template = spec["paths"].pop("/models/{name}")
    paths = {}
    for name, task, constraints in sorted(entries, key=lambda e: e[0]):
        item = {}
        for method, operation in template.items():
            operation = copy.deepcopy(operation)
            operation["parameters"] = [p for p in operation.get("parameters", []) if p.get("name") != "name"]
            if not operation["parameters"]:
                del operation["parameters"]
            operation["operationId"] = f"{operation['operationId']}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"
            if method == "post" and task in TASKS:
                operation.update(_constrained_request(TASKS[task], constraints))
                operation["responses"] = _responses_json(task_responses([TASKS[task]]))
                operation["tags"] = ["inference", task]
                operation["summary"] = f"Run {name} ({task})"
            paths[f"/models/{name}"] = item
            item[method] = operation
    # Concrete paths first, as a router matches them; then the rest in FastAPI's order.
    rest = spec["paths"]
    spec["paths"] = {}
    for path, item in rest.items():
        if path.startswith("/models/{name}/") and paths:
            spec["paths"].update(paths)
            paths = {}
        spec["paths"][path] = item
    spec["paths"].update(paths)
    return spec


def _responses_json(responses: dict) -> dict:
    """FastAPI-style `responses` (a model per code) -> the document's JSON (a $ref per code)."""
    out = {}
    for code, response in responses.items():
        response = dict(response)
        model = response.pop("model", None)
        if model is not None:
            response.setdefault("content", {})["application/json"] = {"schema": ref(model)}
        out[str(code)] = response
    return out


def inference_operation() -> dict:
    """POST /models/{name} as FastAPI would document it (its route is a plain Starlette one:
    service/routes/inference.py), bodies and responses of every task."""
    return {
        "tags": ["inference"],
        "summary": "Run a model (Inference API shapes: body and response depend on the model's task)",
        "operationId": "infer_models__name__post",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string", "title": "Name"}}],
        "responses": _responses_json(INFERENCE_RESPONSES),
        **copy.deepcopy(INFERENCE_REQUEST),
    }


def install_openapi(app: FastAPI, settings: Settings, registry: Registry, extra_models: tuple[type[BaseModel], ...] = (),
                    extra_limits: dict[str, dict[str, dict]] | None = None) -> None:
    """Generate the document with the request and response schemas of every task and the server's
    caps, and serve /openapi.json: to a caller who may see the models (no API key set, or the right
    key sent) with one path per served model (`model_paths`); to anyone else the template path only,
    which names no model."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            spec["paths"].setdefault("/models/{name}", {})["post"] = inference_operation()
            models = [(m, "validation") for t in TASKS.values() for m in t.json_requests]
            models += [(m, "validation") for m in extra_models]
            models += [(m, "serialization") for m in dict.fromkeys(m for t in TASKS.values() for m in t.response_models)]
            _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.get("$defs", {}))
            limits = dict(extra_limits or {})
            for task in TASKS.values():
                limits.update(task.schema_limits(settings))
            apply_limits(components, limits)
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

    cache: dict[str, dict] = {}

    def live_openapi() -> dict:
        entries = [(e.name, e.task, TASKS[e.task].model_constraints(e.runner) if e.task in TASKS and e.runner else {})
                   for e in registry.entries.values()]
        key = json.dumps(sorted(entries, key=lambda e: e[0]))
        if key not in cache:
            cache.clear()  # one document per set of models: it changes when a folder does
            cache[key] = model_paths(openapi(), entries)
        return cache[key]

    app.openapi = openapi  # type: ignore[method-assign]
    # FastAPI's own /openapi.json route cannot see the request: replace it.
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != app.openapi_url]

    @app.get(app.openapi_url, include_in_schema=False)
    async def openapi_json(request: Request) -> JSONResponse:
        return JSONResponse(live_openapi() if may_see_models(request, settings) else openapi())
