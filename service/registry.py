"""The model registry: find, validate, load and hot-reload the folders of `models_dir`.

Every non-hidden sub-folder is one model, named after the folder. A folder that is invalid or
half-written is listed as `failed` with the reason and never stops the server. A scan (at start,
every `reload_interval_s`, or on POST /admin/reload) compares each folder's signature (names,
sizes and mtimes of its files) with the loaded one and loads new or changed folders off the event
loop. The swap is one dict assignment on the event loop: requests already holding the old model
finish on it (its worker closes when the last one leaves), and a replacement that fails to load
leaves the old model serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import torch_thread
from .batching import ModelWorker
from .pipelines import ImageClassificationRunner, TextClassificationRunner, TextGenerationRunner

log = logging.getLogger("service.registry")

TASKS = ("text-classification", "text-generation", "image-classification")
TASK_ALIASES = {"sentiment-analysis": "text-classification"}
ARCH_SUFFIXES = (
    ("ForSequenceClassification", "text-classification"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForImageClassification", "image-classification"),
    ("ForImageClassificationWithTeacher", "image-classification"),
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model")


class InvalidFolder(Exception):
    """The folder is not a servable model; the message says why."""


class ModelNotFound(LookupError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(f"Model {name!r} not found. Known models: {', '.join(known) or '(none)'}")


class ModelUnavailable(RuntimeError):
    """The model exists but cannot serve now (loading, or failed to load)."""

    def __init__(self, message: str, loading: bool):
        super().__init__(message)
        self.loading = loading


# -- reading a folder (cheap, no torch) ----------------------------------------------------------

def is_candidate(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".")


def folder_signature(path: Path) -> tuple:
    """What changes when a folder is written, replaced or swapped: its files' names, sizes, mtimes."""
    try:
        stat = path.stat()
        files = sorted(
            (p.name, s.st_size, s.st_mtime_ns)
            for p in path.iterdir()
            if p.is_file() and (s := p.stat())
        )
    except OSError:
        return ()
    return (stat.st_ino, tuple(files))


def read_card(path: Path) -> dict:
    """The YAML header of the model card README.md ({} when there is none or it does not parse)."""
    readme = path / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError as exc:
        log.warning("%s: model card header is not valid YAML (%s); ignored", path.name, exc)
        return {}
    return data if isinstance(data, dict) else {}


def card_metrics(card: dict) -> list[dict]:
    """Flatten `model-index` into [{"task", "dataset", "split", "type", "name", "value"}]."""
    out = []
    for entry in card.get("model-index") or []:
        for result in (entry or {}).get("results") or []:
            task = (result.get("task") or {}).get("type")
            dataset = result.get("dataset") or {}
            for metric in result.get("metrics") or []:
                out.append({
                    "task": task,
                    "dataset": dataset.get("name") or dataset.get("type"),
                    "split": dataset.get("split"),
                    "type": metric.get("type"),
                    "name": metric.get("name"),
                    "value": metric.get("value"),
                })
    return out


