"""Load the training data: Hub dataset | local csv/json/parquet | image folders -> DatasetDict.

The result always has a `train` and a `validation` split (split off train, seeded, when the
source has none) and optionally `test`. Classification labels are normalised to integer ids
with real class names (`LabelSpace`), whatever the source used (ClassLabel, strings, ints).
Decisions taken on the way (the per-class split size of Caltech101's layout) come back with the
splits in `RawData`; the config is only read, so the run's saved config is what the user asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import ClassLabel, Dataset, DatasetDict

from training.config import ConfigError, FinetuneConfig

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CALTECH_BACKGROUND = "BACKGROUND_Google"
TEXT_CANDIDATES = ("text", "sentence", "content", "review", "sentence1", "document")
IMAGE_CANDIDATES = ("image", "img", "pixel_values", "picture")


# --------------------------------------------------------------------------------------------
# Sources.


def _builder_for(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise ConfigError(f"{path}: unsupported file type {suffix or '(none)'}; use csv, json, jsonl or parquet")
    if not Path(path).is_file():
        raise ConfigError(f"{path} does not exist")
    return FILE_BUILDERS[suffix]


def _load_files(config: FinetuneConfig) -> DatasetDict:
    files = {"train": config.train_file, "validation": config.validation_file, "test": config.test_file}
    files = {split: path for split, path in files.items() if path}
    builders = {_builder_for(path) for path in files.values()}
    if len(builders) > 1:
        raise ConfigError("train/validation/test files must share one format")
    builder = builders.pop()
    kwargs = {"delimiter": "\t"} if all(p.endswith(".tsv") for p in files.values()) else {}
    try:
        return datasets.load_dataset(builder, data_files=files, **kwargs)
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as err:
        if builder == "json":  # rows of different shapes (a `messages` that is not a list): say which row
            for path in files.values():
                _check_json_rows(Path(path))
        cause = err.__cause__ or err
        raise ConfigError(f"cannot read {', '.join(files.values())}: {type(cause).__name__}: "
                          f"{str(cause).splitlines()[0][:300]}") from None


def _load_hub(config: FinetuneConfig) -> DatasetDict:
    loaded = datasets.load_dataset(config.dataset_name, config.dataset_config_name)
    if not isinstance(loaded, DatasetDict):
        loaded = DatasetDict({"train": loaded})
    if config.train_split not in loaded:
        raise ConfigError(
            f"dataset {config.dataset_name} has no split {config.train_split!r}; splits: {', '.join(loaded)}"
        )
    out = {"train": loaded[config.train_split]}
    val = config.validation_split or next((s for s in ("validation", "valid", "test") if s in loaded), None)
    if config.validation_split and val not in loaded:
        raise ConfigError(f"dataset {config.dataset_name} has no split {val!r}; splits: {', '.join(loaded)}")
    if val is not None and val != config.train_split:
        out["validation"] = loaded[val]
    if config.test_split:
        if config.test_split not in loaded:
            raise ConfigError(f"dataset {config.dataset_name} has no split {config.test_split!r}")
        out["test"] = loaded[config.test_split]
    return DatasetDict(out)


def find_class_folders(root: Path, drop_background: bool) -> tuple[Path, list[str]]:
    """Locate the folder whose sub-folders are the classes; Caltech101's layout included."""
    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist")
    caltech = root / "101_ObjectCategories"
    if caltech.is_dir():
        root = caltech
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if drop_background and CALTECH_BACKGROUND in classes:
        classes.remove(CALTECH_BACKGROUND)
    if not classes:
        raise ConfigError(f"image folder {root} has no class sub-folders (<class>/<image files>)")
    return root, classes


