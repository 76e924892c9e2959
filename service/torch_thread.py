"""One thread for all of the server's torch work: loading models and every forward pass.

PyTorch's CPU kernels run on OpenMP, and libgomp keeps a team of worker threads for each OS thread
that has entered a parallel region, for as long as that thread lives. Two such threads alive at once
(the loader and a model's worker, or the workers of two models) put more OpenMP threads in the
process than there are cores, and libgomp then throttles its spin-waiting: every forward pass gets
about twice as slow, whichever thread runs it (measured: docs/performance.md, Serving, item 7). So
this one thread runs everything that touches torch: loading, the encoder models' batchers
(service/batching.py: batches form, are tokenised and run here) and the steps of the generation
schedulers (service/scheduler.py, whose scheduling stays on a thread of its own). On
a CPU nothing is lost: two forward passes at once would share the same cores anyway.
`torch.set_num_threads` is per thread under OpenMP, so it is applied here too.

A task that runs past its time limit (a forward pass that hangs: a deadlock in a kernel, a model
that blocks) cannot be stopped, but it need not stop the server: the watchdog fails that task
(`TorchTaskHung`), tells the `on_hang` callback which model it belonged to, and starts a fresh torch
thread that takes the queued work. The stuck thread exits if its task ever returns.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("service.torch_thread")


class TorchTaskHung(RuntimeError):
    """A torch task ran past its limit; its thread was given up and replaced."""

    def __init__(self, owner: str | None, seconds: float):
        super().__init__(f"{owner or 'a'} forward pass ran for more than {seconds:.0f} s")
        self.owner, self.seconds = owner, seconds


@dataclass
class _Task:
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    owner: str | None
    limit: float | None
    future: Future = field(default_factory=Future)
    started: float | None = None


_queue: queue.Queue[_Task] = queue.Queue()
_lock = threading.Lock()
_generation = 0
_ident: int | None = None
_current: _Task | None = None  # the live thread's running task
_num_threads: int | None = None
_on_hang: Callable[[str | None, float], None] | None = None


def _worker(generation: int, ready: threading.Event) -> None:
    global _ident, _current
    _ident = threading.get_ident()
    if _num_threads is not None:
        import torch

        torch.set_num_threads(_num_threads)
    ready.set()
    while True:
        task = _queue.get()
        with _lock:
            if generation != _generation:  # replaced while waiting: hand the task to the new thread
                _queue.put(task)
                return
            task.started, _current = time.monotonic(), task
        try:
            result, error = task.fn(*task.args, **task.kwargs), None
        except BaseException as exc:  # handed to the caller, whatever it is
            result, error = None, exc
        with _lock:
            replaced = generation != _generation
            if not replaced:
                _current = None
        if not task.future.done():
            if error is None:
                task.future.set_result(result)
            else:
                task.future.set_exception(error)
        if replaced:
            log.warning("a torch task that had been given up as hung returned after %.0f s; its thread exits",
                        time.monotonic() - task.started)
            return


def _start_thread() -> None:
    global _generation
    ready = threading.Event()
    with _lock:
        _generation += 1
        generation = _generation
    threading.Thread(target=_worker, args=(generation, ready), name=f"torch_{generation - 1}", daemon=True).start()
    ready.wait()


def _watch() -> None:
    global _current
    while True:
        time.sleep(0.2)
        with _lock:
            task = _current
            hung = (task is not None and task.limit is not None and task.started is not None
                    and time.monotonic() - task.started > task.limit)
            if hung:
                _current = None
        if not hung:
            continue
        log.error("torch task of %s ran for more than %.0f s: given up, a new torch thread takes over", task.owner,
                  task.limit)
        if not task.future.done():
            task.future.set_exception(TorchTaskHung(task.owner, task.limit))
        _start_thread()
        if _on_hang is not None:
            try:
                _on_hang(task.owner, task.limit)
            except Exception:
                log.exception("on_hang callback failed")


_start_thread()  # start the thread now, so that it is the only one that runs torch
threading.Thread(target=_watch, name="torch-watchdog", daemon=True).start()


def on_hang(callback: Callable[[str | None, float], None] | None) -> None:
    """Call `callback(owner, seconds)` (from the watchdog thread) when a task is given up as hung."""
    global _on_hang
    _on_hang = callback


def on_torch_thread() -> bool:
    return threading.get_ident() == _ident


def has_waiting() -> bool:
    """Whether tasks are queued for the torch thread (behind the one it runs)."""
    return not _queue.empty()


def submit(fn: Callable[..., Any], *args: Any, owner: str | None = None, limit: float | None = None,
           **kwargs: Any) -> Future:
    """Queue `fn` for the torch thread. With `limit` (seconds), the watchdog gives up on it past that."""
    task = _Task(fn, args, kwargs, owner, limit)
    _queue.put(task)
    return task.future


def run(fn: Callable[..., Any], *args: Any, owner: str | None = None, limit: float | None = None,
        **kwargs: Any) -> Any:
    """Run `fn` on the torch thread and wait for it (from any other thread; inline on it)."""
    if on_torch_thread():
        return fn(*args, **kwargs)
    return submit(fn, *args, owner=owner, limit=limit, **kwargs).result()


async def run_async(fn: Callable[..., Any], *args: Any, owner: str | None = None, limit: float | None = None,
                    **kwargs: Any) -> Any:
    """`run` for the event loop: await `fn` on the torch thread."""
    return await asyncio.wrap_future(submit(fn, *args, owner=owner, limit=limit, **kwargs))


def set_num_threads(count: int) -> None:
    """torch.set_num_threads for the thread that runs the models (and any that replaces it)."""
    global _num_threads
    import torch

    _num_threads = count
    run(torch.set_num_threads, count)
