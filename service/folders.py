"""Reading a model folder without loading it: is it servable, which task is it, what does its card say.

Cheap and torch-free (no weights are read beyond the safetensors header), so a scan can look at
every folder often. The task comes from the card's `pipeline_tag` (or an alias of it), then from
what a task recognises in the folder (a sentence-transformers `modules.json`), then from the
config's architecture (`...ForSequenceClassification`); the tasks are service/tasks/.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("service.folders")

PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_CONFIG = "adapter_config.json"
# PEFT's task types -> our tasks (a card's pipeline_tag wins over these)
ADAPTER_TASKS = {"SEQ_CLS": "text-classification", "CAUSAL_LM": "text-generation", "FEATURE_EXTRACTION": "feature-extraction"}


class InvalidFolder(Exception):
    """The folder is not a servable model; the message says why."""


@dataclass
class AdapterInfo:
    """A PEFT adapter folder's base model: as written in adapter_config.json, and where it was found
    (None: a Hub id, fetched when loading)."""

    base: str
    base_path: Path | None
    task_type: str | None


@dataclass
class FolderInfo:
    task: str
    architecture: str | None
    config: dict
    card: dict
    metrics: list[dict]
    results: dict | None
    adapter: AdapterInfo | None = None
    chat_template: bool = False

    @property
    def labels(self) -> list[str] | None:
        """The config's label names, for tasks that have labels."""
        from .tasks import TASKS

        id2label = self.config.get("id2label")
        if not TASKS[self.task].has_labels or not isinstance(id2label, dict) or not id2label:
            return None
        with contextlib.suppress(ValueError, TypeError):
            return [id2label[k] for k in sorted(id2label, key=int)]
        return None


def is_candidate(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".")


def folder_signature(path: Path) -> tuple:
    """What changes when a folder is written, replaced or swapped: its files' names, sizes, mtimes
    (an adapter's, its sibling base folder's too, so that a new base reloads its adapters)."""
    try:
        stat = path.stat()
        files = sorted(
            (p.name, s.st_size, s.st_mtime_ns)
            for p in path.iterdir()
            if p.is_file() and (s := p.stat())
        )
    except OSError:
        return ()
    signature = (stat.st_ino, tuple(files))
    if (path / ADAPTER_CONFIG).is_file():
        base = _adapter_base(path)
        sibling = path.parent / base if base and "/" not in base else None
        if sibling is not None and sibling.is_dir() and sibling != path:
            signature += (folder_signature(sibling),)
    return signature


