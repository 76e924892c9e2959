"""The real SmolLM2-135M-Instruct (a Llama with a chat template, pad = eos): a few LoRA steps lower the loss
of a fixed batch of conversations; as a decoder classifier it gives the same logits in a padded batch as
one sentence at a time (with LoRA too); a LoRA run on conversations exports a folder that the
text-generation pipeline chats with. About a minute together on 2 cores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import pipeline

from tests.tiny_models import smollm2_dir
from training.config import FinetuneConfig
from training.data import load_raw_datasets
from training.finetune import main
from training.tasks import build_task

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]


@pytest.fixture(scope="module")
def review_chats(tmp_path_factory, rt_small) -> tuple[Path, Path]:
    """Conversations around real Rotten Tomatoes sentences (the user asks, the assistant reviews)."""
    folder = tmp_path_factory.mktemp("smol-chat")
    paths = []
    for src, name, n in zip(rt_small, ("train.jsonl", "test.jsonl"), (16, 4), strict=True):
        with src.open() as f:
            rows = list(csv.DictReader(f))
        rows = rows[:: len(rows) // n][:n]  # both labels (the file is sorted by label)
        (folder / name).write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": f"Write a {row['label']} one-sentence movie review."},
            {"role": "assistant", "content": row["text"]}]}) + "\n" for row in rows))
        paths.append(folder / name)
    return paths[0], paths[1]


def test_a_few_lora_steps_lower_the_loss_of_a_fixed_batch(review_chats, tmp_path):
    train, test = review_chats
    config = FinetuneConfig(task="text-generation", model_name_or_path=str(smollm2_dir()), train_file=str(train),
                            validation_file=str(test), output_dir=str(tmp_path / "unused"), use_peft=True,
                            lora_r=8, lora_dropout=0.0)
    bundle = build_task(config, load_raw_datasets(config).splits)
    model = bundle.model
    batch = bundle.collate_fn([bundle.train_dataset[i] for i in range(2)])
    assert (batch["labels"] != -100).sum() < batch["attention_mask"].sum() / 2  # assistant tokens only
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    before = loss()
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = loss()
    assert after < before - 0.3, (before, after)


@pytest.mark.parametrize("use_peft", [False, True])
def test_decoder_classifier_batch_equals_one_at_a_time(use_peft, rt_small, tmp_path):
    """LlamaForSequenceClassification reads the last non-pad token: pad (= eos) is set in tokenizer and config."""
    train, test = rt_small
    config = FinetuneConfig(model_name_or_path=str(smollm2_dir()), train_file=str(train), validation_file=str(test),
                            output_dir=str(tmp_path / "unused"), use_peft=use_peft, max_train_samples=16,
                            max_eval_samples=8)
    bundle = build_task(config, load_raw_datasets(config).splits)
    model = bundle.model
    base = model.get_base_model() if use_peft else model
    assert base.config.pad_token_id == bundle.processor.pad_token_id == bundle.processor.eos_token_id == 2
    if use_peft:
        assert isinstance(model, PeftModel)
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if ".lora_B." in name:  # B starts at zero: make the adapters count
                torch.nn.init.normal_(param, std=0.02)
    model.eval()
    examples = [bundle.eval_dataset[i] for i in range(4)]
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1  # the batch needs padding
    batch = bundle.collate_fn(examples)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        together = model(**inputs).logits
        alone = torch.cat([model(**{k: v[i:i + 1, :lengths[i]] for k, v in inputs.items()}).logits
                           for i in range(len(examples))])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_lora_chat_run_exports_a_folder_the_pipeline_chats_with(review_chats, tmp_path):
    train, test = review_chats
    out = tmp_path / "models" / "smol-chat"
    assert main(["--task", "text-generation", "--model_name_or_path", str(smollm2_dir()), "--train_file", str(train),
                 "--validation_file", str(test), "--max_eval_samples", "2", "--output_dir", str(out), "--use_peft",
                 "--max_train_steps", "1", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
                 "--checkpointing_steps", "none", "--num_sample_generations", "0"]) == 0
    assert (out / "chat_template.jinja").read_text() == (smollm2_dir() / "chat_template.jinja").read_text()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
    results = json.loads((out / "all_results.json").read_text())
    assert results["trainable_parameters"] < results["total_parameters"] / 20  # LoRA r=16 on every linear layer
    chat = pipeline("text-generation", model=str(out))
    reply = chat([{"role": "user", "content": "Write a positive one-sentence movie review."}], max_new_tokens=12,
                 do_sample=False)[0]["generated_text"]
    assert reply[-1]["role"] == "assistant" and len(reply[-1]["content"].split()) >= 3, reply
