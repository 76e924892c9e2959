"""image-classification: an image (raw bytes, base64 JSON or multipart) -> ranked labels, batched
across requests (Inference API shape; `InferenceClient.image_classification`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import Response
from PIL import Image
from pydantic import Field

from ..conv_inference import optimise_for_inference
from ..images import decode_image, image_budget, read_image_request
from ..settings import Settings
from .base import Call, ServedTask, StrictBody
from .classifier import ClassificationOutput, ClassificationParameters, ClassifierRunner

IMAGE_FORMATS = "JPEG, PNG, WebP, GIF, BMP or TIFF"
# Base64 with its padding, at least one byte, after an optional data: URL prefix (what b64decode(validate=True) takes)
BASE64 = r"^(data:[^,]*,)?(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})$"


class ImageClassificationRequest(StrictBody):
    inputs: str = Field(description="The image file, base64-encoded (a data: URL prefix is accepted).",
                        json_schema_extra={"pattern": BASE64})  # checked in read_image_request, with a clearer 422
    parameters: ClassificationParameters = Field(default_factory=ClassificationParameters)
    options: dict[str, Any] | None = None


class FastImagePreprocess:
    """The usual ImageNet preprocessing (resize the shortest edge or to a fixed size, center crop,
    rescale, normalise) done with one PIL resize per request (`pixels`, kept as uint8) and one
    multiply-add per image when its batch runs (`normalise`).

    transformers' PIL processors cost about as much per image as a MobileNetV2 forward pass on a
    CPU; this path is cheaper (docs/performance.md, Serving, item 4) and runs per request in `prepare`.
    `build` returns None unless the processor is one of this simple kind *and* this path
    reproduces its output on probe images (else the processor is used as is), so the served
    numbers never change.
    """

    def __init__(self, processor):
        size = dict(processor.size)
        self.shortest_edge = size.get("shortest_edge")
        self.fixed = (size["height"], size["width"]) if {"height", "width"} <= size.keys() else None
        crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
        self.crop = (crop["height"], crop["width"]) if crop else None
        self.resample = Image.Resampling(int(processor.resample))
        rescale = float(processor.rescale_factor) if processor.do_rescale else 1.0
        mean = np.asarray(processor.image_mean if processor.do_normalize else [0.0] * 3, dtype=np.float64)
        std = np.asarray(processor.image_std if processor.do_normalize else [1.0] * 3, dtype=np.float64)
        # (pixel * rescale - mean) / std == pixel * scale + shift, per channel of a (3, height, width) image
        self.scale = (rescale / std).astype(np.float32).reshape(3, 1, 1)
        self.shift = (-mean / std).astype(np.float32).reshape(3, 1, 1)

    @classmethod
    def build(cls, processor) -> FastImagePreprocess | None:
        simple = (
            getattr(processor, "do_resize", False)
            and not getattr(processor, "do_reduce_labels", False)
            and getattr(processor, "crop_pct", None) is None
            and getattr(processor, "do_pad", False) in (False, None)
            and len(getattr(processor, "image_mean", None) or []) == 3
            and getattr(processor, "resample", None) is not None
        )
        if not simple:
            return None
        try:
            fast = cls(processor)
            if fast.shortest_edge is None and fast.fixed is None:
                return None
            rng = np.random.default_rng(0)
            probes = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((28, 28), (300, 451), (640, 480))]
            expected = processor(images=probes, return_tensors="np")["pixel_values"]
            got = fast.normalise([fast.pixels(p) for p in probes])
            if expected.shape != got.shape or float(np.abs(expected - got).max()) > 1e-3:
                return None
        except Exception:  # any surprise: keep the processor
            return None
        return fast

    def pixels(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 array (3, height, width), resized and cropped: what `prepare` keeps per
        request (a quarter of the float32 image's bytes; normalised only when its batch runs)."""
        width, height = image.size
        if self.fixed is not None:
            new_h, new_w = self.fixed
        elif width <= height:
            new_w, new_h = self.shortest_edge, int(self.shortest_edge * height / width)
        else:
            new_w, new_h = int(self.shortest_edge * width / height), self.shortest_edge
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), self.resample)
        pixels = np.asarray(image)  # uint8 (height, width, 3)
        if self.crop is not None:
            ch, cw = self.crop
            top, left = int((new_h - ch) / 2.0), int((new_w - cw) / 2.0)
            pixels = pixels[top:top + ch, left:left + cw]
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def normalise(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 arrays from `pixels` -> one float32 batch (n, 3, height, width), written in place: one
        multiply and one add per image, on arrays that stay in the caches (a few small batches of the
        runner at a time, not one large stack of float32 images: docs/performance.md, Serving)."""
        out = np.empty((len(images), *images[0].shape), dtype=np.float32)
        for row, image in zip(out, images, strict=True):
            np.multiply(image, self.scale, out=row)
            row += self.shift
        return out


class ImageClassificationRunner(ClassifierRunner):
    model_output = "logits"  # backend=onnx (service/onnx_backend.py)
    # quantize=int8 for images is static, on calibration images: dynamic int8 (ConvInteger) lost 3-4 points
    # on the demo MobileNetV2 and ran slower than float32 (docs/performance.md, ONNX Runtime).
    onnx_int8 = "static"

    def __init__(self, model, image_processor):
        super().__init__(model)
        self.processor = image_processor
        self.fast = FastImagePreprocess.build(image_processor)
        optimise_for_inference(model)  # batch norm folded, channels-last (conv nets only)

    def prepare(self, payload):
        image, _params = payload
        image = image.convert("RGB")
        return [self.fast.pixels(image) if self.fast is not None else image], 1

    # On a CPU, convolutional networks run *slower per image* in large batches than in small ones
    # (docs/performance.md, Serving, items 5-6 and "The allocator"): a large batch's activations leave
    # the caches, and those above glibc's 32 MiB mmap cap are fresh mmaps page-faulted in on every
    # pass. So on a CPU a micro-batch runs through the model this many images at a time (the best
    # shape with glibc's defaults or tuned thresholds alike: benchmarks/allocator.py); on a GPU in one go.
    CPU_IMAGES_PER_FORWARD = 4

    def pixel_values(self, images: list) -> torch.Tensor:
        """Prepared images (arrays from the fast path, or PIL images) -> one float batch on the model's device."""
        if self.fast is not None:
            pixel_values = torch.from_numpy(self.fast.normalise(images))
        else:
            pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return pixel_values.to(self.model.device, self.model.dtype)

    def run_batch(self, prepared: list[list[Any]], params: list[Any]) -> list[list[dict]]:
        images = [img for imgs in prepared for img in imgs]
        step = self.CPU_IMAGES_PER_FORWARD if self.model.device.type == "cpu" else len(images)
        with torch.inference_mode():
            logits = torch.cat([self.model(pixel_values=self.pixel_values(images[i:i + step])).logits
                                for i in range(0, len(images), step)])
        return self.finish_rows(logits.float().cpu(), list(params))

    def _probe_images(self) -> list:
        """Four images of different sizes and colours, prepared as requests are."""
        rng = np.random.default_rng(0)
        images = [Image.new("RGB", (32, 32), (128, 128, 128)),
                  *(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 451), (64, 48), (500, 375)))]
        return [self.prepare((image, None))[0][0] for image in images]

    def onnx_probe(self) -> list[dict[str, torch.Tensor]]:
        """Three images of different sizes and colours as one batch, and one alone."""
        prepared = self._probe_images()[:3]
        return [{"pixel_values": self.pixel_values(prepared)}, {"pixel_values": self.pixel_values(prepared[:1])}]

    @property
    def compile_dynamic(self) -> bool:
        """backend=torch-compile: static shapes on a CPU, one graph per sub-batch size (dynamic sizes
        lose oneDNN's prepacked convolutions: service/compiled_backend.py); dynamic on a GPU."""
        return self.model.device.type != "cpu"

    def compile_batches(self) -> list[dict[str, torch.Tensor]]:
        """One batch of each size the model is fed: 1 to CPU_IMAGES_PER_FORWARD images on a CPU; on a
        GPU one and two (dynamo's graphs for a batch of one and for any other size)."""
        images = self._probe_images()
        sizes = range(1, self.CPU_IMAGES_PER_FORWARD + 1) if not self.compile_dynamic else (1, 2)
        return [{"pixel_values": self.pixel_values(images[:n])} for n in sizes]

    def onnx_batches(self, images: list[Image.Image]) -> Iterator[dict[str, torch.Tensor]]:
        """Images (calibration for static int8) prepared as requests are, in the batches the model runs;
        made one batch at a time, so that a few hundred large inputs never sit in memory at once."""
        step = self.CPU_IMAGES_PER_FORWARD
        for i in range(0, len(images), step):
            prepared = [self.prepare((image, None))[0][0] for image in images[i:i + step]]
            yield {"pixel_values": self.pixel_values(prepared)}

    def smoke(self):
        pixels = self.processor(images=[Image.new("RGB", (32, 32), (128, 128, 128))], return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixels.to(self.model.device, self.model.dtype)).logits


