"""service/torch_thread.py: one thread runs every model's torch work."""

from __future__ import annotations

import asyncio

from test_batching import TEXTS, _worker

from service.tasks.classifier import ClassificationParameters
from tests.service.service_helpers import Settings


def test_all_torch_work_runs_on_one_thread(pristine_models):
    """Loading and the forward passes of every model run on the single torch thread (two OpenMP
    teams alive at once halve CPU speed). An encoder model's batcher runs there too, tokenising
    included (no hand-off per request); generation keeps its scheduler thread."""
    import threading

    from service import torch_thread

    seen: dict[str, set[str]] = {}

    def recorder(name, fn):
        def wrapped(*args, **kwargs):
            seen.setdefault(name, set()).add(threading.current_thread().name)
            return fn(*args, **kwargs)
        return wrapped

    from service.metrics import Metrics
    from service.tasks import TASKS

    writer = _worker(pristine_models / "writer").runner  # loaded on the torch thread
    workers = [_worker(pristine_models / "topics"),
               TASKS["text-generation"].worker("t", writer, Settings(_env_file=None), Metrics())]
    for name, worker in zip(("topics", "writer"), workers, strict=True):
        worker.runner.model.forward = recorder(name, worker.runner.model.forward)
    workers[0].runner.prepare = recorder("topics-prepare", workers[0].runner.prepare)

    async def scenario():
        from service.tasks.text_generation import GenerationParameters, Prompt

        jobs = [workers[0].submit([t], ClassificationParameters()) for t in TEXTS[:3]]
        jobs.append(workers[1].submit(Prompt("Hello"), GenerationParameters(max_new_tokens=2)))
        return await asyncio.gather(*(j.future for j in jobs))

    results = asyncio.run(scenario())
    assert len(results) == 4 and results[0][0][0]["label"] in {"sports", "politics", "science"}
    names = seen["topics"] | seen["writer"] | seen["topics-prepare"]
    assert len(names) == 1 and next(iter(names)).startswith("torch")
    assert workers[1]._thread.name == "generate-t"  # generation's scheduling stays on its own thread
    assert torch_thread.run(torch_thread.on_torch_thread) is True and not torch_thread.on_torch_thread()
    for worker in workers:
        worker.close()
        worker.join(5)
