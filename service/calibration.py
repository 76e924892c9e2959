"""Calibration images for static int8 quantization of image models (`quantize=int8` with
`calibration_dir`): the images a deployment puts in `<calibration_dir>/<model name>/`, read once at
load.

Static quantization fixes each activation's int8 range ahead of time from real inputs, so the images
must look like what the model will be sent: a few hundred it was not trained on (a validation split;
any layout, an imagefolder's class sub-folders included). The server's own probe images (a gray
square, noise) give ranges that lost 17-28 accuracy points on MobileNetV2 (docs/performance.md, ONNX
Runtime).

At most MAX_IMAGES files are used, spread evenly over the sorted list (an imagefolder sorted by class
still gives every class), and split in two: every fifth calibrates (ranges need few images), the
others are held out to check the quantized model against float32 (service/onnx_backend.py), where
numbers matter: on the demo MobileNetV2, 64 held-out images once showed 98.4 % of float32's labels
kept where 2,000 test images showed 91.7 %. Files that are not a plain image of a sane size are
skipped with one log line when decoded; the digest of the files' contents keys the quantized file in
the ONNX cache, so another set of images gives another file.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import ApiError
from .images import decode_image

log = logging.getLogger("service.calibration")
MAX_IMAGES = 320  # 64 calibrate, 256 check
MIN_IMAGES = 50  # fewer: too few to tell a 2 % label change from a 10 % one, the model stays float32
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
MAX_PIXELS = 40_000_000
# Decoded images are kept until the model has seen them: larger ones are shrunk at once (aspect kept) so
# that 320 camera photos cost about 200 MB, not 10 GB. Models read 224-518 pixels a side.
MAX_SIDE = 640


@dataclass
class CalibrationSet:
    """Decoded RGB images: `calibrate` fixes the ranges, `check` is held out; `digest` names the files' contents."""

    folder: Path
    calibrate: list[Image.Image]
    check: list[Image.Image]
    digest: str


@dataclass
class CalibrationFiles:
    """The files a calibration set is made of, and the digest of their contents (read, not decoded:
    a restart that finds the quantized file and its verdict in the cache decodes nothing)."""

    folder: Path
    files: list[Path]
    digest: str

    def decode(self) -> CalibrationSet | str:
        """The images, split into the calibration and held-out sets, or why there are too few."""
        images = []
        for path in self.files:
            try:
                image = decode_image(path.read_bytes(), MAX_PIXELS)
            except ApiError as exc:
                log.warning("calibration image %s skipped: %s", path, exc.message)
                continue
            image.thumbnail((MAX_SIDE, MAX_SIDE))
            images.append(image)
        if len(images) < MIN_IMAGES:
            return f"{len(images)} usable calibration images in {self.folder}, fewer than {MIN_IMAGES}"
        return CalibrationSet(self.folder, images[0::5], [im for i, im in enumerate(images) if i % 5], self.digest)


def folder_for(calibration_dir: Path | None, model: str) -> Path | None:
    """Where a model's calibration images are expected, or None when no calibration_dir is set."""
    return None if calibration_dir is None else Path(calibration_dir).expanduser() / model


def find(folder: Path) -> CalibrationFiles | str:
    """The calibration files in `folder` (MAX_IMAGES at most, spread over the sorted list), or why there
    are none (a sentence for GET /models)."""
    if not folder.is_dir():
        return f"no calibration images: {folder} is not a folder"
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if len(files) > MAX_IMAGES:  # MAX_IMAGES spread evenly over the list
        files = [files[i * len(files) // MAX_IMAGES] for i in range(MAX_IMAGES)]
    if len(files) < MIN_IMAGES:
        return f"{len(files)} calibration image files in {folder}, fewer than {MIN_IMAGES}"
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return CalibrationFiles(folder, files, digest.hexdigest()[:16])


def load(folder: Path) -> CalibrationSet | str:
    """The decoded calibration set in `folder`, or why there is none."""
    found = find(folder)
    return found if isinstance(found, str) else found.decode()
