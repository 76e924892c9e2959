"""service/tasks/image_classification.py: the runner gives transformers' pipeline's answers."""

from __future__ import annotations

from service.folders import inspect_folder
from service.loading import load_runner
from service.tasks.classifier import ClassificationParameters
from tests.service.service_helpers import Settings


def test_image_micro_batch_matches_transformers_pipeline(pristine_models):
    """A 6-image micro-batch (channels-last weights, run 4 + 2 images per forward on a CPU) gives
    each image the scores transformers' own pipeline gives it alone."""
    import numpy as np
    import pytest
    import torch
    from PIL import Image
    from transformers import pipeline

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 70 - 5 * i, 3), dtype=np.uint8)) for i in range(6)]
    for name in ("mobilenet", "resnet"):
        folder = pristine_models / name
        runner = load_runner(folder, inspect_folder(folder), Settings(_env_file=None))
        convs = [m.weight for m in runner.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        assert len(images) > runner.CPU_IMAGES_PER_FORWARD
        params = [ClassificationParameters(top_k=3)] * len(images)
        served = runner.run_batch([runner.prepare((img, p))[0] for img, p in zip(images, params, strict=True)], params)
        reference = pipeline("image-classification", model=str(folder))
        for image, got in zip(images, served, strict=True):
            expected = reference(image, top_k=3)
            assert [d["label"] for d in got] == [d["label"] for d in expected]
            assert [d["score"] for d in got] == pytest.approx([d["score"] for d in expected], abs=1e-5)
