"""Dynamic batching: concurrent requests share forward passes and get the same answers as alone."""

from __future__ import annotations

import asyncio
import re

import httpx

from service.batching import ModelWorker
from service.folders import inspect_folder
from service.loading import load_runner
from service.metrics import Metrics
from service.tasks.classifier import ClassificationParameters
from tests.service.service_helpers import Settings

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
    settings = Settings(max_batch_wait_ms=1000, max_batch_requests=8, _env_file=None, **overrides)
    runner = load_runner(folder, inspect_folder(folder), settings)
    return ModelWorker("t", runner, settings, Metrics())


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
