"""Request bodies -> validated schema objects: strict JSON. Every problem is an ApiError naming the field."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from .errors import ApiError, describe_validation

URL_INPUT = re.compile(r"^\s*[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def validate(model: type[BaseModel], data: Any, strict: bool = False) -> Any:
    """`model.model_validate`, with a 422 naming the fields on failure."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise ApiError(422, describe_validation(exc.errors()), "validation") from None


def _number(text: str) -> float | int:
    """A JSON number with a fraction or exponent: an int when its value is whole. JSON Schema (and so
    the OpenAPI document) counts 5.0 as an integer, and strict validation would refuse it for an
    int field; a float field takes the int as it is."""
    value = float(text)
    return int(value) if value.is_integer() else value


async def read_json_data(request: Request) -> Any:
    """The body as parsed JSON, or a 422 saying why it is not JSON."""
    body = await request.body()
    if not body:
        raise ApiError(422, "empty body: send JSON like {\"inputs\": ...}", "validation")
    try:
        return json.loads(body, parse_float=_number)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, f"body is not valid JSON ({exc})", "validation") from None
    except RecursionError:  # [[[[...]]]] nested deeper than the parser's stack
        raise ApiError(422, "body is not valid JSON (nested too deeply)", "validation") from None


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`; JSON has types, so validation is strict (0 is not false, "5" is not 5)."""
    return validate(model, await read_json_data(request), strict=True)
