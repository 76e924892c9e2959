"""Every training option, as typed dataclasses grouped by concern; recipes (YAML) and CLI flags fill them.

One dataclass per concern (model, data, optimisation, evaluation, output and checkpoints, logging),
combined into the flat `FinetuneConfig` that the rest of the code reads (`config.learning_rate`).
Precedence: dataclass defaults < recipe file < command-line flags. Each field's docstring (the
string literal right below it) is its `--help` text, shown in one `--help` group per concern, so
the documentation lives in one place. Flag names follow the transformers `*_no_trainer.py`
examples users already know; a recipe's keys are the flag names.

transformers.HfArgumentParser was considered: it reads help from field metadata rather than
docstrings, splits lists on spaces (`--label_names a,b` is one name there), has no `none` for
optional numbers and no recipe-under-flags precedence, so it would not shorten this file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

Task = Literal["text-classification", "text-generation", "image-classification"]
TASKS: tuple[str, ...] = typing.get_args(Task)


class ConfigError(ValueError):
    """A user mistake in the recipe or flags; printed as one line, exit code 2."""


@dataclass
class ModelArgs:
    """Model: what to start from and which of its parts train."""

    task: Task = "text-classification"
    """Task to fine-tune for: text-classification, text-generation or image-classification."""
    model_name_or_path: str = ""
    """Hub model id or local Hugging Face folder to start from."""
    base_model_id: str | None = None
    """Hub id recorded as `base_model` in the model card (default: model_name_or_path)."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model repository (off unless you trust it)."""
    freeze: str = "none"
    """Image models: `none` (fine-tune all), `backbone` (train the head only) or `partial:N` (last N stages too)."""
    channels_last: bool = True
    """Image models with convolutions: keep weights and activations channels-last (faster on CPU and GPU)."""


@dataclass
class PeftArgs:
    """LoRA: train low-rank adapters with PEFT instead of every weight (TRL's flag names)."""

    use_peft: bool = False
    """Train LoRA adapters (and the new head) on a frozen model instead of fine-tuning every weight."""
    lora_r: int = 16
    """LoRA rank: the inner dimension of each adapter."""
    lora_alpha: int = 32
    """LoRA scaling: an adapter's output is multiplied by lora_alpha / lora_r."""
    lora_dropout: float = 0.05
    """Dropout on the input of each adapter during training."""
    lora_target_modules: list[str] | None = None
    """Modules that get adapters: names or name suffixes (`q_proj,v_proj`), or `all-linear`. Default: every linear
    layer of the backbone, and for image models every convolution with groups == 1 (PEFT cannot merge LoRA into
    depthwise convolutions); never the output embeddings or the head."""
    lora_modules_to_save: list[str] | None = None
    """Modules trained fully and saved with the adapter. Default: the new classification head (and any other
    newly initialised module); none for text generation."""
    merge_adapter: bool = True
    """Export the model with the adapters merged in (a plain folder); false: a PEFT adapter folder that names its base."""


