"""One thread for all of the server's torch work: loading models and every forward pass.

PyTorch's CPU kernels run on OpenMP, and libgomp keeps a team of worker threads for each OS thread
that has entered a parallel region, for as long as that thread lives. Two such threads alive at once
(the loader and a model's worker, or the workers of two models) put more OpenMP threads in the
process than there are cores, and libgomp then throttles its spin-waiting: every forward pass gets
about twice as slow, whichever thread runs it (measured: docs/performance.md, Serving, item 7). So the model workers keep their queues and batching, and hand the torch part
to this single thread. On a CPU nothing is lost: two forward passes at once would share the same
cores anyway. `torch.set_num_threads` is per thread under OpenMP, so it is applied here too.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
_ident: int | None = None


def _mark() -> None:
    global _ident
    _ident = threading.get_ident()


_executor.submit(_mark).result()  # start the thread now, so that it is the only one ever used


def on_torch_thread() -> bool:
    return threading.get_ident() == _ident


def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn` on the torch thread and wait for it (from any other thread; inline on it)."""
    if on_torch_thread():
        return fn(*args, **kwargs)
    return _executor.submit(fn, *args, **kwargs).result()


async def run_async(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`run` for the event loop: await `fn` on the torch thread."""
    return await asyncio.get_running_loop().run_in_executor(_executor, functools.partial(fn, *args, **kwargs))


def set_num_threads(count: int) -> None:
    """torch.set_num_threads for the thread that runs the models."""
    import torch

    run(torch.set_num_threads, count)
