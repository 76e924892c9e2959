"""The assets built by scripts/offline_assets.py (`make assets`): present, complete, right sizes."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _asset(relative: str) -> Path:
    path = ASSETS / relative
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make assets` (scripts/offline_assets.py)")
    return path


def _read_csv(relative: str) -> list[dict[str, str]]:
    with open(_asset(relative), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["text", "label"]
        return list(reader)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


@pytest.fixture(scope="module")
def offline_assets_module():
    spec = importlib.util.spec_from_file_location("offline_assets", ROOT / "scripts" / "offline_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_asset_is_stamped_and_current(offline_assets_module):
    """What a second `make assets` checks before skipping an asset (so it would do nothing)."""
    for name, version, files, _ in offline_assets_module.ASSET_LIST:
        if name == "data/imdb/test" and not (ASSETS / files[0]).exists():
            continue  # only built with --imdb-test
        assert offline_assets_module.is_current(name, version, files), (
            f"{name} is not built: run `make assets`"
        )


def test_rotten_tomatoes_splits():
    train = _read_csv("data/rotten_tomatoes/train.csv")
    test = _read_csv("data/rotten_tomatoes/test.csv")
    assert len(train) == 8530
    assert Counter(r["label"] for r in train) == {"negative": 4265, "positive": 4265}
    # 2,136 snippets (1,068/1,068) minus 15 that are train sentences once "&amp;" is unescaped.
    assert len(test) == 2121
    assert Counter(r["label"] for r in test) == {"negative": 1063, "positive": 1058}
    assert not {_norm(r["text"]) for r in test} & {_norm(r["text"]) for r in train}  # really held out
    assert len({_norm(r["text"]) for r in test}) == len(test)
    assert all(r["text"].strip() for r in train + test)


def test_imdb_splits():
    train = _read_csv("data/imdb/train.csv")
    assert len(train) == 25000
    assert Counter(r["label"] for r in train) == {"negative": 12500, "positive": 12500}
    if (ASSETS / "data/imdb/test.csv").exists():  # optional: --imdb-test
        test = _read_csv("data/imdb/test.csv")
        assert len(test) == 24877
        assert set(r["label"] for r in test) == {"negative", "positive"}
        assert not {r["text"] for r in test} & {r["text"] for r in train}


def test_rotten_tomatoes_loads_with_datasets():
    import datasets

    files = {split: str(_asset(f"data/rotten_tomatoes/{split}.csv")) for split in ("train", "test")}
    ds = datasets.load_dataset("csv", data_files=files)
    assert ds.num_rows == {"train": 8530, "test": 2121}
    assert set(ds["test"].unique("label")) == {"negative", "positive"}


def test_fashion_mnist_parquet_keeps_image_and_classlabel_features():
    import datasets
    import pyarrow.parquet as pq

    assert pq.ParquetFile(_asset("data/fashion_mnist/train.parquet")).metadata.num_rows == 60000
    test = datasets.load_dataset(
        "parquet", data_files={"test": str(_asset("data/fashion_mnist/test.parquet"))}, split="test"
    )
    assert test.num_rows == 10000
    assert isinstance(test.features["image"], datasets.Image)
    assert isinstance(test.features["label"], datasets.ClassLabel)
    assert test.features["label"].names == FASHION_CLASSES
    assert Counter(test["label"]) == dict.fromkeys(range(10), 1000)
    image = test[0]["image"]
    assert image.mode == "L" and image.size == (28, 28)


def test_gpt2_tokenizer_is_the_real_one():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_asset("models/gpt2-tokenizer"))
    assert tok("Hello world").input_ids == [15496, 995]
    assert len(tok) == 50257
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.eos_token_id == 50256


def test_model_folders():
    minilm = json.loads((_asset("models/all-MiniLM-L6-v2") / "config.json").read_text())
    assert minilm["model_type"] == "bert" and minilm["hidden_size"] == 384
    assert (ASSETS / "models/all-MiniLM-L6-v2/model.safetensors").exists()
    mobilenet = _asset("models/mobilenet_v2-imagenet")
    config = json.loads((mobilenet / "config.json").read_text())
    assert config["architectures"] == ["MobileNetV2ForImageClassification"]
    assert len(config["id2label"]) == 1000 and config["id2label"]["967"] == "espresso"
    assert (mobilenet / "model.safetensors").exists() and (mobilenet / "preprocessor_config.json").exists()
    assert "pipeline_tag: image-classification" in (mobilenet / "README.md").read_text()


@pytest.mark.slow
def test_smollm2_is_a_real_chat_model():
    """The converted SmolLM2 folder loads as a plain Llama, has its chat template, stops at the end
    of an assistant turn, and answers a factual question (greedy, so any CPU gives the same answer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _asset("models/smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) > 130e6
    assert tokenizer.chat_template and model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