def _adapter_base(path: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
        return base if isinstance(base, str) and base else None
    return None


def read_adapter(path: Path, models_dir: Path | None) -> AdapterInfo | None:
    """The base of a PEFT adapter folder: a sibling folder of that name in the models directory, a
    local path, or (online only) a Hub id. None when the folder is not an adapter."""
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidFolder(f"{ADAPTER_CONFIG} does not parse ({exc})") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise InvalidFolder(f"{ADAPTER_CONFIG} names no base_model_name_or_path")
    candidates = [models_dir / base] if models_dir is not None and "/" not in base else []
    candidates.append(Path(base).expanduser())
    found = next((c.resolve() for c in candidates if (c / "config.json").is_file() and c.resolve() != path.resolve()), None)
    if found is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        if offline or base.startswith(("/", ".", "~")) or base.count("/") > 1:
            raise InvalidFolder(f"the adapter's base model {base!r} is neither a folder of the models directory nor "
                                "a local model folder" + (", and the Hub is offline (HF_HUB_OFFLINE)" if offline else ""))
    return AdapterInfo(base, found, config.get("task_type"))


def read_card(path: Path) -> dict:
    """The metadata of the model card README.md, parsed by huggingface_hub's ModelCard ({} when there
    is none or it does not parse)."""
    from huggingface_hub import ModelCard

    readme = path / "README.md"
    if not readme.is_file():
        return {}
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception as exc:  # YAML errors, a header that is not a mapping, undecodable text
        log.warning("%s: model card metadata does not parse (%s); ignored", path.name, str(exc).splitlines()[0][:200])
        return {}


def card_metrics(card: dict) -> list[dict]:
    """The card's `model-index` as [{"task", "dataset", "split", "type", "name", "value"}]."""
    from huggingface_hub import ModelCardData

    try:
        results = ModelCardData(**card, ignore_metadata_errors=True).eval_results or []
    except Exception:
        return []
    return [{"task": r.task_type, "dataset": r.dataset_name or r.dataset_type, "split": r.dataset_split,
             "type": r.metric_type, "name": r.metric_name, "value": r.metric_value} for r in results]


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


def _check_weights(path: Path, allow_pickle: bool) -> None:
    """Safetensors weights, complete; pickle weights count only with allow_pickle and no safetensors."""
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        if allow_pickle and any((path / name).is_file() for name in PICKLE_WEIGHTS):
            return  # torch.load(weights_only=True) in from_pretrained
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


def detect_task(path: Path, card: dict, config: dict) -> str:
    """The served task of a folder, or InvalidFolder saying why there is none."""
    from .tasks import TASKS, task_for_tag

    tag = card.get("pipeline_tag")
    if tag is not None:
        task = task_for_tag(tag)
        if task is None:
            raise InvalidFolder(f"task {tag!r} is not served (supported: {', '.join(TASKS)})")
        return task
    for name, task in TASKS.items():
        if task.recognises(path, card, config):
            return name
    architectures = config.get("architectures") or []
    for arch in architectures:
        for name, task in TASKS.items():
            if isinstance(arch, str) and arch.endswith(task.architecture_suffixes):
                return name
    raise InvalidFolder(
        f"cannot tell the task: no pipeline_tag in README.md and architectures {architectures} "
        f"has no known head (supported tasks: {', '.join(TASKS)})"
    )


def _read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InvalidFolder("no config.json" if folder.name else "the base model has no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidFolder(f"config.json does not parse ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidFolder("config.json is not a JSON object")
    return config


def inspect_folder(path: Path, allow_pickle: bool = False, models_dir: Path | None = None) -> FolderInfo:
    """Validate a folder without loading weights; raises InvalidFolder with the reason.

    Weights must be safetensors; pickle weights (`pytorch_model.bin`) count only with
    `allow_pickle` (HF_SERVE_ALLOW_PICKLE) and when the folder has no safetensors. A PEFT adapter
    folder (adapter_config.json + adapter_model.safetensors) needs its base (`read_adapter`); its own
    config.json (the fine-tuned labels), else the base's, says what the model is.
    """
    from .tasks import TASKS

    adapter = read_adapter(path, models_dir)
    if adapter is None:
        config = _read_config(path)
        _check_weights(path, allow_pickle)
    else:
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise InvalidFolder("adapter_config.json without adapter_model.safetensors" +
                                (" (adapter_model.bin is not loaded)" if (path / "adapter_model.bin").is_file() else ""))
        _check_safetensors(weights)
        if (path / "config.json").is_file():
            config = _read_config(path)
        else:
            config = _read_config(adapter.base_path) if adapter.base_path is not None else {}

    card = read_card(path)
    if adapter is not None and "pipeline_tag" not in card and adapter.task_type in ADAPTER_TASKS:
        card_for_task = {**card, "pipeline_tag": ADAPTER_TASKS[adapter.task_type]}
    else:
        card_for_task = card
    name = detect_task(path, card_for_task, config)
    task = TASKS[name]
    processor_in = [path] + ([adapter.base_path] if adapter is not None and adapter.base_path is not None else [])
    if not any((folder / f).is_file() for folder in processor_in for f in task.processor_files):
        raise InvalidFolder(f"no {task.processor_description}")

    results = None
    results_file = path / "all_results.json"
    if results_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            results = json.loads(results_file.read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    chat = any(_has_chat_template(folder) for folder in processor_in)
    return FolderInfo(name, architectures[0] if architectures else None, config, card, card_metrics(card), results,
                      adapter, chat)


def _has_chat_template(folder: Path) -> bool:
    """A tokenizer with a chat template: chat_template.jinja, or the key in tokenizer_config.json."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    return False
