"""The live set of models: scan `models_dir`, load (service/loading.py), swap, lease.

Every non-hidden sub-folder is one model, named after the folder. A folder that is invalid or
half-written is listed as `failed` with the reason and never stops the server (service/folders.py
says why). A scan (at start, every `reload_interval_s`, or on POST /admin/reload) compares each
folder's signature (names, sizes and mtimes of its files) with the loaded one and loads new or
changed folders on the torch thread. The swap is one dict assignment on the event loop: requests
holding a lease on the old model finish on it (its worker closes when the last lease ends), and a
replacement that fails to load leaves the old model serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import torch_thread
from .adapters import unload
from .backends import describe as describe_backend
from .errors import ModelNotFound, ModelUnavailable
from .folders import FolderInfo, InvalidFolder, folder_signature, inspect_folder, is_candidate
from .loading import load_runner
from .metrics import Metrics
from .settings import Settings
from .tasks import TASKS

log = logging.getLogger("service.registry")


@dataclass(eq=False)
class Entry:
    name: str
    path: Path
    signature: tuple
    status: str  # available (lazy, not loaded) | loading | ready | failed
    info: FolderInfo | None = None
    runner: Any = None
    worker: Any = None  # the task's batcher: ModelWorker or GenerationScheduler
    error: str | None = None
    rejected_signature: tuple | None = None  # a replacement that failed: not retried until it changes
    loaded_at: float | None = None
    users: int = 0
    retired: bool = False
    load_task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def task(self) -> str | None:
        return self.info.task if self.info else None

    def describe(self) -> dict:
        info = self.info
        card = {k: v for k, v in (info.card if info else {}).items() if k != "model-index"}
        labels = self.runner.labels if self.runner is not None else (info.labels if info else None)
        return {
            "name": self.name,
            "status": self.status,
            "task": self.task,
            "error": self.error,
            "architecture": info.architecture if info else None,
            "labels": labels,
            "card": card,
            "metrics": info.metrics if info else [],
            "results": info.results if info else None,
            "loaded_at": self.loaded_at,
            "chat_template": bool(info and info.chat_template),
            **(describe_backend(getattr(self.runner, "backend", None)) if self.runner is not None
               else {"backend": None, "backend_note": None}),
        }

    def retire(self) -> None:
        self.retired = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.retired and self.users == 0 and self.worker is not None:
            runner = self.runner
            self.worker.close(on_stopped=lambda: torch_thread.run(unload, runner.model))
            self.worker = None


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.models_dir = Path(settings.models_dir)
        self.entries: dict[str, Entry] = {}
        self.initial_scan_done = False
        self._scan_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._reload: asyncio.Task | None = None  # the reload after a hung forward pass
        self._initial: asyncio.Task | None = None

    # lifecycle
    async def start(self) -> None:
        """Register the folders now; load them (preload) in the background; start polling."""
        loop = asyncio.get_running_loop()
        torch_thread.on_hang(lambda owner, seconds: loop.call_soon_threadsafe(self._hung, owner, seconds))
        self._initial = asyncio.create_task(self._initial_scan())
        if self.settings.reload_interval_s > 0:
            self._poller = asyncio.create_task(self._poll())

    async def _initial_scan(self) -> None:
        try:
            await self.scan()
        finally:
            self.initial_scan_done = True

    async def stop(self) -> None:
        torch_thread.on_hang(None)
        for task in (self._poller, self._initial, self._reload):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for entry in list(self.entries.values()):
            if entry.load_task is not None:
                entry.load_task.cancel()
            entry.retire()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                await self.scan()
            except Exception:
                log.exception("model scan failed")

    # scanning
    async def scan(self) -> dict:
        """Bring the registry in line with the folder; returns what changed."""
        async with self._scan_lock:
            summary: dict[str, list] = {"added": [], "replaced": [], "removed": [], "failed": [], "unchanged": []}
            found = await asyncio.to_thread(self._list_folders)
            for name in [n for n in self.entries if n not in found]:
                entry = self.entries.pop(name)
                log.info("model %s: folder removed, unloading", name)
                entry.retire()
                summary["removed"].append(name)

            to_load = []
            for name, (path, sig) in found.items():
                old = self.entries.get(name)
                if old is not None and (sig == old.signature or sig == old.rejected_signature):
                    summary["unchanged"].append(name)
                    continue
                try:
                    info = await asyncio.to_thread(inspect_folder, path, self.settings.allow_pickle, self.models_dir)
                except InvalidFolder as exc:
                    self._reject(name, path, sig, old, str(exc))
                    summary["failed"].append(name)
                    continue
                if old is not None and old.status == "ready":
                    to_load.append((name, path, sig, info, old))
                elif not self.settings.preload:
                    self.entries[name] = Entry(name, path, sig, "available", info)
                    summary["added"].append(name)
                else:
                    self.entries[name] = Entry(name, path, sig, "loading", info)
                    to_load.append((name, path, sig, info, None))
            self._count()
            for name, path, sig, info, old in to_load:
                ok = await self._load(name, path, sig, info, old)
                key = ("replaced" if old is not None else "added") if ok else "failed"
                summary[key].append(name)
            self._count()
            return summary

    def _list_folders(self) -> dict[str, tuple[Path, tuple]]:
        if not self.models_dir.is_dir():
            return {}
        return {p.name: (p, folder_signature(p)) for p in sorted(self.models_dir.iterdir()) if is_candidate(p)}

    def _reject(self, name, path, sig, old: Entry | None, reason: str) -> None:
        if old is not None and old.status == "ready":
            log.warning("model %s: replacement skipped, the old model keeps serving: %s", name, reason)
            old.error = f"replacement not loaded: {reason}"
            old.rejected_signature = sig
        else:
            if old is None or old.error != reason:
                log.warning("model %s: skipped: %s", name, reason)
            if old is not None:
                old.retire()
            self.entries[name] = Entry(name, path, sig, "failed", error=reason)
        self.metrics.reloads.labels("failed").inc()

    async def _load(self, name, path, sig, info, old: Entry | None) -> bool:
        started = time.perf_counter()
        try:
            # a load that hangs (a smoke test that never returns) must not keep the torch thread
            runner = await torch_thread.run_async(load_runner, path, info, self.settings, owner=name,
                                                  limit=max(600.0, 10 * self.settings.request_timeout_s))
        except InvalidFolder as exc:
            self._reject(name, path, sig, old, str(exc))
            return False
        except Exception as exc:  # anything else from transformers: still not fatal for the server
            log.exception("model %s: loading failed", name)
            self._reject(name, path, sig, old, f"{type(exc).__name__}: {str(exc)[:300]}")
            return False
        entry = Entry(name, path, sig, "ready", info, runner=runner, loaded_at=time.time())
        entry.worker = TASKS[info.task].worker(name, runner, self.settings, self.metrics)
        current = self.entries.get(name)
        if current is None or (current is not old and current.status != "loading"):
            entry.retire()  # removed or superseded while loading (scans are serialised, so rare)
            return False
        self.entries[name] = entry  # the atomic swap
        if old is not None:
            old.retire()
        log.info("model %s: %s %s (%s) in %.2fs", name, "reloaded" if old else "loaded", info.task, info.architecture, time.perf_counter() - started)
        self.metrics.reloads.labels("loaded").inc()
        return True

    def _hung(self, name: str | None, seconds: float) -> None:
        """A forward pass of `name` was given up as hung: list the model as failed, then load it again
        from its folder (a fresh model object, on the fresh torch thread)."""
        entry = self.entries.get(name) if name else None
        if entry is None or entry.status != "ready":
            return
        reason = f"a forward pass hung for more than {seconds:.0f} s; reloading"
        log.error("model %s: %s", name, reason)
        self.entries[name] = Entry(name, entry.path, (), "failed", entry.info, error=reason)
        entry.retire()
        self.metrics.reloads.labels("hung").inc()
        self._count()
        self._reload = asyncio.create_task(self.scan())  # the folder's signature now differs: it is loaded again

    def _count(self) -> None:
        for status in ("ready", "loading", "available", "failed"):
            self.metrics.models.labels(status).set(sum(e.status == status for e in self.entries.values()))

    # lookups
    def names(self) -> list[str]:
        return sorted(self.entries)

    def describe(self) -> list[dict]:
        return [self.entries[n].describe() for n in self.names()]

    def get(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFound(name, self.names())
        return entry

    @property
    def ready(self) -> bool:
        return self.initial_scan_done and not any(e.status == "loading" for e in self.entries.values())

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Entry]:
        """Hold a ready model for the length of the block: a reload or removal meanwhile swaps in the
        new model for new requests, and this one's worker stays open until the block ends."""
        entry = await self.acquire(name)
        try:
            yield entry
        finally:
            self.release(entry)

    async def acquire(self, name: str) -> Entry:
        """A ready entry whose worker stays open until `release` (loads it first if lazy); `lease` is
        the way to use it."""
        entry = self.get(name)
        if entry.status == "available":
            if entry.load_task is None:
                entry.load_task = asyncio.create_task(self._lazy_load(entry))
            await asyncio.shield(entry.load_task)
            entry = self.get(name)
        if entry.status == "loading":
            raise ModelUnavailable(f"Model {name!r} is loading, retry shortly", loading=True)
        if entry.status == "failed":
            raise ModelUnavailable(f"Model {name!r} failed to load: {entry.error}", loading=False)
        entry.users += 1
        return entry

    def release(self, entry: Entry) -> None:
        entry.users -= 1
        entry._maybe_close()

    async def _lazy_load(self, entry: Entry) -> None:
        async with self._scan_lock:
            if self.entries.get(entry.name) is not entry:
                return
            entry.status = "loading"
            loaded = await self._load(entry.name, entry.path, entry.signature, entry.info, None)
            if not loaded and self.entries.get(entry.name) is entry:
                entry.status = "failed"
            self._count()
