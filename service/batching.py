"""Dynamic micro-batching for the encoder tasks (classification, embeddings), one batcher per
loaded model. (Generation has continuous batching instead: service/scheduler.py.)

Requests become `Job`s on the model's queue. The batcher takes the first waiting job plus every job
already queued behind it (up to `max_batch_requests` inputs / `max_batch_tokens` padded tokens) and
runs them in one forward pass at once: a lone request never waits, and under load the next batch
forms while the current forward pass runs. Only when the previous pass held more jobs than have
arrived (their clients are about to send again) does it wait for more, `max_batch_wait_ms` at most,
and only while no other model's work waits.

The batcher runs on the one torch thread shared by all models (service/torch_thread.py), as a task
that forms one batch, tokenises or preprocesses it, runs it and queues itself again while jobs are
left, so models take turns. A request so costs two thread hand-offs, the event loop's to the torch
thread and the result's back with `call_soon_threadsafe`. A batching thread of its own in between
cost a lone request two more (docs/performance.md, Serving, item 8) and bought nothing: tokenising
waited for the previous forward pass there too.

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
    """One model's batcher: `submit` on the event loop, batches on the torch thread."""

    def __init__(self, name: str, runner, settings: Settings, metrics: Metrics):
        self.name, self.runner, self.metrics = name, runner, metrics
        self.max_batch_requests = settings.max_batch_requests
        self.max_batch_tokens = settings.max_batch_tokens
        self.wait_s = settings.max_batch_wait_ms / 1000
        self.timeout_s = settings.request_timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # guards _scheduled and _closed
        self._scheduled = False  # a batch task is queued or running on the torch thread
        self._closed = False
        self._on_stopped: Callable[[], None] | None = None
        self._stopped = threading.Event()
        self.batches = 0  # forward passes run
        self._last_jobs = 0  # jobs in the previous forward pass (torch thread only)
        self._pending: Job | None = None  # taken from the queue, opens the next batch (torch thread only)
        self._running: list[Job] = []  # the batch on the torch thread now
        self.largest_batch = 0  # most jobs in one forward pass

    # -- called on the event loop ---------------------------------------------------------------
    def submit(self, payload, params, size: int = 1, emit=None) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(payload, params, loop.create_future(), loop, emit=emit, size=size)
        self._queue.put(job)
        self._gauge()
        self._schedule()
        return job

    def close(self, on_stopped: Callable[[], None] | None = None) -> None:
        """Finish the jobs already queued, then stop (then call `on_stopped`, on the torch thread)."""
        with self._lock:
            self._on_stopped, self._closed = on_stopped, True
        self._schedule()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the batcher has stopped (after `close`)."""
        self._stopped.wait(timeout)

    # -- any thread -----------------------------------------------------------------------------
    def _gauge(self):
        self.metrics.queue_depth.labels(self.name).set(self._queue.qsize())

    def _schedule(self) -> None:
        """Queue the batch task on the torch thread, unless it is queued or running already."""
        with self._lock:
            if self._scheduled or self._stopped.is_set():
                return
            self._scheduled = True
        self._submit_task()

    def _submit_task(self) -> None:
        torch_thread.submit(self._batch_task, owner=self.name, limit=self.timeout_s).add_done_callback(self._task_done)

    def _task_done(self, task) -> None:
        """After a batch task. If it failed (a bug here) or hung (then on the watchdog's thread), its
        jobs get the error, and the queued ones a fresh task (on the torch thread that replaced a
        hung one)."""
        error = task.exception()
        if error is None:
            return
        if not isinstance(error, torch_thread.TorchTaskHung):
            error = failure(self.name, error)
        for job in self._running:
            resolve(job, error)
        self._running = []
        with self._lock:
            self._scheduled = False
        self._schedule()

    # -- torch thread ---------------------------------------------------------------------------
    def _batch_task(self) -> None:
        """Form and run one batch; queue this task again while jobs are left, else stop if closed."""
        batch, inputs = self._form_batch()
        if batch:
            self._run_batch(batch, inputs)
        if not torch_thread.on_torch_thread():
            return  # a hung pass that returned after its thread was replaced: the new one has the queue
        with self._lock:
            more = self._pending is not None or not self._queue.empty()
            self._scheduled = more
            stop = not more and self._closed and not self._stopped.is_set()
        if more:
            self._submit_task()
        elif stop:
            try:
                if self._on_stopped is not None:
                    self._on_stopped()
            finally:
                self._stopped.set()

    def _next(self, timeout: float | None = None) -> Job | None:
        """The next live job: the one set aside by the previous batch, else from the queue (waiting at
        most `timeout` seconds; None: do not wait). None when there is none."""
        while True:
            if self._pending is not None:
                job, self._pending = self._pending, None
            else:
                try:
                    job = self._queue.get_nowait() if timeout is None else self._queue.get(timeout=timeout)
                except queue.Empty:
                    return None
            if job.future.cancelled() or job.cancel.is_set():
                continue
            if job.prepared is None and not self._prepare(job):
                continue
            return job

    def _form_batch(self) -> tuple[list[Job], int]:
        job = self._next()
        if job is None:
            return [], 0
        batch, inputs, longest = [job], job.size, job.cost
        deadline = None
        while inputs < self.max_batch_requests:
            nxt = self._next()  # what is already waiting joins at once
            if nxt is None:
                # Nothing queued: run now, unless the previous pass was larger than this batch so far
                # (we are under load and its requesters are about to come back); then wait for them,
                # at most max_batch_wait_ms after the first job, while no other work waits for the
                # torch thread. Alone, a request never waits.
                if len(batch) >= self._last_jobs or self.wait_s <= 0 or torch_thread.has_waiting():
                    break
                if deadline is None:
                    deadline = time.perf_counter() + self.wait_s
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                nxt = self._next(timeout=remaining)
                if nxt is None:
                    break
            padded = max(longest, nxt.cost) * (inputs + nxt.size)
            if inputs + nxt.size > self.max_batch_requests or padded > self.max_batch_tokens:
                self._pending = nxt  # opens the next batch
                break
            batch.append(nxt)
            inputs += nxt.size
            longest = max(longest, nxt.cost)
        return batch, inputs

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
        self._running = batch
        self._gauge()
        try:
            results = self.runner.run_batch([j.prepared for j in batch], [j.params for j in batch])
            error = None
        except Exception as exc:
            results, error = [None] * len(batch), failure(self.name, exc)
        end = time.perf_counter()
        self._running = []
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
