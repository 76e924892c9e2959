"""Image bytes -> one RGB PIL image, refusing anything that is not a plain picture of a sane size."""

from __future__ import annotations

import io
import warnings

from .errors import ApiError


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
