"""Which runtime serves a loaded model (`HF_SERVE_BACKEND`): the eager torch model as loaded, the same
model through torch.compile (service/compiled_backend.py), or an ONNX Runtime graph of it
(service/onnx_backend.py). Each alternative is checked against eager torch at load; one that fails
or disagrees leaves the model on eager torch, and `Backend.note` says why (GET /models shows it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .folders import FolderInfo
from .settings import Settings

log = logging.getLogger("service.backends")


@dataclass
class Backend:
    """Which runtime serves a model, and why (what GET /models shows)."""

    name: str  # torch | torch-compile | onnx | onnx-int8
    note: str | None = None  # why torch when another backend was asked for; or what it runs
    file: str | None = None
    exporter: str | None = None
    max_error: float | None = None  # largest disagreement with eager torch on the probe inputs
    seconds: float | None = None  # export or compilation (or cache read) + check


TORCH = Backend("torch")
RUNTIMES = {"onnx": "ONNX Runtime", "torch-compile": "torch.compile"}


def select(runner, path: Path, info: FolderInfo, settings: Settings) -> None:
    """Put a loaded runner on the configured backend, or say in one log line why it stays on eager
    torch (blocking: call on the torch thread). `runner.backend` records which."""
    if settings.backend == "torch":
        return
    if settings.backend == "onnx":
        from .onnx_backend import use_onnx as use
    else:
        from .compiled_backend import use_compiled as use
    backend = use(runner, path, info, settings)
    runner.backend = backend
    wanted = RUNTIMES[settings.backend]
    if backend.name == "torch":
        log.warning("model %s: served by torch, not %s: %s", path.name, wanted, backend.note)
        return
    if settings.backend == "onnx":
        from .loading import smoke_test

        smoke_test(runner)  # the same finite-output rule as on torch (a compiled model was checked against eager)
    log.info("model %s: served by %s (%s, %.1f s to ready, max difference to torch %.2g%s)", path.name, wanted,
             backend.name, backend.seconds or 0.0, backend.max_error or 0.0, f"; {backend.note}" if backend.note else "")


def describe(backend: Backend | None) -> dict[str, Any]:
    """The backend fields of GET /models."""
    backend = backend or TORCH
    return {"backend": backend.name, "backend_note": backend.note}
