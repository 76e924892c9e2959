"""service/images.py: decoding only allowed formats, and knowing what a model's image processor
will make of an image from its header alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers import (
    ConvNextImageProcessorPil,
    EfficientNetImageProcessorPil,
    MobileNetV2ImageProcessorPil,
    ViTImageProcessorPil,
)

from service.errors import ApiError
from service.images import ALLOWED_FORMATS, decode_image, image_budget, processed_sizes

PROCESSORS = {
    "mobilenet_v2": MobileNetV2ImageProcessorPil(),  # shortest edge 256, crop 224
    "mobilenet_v2-tiny": MobileNetV2ImageProcessorPil(size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64}),
    "resnet (convnext, crop_pct)": ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875),
    "convnext-384 (warp)": ConvNextImageProcessorPil(size={"shortest_edge": 384}),
    "vit (fixed)": ViTImageProcessorPil(size={"height": 32, "width": 32}),
    "efficientnet (fixed)": EfficientNetImageProcessorPil(size={"height": 40, "width": 40}),
    "shortest edge, no crop": MobileNetV2ImageProcessorPil(size={"shortest_edge": 40}, do_center_crop=False),
    "shortest+longest edge": ViTImageProcessorPil(size={"shortest_edge": 40, "longest_edge": 64}),
}
SIZES = [(1, 1), (3, 200), (200, 3), (57, 31), (31, 57), (500, 13), (13, 500), (640, 480)]


@pytest.mark.parametrize("name", PROCESSORS)
def test_predicted_sizes_are_what_the_processor_makes(name):
    """The model input predicted from (width, height) is the real processor's output shape; without a
    crop the resized size is that output too."""
    processor = PROCESSORS[name]
    for width, height in SIZES:
        image = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
        shape = processor(images=[image], return_tensors="np")["pixel_values"][0].shape
        resized, final = processed_sizes(processor, width, height)
        assert tuple(shape[1:]) == final, (name, width, height)
        if not getattr(processor, "do_center_crop", False) and not getattr(processor, "crop_pct", None):
            assert resized == final


@pytest.mark.parametrize("width,height", [(60_000, 1), (1, 60_000), (30_000, 2), (2, 30_000)])
def test_extreme_aspect_ratios_are_refused_for_shortest_edge_processors(width, height):
    """60000x1 is 60,000 pixels, but a shortest-edge resize to 256 makes it 15,360,000x256."""
    for name in ("mobilenet_v2", "resnet (convnext, crop_pct)", "shortest edge, no crop"):
        with pytest.raises(ApiError) as exc:
            image_budget(PROCESSORS[name], 256 * 2**20)(width, height)
        assert exc.value.status == 413 and "max_image_memory_mb" in exc.value.message, name
    # a processor that warps to a fixed size never blows up: the same image is fine there
    image_budget(PROCESSORS["vit (fixed)"], 256 * 2**20)(width, height)


@pytest.mark.parametrize("width,height", [(4000, 3000), (3000, 4000), (8000, 6000), (6000, 1000), (224, 224), (1, 1)])
def test_photos_and_panoramas_pass_the_budget(width, height):
    for processor in PROCESSORS.values():
        image_budget(processor, 256 * 2**20)(width, height)


def _encode(fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_allowed_format_decodes(fmt):
    image = decode_image(_encode(fmt))
    assert image.mode == "RGB" and image.size == (24, 16)


def test_pdf_and_eps_are_never_opened():
    """PIL's EPS and PDF plugins would run Ghostscript: they are refused before any plugin runs."""
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
           b"newpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n")
    for raw in (_encode("PDF"), eps, _encode("PPM")):  # PPM: a real image, just not an accepted format
        with pytest.raises(ApiError) as exc:
            decode_image(raw)
        assert exc.value.status == 415 and "accepted format" in exc.value.message


def test_the_budget_runs_before_pixels_are_decoded():
    """A check that refuses stops decoding: the truncated body after the header is never read."""
    buf = io.BytesIO()
    Image.new("RGB", (600, 2)).save(buf, format="PNG")
    header_only = buf.getvalue()[:64]  # IHDR and nothing else: decoding it would fail with 415
    with pytest.raises(ApiError) as exc:
        decode_image(header_only, check_size=image_budget(PROCESSORS["mobilenet_v2"], 1))
    assert exc.value.status == 413