def _image_folder(root: Path, classes: list[str], config: FinetuneConfig) -> Dataset:
    """A Dataset of (image path, class id) from `root/<class>/*`; undecodable images skipped or fatal."""
    from PIL import Image as PILImage

    paths, labels, bad = [], [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue  # validation folder without this class
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with PILImage.open(path) as img:
                    img.verify()  # header + structure, without decoding all pixels
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
                if config.on_bad_image == "fail":
                    raise ConfigError(f"cannot decode image {path}: {err}") from None
                bad.append(path)
                continue
            paths.append(str(path))
            labels.append(label)
    if bad:
        logger.warning("skipped %d undecodable image(s) under %s, e.g. %s", len(bad), root, bad[0])
    if not paths:
        raise ConfigError(f"no decodable images found under {root}")
    features = datasets.Features({"image": datasets.Image(), "label": ClassLabel(names=classes)})
    return Dataset.from_dict({"image": paths, "label": labels}, features=features)


def _split_per_class(ds: Dataset, label_column: str, per_class: int, seed: int) -> DatasetDict:
    """Seeded split: `per_class` training examples of each class, the rest for evaluation."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.asarray(ds[label_column])
    train_idx, eval_idx = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        train_idx.extend(idx[:per_class].tolist())
        eval_idx.extend(idx[per_class:].tolist())
    if not eval_idx:
        raise ConfigError(f"--train_samples_per_class {per_class} leaves no images for evaluation")
    return DatasetDict({"train": ds.select(sorted(train_idx)), "validation": ds.select(sorted(eval_idx))})


@dataclass(frozen=True)
class RawData:
    """The loaded splits and what loading decided about them."""

    splits: DatasetDict
    """`train`, `validation` and optionally `test`."""
    train_samples_per_class: int | None = None
    """Training examples per class when validation was split off per class (Caltech101's layout gets
    the usual 30 unless --train_samples_per_class says otherwise); None without such a split."""


def _load_image_dirs(config: FinetuneConfig) -> tuple[DatasetDict, int | None]:
    """The image folders, and the per-class split size to use when there is no validation folder."""
    root = Path(config.train_dir)  # type: ignore[arg-type]
    is_caltech = (root / "101_ObjectCategories").is_dir() or (root / CALTECH_BACKGROUND).is_dir()
    root, classes = find_class_folders(root, config.drop_background_class)
    train = _image_folder(root, classes, config)
    if config.validation_dir:
        val_root, val_classes = find_class_folders(Path(config.validation_dir), config.drop_background_class)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise ConfigError(f"validation classes not in training data: {', '.join(unknown[:5])}")
        return DatasetDict({"train": train, "validation": _image_folder(val_root, classes, config)}), None
    per_class = config.train_samples_per_class
    if is_caltech and per_class is None:
        per_class = 30  # the usual Caltech101 protocol
    return DatasetDict({"train": train}), per_class


def load_raw_datasets(config: FinetuneConfig) -> RawData:
    """Load train/validation(/test) splits from the configured source, subsampled if asked."""
    per_class = config.train_samples_per_class
    if config.train_dir:
        raw, per_class = _load_image_dirs(config)
    elif config.train_file:
        raw = _load_files(config)
    else:
        raw = _load_hub(config)
    if config.task == "text-generation" and is_conversational(raw["train"]):
        sources = {"train": config.train_file, "validation": config.validation_file, "test": config.test_file}
        if config.dataset_name:
            sources = {split: f"{config.dataset_name} ({split} split)" for split in raw}
        # before any split or subset, so that the row number is the source's
        check_conversations(raw, {k: v for k, v in sources.items() if v}, config.assistant_only_loss is not False)
    if "validation" in raw:
        per_class = None  # the source has validation data: no per-class split
    elif per_class:
        if config.label_column not in raw["train"].column_names:
            raise ConfigError(f"label column {config.label_column!r} not found; "
                              f"columns are: {', '.join(raw['train'].column_names)}")
        split = _split_per_class(raw["train"], config.label_column, per_class, config.seed)
        raw["train"], raw["validation"] = split["train"], split["validation"]
    if "validation" not in raw:
        split = raw["train"].train_test_split(
            test_size=config.validation_split_percentage / 100, seed=config.seed, shuffle=True
        )
        raw["train"], raw["validation"] = split["train"], split["test"]
    for split, limit in (("train", config.max_train_samples), ("validation", config.max_eval_samples),
                         ("test", config.max_eval_samples)):
        if limit is not None and split in raw and len(raw[split]) > limit:
            raw[split] = raw[split].shuffle(seed=config.seed).select(range(limit))
    for split, ds in raw.items():
        if len(ds) == 0:
            raise ConfigError(f"the {split} split is empty")
    return RawData(raw, per_class)


# --------------------------------------------------------------------------------------------
# Conversations (text generation): a `messages` column, or `prompt`/`completion` columns.

MESSAGES_COLUMN = "messages"
ROLES = ("system", "user", "assistant", "tool")


def is_conversational(ds: Dataset) -> bool:
    """A `messages` column, or `prompt` and `completion` columns (TRL's two conversational formats)."""
    columns = ds.column_names
    return MESSAGES_COLUMN in columns or ("prompt" in columns and "completion" in columns)


def message_problem(messages: object, what: str = MESSAGES_COLUMN) -> str | None:
    """What is wrong with one row's list of {"role", "content"} messages, or None."""
    if not isinstance(messages, list):
        return f"`{what}` is not a list of {{role, content}} messages (got {type(messages).__name__})"
    if not messages:
        return f"`{what}` is empty"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} of `{what}` is not a {{role, content}} mapping (got {type(message).__name__})"
        role = message.get("role")
        if role is None:
            return f"message {i} of `{what}` has no role"
        if role not in ROLES:
            return f"message {i} of `{what}` has an unknown role {role!r} (roles: {', '.join(ROLES)})"
        if not isinstance(message.get("content"), str):
            return f"message {i} of `{what}` ({role}) has no text content"
    return None


def conversation(row: dict) -> list[dict]:
    """The row's messages, as [{"role", "content"}] (a string prompt is a user turn, a string completion
    an assistant turn)."""
    if MESSAGES_COLUMN in row:
        messages = row[MESSAGES_COLUMN]
    else:
        def turns(value, role):
            return [{"role": role, "content": value}] if isinstance(value, str) else list(value or [])

        messages = turns(row["prompt"], "user") + turns(row["completion"], "assistant")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _row_problem(row: dict) -> str | None:
    if MESSAGES_COLUMN in row:
        return message_problem(row[MESSAGES_COLUMN])
    for column in ("prompt", "completion"):
        value = row.get(column)
        if not isinstance(value, str):
            problem = message_problem(value, column)
            if problem:
                return problem.replace("is not a list of", "is neither a string nor a list of")
    return None


def check_conversations(raw: DatasetDict, sources: dict[str, str], need_assistant: bool) -> None:
    """Every row is a well-formed conversation; else one ConfigError naming the row and the problem."""
    for split, ds in raw.items():
        for index, row in enumerate(ds):
            problem = _row_problem(row)
            if problem is None and need_assistant and not any(m["role"] == "assistant" for m in conversation(row)):
                problem = "the conversation has no assistant message to learn from"
            if problem:
                raise ConfigError(f"row {index + 1} of {sources.get(split, split)}: {problem}")


def _check_json_rows(path: Path) -> None:
    """Read a json/jsonl file row by row and raise ConfigError for the first malformed conversation."""
    import json

    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
        if not isinstance(rows, list):
            rows = [rows]
    except json.JSONDecodeError:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"row {number} of {path}: not valid JSON ({err.msg})") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"row {index + 1} of {path}: not a JSON object")
        if MESSAGES_COLUMN in row or ("prompt" in row and "completion" in row):
            problem = _row_problem(row)
            if problem:
                raise ConfigError(f"row {index + 1} of {path}: {problem}")


