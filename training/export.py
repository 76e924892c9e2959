"""Write the final model folder atomically: weights, processor, model card, results, curves.

Everything is written into a hidden folder beside the target (`.<name>.export-<id>`) and
swapped into place in one rename, so a reader (the server, a copy) sees the previous model
or the new one, never half of either. The model folder holds the model and nothing else: the
training state stays in the run folder (loop.py), so export never has to carry it across.
A kill -9 part-way leaves at most a hidden folder beside the target, which the next export removes.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from training import lora
from training.config import FinetuneConfig, to_dict
from training.tasks.base import TaskBundle

logger = logging.getLogger(__name__)

RESULTS_FILE = "all_results.json"
CURVES_FILE = "training_curves.png"
RUN_CONFIG_FILE = "training_config.yaml"
# Files of a save_pretrained model folder that are copied from the best checkpoint.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")

EXPORT_PREFIX = ".{name}.export-"

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(tmp: Path, target: Path) -> Path | None:
    """Make the complete folder `tmp` appear at `target` (one atomic exchange where the OS has
    renameat2, else two renames: a brief window without a folder, never a half one).

    Returns the hidden folder that now holds the previous content, for the caller to remove, or
    None when `target` did not exist.
    """
    if not target.exists():
        tmp.rename(target)
        return None
    if exchange_dirs(tmp, target):
        return tmp
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    tmp.rename(target)
    return old


def swap_into_place(tmp: Path, target: Path) -> None:
    """Make the complete folder `tmp` appear at `target`; the previous content is then removed."""
    old = replace_dir(tmp, target)
    if old is not None:
        shutil.rmtree(old)


def recover_interrupted_export(target: Path) -> None:
    """Remove what an export that was killed left beside `target`: hidden `.<name>.export-*` and
    `.<name>.old-*` folders (a new model not yet swapped in, or the previous one not yet removed)."""
    target = Path(target).resolve()
    if not target.parent.is_dir():
        return
    prefix = EXPORT_PREFIX.format(name=target.name)
    for folder in target.parent.iterdir():
        if folder.name.startswith(prefix) or folder.name.startswith(f".{target.name}.old-"):
            shutil.rmtree(folder, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """safetensors writes 0600 files; a server running as another user must read them."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


# --------------------------------------------------------------------------------------------
# Model card.


def _dataset_id(config: FinetuneConfig) -> str:
    if config.dataset_id:
        return config.dataset_id
    if config.dataset_name:
        return config.dataset_name
    source = config.train_file or config.train_dir or "local"
    return Path(source).parent.name or Path(source).stem


AUTO_CLASSES = {"text-classification": "AutoModelForSequenceClassification",
                "text-generation": "AutoModelForCausalLM", "image-classification": "AutoModelForImageClassification"}


def _use_section(config: FinetuneConfig, bundle: TaskBundle, adapter: bool) -> str:
    chat = bundle.pipeline_tag == "text-generation" and getattr(bundle.processor, "chat_template", None)
    if adapter:
        auto = AUTO_CLASSES.get(config.task, "AutoModel")
        return f"""A PEFT adapter on `{config.model_name_or_path}` (`adapter_config.json` names it); `config.json` beside
it is the fine-tuned configuration (labels, pad id), the trained head is in the adapter (`modules_to_save`).

```python
from peft import PeftModel
from transformers import AutoConfig, {auto}

folder = "path/to/this/folder"
base = {auto}.from_pretrained("{config.model_name_or_path}", config=AutoConfig.from_pretrained(folder))
model = PeftModel.from_pretrained(base, folder).merge_and_unload()
```"""
    if chat:
        return f"""```python
from transformers import pipeline

chat = pipeline("{bundle.pipeline_tag}", model="path/to/this/folder")
chat([{{"role": "user", "content": "Hello!"}}], max_new_tokens=64)  # the chat template is applied
```"""
    return f"""```python
from transformers import pipeline

pipe = pipeline("{bundle.pipeline_tag}", model="path/to/this/folder")
```"""


