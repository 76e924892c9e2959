"""LoRA with PEFT, the same for every task: which modules get adapters, which train fully, how checkpoints
stay small, and how the result is exported (merged into a plain model folder, or as an adapter folder).

Not named `peft.py`: `accelerate launch training/finetune.py` puts this folder first on sys.path, where
a `peft.py` would hide the real package.

Defaults, by task:
- adapters on every linear layer of the backbone (`nn.Linear`, GPT-2's `Conv1D`) and, in image models, on
  every convolution with groups == 1; never on the output embeddings (a causal LM's tied `lm_head`) nor on
  the head. Depthwise convolutions (groups > 1) stay frozen: PEFT cannot merge LoRA into them.
- fully trained and saved with the adapters (`modules_to_save`): the new classification head, i.e. the
  task model's modules besides its backbone, plus any module the base checkpoint did not provide; none
  for text generation.

Everything else is frozen and never changes: with `--use_peft`, a checkpoint holds only the trainable
tensors (adapters and head), the optimizer only their moments, and a resume rebuilds the frozen part
from the base model, which is what it was.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import warnings
from pathlib import Path

import torch
from transformers.pytorch_utils import Conv1D

from training.config import ConfigError, FinetuneConfig

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"
# What PEFT's LoRA can wrap; the names listed when a requested module does not exist.
ADAPTABLE = (torch.nn.Linear, Conv1D, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Embedding)


def is_peft_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


# --------------------------------------------------------------------------------------------
# What trains: adapters where, and which modules fully.


def head_modules(model: torch.nn.Module) -> list[str]:
    """The task model's children besides its backbone that hold weights: the head (`classifier`, `score`)."""
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        return []
    return [name for name, child in model.named_children()
            if child is not backbone and next(child.parameters(), None) is not None]


