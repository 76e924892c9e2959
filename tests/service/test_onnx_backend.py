"""service/onnx_backend.py: backend=onnx answers as torch does, for every task it covers; the export
is cached outside the model folder and reused; a model that does not export stays on torch.

Run on the tiny models of the shared fixtures, plus the real all-MiniLM-L6-v2 for int8."""

from __future__ import annotations

import csv
import io
import logging
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.folders import folder_signature, inspect_folder
from service.loading import load_runner
from service.tasks.classifier import ClassificationParameters
from service.tasks.feature_extraction import FeatureExtractionRequest
from tests.scores import assert_scores_close
from tests.service.service_helpers import REPO, LiveServer, Settings, make_models_dir, minilm_dir, wait_ready

pytest.importorskip("onnxruntime")

SENTENCES = ["A gorgeous, witty, seductive movie.", "The plot is thin and the acting is wooden.", "meh", "x"]


def settings(tmp_path, backend="onnx", **kwargs) -> Settings:
    return Settings(_env_file=None, models_dir=tmp_path, backend=backend, onnx_cache=tmp_path / "onnx-cache", **kwargs)


def load(folder, s: Settings):
    return load_runner(folder, inspect_folder(folder), s)


def answers(runner, task: str, cat_png: bytes):
    """The runner's results for a real micro-batch of its task (what the batcher hands it)."""
    if task == "image-classification":
        images = [Image.open(io.BytesIO(cat_png)), Image.new("RGB", (40, 70), (200, 30, 30))]
        prepared = [runner.prepare((image, None))[0] for image in images]
        return runner.run_batch(prepared, [ClassificationParameters()] * len(prepared))
    if task == "feature-extraction":
        params = FeatureExtractionRequest(inputs=SENTENCES)
        return runner.run_batch([runner.prepare((SENTENCES, params))[0]], [params])[0].vectors
    params = ClassificationParameters()
    return runner.run_batch([runner.prepare((SENTENCES, params))[0]], [params])[0]


@pytest.mark.parametrize("name", ["sentiment", "embedder", "mobilenet", "resnet"])
def test_onnx_answers_as_torch(name, pristine_models, tmp_path, cat_png):
    folder = make_models_dir(pristine_models, tmp_path, [name]) / name
    task = inspect_folder(folder).task
    torch_runner, onnx_runner = load(folder, settings(tmp_path, "torch")), load(folder, settings(tmp_path))
    assert onnx_runner.backend.name == "onnx" and onnx_runner.backend.exporter == "torchscript"
    assert not isinstance(onnx_runner.model, torch.nn.Module)  # the torch model is gone: the session serves
    expected, got = answers(torch_runner, task, cat_png), answers(onnx_runner, task, cat_png)
    if task == "feature-extraction":
        np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-5)
    else:
        assert_scores_close(got, expected)


def test_export_is_cached_outside_a_read_only_folder_and_reused(pristine_models, tmp_path, caplog):
    folder = make_models_dir(pristine_models, tmp_path / "models", ["sentiment"]) / "sentiment"
    for path in (*folder.iterdir(), folder):  # (root ignores the bits: then the signature check below is the test)
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IXUSR if path.is_dir() else stat.S_IRUSR)
    before = folder_signature(folder)
    s = settings(tmp_path)
    try:
        first = load(folder, s)
        assert folder_signature(folder) == before  # nothing written into the model folder
        entries = list(s.onnx_cache.iterdir())
        assert len(entries) == 1 and entries[0].name.startswith("sentiment-")
        onnx_file = entries[0] / "model.onnx"
        assert first.backend.file == str(onnx_file) and first.backend.exporter == "torchscript"
        assert [p.name for p in entries[0].iterdir()] == ["model.onnx"]  # no temporary file left behind
        written = onnx_file.stat().st_mtime_ns
        caplog.clear()  # the first load's lines too, when an earlier test left the logger at INFO
        with caplog.at_level(logging.INFO, logger="service.onnx"):
            second = load(folder, s)  # a restart or reload of the same folder version
        assert second.backend.exporter is None and onnx_file.stat().st_mtime_ns == written
        assert "ONNX file reused from the cache" in caplog.text and "exported" not in caplog.text
    finally:
        for path in (folder, *folder.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
    # A new version of the folder (other weights) gets its own entry.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    torch.nn.init.normal_(model.classifier.weight)
    model.save_pretrained(folder)
    third = load(folder, s)
    assert third.backend.exporter == "torchscript" and len(list(s.onnx_cache.iterdir())) == 2


def test_unwritable_cache_exports_every_load(pristine_models, tmp_path):
    folder = make_models_dir(pristine_models, tmp_path / "models", ["topics"]) / "topics"
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # a cache path under a file cannot be created, even by root
    runner = load(folder, Settings(_env_file=None, backend="onnx", onnx_cache=blocker / "cache"))
    assert runner.backend.name == "onnx" and runner.backend.file is None


def build_tiny_longformer(out):
    """Longformer pads each input to its attention window with Python arithmetic on the shape: the
    TorchScript tracer bakes the probe's length into the graph, which then fails on other lengths."""
    from transformers import AutoTokenizer, LongformerConfig, LongformerForSequenceClassification

    torch.manual_seed(0)
    config = LongformerConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32, max_position_embeddings=130, attention_window=8, num_labels=2,
                              pad_token_id=0, id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1})
    LongformerForSequenceClassification(config).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(out)
    return out


