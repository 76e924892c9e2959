"""LoRA (training/lora.py) for every task, on tiny real models: only the adapters and the saved head
train (every other tensor is bit-identical: frozen tensors are never touched); the merged export gives
the logits of the unmerged PEFT model; the adapter export loads with PEFT; bad requests stop with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from tests.tiny_models import build_tiny_llama_chat, build_tiny_resnet
from training.config import FinetuneConfig
from training.data import load_raw_datasets
from training.finetune import main
from training.loop import train
from training.tasks import build_task

# PEFT asks transformers about gradient checkpointing with a deprecated name when it loads an adapter.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory) -> Path:
    return build_tiny_resnet(tmp_path_factory.mktemp("models") / "tiny-resnet")


@pytest.fixture(scope="session")
def tiny_llama_chat(tmp_path_factory) -> Path:
    return build_tiny_llama_chat(tmp_path_factory.mktemp("models") / "tiny-llama-chat")


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory, rt_small) -> tuple[Path, Path]:
    """Conversations from real Rotten Tomatoes sentences: the user asks for a review, the assistant gives one."""
    import csv

    folder = tmp_path_factory.mktemp("chat")
    paths = []
    for src, name in zip(rt_small, ("train.jsonl", "test.jsonl"), strict=True):
        with src.open() as f:
            rows = list(csv.DictReader(f))
        lines = [json.dumps({"messages": [
            {"role": "user", "content": f"Write a {row['label']} movie review."},
            {"role": "assistant", "content": row["text"]}]}) for row in rows]
        (folder / name).write_text("\n".join(lines) + "\n")
        paths.append(folder / name)
    return paths[0], paths[1]


def _card(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])


def _is_trained(key: str) -> bool:
    return ".lora_" in key or ".modules_to_save." in key


def _task_config(task: str, model: Path, data: dict, tmp_path: Path, **extra) -> FinetuneConfig:
    values = dict(task=task, model_name_or_path=str(model), output_dir=str(tmp_path / "models" / "lora"),
                  use_peft=True, max_train_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                  checkpointing_steps=None, eval_steps=2, **data)
    return FinetuneConfig(**{**values, **extra})


# --------------------------------------------------------------------------------------------
# Only the adapters and the head train.


@pytest.mark.parametrize("task", ["text-classification", "text-generation", "image-classification"])
def test_lora_trains_only_adapters_and_the_saved_head(task, tiny_bert, tiny_llama_chat, tiny_mobilenet, rt_small,
                                                     chat_files, caltech_folder, tmp_path):
    if task == "text-classification":
        config = _task_config(task, tiny_bert, {"train_file": str(rt_small[0]), "validation_file": str(rt_small[1])},
                              tmp_path)
    elif task == "text-generation":
        config = _task_config(task, tiny_llama_chat, {"train_file": str(chat_files[0]),
                                                      "validation_file": str(chat_files[1])}, tmp_path,
                              max_eval_samples=16, num_sample_generations=0)
    else:
        config = _task_config(task, tiny_mobilenet, {"train_dir": str(caltech_folder), "train_samples_per_class": 6},
                              tmp_path, per_device_train_batch_size=6)
    bundle = build_task(config, load_raw_datasets(config).splits)
    model = bundle.model
    assert isinstance(model, PeftModel)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(_is_trained(n) for n in trainable)

    train(config, Accelerator(), bundle)

    after = model.state_dict()
    assert after.keys() == before.keys()
    frozen = [k for k in before if not _is_trained(k)]
    changed = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]  # weights and buffers (batch-norm statistics included) untouched
    moved = {k for k in before if _is_trained(k) and not torch.equal(before[k], after[k])}
    assert any(".lora_B." in k for k in moved)  # LoRA's B starts at zero: it moved
    if task != "text-generation":  # the new head trains fully
        assert any(".modules_to_save." in k and "classifier" in k for k in moved), sorted(moved)[:5]
    if task == "image-classification":
        targeted = {k.split(".lora_A.")[0] for k in before if ".lora_A." in k}
        convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
                 and ".lora_" not in name and not name.endswith("base_layer")}
        depthwise = {n for n, m in convs.items() if m.groups > 1}
        assert depthwise and not any(n.removesuffix(".base_layer") in targeted for n in depthwise)
        assert any(k.endswith("conv_1x1.convolution") for k in targeted)  # convolutions with groups == 1


# --------------------------------------------------------------------------------------------
# Export: merged (a plain folder) and adapter folder.


def _run(model: Path, data: list[str], name: str, *extra: str) -> Path:
    assert main(["--model_name_or_path", str(model), *data, "--output_dir", f"models/{name}", "--use_peft",
                 "--max_train_steps", "4", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
                 "--lora_r", "4", "--checkpointing_steps", "none", *extra]) == 0
    return Path("models") / name


def _peft_logits(base_cls, base: Path, adapter: Path, inputs: dict, config_dir: Path) -> torch.Tensor:
    base_model = base_cls.from_pretrained(base, config=AutoConfig.from_pretrained(config_dir))
    model = PeftModel.from_pretrained(base_model, str(adapter)).eval()
    with torch.no_grad():
        return model(**inputs).logits


def test_text_classification_merged_and_adapter_exports(tiny_bert, rt_small, tmp_path):
    train_file, test_file = rt_small
    data = ["--train_file", str(train_file), "--validation_file", str(test_file)]
    merged = _run(tiny_bert, data, "merged")
    adapter = _run(tiny_bert, data, "adapter", "--merge_adapter", "false")

    tokenizer = AutoTokenizer.from_pretrained(merged)
    inputs = tokenizer(["A gorgeous, witty film.", "Dull, lifeless and far too long for what it says."],
                       padding=True, return_tensors="pt")
    # The merged folder is a plain model whose logits are the unmerged PEFT model's (its best adapter).
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        merged_logits = plain(**inputs).logits
    best = tmp_path / "runs" / "merged" / "checkpoints" / "best"
    reference = _peft_logits(AutoModelForSequenceClassification, tiny_bert, best, inputs, merged)
    torch.testing.assert_close(merged_logits, reference, rtol=1e-4, atol=1e-5)
    assert not (merged / "adapter_config.json").exists()
    assert _card(merged)["library_name"] == "transformers" and "lora" in _card(merged)["tags"]

    # The adapter folder: PEFT loads it on its base; config.json carries the labels; the head is in the adapter.
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json", "README.md"} <= names
    assert "model.safetensors" not in names
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_bert)  # as the user gave it
    assert "classifier" in adapter_config["modules_to_save"]
    assert any(k.endswith("classifier.weight") for k in load_file(adapter / "adapter_model.safetensors"))
    assert json.loads((adapter / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    card = _card(adapter)
    assert card["library_name"] == "peft" and card["base_model"] == str(tiny_bert)
    assert "PeftModel.from_pretrained" in (adapter / "README.md").read_text()
    adapter_logits = _peft_logits(AutoModelForSequenceClassification, tiny_bert, adapter, inputs, adapter)
    best = tmp_path / "runs" / "adapter" / "checkpoints" / "best"
    torch.testing.assert_close(adapter_logits, _peft_logits(AutoModelForSequenceClassification, tiny_bert, best,
                                                            inputs, adapter), rtol=1e-5, atol=1e-6)


def test_text_generation_merged_and_adapter_exports(tiny_llama_chat, chat_files, tmp_path):
    data = ["--task", "text-generation", "--train_file", str(chat_files[0]), "--validation_file", str(chat_files[1]),
            "--max_eval_samples", "8", "--num_sample_generations", "1"]
    merged = _run(tiny_llama_chat, data, "merged")
    adapter = _run(tiny_llama_chat, data, "adapter", "--merge_adapter", "false")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    inputs = {"input_ids": tokenizer.apply_chat_template([{"role": "user", "content": "Write a review."}],
                                                         add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True)["input_ids"]}
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        merged_logits = plain(**inputs).logits
    best = tmp_path / "runs" / "merged" / "checkpoints" / "best"
    torch.testing.assert_close(merged_logits, _peft_logits(AutoModelForCausalLM, tiny_llama_chat, best, inputs, merged),
                               rtol=1e-4, atol=1e-5)
    for folder in (merged, adapter):  # the chat template and a generation config that stops at <|im_end|>
        assert (folder / "chat_template.jinja").read_text() == (tiny_llama_chat / "chat_template.jinja").read_text()
        assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] in (2, [2])
    assert "## Sample generations" in (merged / "README.md").read_text()
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM" and not adapter_config["modules_to_save"]
    assert {"q_proj", "v_proj", "down_proj"} <= set(adapter_config["target_modules"])  # every linear layer
    assert "lm_head" not in adapter_config["target_modules"]
    _peft_logits(AutoModelForCausalLM, tiny_llama_chat, adapter, inputs, adapter)  # loads with PEFT


@pytest.mark.parametrize("arch", ["mobilenet", "resnet"])
def test_image_classification_merged_and_adapter_exports(arch, tiny_mobilenet, tiny_resnet, caltech_folder, tmp_path):
    base = tiny_mobilenet if arch == "mobilenet" else tiny_resnet
    data = ["--task", "image-classification", "--train_dir", str(caltech_folder), "--train_samples_per_class", "6",
            "--per_device_train_batch_size", "6"]
    merged = _run(base, data, "merged")
    adapter = _run(base, data, "adapter", "--merge_adapter", "false")
    processor = AutoImageProcessor.from_pretrained(merged)
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sorted((caltech_folder / "101_ObjectCategories" / "anchor").glob("*.jpg"))[:3]]
    inputs = {"pixel_values": processor(images, return_tensors="pt")["pixel_values"]}
    plain = AutoModelForImageClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        merged_logits = plain(**inputs).logits
    best = tmp_path / "runs" / "merged" / "checkpoints" / "best"
    reference = _peft_logits(AutoModelForImageClassification, base, best, inputs, merged)
    torch.testing.assert_close(merged_logits, reference, rtol=1e-4, atol=1e-5)
    assert sorted(json.loads((merged / "config.json").read_text())["id2label"].values()) == [
        "accordion", "airplanes", "anchor"]
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["classifier"]
    assert (adapter / "preprocessor_config.json").is_file()
    _peft_logits(AutoModelForImageClassification, base, adapter, inputs, adapter)


# --------------------------------------------------------------------------------------------
# Requests that cannot work: one line, exit code 2, nothing written.


@pytest.mark.parametrize(("extra", "message"), [
    (["--lora_target_modules", "q_proj"],
     "--lora_target_modules 'q_proj' names no module of BertForSequenceClassification; its adaptable modules "
     "are named: classifier, dense, key, position_embeddings, query, token_type_embeddings, value, word_embeddings"),
    (["--lora_modules_to_save", "head"], "--lora_modules_to_save 'head' names no module"),
    (["--freeze", "backbone"], "--freeze applies to image-classification"),
])
def test_bad_lora_requests_stop_with_one_line(extra, message, tiny_bert, rt_small, tmp_path, capsys):
    train_file, test_file = rt_small
    code = main(["--model_name_or_path", str(tiny_bert), "--train_file", str(train_file), "--validation_file",
                 str(test_file), "--output_dir", "models/bad", "--use_peft", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_lora_with_freeze_and_depthwise_requests(tiny_mobilenet, caltech_folder, tmp_path, capsys):
    args = ["--task", "image-classification", "--model_name_or_path", str(tiny_mobilenet), "--train_dir",
            str(caltech_folder), "--train_samples_per_class", "6", "--output_dir", "models/bad", "--use_peft"]
    assert main([*args, "--freeze", "backbone"]) == 2
    assert "--use_peft and --freeze backbone do not combine" in capsys.readouterr().err
    assert main([*args, "--lora_target_modules", "convolution"]) == 2  # every conv, depthwise ones included
    err = capsys.readouterr().err
    assert "selects depthwise convolutions (groups > 1: mobilenet_v2." in err and "--merge_adapter false" in err
    assert main([*args, "--lora_target_modules", "convolution", "--merge_adapter", "false", "--lora_r", "3"]) == 2
    assert "PEFT needs --lora_r divisible by groups" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
