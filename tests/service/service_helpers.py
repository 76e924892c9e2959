"""Helpers for the service tests: tiny model folders and a real uvicorn server on a loopback port."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `pytest` without `python -m`: make `service` and `tests` importable
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.tiny_models import (  # noqa: E402, F401  (re-exported for conftest)
    build_tiny_bert,
    build_tiny_gpt2,
    build_tiny_llama_chat,
    build_tiny_mobilenet_v2,
    build_tiny_resnet,
    build_tiny_sentence_encoder,
    minilm_dir,
)

SENTIMENT_CARD = """---
library_name: transformers
license: apache-2.0
pipeline_tag: text-classification
base_model: sentence-transformers/all-MiniLM-L6-v2
datasets:
- rotten_tomatoes
model-index:
- name: sentiment
  results:
  - task:
      type: text-classification
      name: Text Classification
    dataset:
      name: Rotten Tomatoes
      type: rotten_tomatoes
      split: test
    metrics:
    - type: accuracy
      value: 0.81
      name: Accuracy
---

# sentiment

A tiny test model.
"""


def write_card(folder: Path, pipeline_tag: str) -> None:
    (folder / "README.md").write_text(f"---\nlibrary_name: transformers\npipeline_tag: {pipeline_tag}\n---\n# {folder.name}\n")


def build_failing_bert(out: Path) -> Path:
    """A classifier whose embedding table is smaller than its tokenizer's vocabulary: ids below 1000
    (e.g. "!" = 999, [CLS] 101, [SEP] 102) work, most words raise IndexError inside the model."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128, num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(out)
    return out


GOOD = ["sentiment", "topics", "writer", "gpt2-cls", "mobilenet", "resnet", "fragile", "embedder", "chatty"]
BROKEN = ["corrupt", "no-config", "base-bert"]


def make_models_dir(pristine: Path, dest: Path, names: list[str]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(pristine / name, dest / name)
    return dest


def wait_ready(client, timeout: float = 60.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready", headers=headers).status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError("server did not become ready")


class LiveServer:
    """uvicorn on 127.0.0.1 with a free port, in a background thread."""

    def __init__(self, settings: Settings):
        import uvicorn

        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


def png_bytes(array=None, fmt: str = "PNG") -> bytes:
    from PIL import Image

    if array is None:
        import skimage.data

        array = skimage.data.chelsea()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()




def wait_until(predicate, timeout: float, what: str, every: float = 0.25):
    """Poll `predicate` every `every` seconds until it returns something true (returned); TimeoutError(`what`)
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m service` in a subprocess: a crash (SIGBUS, ...) fails the test instead of killing pytest."""

    def __init__(self, models_dir: Path, *flags: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # not a pipe: a full pipe would block the server's logging
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--models-dir", str(models_dir), "--port", str(self.port),
             "--log-level", "info", *flags],
            cwd=REPO, env={**os.environ, **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT)
        self.output = ""

    def __enter__(self) -> ServerProcess:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.seek(0)
        self.output = self.log.read().decode(errors="replace")
        self.log.close()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


def peak_rss_mb(pid: int) -> float:
    """The highest resident memory a process has reached (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")