def _samples_section(samples: list[dict] | None) -> str:
    if not samples:
        return ""
    rows = []
    for sample in samples:
        rows.append(f"- **prompt**: {sample['prompt']}\n  - **model**: {sample['generated'] or '(nothing)'}\n"
                    f"  - *held-out answer*: {sample['reference']}")
    return ("\n## Sample generations\n\nGreedy answers of the fine-tuned model to held-out prompts (never trained on), "
            "with the held-out answer:\n\n" + "\n".join(rows) + "\n")


def build_model_card(config: FinetuneConfig, bundle: TaskBundle, results: dict, world: dict,
                     samples: list[dict] | None = None, adapter: dict | None = None) -> ModelCard:
    """Hub model card: YAML metadata (pipeline_tag, base_model, datasets, model-index) + prose. `adapter`: the
    adapter_config.json of a LoRA run (an adapter folder when not merged)."""
    name = config.run_name or Path(config.output_dir).name
    dataset = _dataset_id(config)
    split = "test" if any(k.startswith("test_") for k in results) else "validation"
    prefix = "test_" if split == "test" else "eval_"
    metric_keys = ("accuracy", "f1_macro") if bundle.pipeline_tag != "text-generation" else ("perplexity", "loss")
    eval_results = [
        EvalResult(task_type=bundle.pipeline_tag, dataset_type=dataset, dataset_name=dataset,
                   dataset_config=config.dataset_config_name, dataset_split=split,
                   metric_type=key, metric_value=round(float(results[prefix + key]), 4))
        for key in metric_keys if isinstance(results.get(prefix + key), (int, float))
    ]
    base_model = config.base_model_id or config.model_name_or_path
    unmerged = adapter is not None and not config.merge_adapter
    tags = ["generated_from_trainer", "accelerate", bundle.pipeline_tag]
    if adapter is not None:
        tags += ["lora", "peft"] + ([f"base_model:adapter:{base_model}"] if unmerged else [])
    data = ModelCardData(
        model_name=name,
        base_model=base_model,
        datasets=[dataset],
        pipeline_tag=bundle.pipeline_tag,
        library_name="peft" if unmerged else "transformers",
        license="apache-2.0",
        tags=tags,
        eval_results=eval_results or None,
    )
    metrics_rows = "\n".join(
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in results.items() if isinstance(v, (int, float))
    )
    labels = ", ".join(bundle.labels.names) if bundle.labels else "n/a"
    hyper = {k: getattr(config, k) for k in (
        "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
        "max_train_steps", "lr_scheduler_type", "num_warmup_steps", "weight_decay", "seed", "max_length",
        "block_size", "freeze")}
    if adapter is not None:
        targets = adapter.get("target_modules")
        hyper.update({"use_peft": True, "lora_r": config.lora_r, "lora_alpha": config.lora_alpha,
                      "lora_dropout": config.lora_dropout,
                      "lora_target_modules": sorted(targets) if isinstance(targets, (list, set)) else targets,
                      "lora_modules_to_save": adapter.get("modules_to_save"), "merge_adapter": config.merge_adapter})
    trained = ""
    if isinstance(results.get("trainable_parameters"), int) and results.get("total_parameters"):
        share = 100 * results["trainable_parameters"] / results["total_parameters"]
        trained = (f"- Trained parameters: {results['trainable_parameters']:,} of {results['total_parameters']:,} "
                   f"({share:.2f} %)")
        if adapter is not None:
            where = "this folder is the adapter" if unmerged else "merged into the weights"
            trained += f", LoRA r={config.lora_r} alpha={config.lora_alpha} ({where})"
    body = f"""
# {name}

Fine-tuned from `{data.base_model}` on `{dataset}` for **{bundle.pipeline_tag}** with
`accelerate launch training/finetune.py`.

- Labels: {labels}
- Trained on {results.get('train_examples')} examples, evaluated on {results.get('eval_examples')}
- Hardware: {world.get('num_processes')} process(es) on {world.get('device')}, mixed precision {world.get('mixed_precision')}
{trained}

## Results

| metric | value |
|---|---|
{metrics_rows}

![training curves]({CURVES_FILE})
{_samples_section(samples)}
## Use

{_use_section(config, bundle, unmerged)}

## Training hyper-parameters

```yaml
{yaml.safe_dump(hyper, sort_keys=False).strip()}
```

The complete configuration is in `{RUN_CONFIG_FILE}`.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def plot_curves(history: list[dict], main_metric: str, path: Path) -> None:
    """Training loss and eval metric against optimizer steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r[f"eval_{main_metric}"]) for r in history if f"eval_{main_metric}" in r]
    eval_loss = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train loss")
    if eval_loss:
        ax_loss.plot(*zip(*eval_loss, strict=True), "o-", label="eval loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    if evals:
        ax_metric.plot(*zip(*evals, strict=True), "o-", color="tab:green")
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(f"eval {main_metric}")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The export, one function per file group.


def write_weights(config: FinetuneConfig, bundle: TaskBundle, best_dir: Path, folder: Path) -> None:
    """Copy the best model's `save_pretrained` files (config, safetensors weights) into `folder`. A LoRA run
    (the best checkpoint is an adapter, and the in-memory model holds the best weights): the merged model,
    or the adapter folder with `--merge_adapter false`."""
    if (best_dir / lora.ADAPTER_CONFIG).is_file():
        if config.merge_adapter:
            lora.write_merged(bundle.model, folder)
        else:
            lora.write_adapter(bundle.model, best_dir, folder, config.model_name_or_path)
        return
    copied = [f for f in MODEL_FILES if (best_dir / f).is_file()]
    copied += [p.name for p in best_dir.glob("model-*.safetensors")]  # shards of large models
    if "config.json" not in copied or not any(f.endswith(".safetensors") for f in copied):
        raise RuntimeError(f"best checkpoint {best_dir} is incomplete")
    for name in copied:
        shutil.copy2(best_dir / name, folder / name)


def write_processor(processor, folder: Path) -> None:
    """The tokenizer or image processor, next to the weights."""
    processor.save_pretrained(folder)


def write_results(config: FinetuneConfig, bundle: TaskBundle, results: dict, history: list[dict],
                  folder: Path) -> None:
    """all_results.json, the run's config and the training curves."""
    (folder / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    (folder / RUN_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    plot_curves(history, bundle.main_metric, folder / CURVES_FILE)


def write_card(config: FinetuneConfig, bundle: TaskBundle, results: dict, world: dict, folder: Path,
               samples: list[dict] | None = None, best_dir: Path | None = None) -> None:
    """The model card README.md."""
    adapter_file = best_dir / lora.ADAPTER_CONFIG if best_dir is not None else None
    adapter = json.loads(adapter_file.read_text()) if adapter_file is not None and adapter_file.is_file() else None
    build_model_card(config, bundle, results, world, samples, adapter).save(folder / "README.md")


def export_model(config: FinetuneConfig, bundle: TaskBundle, best_dir: Path, results: dict,
                 history: list[dict], world: dict, samples: list[dict] | None = None) -> Path:
    """Assemble the model folder from the best checkpoint and swap it into `config.output_dir`."""
    target = Path(config.output_dir).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_export(target)
    tmp = target.with_name(EXPORT_PREFIX.format(name=target.name) + uuid.uuid4().hex[:8])
    try:
        tmp.mkdir()
        write_weights(config, bundle, best_dir, tmp)
        write_processor(bundle.processor, tmp)
        write_results(config, bundle, results, history, tmp)
        write_card(config, bundle, results, world, tmp, samples, best_dir)
        _make_readable(tmp)
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s", target)
    return target
