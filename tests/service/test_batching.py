"""Dynamic batching: concurrent requests share forward passes and get the same answers as alone."""

from __future__ import annotations

import asyncio
import re

import httpx
from service_helpers import Settings

from service.batching import ModelWorker
from service.registry import inspect_folder, load_runner
from service.schemas import ClassificationParameters

TEXTS = [f"review number {i}: " + "good " * (i % 7) + "bad " * (i % 3) for i in range(32)]


def batch_histogram(metrics_text: str, model: str) -> tuple[float, float]:
    """(forward passes, forward passes with exactly one input) from /metrics."""
    count = float(re.search(rf'hf_serve_batch_size_count{{model="{model}"}} (\S+)', metrics_text).group(1))
    ones = float(re.search(rf'hf_serve_batch_size_bucket{{le="1.0",model="{model}"}} (\S+)', metrics_text).group(1))
    return count, ones


def test_concurrent_requests_equal_one_by_one(live, http):
    alone = [http.post("/models/sentiment", json={"inputs": t}).json()[0] for t in TEXTS]
    worker = live.app.state.registry.entries["sentiment"].worker
    batches_before = worker.batches

    async def fire():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/models/sentiment", json={"inputs": t}) for t in TEXTS))
        return responses

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    for single, response in zip(alone, responses, strict=True):
        together = response.json()[0]
        assert [d["label"] for d in together] == [d["label"] for d in single]
        for a, b in zip(single, together, strict=True):
            assert abs(a["score"] - b["score"]) < 1e-5
        assert float(response.headers["x-queue-time"]) >= 0
    # 32 requests in fewer forward passes: a batch > 1 was formed
    assert worker.batches - batches_before < len(TEXTS)
    assert worker.largest_batch > 1
    count, ones = batch_histogram(http.get("/metrics").text, "sentiment")
    assert count > ones  # /metrics saw a multi-input batch too


def _worker(folder, **overrides):
    settings = Settings(max_batch_wait_ms=1000, max_batch_size=8, _env_file=None, **overrides)
    runner = load_runner(folder, inspect_folder(folder), settings)
    return ModelWorker("t", runner, settings)


def test_worker_gathers_up_to_max_batch_size(pristine_models):
    worker = _worker(pristine_models / "topics")
    params = ClassificationParameters()

    async def scenario():
        # submitted in one tick: they are all queued long before the 1 s gathering window closes
        jobs = [worker.submit([t], params) for t in TEXTS[:12]]
        return await asyncio.gather(*(j.future for j in jobs)), jobs

    results, jobs = asyncio.run(scenario())
    worker.close()
    worker.join(10)
    assert len(results) == 12 and all(len(r) == 1 and len(r[0]) == 3 for r in results)
    assert worker.batches == 2 and worker.largest_batch == 8  # 8 + 4
    assert all(j.inference_ms >= 0 and j.queue_ms >= 0 for j in jobs)


def test_worker_splits_batches_by_padded_tokens(pristine_models):
    worker = _worker(pristine_models / "topics", max_batch_tokens=64)
    params = ClassificationParameters()
    long_text = "word " * 40  # ~42 tokens: two of them exceed 64 padded tokens

    async def scenario():
        jobs = [worker.submit([long_text], params) for _ in range(3)]
        return await asyncio.gather(*(j.future for j in jobs))

    results = asyncio.run(scenario())
    worker.close()
    worker.join(10)
    assert len(results) == 3 and results[0] == results[1] == results[2]
    assert worker.batches == 3 and worker.largest_batch == 1


def test_list_inputs_count_towards_the_batch(pristine_models):
    worker = _worker(pristine_models / "topics")
    params = ClassificationParameters(top_k=1)

    async def scenario():
        jobs = [worker.submit(TEXTS[:5], params, size=5), worker.submit(TEXTS[5:10], params, size=5)]
        return await asyncio.gather(*(j.future for j in jobs))

    first, second = asyncio.run(scenario())
    worker.close()
    worker.join(10)
    assert len(first) == len(second) == 5
    assert worker.batches == 2  # 5 + 5 > max_batch_size 8


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


def test_batchnorm_folding_only_touches_conv_norm_blocks(pristine_models):
    """Every conv + batch-norm block of ResNet and MobileNetV2 is folded (no BatchNorm2d left to
    run), a model in training mode is not, and a model without convolutions is left alone."""
    import torch
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from service.conv_inference import fold_batchnorm, optimise_for_inference

    for name in ("mobilenet", "resnet"):
        model = AutoModelForImageClassification.from_pretrained(pristine_models / name).eval()
        norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        x = torch.randn(2, 3, 64, 64)
        with torch.inference_mode():
            expected = model(pixel_values=x).logits
        assert optimise_for_inference(model) is True
        assert norms > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        with torch.inference_mode():
            assert torch.allclose(model(pixel_values=x).logits, expected, atol=1e-4)
    training = AutoModelForImageClassification.from_pretrained(pristine_models / "resnet").train()
    assert fold_batchnorm(training) == 0
    text = AutoModelForSequenceClassification.from_pretrained(pristine_models / "sentiment").eval()
    assert optimise_for_inference(text) is False


def test_all_torch_work_runs_on_one_thread(pristine_models):
    """Loading and the forward passes of every model run on the single torch thread (two OpenMP
    teams alive at once halve CPU speed), while each model keeps its own batching thread."""
    import threading

    from service import torch_thread

    seen: dict[str, set[str]] = {}

    def recorder(name, fn):
        def wrapped(*args, **kwargs):
            seen.setdefault(name, set()).add(threading.current_thread().name)
            return fn(*args, **kwargs)
        return wrapped

    workers = [_worker(pristine_models / "topics"), _worker(pristine_models / "writer")]
    workers[0].runner.run_batch = recorder("topics", workers[0].runner.run_batch)
    workers[1].runner.generate = recorder("writer", workers[1].runner.generate)

    async def scenario():
        from service.schemas import GenerationParameters

        jobs = [workers[0].submit([t], ClassificationParameters()) for t in TEXTS[:3]]
        jobs.append(workers[1].submit("Hello", GenerationParameters(max_new_tokens=2)))
        return await asyncio.gather(*(j.future for j in jobs))

    results = asyncio.run(scenario())
    assert len(results) == 4 and results[0][0][0]["label"] in {"sports", "politics", "science"}
    names = seen["topics"] | seen["writer"]
    assert len(names) == 1 and next(iter(names)).startswith("torch")
    assert {w._thread.name for w in workers} == {"model-t"}  # batching stays on the workers' threads
    assert torch_thread.run(torch_thread.on_torch_thread) is True and not torch_thread.on_torch_thread()
    for worker in workers:
        worker.close()
        worker.join(5)
