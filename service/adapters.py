"""PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`, from `--merge_adapter
false`), served like any folder. `adapter_mode` decides the memory:

- merge (default): base + adapter -> one plain model (`merge_and_unload`): as fast as a merged
  export, the base's memory once per adapter.
- share: one base in memory for every adapter on it (PEFT's multi-adapter model); each adapter's
  runner holds an `AdapterView`, which activates its adapter before each forward pass. All forward
  passes run on the one torch thread, so switching is safe; requests for different adapters run in
  separate forward passes.

The adapter folder's own config.json (the fine-tuned labels and pad id) is the model's config; the
classification head comes from the adapter (`modules_to_save`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .folders import AdapterInfo, InvalidFolder
from .settings import Settings

log = logging.getLogger("service.adapters")


class AdapterView:
    """One adapter of a shared PEFT model, looking like a plain model to the runners."""

    def __init__(self, shared: SharedBase, adapter_name: str):
        self._shared, self._name = shared, adapter_name

    def __call__(self, *args, **kwargs):
        model = self._shared.model
        if model.active_adapter != self._name:
            model.set_adapter(self._name)
        return model(*args, **kwargs)

    def __getattr__(self, item: str) -> Any:  # config, device, dtype, generation_config, get_base_model, ...
        return getattr(self._shared.model, item)

    def release(self) -> None:
        """The adapter's model was unloaded: drop the adapter, and the base with the last one."""
        self._shared.drop(self._name)


class SharedBase:
    def __init__(self, key: tuple, model):
        self.key, self.model, self.adapters = key, model, set()

    def drop(self, adapter_name: str) -> None:
        if adapter_name in self.adapters:
            self.adapters.discard(adapter_name)
            if self.adapters:
                self.model.delete_adapter(adapter_name)
            else:
                _SHARED.pop(self.key, None)


_SHARED: dict[tuple, SharedBase] = {}  # touched on the torch thread only
_LOADS = itertools.count()


def _head_covered(missing: list[str], adapter_keys: list[str]) -> list[str]:
    """The base's missing weights that the adapter does not bring (its `modules_to_save`)."""
    return [k for k in missing if not any(a == k or a.endswith("." + k) for a in adapter_keys)]


def load_adapter_model(model_cls, path: Path, adapter: AdapterInfo, settings: Settings, task: str,
                       ignore_missing: Callable[[str], bool]):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoConfig

    from .loading import _from_pretrained, _refuse_missing

    source = adapter.base_path or adapter.base
    config = AutoConfig.from_pretrained(path, trust_remote_code=False) if (path / "config.json").is_file() else None
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        adapter_keys = list(f.keys())
    labels = json.dumps(getattr(config, "id2label", None), sort_keys=True) if config is not None else ""
    key = (str(source), model_cls.__name__, labels, str(settings.resolved_dtype()), settings.resolved_device())
    # a fresh name per load: a replacement loads beside the adapter it replaces, which keeps serving
    # its requests in flight until it is retired
    name = "a" + hashlib.sha1(f"{path.resolve()}:{next(_LOADS)}".encode()).hexdigest()[:12]

    def base_model():
        kwargs = {"config": config} if config is not None else {}
        model, loading = _from_pretrained(model_cls, source, settings, local=adapter.base_path is not None, **kwargs)
        missing = sorted(k for k in loading.get("missing_keys") or [] if not ignore_missing(k))
        _refuse_missing(_head_covered(missing, adapter_keys), task)
        return model.to(settings.resolved_device()).eval()

    try:
        if settings.adapter_mode == "merge":
            peft_model = PeftModel.from_pretrained(base_model(), str(path), is_trainable=False)
            return peft_model.merge_and_unload().eval()
        shared = _SHARED.get(key)
        if shared is None:
            shared = SharedBase(key, PeftModel.from_pretrained(base_model(), str(path), adapter_name=name,
                                                               is_trainable=False).eval())
            _SHARED[key] = shared
        else:
            shared.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        shared.adapters.add(name)
        log.info("adapter %s shares its base %s with %d adapter(s)", path.name, adapter.base, len(shared.adapters))
        return AdapterView(shared, name)
    except InvalidFolder:
        raise
    except Exception as exc:
        raise InvalidFolder(f"the adapter does not load on {adapter.base}: {type(exc).__name__}: {str(exc)[:300]}") from None


def unload(model) -> None:
    """What the registry calls when a model is retired (on the torch thread)."""
    if isinstance(model, AdapterView):
        model.release()
