"""Data loading: labels become real names, Caltech101 layout, bad input fails clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from datasets import ClassLabel, Dataset, DatasetDict
from PIL import Image

from training.config import ConfigError, FinetuneConfig
from training.data import encode_labels, load_raw_datasets
from training.finetune import main


def _dd(labels_train, labels_val, feature=None) -> DatasetDict:
    train = Dataset.from_dict({"text": ["x"] * len(labels_train), "label": labels_train})
    val = Dataset.from_dict({"text": ["y"] * len(labels_val), "label": labels_val})
    if feature is not None:
        train, val = train.cast_column("label", feature), val.cast_column("label", feature)
    return DatasetDict({"train": train, "validation": val})


def test_string_labels_become_names():
    encoded, labels = encode_labels(_dd(["pos", "neg", "pos"], ["neg", "pos"]), "label", None)
    assert labels.names == ["neg", "pos"]
    assert encoded["train"]["label"] == [1, 0, 1]
    assert encoded["validation"].features["label"].names == ["neg", "pos"]


def test_int_labels_use_label_names_or_classlabel():
    _, labels = encode_labels(_dd([0, 1, 1], [1, 0]), "label", ["negative", "positive"])
    assert labels.id2label == {0: "negative", 1: "positive"}
    _, labels = encode_labels(_dd([0, 1], [1], ClassLabel(names=["bad", "good"])), "label", None)
    assert labels.names == ["bad", "good"]
    _, labels = encode_labels(_dd([0, 1], [1]), "label", None, {0: "LABEL_0", 1: "LABEL_1"})
    assert labels.names == ["0", "1"]  # generic model names are never used


def test_one_class_and_unseen_label_are_refused():
    with pytest.raises(ConfigError, match="only one class"):
        encode_labels(_dd(["pos", "pos"], ["pos"]), "label", None)
    with pytest.raises(ConfigError, match="not in training data"):
        encode_labels(_dd(["pos", "neg"], ["meh"]), "label", None)


def test_missing_label_column_names_the_columns():
    with pytest.raises(ConfigError, match="'stars' not found; columns are: text, label"):
        encode_labels(_dd(["a", "b"], ["a"]), "stars", None)


def test_caltech_layout_split_per_class(caltech_folder):
    config = FinetuneConfig(task="image-classification", model_name_or_path="m", train_dir=str(caltech_folder),
                            train_samples_per_class=4)
    loaded = load_raw_datasets(config)
    raw = loaded.splits
    assert loaded.train_samples_per_class == 4
    names = raw["train"].features["label"].names
    assert names == ["accordion", "airplanes", "anchor"]  # BACKGROUND_Google dropped
    train_labels = raw["train"]["label"]
    assert [train_labels.count(i) for i in range(3)] == [4, 4, 4]
    # 10 + 10 + 11 decodable images (the fake jpeg is skipped); the grayscale one is kept.
    assert len(raw["train"]) + len(raw["validation"]) == 31
    again = load_raw_datasets(config).splits
    assert list(again["train"]["image"]) == list(raw["train"]["image"])  # seeded split

    config.train_samples_per_class = None  # Caltech layout: the usual 30 per class by default
    with pytest.raises(ConfigError, match="--train_samples_per_class 30 leaves no images for evaluation"):
        load_raw_datasets(config)


def test_the_caltech_default_is_a_decision_of_loading_not_a_config_change(tiny_mobilenet, tmp_path):
    """Caltech's layout without --train_samples_per_class: loading decides the usual 30 per class and says
    so in its result and the run's results; the config, saved with the model, keeps what the user asked."""
    categories = tmp_path / "caltech" / "101_ObjectCategories"
    rng = np.random.default_rng(0)
    for name, colour in (("ant", (200, 40, 40)), ("bee", (40, 40, 200))):
        (categories / name).mkdir(parents=True)
        for i in range(32):
            pixels = (np.array(colour) + rng.integers(-40, 40, (16, 16, 3))).clip(0, 255).astype("uint8")
            Image.fromarray(pixels).save(categories / name / f"image_{i + 1:04d}.jpg")
    config = FinetuneConfig(task="image-classification", model_name_or_path="m", train_dir=str(categories.parent))
    loaded = load_raw_datasets(config)
    assert loaded.train_samples_per_class == 30
    assert len(loaded.splits["train"]) == 60 and len(loaded.splits["validation"]) == 4
    assert config.train_samples_per_class is None

    assert main(["--task", "image-classification", "--model_name_or_path", str(tiny_mobilenet), "--train_dir",
                 str(categories.parent), "--output_dir", "models/insects", "--max_train_steps", "1",
                 "--checkpointing_steps", "none"]) == 0
    out = tmp_path / "models" / "insects"
    assert yaml.safe_load((out / "training_config.yaml").read_text())["train_samples_per_class"] is None
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_samples_per_class"] == 30 and results["train_examples"] == 60


def test_bad_image_can_fail_the_run(caltech_folder):
    config = FinetuneConfig(task="image-classification", model_name_or_path="m", train_dir=str(caltech_folder),
                            on_bad_image="fail")
    with pytest.raises(ConfigError, match="cannot decode image .*image_0012.jpg"):
        load_raw_datasets(config)


def test_local_files_and_subsampling(rt_small):
    train, test = rt_small
    config = FinetuneConfig(model_name_or_path="m", train_file=str(train), validation_file=str(test),
                            max_train_samples=50)
    raw = load_raw_datasets(config).splits
    assert len(raw["train"]) == 50 and len(raw["validation"]) == 42
    assert set(raw["train"]["label"]) == {"negative", "positive"}  # seeded shuffle keeps both classes


def test_missing_file_and_bad_type(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_raw_datasets(FinetuneConfig(model_name_or_path="m", train_file=str(tmp_path / "none.csv")))
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    with pytest.raises(ConfigError, match="unsupported file type .xlsx"):
        load_raw_datasets(FinetuneConfig(model_name_or_path="m", train_file=str(bad)))


def test_dataset_name_loads_a_dataset_repo_folder(tiny_bert, rt_small, tmp_path):
    """--dataset_name goes through datasets.load_dataset like a Hub id; a local repo folder is the same path."""
    train, test = rt_small
    repo = tmp_path / "my-dataset"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.csv").write_text(train.read_text())
    (repo / "data" / "test.csv").write_text(test.read_text())
    out = tmp_path / "from-repo"
    assert main(["--model_name_or_path", str(tiny_bert), "--dataset_name", str(repo), "--output_dir", str(out),
                 "--max_train_steps", "2", "--checkpointing_steps", "none"]) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_examples"] == 42  # the repo's test split became the validation split


def test_image_parquet_source_with_per_class_split(tiny_mobilenet, caltech_folder, tmp_path):
    """A Hub-style image dataset (parquet with Image + ClassLabel, one train split), split 4 per class."""
    import datasets

    folder = load_raw_datasets(FinetuneConfig(task="image-classification", model_name_or_path="m",
                                              train_dir=str(caltech_folder), train_samples_per_class=9)).splits
    full = datasets.concatenate_datasets([folder["train"], folder["validation"]])
    parquet = tmp_path / "caltech.parquet"
    full.to_parquet(str(parquet))
    out = tmp_path / "parquet-run"
    assert main(["--task", "image-classification", "--model_name_or_path", str(tiny_mobilenet), "--train_file",
                 str(parquet), "--train_samples_per_class", "4", "--output_dir", str(out), "--max_train_steps",
                 "2", "--per_device_train_batch_size", "6", "--checkpointing_steps", "none"]) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_examples"] == 12 and results["eval_examples"] == len(full) - 12