def _check_safetensors(path: Path) -> None:
    """A truncated or corrupt safetensors file fails here, before torch ever sees it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > min(size - 8, 100 * 1024 * 1024):
                raise ValueError("header length out of range")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise ValueError(f"{size} bytes on disk, header describes {8 + header_len + end}")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise InvalidFolder(f"{path.name} is not a valid safetensors file ({exc})") from None


@dataclass
class FolderInfo:
    task: str
    architecture: str | None
    config: dict
    card: dict
    metrics: list[dict]
    results: dict | None


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def inspect_folder(path: Path, allow_pickle: bool = False) -> FolderInfo:
    """Validate a folder without loading weights; raises InvalidFolder with the reason.

    Weights must be safetensors; pickle weights (`pytorch_model.bin`) count only with
    `allow_pickle` (HF_SERVE_ALLOW_PICKLE) and when the folder has no safetensors.
    """
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InvalidFolder("no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidFolder(f"config.json does not parse ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidFolder("config.json is not a JSON object")

    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        if allow_pickle and any((path / name).is_file() for name in PICKLE_WEIGHTS):
            weights = []  # torch.load(weights_only=True) in load_runner
        else:
            other = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = (f" ({', '.join(other)} ignored: only safetensors weights are loaded unless "
                    "HF_SERVE_ALLOW_PICKLE=true)") if other else ""
            raise InvalidFolder("no safetensors weights" + hint)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidFolder(f"model.safetensors.index.json does not parse ({exc})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise InvalidFolder(f"missing weight shards: {', '.join(sorted(missing))}")
    for weight_file in weights:
        _check_safetensors(weight_file)

    card = read_card(path)
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else None
    task = TASK_ALIASES.get(card.get("pipeline_tag"), card.get("pipeline_tag"))
    if task is None:
        task = next((t for arch in architectures for suffix, t in ARCH_SUFFIXES if arch.endswith(suffix)), None)
        if task is None:
            raise InvalidFolder(
                f"cannot tell the task: no pipeline_tag in README.md and architectures {architectures} "
                f"has no known head (supported tasks: {', '.join(TASKS)})"
            )
    if task not in TASKS:
        raise InvalidFolder(f"task {task!r} is not served (supported: {', '.join(TASKS)})")
    if task == "image-classification":
        if not (path / "preprocessor_config.json").is_file():
            raise InvalidFolder("no preprocessor_config.json (image processor)")
    elif not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InvalidFolder("no tokenizer files (tokenizer.json / tokenizer_config.json / vocab)")

    results = None
    results_file = path / "all_results.json"
    if results_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            results = json.loads(results_file.read_text(encoding="utf-8"))
    return FolderInfo(task, architecture, config, card, card_metrics(card), results)


def load_runner(path: Path, info: FolderInfo, settings):
    """Load weights and processor (blocking: call it on the torch thread, service/torch_thread.py).
    safetensors only (pickle only with allow_pickle), never remote code.

    The weights are read into memory (`disable_mmap`): a memory-mapped file that someone overwrites in
    place (`cp new/model.safetensors models/x/`) would kill the whole server with SIGBUS on the next
    forward pass. A replaced or rewritten file is picked up by the next scan instead.
    """
    import transformers
    from transformers import (
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    transformers.utils.logging.disable_progress_bar()
    model_cls = {
        "text-classification": AutoModelForSequenceClassification,
        "text-generation": AutoModelForCausalLM,
        "image-classification": AutoModelForImageClassification,
    }[info.task]
    try:
        model, loading = model_cls.from_pretrained(
            path, use_safetensors=None if getattr(settings, "allow_pickle", False) else True,
            trust_remote_code=False, local_files_only=True, disable_mmap=True,
            dtype=settings.resolved_dtype(), output_loading_info=True,
        )
    except Exception as exc:
        raise InvalidFolder(f"weights do not load: {type(exc).__name__}: {str(exc)[:300]}") from None
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise InvalidFolder(
            f"{info.task} needs weights the folder lacks ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): "
            "is this a base model without a fine-tuned head?"
        )
    model = model.to(settings.resolved_device()).eval()
    try:
        if info.task == "image-classification":
            processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        else:
            processor = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise InvalidFolder(f"processor does not load: {type(exc).__name__}: {str(exc)[:300]}") from None
    _smoke_test(model, processor, info.task)
    try:
        if info.task == "text-classification":
            return TextClassificationRunner(model, processor, settings.max_input_length, settings.max_input_chars)
        if info.task == "text-generation":
            return TextGenerationRunner(model, processor, settings.max_input_length, settings.max_new_tokens,
                                        settings.max_input_chars)
        return ImageClassificationRunner(model, processor)
    except ValueError as exc:
        raise InvalidFolder(str(exc)) from None


def _smoke_test(model, processor, task: str) -> None:
    """One tiny forward pass before the model is served: weights whose bytes are corrupt (but whose
    file is well-formed) give NaN/inf logits, and a folder like that must not replace a working model."""
    import torch

    try:
        with torch.inference_mode():
            if task == "image-classification":
                from PIL import Image

                pixels = processor(images=[Image.new("RGB", (32, 32), (128, 128, 128))], return_tensors="pt")["pixel_values"]
                logits = model(pixel_values=pixels.to(model.device, model.dtype)).logits
            else:
                ids = processor("Hello world", return_tensors="pt")["input_ids"][:, :8]
                if ids.shape[1] == 0:
                    return
                logits = model(input_ids=ids.to(model.device)).logits
    except Exception as exc:  # some inputs may legitimately fail (e.g. a vocabulary mismatch): its requests will say so
        log.warning("model smoke test raised %s: %s; serving it anyway", type(exc).__name__, str(exc)[:200])
        return
    if not bool(torch.isfinite(logits.float()).all()):
        raise InvalidFolder("the model's outputs on a test input are NaN/inf: corrupt weights?")


# -- the registry (event-loop side) ----------------------------------------------------------------

@dataclass(eq=False)
class Entry:
    name: str
    path: Path
    signature: tuple
    status: str  # available (lazy, not loaded) | loading | ready | failed
    info: FolderInfo | None = None
    runner: Any = None
    worker: ModelWorker | None = None
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
        labels = None
        if self.runner is not None:
            labels = self.runner.labels
        elif info and info.task != "text-generation" and info.config.get("id2label"):
            id2label = info.config["id2label"]
            labels = [id2label[k] for k in sorted(id2label, key=int)]
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
        }

    def retire(self) -> None:
        self.retired = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.retired and self.users == 0 and self.worker is not None:
            self.worker.close()
            self.worker = None


class Registry:
    def __init__(self, settings, metrics=None):
        self.settings = settings
        self.metrics = metrics
        self.models_dir = Path(settings.models_dir)
        self.entries: dict[str, Entry] = {}
        self.initial_scan_done = False
        self._scan_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._initial: asyncio.Task | None = None

    # lifecycle
    async def start(self) -> None:
        """Register the folders now; load them (preload) in the background; start polling."""
        self._initial = asyncio.create_task(self._initial_scan())
        if self.settings.reload_interval_s > 0:
            self._poller = asyncio.create_task(self._poll())

    async def _initial_scan(self) -> None:
        try:
            await self.scan()
        finally:
            self.initial_scan_done = True

    async def stop(self) -> None:
        for task in (self._poller, self._initial):
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
                    info = await asyncio.to_thread(inspect_folder, path, self.settings.allow_pickle)
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
        if self.metrics is not None:
            self.metrics.reloads.labels("failed").inc()

    async def _load(self, name, path, sig, info, old: Entry | None) -> bool:
        started = time.perf_counter()
        try:
            runner = await torch_thread.run_async(load_runner, path, info, self.settings)
        except InvalidFolder as exc:
            self._reject(name, path, sig, old, str(exc))
            return False
        except Exception as exc:  # anything else from transformers: still not fatal for the server
            log.exception("model %s: loading failed", name)
            self._reject(name, path, sig, old, f"{type(exc).__name__}: {str(exc)[:300]}")
            return False
        entry = Entry(name, path, sig, "ready", info, runner=runner, loaded_at=time.time())
        entry.worker = ModelWorker(name, runner, self.settings, self.metrics)
        current = self.entries.get(name)
        if current is None or (current is not old and current.status != "loading"):
            entry.retire()  # removed or superseded while loading (scans are serialised, so rare)
            return False
        self.entries[name] = entry  # the atomic swap
        if old is not None:
            old.retire()
        log.info("model %s: %s %s (%s) in %.2fs", name, "reloaded" if old else "loaded", info.task, info.architecture, time.perf_counter() - started)
        if self.metrics is not None:
            self.metrics.reloads.labels("loaded").inc()
        return True

    def _count(self) -> None:
        if self.metrics is None:
            return
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

    async def acquire(self, name: str) -> Entry:
        """A ready entry whose worker stays open until `release` (loads it first if lazy)."""
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
