"""Loading a folder into a runner (blocking: call on the torch thread, service/torch_thread.py).

The task decides the model class, processor and runner (service/tasks/); this module holds the rules
every task loads by: safetensors only (pickle only with allow_pickle, and then with torch's
weights_only unpickler), never remote code, nothing fetched, and a smoke test before serving.

The weights are read into memory (`disable_mmap`): a memory-mapped file that someone overwrites in
place (`cp new/model.safetensors models/x/`) would kill the whole server with SIGBUS on the next
forward pass. A replaced or rewritten file is picked up by the next scan instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .backends import select as select_backend
from .folders import FolderInfo, InvalidFolder, read_adapter
from .settings import Settings

log = logging.getLogger("service.loading")
# Any of these in an adapter folder means it brings its own processor.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "preprocessor_config.json")


def warn_if_dtype_is_slow(settings: Settings) -> None:
    """One startup warning for HF_SERVE_DTYPE=bfloat16 on a CPU that only emulates bf16 (ResNet-50
    forwards measured over 20x slower than float32 there)."""
    if settings.dtype != "bfloat16" or settings.resolved_device() != "cpu":
        return
    from training.precision import emulated_bf16_note

    if note := emulated_bf16_note():
        log.warning("dtype bfloat16 on the CPU: %s; HF_SERVE_DTYPE=auto (float32) serves faster here", note)


def load_runner(path: Path, info: FolderInfo, settings: Settings) -> Any:
    """The folder's task loads it; its smoke input must give finite outputs."""
    from .tasks import TASKS

    try:
        runner = TASKS[info.task].load(path, settings)
    except ValueError as exc:  # a runner that refuses its model (e.g. no pad token): the folder's fault
        raise InvalidFolder(str(exc)) from None
    smoke_test(runner)
    select_backend(runner, path, info, settings)
    return runner


def _from_pretrained(model_cls, source, settings: Settings, local: bool, **kwargs):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        return model_cls.from_pretrained(
            source, use_safetensors=None if settings.allow_pickle else True,
            trust_remote_code=False, local_files_only=local, disable_mmap=True,
            dtype=settings.resolved_dtype(), output_loading_info=True, **kwargs,
        )
    except Exception as exc:
        raise InvalidFolder(f"weights do not load: {type(exc).__name__}: {str(exc)[:300]}") from None


def _refuse_missing(missing: list[str], task: str) -> None:
    if missing:
        raise InvalidFolder(
            f"{task} needs weights the folder lacks ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): "
            "is this a base model without a fine-tuned head?"
        )


def load_model(model_cls, path: Path, settings: Settings, task: str,
               ignore_missing: Callable[[str], bool] = lambda key: False):
    """`model_cls.from_pretrained` under the server's rules, on the configured device, in eval mode.
    Weights the head needs but the folder lacks fail the folder (a base model without a head).
    A PEFT adapter folder loads its base, then the adapter (service/adapters.py)."""
    adapter = read_adapter(path, settings.models_dir)
    if adapter is not None:
        from .adapters import load_adapter_model

        return load_adapter_model(model_cls, path, adapter, settings, task, ignore_missing)
    model, loading = _from_pretrained(model_cls, path, settings, local=True)
    _refuse_missing(sorted(k for k in loading.get("missing_keys") or [] if not ignore_missing(k)), task)
    return model.to(settings.resolved_device()).eval()


def load_processor(processor_cls, path: Path, settings: Settings):
    """A tokenizer or image processor from the folder (an adapter without one: from its base)."""
    source = path
    adapter = read_adapter(path, settings.models_dir)
    if adapter is not None and not any((path / f).is_file() for f in PROCESSOR_FILES):
        source = adapter.base_path or adapter.base
    try:
        return processor_cls.from_pretrained(source, local_files_only=source is path or adapter.base_path is not None,
                                             trust_remote_code=False)
    except Exception as exc:
        raise InvalidFolder(f"processor does not load: {type(exc).__name__}: {str(exc)[:300]}") from None


def smoke_test(runner) -> None:
    """One tiny forward pass before the model is served: weights whose bytes are corrupt (but whose
    file is well-formed) give NaN/inf outputs, and a folder like that must not replace a working model."""
    import torch

    try:
        outputs = runner.smoke()
    except Exception as exc:  # some inputs may legitimately fail (e.g. a vocabulary mismatch): its requests will say so
        log.warning("model smoke test raised %s: %s; serving it anyway", type(exc).__name__, str(exc)[:200])
        return
    if outputs is not None and not bool(torch.isfinite(outputs.float()).all()):
        raise InvalidFolder("the model's outputs on a test input are NaN/inf: corrupt weights?")
