"""Dynamic micro-batching for the encoder tasks (classification, embeddings): one worker thread per
loaded model. (Generation has continuous batching instead: service/scheduler.py.)

Requests become `Job`s on the model's queue. The worker takes the first waiting job plus every job
already queued behind it (up to `max_batch_requests` inputs / `max_batch_tokens` padded tokens) and runs
them in one forward pass at once: a lone request never waits, and under load the next batch forms
while the current forward pass runs. Only when the previous pass held more jobs than have arrived
(their clients are about to send again) does it wait for more, `max_batch_wait_ms` at most.
Tokenising and image preprocessing happen on this thread; the forward pass is handed to the one
torch thread shared by all models (service/torch_thread.py), so the event loop only moves bytes. Results go back to the loop with `call_soon_threadsafe`.

The queue is unbounded here on purpose: the app refuses requests over `max_concurrent_requests`
(429) before they reach it, which bounds every queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import torch_thread
from .errors import InferenceFailed, InputError
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("service.batching")
_STOP = object()


@dataclass
class Job:
    payload: Any
    params: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    emit: Any = None  # generation: called with each token, from the torch thread
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    finished: float = 0.0
    prepared: Any = None
    cost: int = 0  # padded tokens for text, 1 for images
    size: int = 1  # inputs in this job

    @property
    def queue_ms(self) -> float:
        return max(self.started - self.enqueued, 0.0) * 1000

    @property
    def inference_ms(self) -> float:
        return max(self.finished - self.started, 0.0) * 1000


def failure(name: str, exc: BaseException) -> InferenceFailed:
    """Log a model's exception with a fresh error id; the caller gets the id, never the traceback."""
    error_id = uuid.uuid4().hex[:12]
    log.error("model %s: inference failed (error id %s)", name, error_id, exc_info=exc)
    return InferenceFailed(error_id)


class ModelWorker:
    def __init__(self, name: str, runner, settings: Settings, metrics: Metrics):
        self.name, self.runner, self.metrics = name, runner, metrics
        self.max_batch_requests = settings.max_batch_requests
        self.max_batch_tokens = settings.max_batch_tokens
        self.wait_s = settings.max_batch_wait_ms / 1000
        self.timeout_s = settings.request_timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._on_stopped: Callable[[], None] | None = None
        self.batches = 0  # forward passes run
        self._last_jobs = 0  # jobs in the previous forward pass (worker thread only)
        self.largest_batch = 0  # most jobs in one forward pass
        self._thread = threading.Thread(target=self._loop, name=f"model-{name}", daemon=True)
        self._thread.start()

    # -- called on the event loop ---------------------------------------------------------------
    def submit(self, payload, params, size: int = 1, emit=None) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(payload, params, loop.create_future(), loop, emit=emit, size=size)
        self._queue.put(job)
        self._gauge()
        return job

    def close(self, on_stopped: Callable[[], None] | None = None) -> None:
        """Finish the jobs already queued, then stop the thread (then call `on_stopped` on it)."""
        self._on_stopped = on_stopped
        self._queue.put(_STOP)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- worker thread --------------------------------------------------------------------------
    def _gauge(self):
        self.metrics.queue_depth.labels(self.name).set(self._queue.qsize())

    def _loop(self) -> None:
        pending = None
        while True:
            job = pending if pending is not None else self._queue.get()
            pending = None
            if job is _STOP:
                if self._on_stopped is not None:
                    self._on_stopped()
                return
            if job.future.cancelled() or job.cancel.is_set():
                continue
            if job.prepared is None and not self._prepare(job):
                continue
            batch, inputs, longest = [job], job.size, job.cost
            deadline = None
            while inputs < self.max_batch_requests:
                try:
                    nxt = self._queue.get_nowait()  # what is already waiting joins at once
                except queue.Empty:
                    # Nothing queued: run now, unless the previous pass was larger than this batch so far
                    # (we are under load and its requesters are about to come back); then wait for them,
                    # at most max_batch_wait_ms after the first job. Alone, a request never waits.
                    if len(batch) >= self._last_jobs or self.wait_s <= 0:
                        break
                    if deadline is None:
                        deadline = time.perf_counter() + self.wait_s
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    try:
                        nxt = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if nxt is _STOP:
                    pending = nxt
                    break
                if nxt.future.cancelled() or not self._prepare(nxt):
                    continue
                padded = max(longest, nxt.cost) * (inputs + nxt.size)
                if inputs + nxt.size > self.max_batch_requests or padded > self.max_batch_tokens:
                    pending = nxt  # opens the next batch
                    break
                batch.append(nxt)
                inputs += nxt.size
                longest = max(longest, nxt.cost)
            self._run_batch(batch, inputs)

    def _prepare(self, job: Job) -> bool:
        try:
            job.prepared, job.cost = self.runner.prepare((job.payload, job.params))
            return True
        except InputError as exc:
            resolve(job, exc)
        except Exception as exc:  # a tokenizer bug is still our bug: 500 with an id
            resolve(job, failure(self.name, exc))
        return False

    def _run_batch(self, batch: list[Job], inputs: int) -> None:
        start = time.perf_counter()
        for job in batch:
            job.started = start
        self._gauge()
        try:
            results = torch_thread.run(self.runner.run_batch, [j.prepared for j in batch], [j.params for j in batch],
                                       owner=self.name, limit=self.timeout_s)
            error = None
        except torch_thread.TorchTaskHung as exc:  # the requests get a 504; the registry reloads the model
            results, error = [None] * len(batch), exc
        except Exception as exc:
            results, error = [None] * len(batch), failure(self.name, exc)
        end = time.perf_counter()
        self.batches += 1
        self._last_jobs = len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        self.metrics.batch_size.labels(self.name).observe(inputs)
        self.metrics.forward_seconds.labels(self.name).observe(end - start)
        for job, result in zip(batch, results, strict=True):
            job.finished = end
            job.prepared = None
            resolve(job, error if error is not None else result)


def resolve(job: Job, result) -> None:
    """Hand a job's result (or exception) to its future, on the event loop's thread."""
    def settle():
        if job.future.done():
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed (server shutting down)
        job.loop.call_soon_threadsafe(settle)
