"""The tasks (training/tasks/): each fine-tunes a tiny real model on real data and exports a folder that
`transformers.pipeline()` loads as is, with a Hub model card; image models' layout and freezing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline

from training.config import FinetuneConfig
from training.data import load_raw_datasets
from training.finetune import main
from training.tasks import build_task


def _card(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _no_partial_folders(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------
# text-classification


def test_text_classification_bert(tiny_bert, rt_small, tmp_path):
    train, test = rt_small
    out = tmp_path / "models" / "sentiment"
    code = main(["--model_name_or_path", str(tiny_bert), "--train_file", str(train), "--validation_file", str(test),
                 "--test_file", str(test), "--output_dir", str(out), "--num_train_epochs", "2",
                 "--per_device_train_batch_size", "16", "--learning_rate", "5e-4", "--eval_steps", "5",
                 "--base_model_id", "org/tiny-bert", "--dataset_id", "rotten_tomatoes"])
    assert code == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "all_results.json",
                 "training_curves.png", "training_config.yaml"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pkl"))  # safetensors only in the model folder
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}

    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and "eval_f1_macro" in results
    assert sum(map(sum, results["eval_confusion_matrix"])) == 42  # every eval sentence counted once
    assert results["train_samples_per_second"] > 0 and "test_accuracy" in results

    card = _card(out)
    assert card["pipeline_tag"] == "text-classification"
    assert card["base_model"] == "org/tiny-bert"
    assert card["datasets"] == ["rotten_tomatoes"]
    assert card["library_name"] == "transformers"
    metrics = {m["type"]: m["value"] for m in card["model-index"][0]["results"][0]["metrics"]}
    assert metrics["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-4)

    classify = pipeline("text-classification", model=str(out))
    preds = classify(["A moving, beautifully acted film.", "Dull and lifeless."])
    assert {p["label"] for p in preds} <= {"negative", "positive"}
    _no_partial_folders(out.parent)


def test_gpt2_classification_batches_with_padding(tiny_gpt2, rt_small, tmp_path):
    train, test = rt_small
    out = tmp_path / "gpt2-sentiment"
    assert main(["--model_name_or_path", str(tiny_gpt2), "--train_file", str(train), "--validation_file",
                 str(test), "--output_dir", str(out), "--max_train_steps", "6", "--per_device_train_batch_size",
                 "8", "--checkpointing_steps", "none"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == config["eos_token_id"] == 50256
    classify = pipeline("text-classification", model=str(out))
    texts = ["Short.", "A much longer sentence that needs padding when batched with the short one."]
    batched = classify(texts, batch_size=2)
    single = [classify(t)[0] for t in texts]
    assert [b["label"] for b in batched] == [s["label"] for s in single]
    for b, s in zip(batched, single, strict=True):
        assert b["score"] == pytest.approx(s["score"], abs=1e-4)


# --------------------------------------------------------------------------------------------
# text-generation


def test_text_generation_gpt2(tiny_gpt2, rt_small, tmp_path):
    train, test = rt_small
    out = tmp_path / "gpt2-lm"
    assert main(["--task", "text-generation", "--model_name_or_path", str(tiny_gpt2), "--train_file", str(train),
                 "--validation_file", str(test), "--output_dir", str(out), "--block_size", "32",
                 "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3"]) == 0
    assert (out / "generation_config.json").is_file()
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_perplexity"] > 1.0
    card = _card(out)
    assert card["pipeline_tag"] == "text-generation"
    assert {m["type"] for m in card["model-index"][0]["results"][0]["metrics"]} == {"perplexity", "loss"}
    generate = pipeline("text-generation", model=str(out))
    # A few steps of training make EOS (between documents) the likeliest token: force some text.
    text = generate("The film was", min_new_tokens=3, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("The film was") and len(text) > len("The film was")


# --------------------------------------------------------------------------------------------
# image-classification


def test_image_classification_caltech_layout_head_only(tiny_mobilenet, caltech_folder, tmp_path):
    out = tmp_path / "caltech"
    assert main(["--task", "image-classification", "--model_name_or_path", str(tiny_mobilenet), "--train_dir",
                 str(caltech_folder), "--train_samples_per_class", "6", "--output_dir", str(out),
                 "--num_train_epochs", "2", "--per_device_train_batch_size", "6", "--learning_rate", "1e-2",
                 "--freeze", "backbone"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["accordion", "airplanes", "anchor"]
    assert (out / "preprocessor_config.json").is_file()

    # Head-only: every backbone tensor is bit-identical to the base model, the head is new.
    base, tuned = load_file(tiny_mobilenet / "model.safetensors"), load_file(out / "model.safetensors")
    backbone = [k for k in tuned if k.startswith("mobilenet_v2.")]
    assert backbone and all(torch.equal(base[k], tuned[k]) for k in backbone)
    assert tuned["classifier.weight"].shape[0] == 3

    classify = pipeline("image-classification", model=str(out))
    gray = Image.open(caltech_folder / "101_ObjectCategories" / "anchor" / "image_0011.jpg")
    assert gray.mode == "L"
    assert {p["label"] for p in classify(gray)} == {"accordion", "airplanes", "anchor"}
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_examples"] == 18 and results["eval_examples"] == 31 - 18


def test_partial_freeze_trains_last_stages_only(tiny_mobilenet, caltech_folder, tmp_path):
    out = tmp_path / "partial"
    assert main(["--task", "image-classification", "--model_name_or_path", str(tiny_mobilenet), "--train_dir",
                 str(caltech_folder), "--train_samples_per_class", "4", "--output_dir", str(out),
                 "--max_train_steps", "2", "--per_device_train_batch_size", "6", "--learning_rate", "1e-2",
                 "--freeze", "partial:2", "--checkpointing_steps", "none"]) == 0
    base, tuned = load_file(tiny_mobilenet / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in base if k in tuned and k.endswith("weight") and not torch.equal(base[k], tuned[k])}
    assert "mobilenet_v2.conv_stem.first_conv.convolution.weight" not in changed
    assert any(k.startswith("mobilenet_v2.layer.15.") for k in changed)
    assert any(k.startswith("mobilenet_v2.conv_1x1.") for k in changed)
    assert not any(k.startswith("mobilenet_v2.layer.0.") for k in changed)


def _image_bundle(model_dir: Path, caltech_folder: Path, tmp_path: Path, channels_last: bool):
    config = FinetuneConfig(task="image-classification", model_name_or_path=str(model_dir),
                            train_dir=str(caltech_folder), train_samples_per_class=4,
                            output_dir=str(tmp_path / "unused"), channels_last=channels_last)
    return build_task(config, load_raw_datasets(config).splits)


def test_channels_last_layout_and_cpu_eval_chunks(tiny_mobilenet, caltech_folder, tmp_path):
    """Conv weights are trained channels-last (the faster layout) unless --channels_last false, and
    the CPU evaluation step, which runs a few images per forward, gives the full batch's answer."""
    fast = _image_bundle(tiny_mobilenet, caltech_folder, tmp_path, channels_last=True)
    plain = _image_bundle(tiny_mobilenet, caltech_folder, tmp_path, channels_last=False)
    name = "mobilenet_v2.conv_stem.first_conv.convolution.weight"
    weight = dict(fast.model.named_parameters())[name]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert dict(plain.model.named_parameters())[name].is_contiguous()

    batch = fast.collate_fn([fast.eval_dataset[i] for i in range(11)])  # 11: chunks of 4, 4 and 3
    fast.model.eval()
    plain.model.eval()
    with torch.inference_mode():
        chunked = fast.eval_step(fast.model, batch)
        whole = plain.eval_step(plain.model, {k: v for k, v in batch.items()})
        logits = plain.model(pixel_values=batch["pixel_values"]).logits
    assert chunked["preds"].shape == (11,) and torch.equal(chunked["labels"], batch["labels"])
    # Predictions must agree wherever the top two logits are apart by more than float noise (the
    # tiny random model is close to uniform; which of two tied classes wins depends on the kernels).
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert torch.equal(chunked["preds"][clear], logits.argmax(-1)[clear])
    assert torch.equal(whole["preds"][clear], chunked["preds"][clear])
    assert torch.allclose(chunked["loss"], whole["loss"], atol=1e-5)


