"""Fixtures of the service and end-to-end tests (a plugin of tests/conftest.py): tiny real model
folders and real servers on loopback ports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.service.service_helpers import (
    BROKEN,
    GOOD,
    SENTIMENT_CARD,
    LiveServer,
    Settings,
    build_failing_bert,
    build_tiny_bert,
    build_tiny_gpt2,
    build_tiny_llama_chat,
    build_tiny_mobilenet_v2,
    build_tiny_resnet,
    build_tiny_sentence_encoder,
    make_models_dir,
    png_bytes,
    wait_ready,
    write_card,
)


@pytest.fixture(scope="session")
def pristine_models(tmp_path_factory) -> Path:
    """Every kind of folder once; tests copy what they need (copytree is fast)."""
    root = tmp_path_factory.mktemp("pristine")
    build_tiny_bert(root / "sentiment", labels=["negative", "positive"])
    (root / "sentiment" / "README.md").write_text(SENTIMENT_CARD)
    (root / "sentiment" / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.81, "epoch": 1.0}))
    build_tiny_bert(root / "topics", labels=["sports", "politics", "science"], seed=1)  # no card: architecture fallback
    build_tiny_gpt2(root / "writer")
    write_card(root / "writer", "text-generation")
    build_tiny_gpt2(root / "gpt2-cls", labels=["no", "yes"])  # no card; batched GPT-2 needs pad_token_id
    build_tiny_mobilenet_v2(root / "mobilenet", labels=["cat", "dog", "bird"])
    write_card(root / "mobilenet", "image-classification")
    build_tiny_resnet(root / "resnet")  # no card
    build_failing_bert(root / "fragile")
    build_tiny_sentence_encoder(root / "embedder", pooling="cls_token")  # no card: modules.json says it
    build_tiny_llama_chat(root / "chatty")  # a chat template
    # broken folders
    shutil.copytree(root / "sentiment", root / "corrupt")
    weights = root / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(root / "topics", root / "no-config")
    (root / "no-config" / "config.json").unlink()
    build_tiny_bert(root / "base-bert")  # BertModel: no task head
    return root


@pytest.fixture(scope="session")
def models_dir(pristine_models, tmp_path_factory) -> Path:
    """The shared, never-modified models dir: good folders, broken ones and a hidden one."""
    root = make_models_dir(pristine_models, tmp_path_factory.mktemp("models"), GOOD + BROKEN)
    shutil.copytree(pristine_models / "topics", root / ".tmp-topics-swap")  # hidden: ignored
    return root


@pytest.fixture(scope="session")
def live(models_dir):
    """One real server over the shared models dir (no polling), for the whole session."""
    settings = Settings(models_dir=models_dir, reload_interval_s=0, max_batch_wait_ms=20, _env_file=None)
    with LiveServer(settings) as server, server.client() as client:
        wait_ready(client)
        yield server


@pytest.fixture(scope="session")
def http(live):
    with live.client() as client:
        yield client


@pytest.fixture(scope="session")
def cat_png() -> bytes:
    return png_bytes()


@pytest.fixture(scope="session")
def coffee_jpeg() -> bytes:
    import skimage.data

    return png_bytes(skimage.data.coffee(), "JPEG")
