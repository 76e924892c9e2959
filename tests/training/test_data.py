"""Data loading: labels become real names, Caltech101 layout, bad input fails clearly."""

from __future__ import annotations

import pytest
from datasets import ClassLabel, Dataset, DatasetDict

from training.config import ConfigError, FinetuneConfig
from training.data import encode_labels, load_raw_datasets


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
    raw = load_raw_datasets(config)
    names = raw["train"].features["label"].names
    assert names == ["accordion", "airplanes", "anchor"]  # BACKGROUND_Google dropped
    train_labels = raw["train"]["label"]
    assert [train_labels.count(i) for i in range(3)] == [4, 4, 4]
    # 10 + 10 + 11 decodable images (the fake jpeg is skipped); the grayscale one is kept.
    assert len(raw["train"]) + len(raw["validation"]) == 31
    again = load_raw_datasets(config)
    assert list(again["train"]["image"]) == list(raw["train"]["image"])  # seeded split

    config.train_samples_per_class = None  # Caltech layout: the usual 30 per class by default
    with pytest.raises(ConfigError, match="--train_samples_per_class 30 leaves no images for evaluation"):
        load_raw_datasets(config)


def test_bad_image_can_fail_the_run(caltech_folder):
    config = FinetuneConfig(task="image-classification", model_name_or_path="m", train_dir=str(caltech_folder),
                            on_bad_image="fail")
    with pytest.raises(ConfigError, match="cannot decode image .*image_0012.jpg"):
        load_raw_datasets(config)


def test_local_files_and_subsampling(rt_small):
    train, test = rt_small
    config = FinetuneConfig(model_name_or_path="m", train_file=str(train), validation_file=str(test),
                            max_train_samples=50)
    raw = load_raw_datasets(config)
    assert len(raw["train"]) == 50 and len(raw["validation"]) == 42
    assert set(raw["train"]["label"]) == {"negative", "positive"}  # seeded shuffle keeps both classes


def test_missing_file_and_bad_type(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_raw_datasets(FinetuneConfig(model_name_or_path="m", train_file=str(tmp_path / "none.csv")))
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    with pytest.raises(ConfigError, match="unsupported file type .xlsx"):
        load_raw_datasets(FinetuneConfig(model_name_or_path="m", train_file=str(bad)))
