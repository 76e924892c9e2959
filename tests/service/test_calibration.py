"""service/calibration.py: which images a model's calibration set holds, and how it is split."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service import calibration


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_no_folder_and_too_few_images_are_reasons(tmp_path):
    assert calibration.folder_for(None, "m") is None
    assert calibration.load(tmp_path / "absent") == f"no calibration images: {tmp_path / 'absent'} is not a folder"
    few, broken = tmp_path / "few", tmp_path / "broken"
    few.mkdir()
    (few / "a.png").write_bytes(png(0))
    assert calibration.load(few) == f"1 calibration image files in {few}, fewer than {calibration.MIN_IMAGES}"
    broken.mkdir()  # enough files, one of which is not an image: too few once decoded
    for i in range(calibration.MIN_IMAGES - 1):
        (broken / f"{i}.png").write_bytes(png(i))
    (broken / "x.png").write_bytes(b"not a png")
    assert calibration.load(broken) == (f"{calibration.MIN_IMAGES - 1} usable calibration images in {broken}, "
                                        f"fewer than {calibration.MIN_IMAGES}")


def test_images_are_spread_over_the_folder_and_split(tmp_path):
    classes = [f"class{k}" for k in range(4)]
    for k, name in enumerate(classes):  # an imagefolder sorted by class: 100 images each
        (tmp_path / name).mkdir()
        for i in range(100):
            (tmp_path / name / f"{i:03d}.png").write_bytes(png(1000 * k + i))
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "hidden.png").write_bytes(png(9))
    found = calibration.load(tmp_path)
    assert len(found.calibrate) == 64 and len(found.check) == 256
    assert all(im.mode == "RGB" and im.size == (10, 12) for im in found.calibrate + found.check)
    # Every class is in both halves: the first images of the list alone would be class0 only.
    calibrated = {im.tobytes() for im in found.calibrate}
    for k in range(4):
        in_class = {Image.open(io.BytesIO(png(1000 * k + i))).convert("RGB").tobytes() for i in range(100)}
        assert in_class & calibrated
    (tmp_path / ".cache" / "hidden.png").write_bytes(png(10))  # hidden files are never read
    assert calibration.load(tmp_path).digest == found.digest
    (tmp_path / "class0" / "000.png").write_bytes(png(5))
    assert calibration.load(tmp_path).digest != found.digest


def test_large_images_are_shrunk_when_read(tmp_path):
    for i in range(calibration.MIN_IMAGES):
        size = (3000, 2000) if i == 0 else (10, 12)
        Image.new("RGB", size, (i, 2 * i, 3 * i)).save(tmp_path / f"{i:02d}.jpg")
    found = calibration.load(tmp_path)
    big = found.calibrate[0]  # the first file
    assert big.size == (calibration.MAX_SIDE, round(calibration.MAX_SIDE * 2 / 3))  # aspect kept
    assert all(im.size == (10, 12) for im in found.calibrate[1:] + found.check)
