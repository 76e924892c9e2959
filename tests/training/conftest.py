"""Fixtures for the training tests: tiny real models and small real data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.tiny_models import ASSETS, build_tiny_bert, build_tiny_gpt2, build_tiny_mobilenet_v2

RT_DIR = ASSETS / "data" / "rotten_tomatoes"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_mobilenet(tmp_path_factory) -> Path:
    return build_tiny_mobilenet_v2(tmp_path_factory.mktemp("models") / "tiny-mobilenet")


def _subset(src: Path, dst: Path, n: int) -> Path:
    """The first n rows of each label of a real Rotten Tomatoes csv (balanced)."""
    with src.open() as f:
        rows = list(csv.DictReader(f))
    by_label: dict[str, list] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    keep = [row for label in sorted(by_label) for row in by_label[label][: n // 2]]
    with dst.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(keep)
    return dst


@pytest.fixture(scope="session")
def rt_small(tmp_path_factory) -> tuple[Path, Path]:
    """160 training and 41 evaluation sentences of the real Rotten Tomatoes data (labels are names)."""
    if not (RT_DIR / "train.csv").exists():
        raise RuntimeError(f"{RT_DIR} is missing: run `make assets`")
    folder = tmp_path_factory.mktemp("rt")
    return _subset(RT_DIR / "train.csv", folder / "train.csv", 160), _subset(RT_DIR / "test.csv", folder / "test.csv", 42)


@pytest.fixture(scope="session")
def caltech_folder(tmp_path_factory) -> Path:
    """A generated folder in Caltech101's layout: 101_ObjectCategories/<class>/image_NNNN.jpg,
    with BACKGROUND_Google, one grayscale image and one file that is not an image."""
    root = tmp_path_factory.mktemp("caltech") / "caltech101"
    categories = root / "101_ObjectCategories"
    rng = np.random.default_rng(0)
    colours = {"accordion": (200, 40, 40), "airplanes": (40, 200, 40), "anchor": (40, 40, 200),
               "BACKGROUND_Google": (120, 120, 120)}
    for name, colour in colours.items():
        folder = categories / name
        folder.mkdir(parents=True)
        for i in range(10):
            pixels = (np.array(colour) + rng.integers(-40, 40, (48, 64, 3))).clip(0, 255).astype("uint8")
            Image.fromarray(pixels).save(folder / f"image_{i + 1:04d}.jpg")
    gray = rng.integers(0, 255, (40, 56)).astype("uint8")
    Image.fromarray(gray, "L").save(categories / "anchor" / "image_0011.jpg")
    (categories / "airplanes" / "image_0012.jpg").write_bytes(b"this is not a jpeg")
    return root


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
    """Each test runs in its own empty current directory: the default run folder (`runs/<name>`, relative
    like `models/`) then lands in tmp_path, never in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def reference(tiny_gpt2, rt_small, tmp_path_factory) -> Path:
    """An uninterrupted run of `lm_args` in a subprocess (the directory it ran in): every interrupted
    run must end up with its training state."""
    from tests.training.subprocess_runs import finetune, lm_args

    train, test = rt_small
    cwd = tmp_path_factory.mktemp("reference")
    result = finetune(lm_args(tiny_gpt2, train, test), cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return cwd


@pytest.fixture(scope="session")
def two_process_run(tiny_bert, rt_small, tmp_path_factory):
    """`distributed_args` run by 2 CPU processes on one machine (the directory it ran in, and its stderr):
    checked in test_loop.py, and the reference of the multi-node run in test_multinode.py."""
    from tests.training.subprocess_runs import (
        CPU_DISTRIBUTED,
        distributed_args,
        distributed_launcher,
        finetune,
    )

    train, test = rt_small
    cwd = tmp_path_factory.mktemp("ddp")
    result = finetune(distributed_args(tiny_bert, train, test, "ddp"), cwd, CPU_DISTRIBUTED, distributed_launcher())
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result.stderr
