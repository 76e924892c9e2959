"""Images in requests, for any image task: the three ways to send one (raw bytes, base64 in JSON,
multipart), bytes -> one RGB PIL image (refusing anything that is not a plain picture of a sane
size), and what an image will cost once a model's image processor has resized it (known from the
header, before a pixel is decoded)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from collections.abc import Callable
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError
from .request_parsing import URL_INPUT, read_json, validate

# The formats people send to an image model (the JPEG opener also reads phones' multi-picture MPO
# files). Never EPS or PDF: their PIL plugins run Ghostscript when it is installed.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def decode_image(raw: bytes, max_pixels: int = 40_000_000, check_size: Callable[[int, int], None] | None = None):
    """Bytes -> an RGB PIL image, refusing what is not one plain picture of a sane size.

    The size comes from the header (`Image.open` reads no pixels), so a decompression bomb, or an image
    that `check_size(width, height)` refuses (what the model's processor would make of it), is refused
    before any pixel is decoded. Only ALLOWED_FORMATS are opened. Animated images are refused; other
    modes (CMYK, 16-bit, palette, alpha) are converted to 8-bit RGB here, off the event loop.
    """
    from PIL import Image

    def unsupported(what: str) -> ApiError:
        return ApiError(415, f"could not decode the image ({what})", "unsupported_media_type")

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ApiError(413, f"image dimensions exceed {max_pixels} pixels (max_image_pixels)",
                           "payload_too_large") from None
        except Image.UnidentifiedImageError:
            raise unsupported(f"not an image in an accepted format: {', '.join(ALLOWED_FORMATS)}") from None
        except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, struct.error, ...) on garbage
            raise unsupported(type(exc).__name__) from None
        width, height = image.size
        if width * height > max_pixels:
            raise ApiError(413, f"image is {width}x{height} = {width * height} pixels, more than max_image_pixels "
                                f"({max_pixels})", "payload_too_large")
        if width == 0 or height == 0:
            raise unsupported("empty image")
        if check_size is not None:
            check_size(width, height)
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


# -- the three ways to send an image: raw bytes, base64 in JSON, multipart upload ------------------

async def read_image_request(request: Request, body_model: type[BaseModel], params_model: type[BaseModel]) -> tuple[bytes, Any]:
    """(image bytes, parameters) from raw image bytes, JSON with base64 `inputs` (`body_model`, whose
    `parameters` are `params_model`), or multipart with the parameters as fields."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    params = params_model()
    if content_type == "application/json":
        body = await read_json(request, body_model)
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
        raw, params = await _read_multipart(request, params_model)
    elif content_type in ("", "application/octet-stream") or content_type.startswith("image/"):
        raw = await request.body()
    else:
        raise ApiError(415, f"unsupported content type {content_type!r}: send an image (image/*), "
                            "JSON with base64 'inputs', or a multipart upload", "unsupported_media_type")
    if not raw:
        raise ApiError(422, "inputs: empty image", "validation")
    return raw, params


async def _read_multipart(request: Request, params_model: type[BaseModel]) -> tuple[bytes, Any]:
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
    for key, value in form.items():
        if hasattr(value, "read"):
            continue
        if key in ("top_k", "function_to_apply"):
            fields[key] = str(value)
        elif key != "parameters":  # as a JSON body's unknown fields
            raise ApiError(422, f"{key}: unknown field (fields: file, top_k, function_to_apply)", "validation")
    return raw, validate(params_model, fields)


# -- what a model's image processor makes of an image ----------------------------------------------

def processed_sizes(processor, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((height, width) after the processor's resize, (height, width) of the model's input) for an
    image of `width` x `height`, computed the way transformers' image processors compute them (the
    size dict's shortest_edge / longest_edge / max_height+max_width / height+width forms, ConvNeXt's
    crop_pct, center crop), without touching a pixel."""
    from transformers.image_transforms import get_size_with_aspect_ratio
    from transformers.image_utils import get_image_size_for_max_height_width

    resized = (height, width)
    size = dict(getattr(processor, "size", None) or {})
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    crop_pct = getattr(processor, "crop_pct", None)
    final = None
    if getattr(processor, "do_resize", True) and size:
        if shortest and crop_pct and not longest:
            # ConvNeXt-style: shortest edge to shortest/crop_pct, then a square crop (warped square from 384 on)
            if shortest < 384:
                resized = _shortest_edge(height, width, int(shortest / crop_pct))
            else:
                resized = (shortest, shortest)
            final = (shortest, shortest)
        elif shortest and longest:
            resized = tuple(get_size_with_aspect_ratio((height, width), shortest, longest))
        elif shortest:
            resized = _shortest_edge(height, width, shortest)
        elif size.get("max_height") and size.get("max_width"):
            resized = tuple(get_image_size_for_max_height_width((height, width), size["max_height"], size["max_width"]))
        elif size.get("height") and size.get("width"):
            resized = (size["height"], size["width"])
        elif longest:  # the longest edge alone: scale it down to `longest`
            scale = longest / max(height, width)
            resized = (max(int(height * scale), 1), max(int(width * scale), 1))
    if final is None:
        final = resized
        crop = dict(getattr(processor, "crop_size", None) or {})
        if getattr(processor, "do_center_crop", False) and crop.get("height") and crop.get("width"):
            final = (crop["height"], crop["width"])
    return resized, final


def _shortest_edge(height: int, width: int, shortest: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter edge becomes `shortest`, the aspect ratio is kept."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


# Bytes per pixel of the resized image while it is processed (PIL's 4-byte pixels, float32 RGB, the
# normalised copy), and per input pixel of a forward pass (float32 RGB times the activations a
# convolutional network keeps alive at once, a generous multiple for MobileNetV2 / ResNet / ViT).
RESIZED_BYTES_PER_PIXEL = 32
FORWARD_BYTES_PER_PIXEL = 12 * 32


def image_memory_estimate(processor, width: int, height: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(estimated bytes, resized (h, w), model input (h, w)) of one image through `processor` and a model."""
    resized, final = processed_sizes(processor, width, height)
    cost = resized[0] * resized[1] * RESIZED_BYTES_PER_PIXEL + final[0] * final[1] * FORWARD_BYTES_PER_PIXEL
    return cost, resized, final


def image_budget(processor, max_bytes: int) -> Callable[[int, int], None]:
    """A `check_size` for decode_image: refuses (413) an image whose processing would need more than
    `max_bytes`, naming the size the model's processor would have made of it."""

    def check(width: int, height: int) -> None:
        cost, resized, final = image_memory_estimate(processor, width, height)
        if cost > max_bytes:
            raise ApiError(
                413, f"image of {width}x{height} pixels would become {resized[1]}x{resized[0]} after this model's "
                     f"resize (model input {final[1]}x{final[0]}), about {cost / 2**20:.0f} MB to process, more than "
                     f"max_image_memory_mb ({max_bytes / 2**20:.0f} MB): send an image with a less extreme aspect ratio",
                "payload_too_large")

    return check
