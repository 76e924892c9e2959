"""Give freed heap memory back to the operating system.

glibc keeps memory that Python and torch free (per-thread arenas, fragmented heaps) for reuse; a
server with several threads (the event loop, the torch thread, generation schedulers) and bursts
of differently sized batches then sees its RSS climb in steps and never come down, although nothing
leaks (benchmarks/README_soak.md has the measurements). `malloc_trim(0)` releases the free pages of every arena; calling it every few
seconds costs microseconds to milliseconds and nothing on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("service.memory")
TRIM_INTERVAL_S = 5.0
_M_ARENA_MAX = -8  # mallopt parameter number, from glibc's malloc.h


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def limit_arenas(count: int = 2) -> None:
    """Cap glibc's malloc arenas (default 8 per core): the torch thread, the event loop, generation
    schedulers and the thread pool would otherwise each fragment a heap of their own. Call before threads start."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).mallopt(_M_ARENA_MAX, count)


async def trim_periodically(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Run malloc_trim(0) every `interval_s` seconds (in a thread: it may take a few ms)."""
    trim = _malloc_trim()
    if trim is None:
        log.info("malloc_trim is not available: freed memory stays with the allocator")
        return
    while True:
        await asyncio.sleep(interval_s)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(trim, 0)