# --------------------------------------------------------------------------------------------
# Columns and labels.


def resolve_column(ds: Dataset, requested: str | None, candidates: tuple[str, ...], what: str) -> str:
    """The column to use: the requested one (must exist) or the first candidate present."""
    columns = ds.column_names
    if requested:
        if requested not in columns:
            raise ConfigError(f"{what} column {requested!r} not found; columns are: {', '.join(columns)}")
        return requested
    for name in candidates:
        if name in columns:
            return name
    raise ConfigError(f"no {what} column found (tried {', '.join(candidates)}); columns are: {', '.join(columns)}"
                      f" — pass --{what}_column")


@dataclass(frozen=True)
class LabelSpace:
    """Class names in id order; `id2label`/`label2id` for the model config."""

    names: list[str]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def _is_generic(names: list[str]) -> bool:
    return all(name == f"LABEL_{i}" for i, name in enumerate(names))


def encode_labels(raw: DatasetDict, label_column: str, label_names: list[str] | None,
                  model_labels: dict[int, str] | None = None) -> tuple[DatasetDict, LabelSpace]:
    """Turn the label column into ids 0..K-1 named by real class names.

    Names come from, in order: a ClassLabel feature, string labels (sorted), `--label_names`,
    the base model's own non-generic `id2label` of the same size, else the integers themselves.
    """
    train = raw["train"]
    if label_column not in train.column_names:
        raise ConfigError(f"label column {label_column!r} not found; columns are: {', '.join(train.column_names)}")
    feature = train.features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        if label_names:
            if len(label_names) != len(names):
                raise ConfigError(f"--label_names has {len(label_names)} names but the data has {len(names)} classes")
            names = list(label_names)
        encoded = raw
    else:
        values = sorted(set(train[label_column]) - {None})
        if values and isinstance(values[0], str):
            names = [str(v) for v in values]
            mapping = {v: i for i, v in enumerate(values)}
        else:
            ints = [int(v) for v in values]
            if ints != list(range(len(ints))):
                # Non-contiguous integer labels (e.g. 1..5 stars): map in sorted order.
                mapping = {v: i for i, v in enumerate(values)}
            else:
                mapping = {v: int(v) for v in values}
            if label_names:
                if len(label_names) != len(values):
                    raise ConfigError(
                        f"--label_names has {len(label_names)} names but the data has {len(values)} classes")
                names = list(label_names)
            elif model_labels and len(model_labels) == len(values) and not _is_generic(
                    [model_labels[i] for i in sorted(model_labels)]):
                names = [model_labels[i] for i in sorted(model_labels)]
            else:
                names = [str(v) for v in values]

        def _encode(batch: dict) -> dict:
            out = []
            for value in batch[label_column]:
                if value not in mapping:
                    raise ConfigError(f"label {value!r} appears in evaluation data but not in training data")
                out.append(mapping[value])
            return {label_column: out}

        encoded = DatasetDict({
            split: ds.filter(lambda b: [v is not None for v in b[label_column]], batched=True).map(
                _encode, batched=True).cast_column(label_column, ClassLabel(names=names))
            for split, ds in raw.items()
        })
    if len(names) < 2:
        raise ConfigError(f"label column {label_column!r} has only one class ({names[0] if names else 'none'}); "
                          "classification needs at least two")
    return encoded, LabelSpace(names)