class ImageClassification(ServedTask):
    name = "image-classification"
    architecture_suffixes = ("ForImageClassification", "ForImageClassificationWithTeacher")
    processor_files = ("preprocessor_config.json",)
    processor_description = "preprocessor_config.json (image processor)"
    json_requests = (ImageClassificationRequest,)
    # What a document can say of an image: its media type and that it is bytes. That the bytes decode
    # (a 415 otherwise) no schema says; schemathesis.toml tells the fuzzer so.
    other_request_content = {
        "image/*": {"schema": {"type": "string", "format": "binary", "minLength": 1,
                               "description": f"The image file: {IMAGE_FORMATS}"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary", "minLength": 1,
                                                "description": f"The image file: {IMAGE_FORMATS}"}},
        # Also accepted, for older clients: a `parameters` field with the parameters as JSON. The file
        # field may have any name; other fields are refused, as unknown JSON fields are.
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "additionalProperties": False,
                                           "properties": {
            "file": {"type": "string", "format": "binary", "minLength": 1, "description": f"The image file: {IMAGE_FORMATS}"},
            "top_k": {"type": "string", "pattern": "^[1-9][0-9]{0,8}$", "description": "An integer, at least 1"},
            "function_to_apply": {"type": "string", "enum": ["softmax", "sigmoid", "none"]},
        }}, "encoding": {"file": {"contentType": "image/*"}}},
    }
    error_responses = {415: "Not an image, an image in a format other than those listed, or a content type other "
                            "than those documented"}
    response_models = (ClassificationOutput,)
    response_schema = {"type": "array", "items": {"$ref": "#/components/schemas/ClassificationOutput"},
                       "title": "ImageClassificationOutput"}
    response_description = "image-classification: one list of labels"

    def load(self, path: Path, settings: Settings) -> ImageClassificationRunner:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from ..loading import load_model, load_processor

        model = load_model(AutoModelForImageClassification, path, settings, self.name)
        return ImageClassificationRunner(model, load_processor(AutoImageProcessor, path, settings))

    async def handle(self, request: Request, call: Call) -> Response:
        raw, params = await read_image_request(request, ImageClassificationRequest, ClassificationParameters)
        budget = image_budget(call.runner.processor, call.settings.max_image_memory_mb * 2**20)
        image = await asyncio.to_thread(decode_image, raw, call.settings.max_image_pixels, budget)
        result, job = await call.run(image, params)
        return call.json(result, job)