def test_a_model_that_does_not_export_stays_on_torch(tmp_path, caplog, cat_png):
    folder = build_tiny_longformer(tmp_path / "longformer")
    with caplog.at_level(logging.WARNING, logger="service.backends"):
        runner = load(folder, settings(tmp_path))
    assert runner.backend.name == "torch" and "fails on a probe batch" in runner.backend.note
    assert isinstance(runner.model, torch.nn.Module)
    assert "longformer: served by torch, not ONNX Runtime" in caplog.text
    rows = answers(runner, "text-classification", cat_png)
    assert len(rows) == len(SENTENCES) and {d["label"] for d in rows[0]} == {"no", "yes"}


def test_http_answers_are_the_same_under_both_backends(http, pristine_models, tmp_path, cat_png):
    root = make_models_dir(pristine_models, tmp_path / "models", ["sentiment", "mobilenet", "embedder", "writer"])
    s = settings(root, reload_interval_s=0)
    with LiveServer(s) as server, server.client() as onnx_http:
        wait_ready(onnx_http)
        models = {m["name"]: m for m in onnx_http.get("/models").json()["models"]}
        assert {n: m["backend"] for n, m in models.items()} == {
            "sentiment": "onnx", "mobilenet": "onnx", "embedder": "onnx", "writer": "torch"}
        assert models["writer"]["backend_note"] == "this task runs on torch only"
        requests = [("/models/sentiment", {"json": {"inputs": ["a fine film", "dull", "x"]}}),
                    ("/models/sentiment", {"json": {"inputs": "good", "parameters": {"top_k": 1}}}),
                    ("/models/mobilenet", {"content": cat_png, "headers": {"content-type": "image/png"}}),
                    ("/models/embedder", {"json": {"inputs": ["a fine film", "dull"]}})]
        for url, kwargs in requests:
            got, expected = onnx_http.post(url, **kwargs), http.post(url, **kwargs)
            assert got.status_code == expected.status_code == 200
            if "embedder" in url:
                np.testing.assert_allclose(np.array(got.json()), np.array(expected.json()), atol=1e-5)
            else:
                assert_scores_close(got.json(), expected.json())
            assert got.headers["x-model-name"] == expected.headers["x-model-name"]
    assert http.get("/models/sentiment").json()["backend"] == "torch"