@dataclass
class DataArgs:
    """Data: where the examples come from, how they are split and turned into model inputs."""

    dataset_name: str | None = None
    """Hub dataset id (or a local dataset folder) to load with datasets.load_dataset."""
    dataset_config_name: str | None = None
    """Configuration (subset) of the Hub dataset, e.g. `sst2` for `nyu-mll/glue`."""
    dataset_id: str | None = None
    """Hub id recorded under `datasets` in the model card (default: dataset_name)."""
    train_file: str | None = None
    """Local training file: csv, json, jsonl or parquet."""
    validation_file: str | None = None
    """Local validation file (same formats); default: split off train by validation_split_percentage."""
    test_file: str | None = None
    """Local test file, evaluated once with the final model."""
    train_dir: str | None = None
    """Image folder `<class>/<image>` (or Caltech101's `101_ObjectCategories`) for training."""
    validation_dir: str | None = None
    """Image folder `<class>/<image>` for validation."""
    train_split: str = "train"
    """Split of the Hub dataset used for training."""
    validation_split: str | None = None
    """Split used for validation (default: `validation`, then `test`, else split off train)."""
    test_split: str | None = None
    """Split evaluated once with the final model (default: none)."""
    validation_split_percentage: float = 10.0
    """Percent of train held out for validation when the data has no validation split."""
    train_samples_per_class: int | None = None
    """Image folders without validation data: take this many training images per class, rest to eval (Caltech101 protocol: 30)."""
    drop_background_class: bool = True
    """Caltech101 folder layout: drop the BACKGROUND_Google clutter class."""
    text_column: str | None = None
    """Column holding the text (default: `text`, `sentence`, `content` or `review`, whichever exists)."""
    text_pair_column: str | None = None
    """Second text column for sentence-pair classification (e.g. `sentence2`)."""
    label_column: str = "label"
    """Column holding the class label (ints or strings)."""
    image_column: str | None = None
    """Column holding the image (default: `image` or `img`, whichever exists)."""
    label_names: list[str] | None = None
    """Class names for integer labels without names, in label order (e.g. `negative,positive`)."""
    max_train_samples: int | None = None
    """Use at most this many training examples (seeded random subset; for quick runs)."""
    max_eval_samples: int | None = None
    """Use at most this many validation/test examples (seeded random subset)."""
    on_bad_image: Literal["skip", "fail"] = "skip"
    """What to do with an image that cannot be decoded: skip it (counted) or fail."""
    preprocessing_num_workers: int | None = None
    """Processes for tokenisation with datasets.map (default: one)."""
    max_length: int = 128
    """Classification: truncate texts to this many tokens."""
    block_size: int = 128
    """Text generation: length of the token blocks the corpus is cut into; conversations are cut at this length."""
    chat_template: str | None = None
    """Text generation on conversations: a Jinja chat template (a file or the template itself) for a model without one,
    or to replace its own; saved with the tokenizer."""
    assistant_only_loss: bool | None = None
    """Conversations: train on the assistant turns only (their end-of-turn token included). Default: on for
    conversational data (a `messages` column, or `prompt`/`completion`)."""
    group_by_length: bool = True
    """Classification: batch texts of similar length together (less padding, faster)."""


