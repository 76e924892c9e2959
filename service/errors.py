"""Every error the API answers: `{"error": message, "error_type": kind}` with a 4xx/5xx status,
never a stack trace."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("service")


class InputError(ValueError):
    """The caller's input cannot be processed (becomes a 422 naming `field`)."""

    def __init__(self, message: str, field: str = "inputs"):
        super().__init__(message)
        self.field = field


class ModelNotFound(LookupError):
    """No folder of that name is served (404)."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"Model {name!r} not found. Known models: {', '.join(known) or '(none)'}")


class ModelUnavailable(RuntimeError):
    """The model exists but cannot serve now: loading, or failed to load (503)."""

    def __init__(self, message: str, loading: bool):
        super().__init__(message)
        self.loading = loading


class InferenceFailed(RuntimeError):
    """The model raised; `error_id` is in the server log with the traceback."""

    def __init__(self, error_id: str):
        super().__init__(f"inference failed (error id {error_id})")
        self.error_id = error_id


class ApiError(Exception):
    """Becomes `{"error", "error_type"}` with `status`."""

    def __init__(self, status: int, message: str, error_type: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers = status, message, error_type, headers


# OpenAI's error "type" for our statuses (the openai client reads `error.message`, `type`, `code`, `param`).
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_response(status: int, message: str, error_type: str, headers: dict | None = None,
                   path: str = "") -> JSONResponse:
    """`{"error", "error_type"}`, or on the OpenAI routes (/v1/...) OpenAI's
    `{"error": {"message", "type", "param", "code"}}`."""
    if path.startswith("/v1/"):
        kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        field, sep, _ = message.partition(": ")
        param = field if sep and " " not in field else None  # "messages.0.role: ..." names the field
        code = "model_not_found" if error_type == "not_found" and "Model" in message else error_type
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return JSONResponse(body, status_code=status, headers=headers)
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


def job_error(exc: BaseException) -> ApiError | None:
    """The API error for what a model worker raised: bad input (422) or a failing model (500)."""
    if isinstance(exc, InputError):
        return ApiError(422, f"{exc.field}: {exc}", "validation")
    if isinstance(exc, InferenceFailed):
        return ApiError(500, f"the model failed on this input (error id {exc.error_id})", "inference")
    from .torch_thread import TorchTaskHung

    if isinstance(exc, TorchTaskHung):
        return ApiError(504, f"{exc}; the model is being reloaded", "timeout")
    return None


def as_api_error(exc: BaseException) -> ApiError | None:
    """Our own exceptions as the API error they become; None for anything else (a 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ModelNotFound):
        return ApiError(404, str(exc), "not_found")
    if isinstance(exc, ModelUnavailable):
        return ApiError(503, str(exc), "loading" if exc.loading else "unavailable", {"Retry-After": "2"})
    if isinstance(exc, RequestValidationError):
        return ApiError(422, describe_validation(exc.errors()), "validation")
    return job_error(exc)


def allowed_methods(routes, path: str) -> list[str]:
    """Every method some route serves at `path` (routers included without a prefix are walked)."""
    methods: set[str] = set()
    for route in routes:
        if hasattr(route, "original_router"):
            methods.update(allowed_methods(route.original_router.routes, path))
        elif getattr(route, "methods", None) and route.path_regex.match(path):
            methods.update(route.methods)
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Map our errors, FastAPI's validation errors, HTTP errors and anything unexpected to the common shape."""

    async def _ours(request: Request, exc: Exception):
        error = as_api_error(exc)
        return error_response(error.status, error.message, error.error_type, error.headers, request.url.path)

    for kind in (ApiError, ModelNotFound, ModelUnavailable):
        app.add_exception_handler(kind, _ours)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(422, describe_validation(exc.errors()), "validation", path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names the first matching route's methods only
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request.app.routes, request.url.path))}
        return error_response(exc.status_code, str(exc.detail), kind, headers, request.url.path)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        error_id = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error (error id {error_id})", "internal", path=request.url.path)