def rt_rows(split: str, count: int) -> list[tuple[str, int]]:
    with (REPO / "assets" / "data" / "rotten_tomatoes" / f"{split}.csv").open(encoding="utf-8") as f:
        rows = [(r["text"], int(r["label"] == "positive")) for r in csv.DictReader(f)]
    return rows[::len(rows) // count][:count]  # spread over the file (it is sorted by label)


def test_int8_minilm_embeddings_keep_the_labels_of_float32(tmp_path):
    """The real all-MiniLM-L6-v2 as a sentence encoder: RT test sentences labelled by the nearer of the
    two class centroids of RT training sentences' embeddings, under torch and under int8."""
    shutil.copytree(minilm_dir(), tmp_path / "minilm")
    train, test = rt_rows("train", 96), rt_rows("test", 160)
    labelled = {}
    for backend, quantize in (("torch", "none"), ("onnx", "int8")):
        runner = load(tmp_path / "minilm", settings(tmp_path, backend, quantize=quantize))
        embed = [np.array(answers_for(runner, [t for t, _ in rows])) for rows in (train, test)]
        labels = np.array([label for _, label in train])
        centroids = np.stack([embed[0][labels == k].mean(0) for k in (0, 1)])
        labelled[backend] = (embed[1] @ centroids.T).argmax(1), embed[1]
    assert runner.backend.name == "onnx-int8"
    accuracy = np.mean(labelled["torch"][0] == np.array([label for _, label in test]))
    agreement = np.mean(labelled["torch"][0] == labelled["onnx"][0])
    cosine = np.sum(labelled["torch"][1] * labelled["onnx"][1], axis=1)  # both unit length
    print(f"centroid accuracy {accuracy:.3f}, int8 label agreement {agreement:.3f}, min cosine {cosine.min():.4f}")
    # Measured here: accuracy 61 %, agreement 95.6 %, min cosine 0.985 (a weak classifier: many
    # sentences lie near its boundary, where int8's small shifts flip them; the fine-tuned demo MiniLM
    # keeps 98 % of its labels: benchmarks/onnx_backend.py).
    assert accuracy > 0.57
    assert agreement >= 0.93 and cosine.min() > 0.97


def answers_for(runner, texts: list[str]) -> list[list[float]]:
    params = FeatureExtractionRequest(inputs=texts)
    prepared = [runner.prepare((texts[i:i + 32], params))[0] for i in range(0, len(texts), 32)]
    return [v for result in runner.run_batch(prepared, [params] * len(prepared)) for v in result.vectors]


def fashion_pngs(count: int, split: str = "train") -> list[bytes]:
    """Real Fashion-MNIST images (PNG bytes, 28x28 grayscale as stored), from `make assets`."""
    import pyarrow.parquet as pq

    table = pq.read_table(REPO / "assets" / "data" / "fashion_mnist" / f"{split}.parquet", columns=["image"])
    return [row["bytes"] for row in table.slice(0, count).column("image").to_pylist()]


def write_images(folder, pngs: list[bytes]):
    folder.mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(pngs):
        (folder / f"{i % 3}" / f"{i:03d}.png").parent.mkdir(exist_ok=True)  # an imagefolder's class folders
        (folder / f"{i % 3}" / f"{i:03d}.png").write_bytes(png)
    return folder


def test_image_models_without_calibration_images_stay_float32_under_int8(pristine_models, tmp_path):
    folder = make_models_dir(pristine_models, tmp_path / "models", ["mobilenet"]) / "mobilenet"
    runner = load(folder, settings(tmp_path, quantize="int8"))
    assert runner.backend.name == "onnx" and "needs calibration images (calibration_dir)" in runner.backend.note
    runner = load(folder, settings(tmp_path, quantize="int8", calibration_dir=tmp_path / "calibration"))
    assert runner.backend.name == "onnx"
    assert runner.backend.note == f"no calibration images: {tmp_path / 'calibration' / 'mobilenet'} is not a folder: served in float32"


def test_static_int8_image_model_on_calibration_images(pristine_models, tmp_path, caplog):
    """quantize=int8 with calibration images: a statically quantized graph (int8 weights and activations,
    the first convolution in float32) that keeps torch's answers; quantized once per calibration set."""
    import onnx

    folder = make_models_dir(pristine_models, tmp_path / "models", ["resnet"]) / "resnet"
    images = write_images(tmp_path / "calibration" / "resnet", fashion_pngs(80))
    (images / "notes.txt").write_text("not an image")
    (images / "0" / "broken.png").write_bytes(b"\x89PNG not really")  # skipped with a log line
    s = settings(tmp_path, quantize="int8", calibration_dir=tmp_path / "calibration")
    with caplog.at_level(logging.INFO):
        runner = load(folder, s)
    assert runner.backend.name == "onnx-int8", runner.backend.note
    assert "top label equal to float32 on" in runner.backend.note and "of 64 held-out images" in runner.backend.note
    assert "calibration image" in caplog.text and "broken.png skipped" in caplog.text
    graph = onnx.load(runner.backend.file).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    produced_by = {out: n.op_type for n in graph.node for out in n.output}
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= len(convs) - 1
    assert produced_by.get(convs[0].input[0]) != "DequantizeLinear"  # the pixels reach the first conv in float32
    assert all(produced_by.get(c.input[0]) == "DequantizeLinear" for c in convs[1:])

    torch_runner = load(folder, settings(tmp_path, "torch"))
    test = [Image.open(io.BytesIO(png)) for png in fashion_pngs(16, "test")]
    expected, got = (r.run_batch([r.prepare((im, None))[0] for im in test], [ClassificationParameters()] * len(test))
                     for r in (torch_runner, runner))
    for want, have in zip(expected, got, strict=True):
        assert {d["label"] for d in have} == {d["label"] for d in want}
        scores = {d["label"]: d["score"] for d in have}
        assert max(abs(scores[d["label"]] - d["score"]) for d in want) < 0.15

    # A restart reads the quantized file and the check's verdict from the cache; new images, a new file.
    written = Path(runner.backend.file).stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = load(folder, s)
    assert again.backend.file == runner.backend.file and Path(again.backend.file).stat().st_mtime_ns == written
    assert again.backend.note == runner.backend.note and "quantized to int8" not in caplog.text
    assert "broken.png skipped" not in caplog.text  # no image decoded: the cached verdict stands
    (images / "0" / "000.png").unlink()
    other = load(folder, s)
    assert other.backend.name == "onnx-int8" and other.backend.file != runner.backend.file


def test_static_int8_that_changes_labels_is_not_served(pristine_models, tmp_path, monkeypatch):
    """The label check refuses a quantized graph (here: a bar no graph can pass) and float32 serves."""
    from service import onnx_backend

    monkeypatch.setattr(onnx_backend, "INT8_MIN_LABEL_AGREEMENT", 1.01)
    folder = make_models_dir(pristine_models, tmp_path / "models", ["mobilenet"]) / "mobilenet"
    write_images(tmp_path / "calibration" / "mobilenet", fashion_pngs(60))
    runner = load(folder, settings(tmp_path, quantize="int8", calibration_dir=tmp_path / "calibration"))
    assert runner.backend.name == "onnx" and runner.backend.file.endswith("/model.onnx")
    assert "of 48 held-out calibration images, fewer than 101% at 95 % confidence: served in float32" in runner.backend.note


def test_static_int8_that_fails_leaves_float32_serving(pristine_models, tmp_path, monkeypatch):
    """A graph the quantizer cannot take (here: it raises) costs int8, not the ONNX backend."""
    from service import onnx_backend

    def cannot(*args, **kwargs):
        raise ValueError("unsupported op")

    monkeypatch.setattr(onnx_backend, "quantize_int8_static", cannot)
    folder = make_models_dir(pristine_models, tmp_path / "models", ["resnet"]) / "resnet"
    write_images(tmp_path / "calibration" / "resnet", fashion_pngs(60))
    runner = load(folder, settings(tmp_path, quantize="int8", calibration_dir=tmp_path / "calibration"))
    assert runner.backend.name == "onnx"
    assert runner.backend.note == "static int8 failed (ValueError: unsupported op): served in float32"
    assert not list((tmp_path / "onnx-cache").glob("*/model.int8-static-*"))  # nothing half-written left


def test_the_label_check_refuses_only_what_the_images_show_to_be_worse():
    """One-sided 95 % Wilson bounds against 98 %: the measured cases of docs/performance.md."""
    from service.onnx_backend import INT8_MIN_LABEL_AGREEMENT, agreement_upper_bound

    def refused(kept, count):
        return agreement_upper_bound(kept / count, count) < INT8_MIN_LABEL_AGREEMENT

    assert refused(232, 256)  # the demo MobileNetV2: 90.7 % kept (91.7 % on 2,000 test images, -2.0 pt)
    assert not refused(250, 256)  # a trained ResNet-18: 97.7 % here, 99.1 % and +0.0 pt on 2,000 test images
    assert not refused(63, 64) and not refused(256, 256)
    assert refused(480, 512) and not refused(47, 48)  # 93.8 % of many: refused; one miss of few: not
    assert agreement_upper_bound(0.5, 0) == 1.0
