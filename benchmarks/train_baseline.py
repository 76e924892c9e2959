"""The training baseline: transformers' `examples/pytorch/text-classification/run_glue_no_trainer.py`.

What is reproduced, from the script's logic (it is not installed here; this follows its code as of
transformers 4.4x-5.x):
- local csv files -> `datasets.load_dataset("csv", data_files={"train", "validation"})`; no task name, so
  the text column is the first non-`label` column and labels are `sorted(unique(label))` -> ids
  (`label_to_id`, also written into the model config);
- tokenization once, before the loop, with a batched `datasets.map` of
  `tokenizer(texts, padding=padding, max_length=args.max_length, truncation=True)` where
  `padding = "max_length" if args.pad_to_max_length else False`;
- the collator: `default_data_collator` with `--pad_to_max_length`, otherwise **the default**,
  `DataCollatorWithPadding(tokenizer, pad_to_multiple_of=None)` (8 only under mixed precision, 16 under
  fp8): each batch is padded to its own longest example;
- `DataLoader(train_dataset, shuffle=True, ...)` (random batches, no length grouping), the eval loader in
  file order with `per_device_eval_batch_size`;
- AdamW over two groups (no weight decay on `bias` and `LayerNorm.weight`), `get_scheduler(
  lr_scheduler_type="linear", num_warmup_steps, num_training_steps=max_train_steps)`;
- `accelerator.prepare(...)`, then per step `model(**batch).loss` / `accelerator.backward` / `optimizer.step`
  / `lr_scheduler.step` / `optimizer.zero_grad` (gradient_accumulation_steps 1), stopping at
  `max_train_steps`; evaluation with `argmax` and `accelerator.gather_for_metrics`.
Flag names and meanings are the script's; its own defaults (batch 8, lr 5e-5, weight decay 0, no
warm-up, 3 epochs) are overridden by the benchmark with the values it gives every arm (batch 32,
lr 1e-4, ...). Left out, as they do not touch the timed loop: `--with_tracking`, checkpointing,
`--push_to_hub`, the progress bar, the GLUE metric (accuracy is computed directly).

Prints one JSON line: examples/s and tokens/s of the training loop (evaluation excluded), accuracy.

    python benchmarks/train_baseline.py --model_name_or_path assets/models/all-MiniLM-L6-v2 \
        --train_file assets/data/rotten_tomatoes/train.csv \
        --validation_file assets/data/rotten_tomatoes/test.csv --max_train_steps 50 [--pad_to_max_length]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import load_dataset
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    default_data_collator,
    get_scheduler,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--validation_file", required=True)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--pad_to_max_length", action="store_true",
                        help="pad every example to max_length (default: dynamic padding per batch)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--lr_scheduler_type", default="linear")
    parser.add_argument("--num_warmup_steps", type=int, default=0)
    parser.add_argument("--max_train_steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()

    accelerator = Accelerator()
    if args.seed is not None:
        set_seed(args.seed)

    raw = load_dataset("csv", data_files={"train": args.train_file, "validation": args.validation_file})
    label_list = sorted(raw["train"].unique("label"))
    text_key = [c for c in raw["train"].column_names if c != "label"][0]
    config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=len(label_list))
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, config=config)
    label_to_id = {v: i for i, v in enumerate(label_list)}
    model.config.label2id = label_to_id
    model.config.id2label = {i: label for label, i in label_to_id.items()}

    padding = "max_length" if args.pad_to_max_length else False

    def preprocess_function(examples):
        result = tokenizer(examples[text_key], padding=padding, max_length=args.max_length, truncation=True)
        result["labels"] = [label_to_id[label] for label in examples["label"]]
        return result

    with accelerator.main_process_first():
        processed = raw.map(preprocess_function, batched=True, remove_columns=raw["train"].column_names)
    train_dataset, eval_dataset = processed["train"], processed["validation"]

    if args.pad_to_max_length:
        data_collator = default_data_collator
    else:
        # The script's comment: pad to a multiple of 8 (16 for fp8) only under mixed precision, for tensor cores.
        pad_to_multiple_of = 16 if accelerator.mixed_precision == "fp8" else 8 if accelerator.mixed_precision != "no" else None
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    train_dl = DataLoader(train_dataset, shuffle=True, collate_fn=data_collator, batch_size=args.per_device_train_batch_size)
    eval_dl = DataLoader(eval_dataset, collate_fn=data_collator, batch_size=args.per_device_eval_batch_size)

    no_decay = ["bias", "LayerNorm.weight"]
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    lr_scheduler = get_scheduler(name=args.lr_scheduler_type, optimizer=optimizer,
                                 num_warmup_steps=args.num_warmup_steps, num_training_steps=args.max_train_steps)
    model, optimizer, train_dl, eval_dl, lr_scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, lr_scheduler)

    completed_steps, examples, tokens, padded = 0, 0, 0, 0
    started = time.perf_counter()
    while completed_steps < args.max_train_steps:  # the script's epoch loop, cut at max_train_steps
        model.train()
        for batch in train_dl:
            outputs = model(**batch)
            accelerator.backward(outputs.loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            completed_steps += 1
            examples += batch["labels"].shape[0] * accelerator.num_processes
            tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            padded += batch["input_ids"].numel() * accelerator.num_processes
            if completed_steps >= args.max_train_steps:
                break
    seconds = time.perf_counter() - started

    model.eval()
    correct = total = 0
    for batch in eval_dl:
        with torch.no_grad():
            outputs = model(**batch)
        predictions, references = accelerator.gather_for_metrics((outputs.logits.argmax(dim=-1), batch["labels"]))
        correct += int((predictions == references).sum())
        total += references.numel()
    if accelerator.is_main_process:
        print(json.dumps({"train_runtime_s": seconds, "train_samples_per_second": examples / seconds,
                          "train_tokens_per_second": tokens / seconds, "padded_tokens_per_second": padded / seconds,
                          "padding_fraction": 1 - tokens / padded, "steps": completed_steps,
                          "eval_accuracy": correct / total, "eval_examples": total,
                          "pad_to_max_length": args.pad_to_max_length, "num_processes": accelerator.num_processes}))


if __name__ == "__main__":
    main()