@dataclass
class OptimArgs:
    """Optimisation: batches, AdamW, learning-rate schedule, length of the run."""

    per_device_train_batch_size: int = 16
    """Training batch size per device (process)."""
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    num_train_epochs: float = 3.0
    """Number of passes over the training data."""
    max_train_steps: int | None = None
    """Total optimizer steps; overrides num_train_epochs when set."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr_scheduler_type: str = "linear"
    """Scheduler from transformers.get_scheduler: linear, cosine, constant, constant_with_warmup, ..."""
    num_warmup_steps: int = 0
    """Linear warm-up steps of the learning rate."""
    max_grad_norm: float | None = 1.0
    """Clip gradients to this norm (none: no clipping)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision. auto: `accelerate launch --mixed_precision` when that says bf16/fp16, else bf16
    where the hardware has native bf16 (a CUDA GPU with bf16; a CPU with AMX or AVX-512 BF16), else
    float32. no: float32. Weights, optimizer state and checkpoints are float32 either way."""
    seed: int = 42
    """Random seed: data order, initialisation of new heads, dropout, augmentations."""


@dataclass
class EvalArgs:
    """Evaluation: when to evaluate, which model is kept, when to stop early."""

    per_device_eval_batch_size: int = 64
    """Evaluation batch size per device (process)."""
    eval_steps: int | None = None
    """Also evaluate every N optimizer steps (always evaluated at the end of each epoch)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improving the main metric."""
    eval_on_start: bool = False
    """Also evaluate before the first step (the starting model's metrics, reported as start_eval_*)."""
    num_sample_generations: int = 3
    """Conversations: greedy answers to this many held-out prompts, written into the model card (0: none)."""


@dataclass
class CheckpointArgs:
    """Output and checkpoints: the model folder (what is served) and the run folder (training state)."""

    output_dir: str = "models/finetuned"
    """Where the exported model folder goes: the model, its processor, card and results, nothing else."""
    run_dir: str | None = None
    """Where the training state goes (checkpoints/, tracker logs); default: runs/<name of output_dir>."""
    overwrite_output_dir: bool = False
    """Allow writing into a non-empty folder that is not one of our runs, or restarting a run from scratch."""
    checkpointing_steps: str | None = "epoch"
    """Save training state every N steps (an integer) or at the end of each `epoch`; none: never."""
    checkpoints_total_limit: int = 2
    """Keep only the last N training-state checkpoints."""
    resume_from_checkpoint: str | None = None
    """Resume from a checkpoint folder, or `latest` for the newest in run_dir/checkpoints."""


@dataclass
class LoggingArgs:
    """Logging: the loss curve and experiment trackers."""

    with_tracking: bool = False
    """Log metrics to experiment trackers (see report_to)."""
    report_to: str = "all"
    """Trackers for with_tracking: all, tensorboard, wandb, mlflow, comet_ml, ..."""
    run_name: str | None = None
    """Name of the run in trackers and the model card (default: output folder name)."""
    logging_steps: int = 10
    """Record the training loss every N optimizer steps."""


SECTIONS: tuple[type, ...] = (ModelArgs, PeftArgs, DataArgs, OptimArgs, EvalArgs, CheckpointArgs, LoggingArgs)


# Bases in reverse: a dataclass lists the fields of its last base first, so this keeps the order of
# SECTIONS in `fields()`, the saved config and `--help`.
@dataclass
class FinetuneConfig(LoggingArgs, CheckpointArgs, EvalArgs, OptimArgs, DataArgs, PeftArgs, ModelArgs):
    """Every option of a run; one flat namespace (`config.learning_rate`), declared by concern above."""


def run_folder(config: FinetuneConfig) -> Path:
    """The run folder: `--run_dir`, else `runs/<name of the output folder>` (relative to the current directory)."""
    if config.run_dir:
        return Path(config.run_dir)
    return Path("runs") / Path(config.output_dir).resolve().name


# --------------------------------------------------------------------------------------------
# Field documentation: the docstring below each field.


def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field (inherited ones included) to the string literal written right below it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# --------------------------------------------------------------------------------------------
# Type conversion shared by YAML values and CLI strings.


def _strip_optional(tp: object) -> tuple[object, bool]:
    """`X | None` -> (X, True)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _convert(name: str, value: object, tp: object) -> object:
    """Convert a YAML or CLI value to the field's type, or raise ConfigError naming the field."""
    base, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"--{name} needs a value")
    origin = typing.get_origin(base)
    try:
        if origin is Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise ConfigError(f"--{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
            return value
        if origin is list:
            items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[arg-type]
            return [str(item).strip() for item in items if str(item).strip()]
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"--{name} must be true or false; got {value!r}")
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)  # type: ignore[arg-type]
        if base is float:
            return float(value)  # type: ignore[arg-type]
        return str(value)
    except (TypeError, ValueError):
        kind = getattr(base, "__name__", str(base))
        raise ConfigError(f"--{name} must be {kind}; got {value!r}") from None


def _field_types(cls: type = FinetuneConfig) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------------------------
# Parsing.


def build_parser() -> argparse.ArgumentParser:
    """The CLI: `--recipe` plus one flag per config field, in one group per concern, help from the field docstrings."""
    parser = argparse.ArgumentParser(
        prog="accelerate launch training/finetune.py",
        description="Fine-tune a Hugging Face model with Accelerate. Flags override the recipe.",
        argument_default=argparse.SUPPRESS,  # unset flags stay unset, so the recipe shows through
    )
    parser.add_argument("--recipe", help="YAML file whose keys are the flags below (without --).")
    docs = field_docs(FinetuneConfig)
    defaults = FinetuneConfig()
    for section in SECTIONS:
        title, _, description = (section.__doc__ or section.__name__).partition(": ")
        group = parser.add_argument_group(title.lower(), description[:1].upper() + description[1:] or None)
        for name, tp in _field_types(section).items():
            base, _ = _strip_optional(tp)
            help_text = f"{docs.get(name, '')} (default: {getattr(defaults, name)})"
            if base is bool:
                group.add_argument(f"--{name}", nargs="?", const="true", metavar="BOOL", help=help_text)
            elif typing.get_origin(base) is Literal:
                group.add_argument(f"--{name}", choices=list(typing.get_args(base)), help=help_text)
            else:
                group.add_argument(f"--{name}", metavar=name.upper(), help=help_text)
    return parser