def test_channels_last_gives_the_same_gradients(tiny_mobilenet, caltech_folder, tmp_path):
    """Layout is a speed choice: the same weights and batch give the same loss and gradient
    channels-last as contiguous (training mode, batch-norm statistics included)."""
    fast = _image_bundle(tiny_mobilenet, caltech_folder, tmp_path, channels_last=True)
    plain = _image_bundle(tiny_mobilenet, caltech_folder, tmp_path, channels_last=False)
    fast.model.load_state_dict(plain.model.state_dict())  # copy_ keeps each parameter's layout
    batch = plain.collate_fn([plain.train_dataset[i] for i in range(6)])
    losses = {}
    for name, bundle in (("fast", fast), ("plain", plain)):
        bundle.model.train()
        torch.manual_seed(0)  # the same dropout mask
        loss = torch.nn.functional.cross_entropy(bundle.model(pixel_values=batch["pixel_values"]).logits, batch["labels"])
        loss.backward()
        losses[name] = loss.item()
    # oneDNN's channels-last batch norm computes training statistics less precisely (about 3e-5 vs
    # 1e-6 relative on activations; bf16 autocast is 4e-3), and this tiny random model is badly
    # conditioned (gradient norm ~750), so compare as an optimiser sees them: same direction and
    # size to within 1 %. A wrong layout conversion gives unrelated gradients.
    assert losses["fast"] == pytest.approx(losses["plain"], rel=1e-3)
    names = [n for n, p in plain.model.named_parameters() if p.grad is not None]
    assert len(names) > 100
    fast_params = dict(fast.model.named_parameters())
    g_fast = torch.cat([fast_params[n].grad.flatten() for n in names])
    g_plain = torch.cat([p.grad.flatten() for n, p in plain.model.named_parameters() if p.grad is not None])
    assert torch.nn.functional.cosine_similarity(g_fast, g_plain, dim=0) > 0.995
    assert (g_fast.norm() / g_plain.norm()).item() == pytest.approx(1.0, abs=1e-2)

