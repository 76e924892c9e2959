"""Request bodies -> validated schema objects: strict JSON, and the three ways to send an image
(raw bytes, base64 in JSON, multipart upload). Every problem is an ApiError naming the field."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import schemas
from .errors import ApiError, describe_validation

URL_INPUT = re.compile(r"^\s*[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def validate(model: type[BaseModel], data: Any, strict: bool = False) -> Any:
    """`model.model_validate`, with a 422 naming the fields on failure."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise ApiError(422, describe_validation(exc.errors()), "validation") from None


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`; JSON has types, so validation is strict (0 is not false, "5" is not 5)."""
    body = await request.body()
    if not body:
        raise ApiError(422, "empty body: send JSON like {\"inputs\": ...}", "validation")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, f"body is not valid JSON ({exc})", "validation") from None
    except RecursionError:  # [[[[...]]]] nested deeper than the parser's stack
        raise ApiError(422, "body is not valid JSON (nested too deeply)", "validation") from None
    return validate(model, data, strict=True)


async def read_image_request(request: Request) -> tuple[bytes, schemas.ClassificationParameters]:
    """(image bytes, parameters) from raw image bytes, JSON with base64 `inputs`, or multipart."""
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
        raw, params = await _read_multipart(request)
    elif content_type in ("", "application/octet-stream") or content_type.startswith("image/"):
        raw = await request.body()
    else:
        raise ApiError(415, f"unsupported content type {content_type!r}: send an image (image/*), "
                            "JSON with base64 'inputs', or a multipart upload", "unsupported_media_type")
    if not raw:
        raise ApiError(422, "inputs: empty image", "validation")
    return raw, params


async def _read_multipart(request: Request) -> tuple[bytes, schemas.ClassificationParameters]:
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
    return raw, validate(schemas.ClassificationParameters, fields)