def load_recipe(path: str | Path) -> dict:
    """Read a YAML recipe: a flat mapping of field names to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of option names to values")
    return data


def make_config(values: dict) -> FinetuneConfig:
    """Build a validated FinetuneConfig from raw (YAML or CLI) values."""
    types_ = _field_types()
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(unknown)}")
    converted = {name: _convert(name, value, types_[name]) for name, value in values.items()}
    config = FinetuneConfig(**converted)
    validate(config)
    lora_only = sorted(name for name in values if name in _PEFT_ONLY)
    if lora_only and not config.use_peft:  # e.g. a LoRA recipe run with --use_peft false: a full fine-tune
        logging.getLogger("training").warning("%s ignored without --use_peft", ", ".join("--" + n for n in lora_only))
    return config


_PEFT_ONLY = {f.name for f in dataclasses.fields(PeftArgs)} - {"use_peft"}


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    """Parse `--recipe` and flags into a FinetuneConfig (flags override the recipe)."""
    namespace = vars(build_parser().parse_args(argv))
    recipe = namespace.pop("recipe", None)
    values = load_recipe(recipe) if recipe else {}
    values.update(namespace)
    return make_config(values)


_FREEZE = re.compile(r"^(none|backbone|partial:\d+)$")


def validate(config: FinetuneConfig) -> None:
    """Cross-field checks; raise ConfigError with one clear line."""
    if config.task not in TASKS:
        raise ConfigError(f"unknown task {config.task!r}; choose one of {', '.join(TASKS)}")
    if not config.model_name_or_path:
        raise ConfigError("--model_name_or_path is required")
    sources = [config.dataset_name, config.train_file, config.train_dir]
    if sum(s is not None for s in sources) != 1:
        raise ConfigError("give exactly one data source: --dataset_name, --train_file or --train_dir")
    if config.train_dir and config.task != "image-classification":
        raise ConfigError("--train_dir (image folders) is for --task image-classification")
    if not _FREEZE.match(config.freeze):
        raise ConfigError(f"--freeze must be none, backbone or partial:N; got {config.freeze!r}")
    if config.freeze != "none" and config.task != "image-classification":
        raise ConfigError("--freeze applies to image-classification models")
    if config.use_peft:
        if config.freeze != "none":
            raise ConfigError(f"--use_peft and --freeze {config.freeze} do not combine: LoRA freezes the whole model and "
                              "trains adapters; choose what else trains fully with --lora_modules_to_save")
        if config.lora_r <= 0 or config.lora_alpha <= 0:
            raise ConfigError(f"--lora_r and --lora_alpha must be positive; got {config.lora_r} and {config.lora_alpha}")
        if not 0 <= config.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1); got {config.lora_dropout}")
        if config.lora_target_modules == []:
            raise ConfigError("--lora_target_modules is empty: name modules, or leave it out for every linear layer")
    chat_flags = [n for n in ("chat_template", "assistant_only_loss") if getattr(config, n) is not None]
    if chat_flags and config.task != "text-generation":
        raise ConfigError(f"--{chat_flags[0]} applies to --task text-generation (conversational data)")
    if config.num_sample_generations < 0:
        raise ConfigError(f"--num_sample_generations must be 0 or more; got {config.num_sample_generations}")
    ckpt = config.checkpointing_steps
    if ckpt is not None and ckpt != "epoch" and not (ckpt.isdigit() and int(ckpt) > 0):
        raise ConfigError(f"--checkpointing_steps must be a positive integer or 'epoch'; got {ckpt!r}")
    positive = {
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "per_device_eval_batch_size": config.per_device_eval_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "max_length": config.max_length,
        "block_size": config.block_size,
        "logging_steps": config.logging_steps,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{name} must be positive; got {value}")
    if config.learning_rate <= 0:
        raise ConfigError(f"--learning_rate must be positive; got {config.learning_rate}")
    if not 0 < config.validation_split_percentage < 100:
        raise ConfigError("--validation_split_percentage must be between 0 and 100")


def to_dict(config: FinetuneConfig) -> dict:
    """Plain dict of the config (for logs, trackers and the saved run config)."""
    return dataclasses.asdict(config)