def new_modules(model: torch.nn.Module, loading_info: dict | None) -> list[str]:
    """Modules whose weights the base checkpoint did not provide (missing or resized ones): initialised here,
    so they must train fully."""
    if not loading_info:
        return []
    keys = set(loading_info.get("missing_keys") or [])
    keys |= {k[0] if isinstance(k, (tuple, list)) else k for k in loading_info.get("mismatched_keys") or []}
    params = dict(model.named_parameters())
    return sorted({key.rsplit(".", 1)[0] for key in keys if key in params and "." in key})


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the full module name, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def _under(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _default_targets(model: torch.nn.Module, excluded: set[str], convolutions: bool) -> list[str]:
    """Linear layers (and convolutions with groups == 1) outside the excluded modules."""
    kinds: tuple[type, ...] = (torch.nn.Linear, Conv1D) + ((torch.nn.Conv2d,) if convolutions else ())
    return [name for name, module in model.named_modules()
            if isinstance(module, kinds) and not _under(name, excluded)
            and getattr(module, "groups", 1) == 1]


def _compact(model: torch.nn.Module, names: list[str]) -> list[str]:
    """The leaf names (`q_proj`, `query`) when they select exactly `names`; else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = [n for n, _ in model.named_modules() if any(_matches(n, leaf) for leaf in leaves)]
    return leaves if sorted(selected) == sorted(names) else sorted(names)


def _existing_names(model: torch.nn.Module) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, ADAPTABLE) and n})
    return ", ".join(leaves)


def resolve_targets(model: torch.nn.Module, config: FinetuneConfig, excluded: set[str]) -> list[str]:
    """The module names that get adapters; ConfigError for a name that matches nothing, or for depthwise
    convolutions whose adapter could not be merged."""
    requested = config.lora_target_modules
    convolutions = config.task == "image-classification"
    if requested is None or [r.lower() for r in requested] == [ALL_LINEAR]:
        targets = _default_targets(model, excluded, convolutions=convolutions and requested is None)
        if not targets:
            raise ConfigError(f"{type(model).__name__} has no linear layers outside its head for LoRA; name the "
                              f"modules with --lora_target_modules (modules: {_existing_names(model)})")
        return _compact(model, targets)
    names = [n for n, _ in model.named_modules() if n]
    for target in requested:
        if not any(_matches(n, target) for n in names):
            raise ConfigError(f"--lora_target_modules {target!r} names no module of {type(model).__name__}; "
                              f"its adaptable modules are named: {_existing_names(model)}")
    chosen = {n: m for n, m in model.named_modules() if any(_matches(n, t) for t in requested)}
    depthwise = sorted(n for n, m in chosen.items() if isinstance(m, torch.nn.Conv2d) and m.groups > 1)
    if depthwise:
        shown = ", ".join(depthwise[:3]) + (f" and {len(depthwise) - 3} more" if len(depthwise) > 3 else "")
        if config.merge_adapter:
            raise ConfigError(f"--lora_target_modules selects depthwise convolutions (groups > 1: {shown}); PEFT "
                              "cannot merge LoRA into them: leave them out, or keep the adapter unmerged with "
                              "--merge_adapter false")
        groups = sorted({chosen[n].groups for n in depthwise})
        if any(config.lora_r % g for g in groups):
            raise ConfigError(f"--lora_target_modules selects depthwise convolutions ({shown}) with groups "
                              f"{', '.join(map(str, groups))}: PEFT needs --lora_r divisible by groups; got {config.lora_r}")
    return list(requested)


def resolve_modules_to_save(model: torch.nn.Module, config: FinetuneConfig, loading_info: dict | None) -> list[str]:
    requested = config.lora_modules_to_save
    if requested is None:
        if config.task == "text-generation":
            return []
        heads = head_modules(model)
        extra = [m for m in new_modules(model, loading_info) if not _under(m, set(heads))]
        if extra:
            logger.info("newly initialised modules train fully too: %s", ", ".join(extra))
        return heads + extra
    names = [n for n, _ in model.named_modules() if n]
    for target in requested:
        if not any(n.endswith(target) for n in names):  # PEFT's own rule for modules_to_save
            children = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(f"--lora_modules_to_save {target!r} names no module of {type(model).__name__}; "
                              f"its top-level modules are: {children}")
    return list(requested)


def wrap(model: torch.nn.Module, config: FinetuneConfig, loading_info: dict | None = None) -> torch.nn.Module:
    """The model with LoRA adapters (a PeftModel): only adapters and modules_to_save train."""
    from peft import LoraConfig, TaskType, get_peft_model

    to_save = resolve_modules_to_save(model, config, loading_info)
    excluded = set(to_save)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded |= {n for n, m in model.named_modules() if output is not None and m is output}
    targets = resolve_targets(model, config, excluded)
    task_type = {"text-classification": TaskType.SEQ_CLS, "text-generation": TaskType.CAUSAL_LM}.get(config.task)
    # GPT-2's Conv1D stores its weight transposed (in, out): PEFT needs to know (it would warn and guess).
    conv1d = any(isinstance(m, Conv1D) and any(_matches(n, t) for t in targets) for n, m in model.named_modules())
    lora_config = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets,
        modules_to_save=list(to_save) or None, task_type=task_type, bias="none", fan_in_fan_out=conv1d,
    )
    with warnings.catch_warnings():  # PEFT asks the model about gradient checkpointing with a deprecated name
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora_config)
    saved = peft_model.peft_config["default"]
    # The base as the user named it (a Hub id or a path), whatever the loaded config says; PEFT's
    # sequence-classification model adds its usual head names (classifier, score) to modules_to_save.
    saved.base_model_name_or_path = config.model_name_or_path
    if saved.modules_to_save:
        saved.modules_to_save = list(dict.fromkeys(saved.modules_to_save))
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d alpha=%d on %s; trained fully: %s; %s of %s parameters train (%.2f %%)",
                config.lora_r, config.lora_alpha, _shown(targets), ", ".join(to_save) or "nothing",
                f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return peft_model


def _shown(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 8 else f"{len(names)} modules ({', '.join(names[:3])}, ...)"


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters (PEFT's count for a PeftModel: a wrapped head counted once)."""
    if is_peft_model(model):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------------------------
# Checkpoints: the trainable tensors only.


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def keep_trainable_in_checkpoints(accelerator) -> None:
    """accelerator.save_state writes only the trainable tensors of a PEFT model (adapters and head):
    the frozen rest is the base model's, rebuilt from it on resume."""

    def hook(models, weights, output_dir) -> None:
        for model, state in zip(models, weights, strict=False):
            if not is_peft_model(accelerator.unwrap_model(model)):
                continue
            keep = trainable_names(model)
            for key in [k for k in state if k not in keep]:
                del state[key]

    accelerator.register_save_state_pre_hook(hook)


def check_checkpoint(model: torch.nn.Module, checkpoint: Path) -> None:
    """A LoRA run resumes from a checkpoint that holds all of its trainable tensors (not from one of a full
    fine-tune, or of other LoRA settings)."""
    from safetensors import safe_open

    path = checkpoint / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{checkpoint} has no model.safetensors to resume a LoRA run from")
    with safe_open(str(path), "pt") as f:
        saved = set(f.keys())
    missing = sorted(trainable_names(model) - saved)
    if missing:
        raise ConfigError(f"{checkpoint} was not saved by a LoRA run with these settings (it lacks {missing[0]}"
                          f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); resume with the "
                          "options it was trained with, or start over with --overwrite_output_dir")


def load_adapter_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load an adapter folder's weights (adapters and modules_to_save) into the PeftModel `model`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{folder / ADAPTER_WEIGHTS} does not fit the model: {unexpected[:3]}")


# --------------------------------------------------------------------------------------------
# Export.


def write_merged(model: torch.nn.Module, folder: Path) -> None:
    """Merge the adapters into the weights and save the plain model (the PeftModel is consumed)."""
    merged = model.merge_and_unload()
    merged.save_pretrained(folder, safe_serialization=True)


def write_adapter(model: torch.nn.Module, best_dir: Path, folder: Path, base_name: str) -> None:
    """The PEFT adapter folder: adapter_config.json naming the base as the user gave it, the best adapter
    weights, and the fine-tuned config.json (labels, pad id) and generation config beside them."""
    shutil.copy2(best_dir / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
    adapter_config = json.loads((best_dir / ADAPTER_CONFIG).read_text())
    adapter_config["base_model_name_or_path"] = base_name
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None and base.can_generate():
        base.generation_config.save_pretrained(folder)
