"""The training baseline: a plain Accelerate loop as in transformers' `run_glue_no_trainer.py`.

Pads every example to `max_length` (128), random batches (`shuffle=True`), AdamW + linear schedule,
`accelerator.prepare` / `backward`, then accuracy on the evaluation file (padded the same way).
Prints one JSON line: examples/s and tokens/s of the training loop (evaluation excluded), accuracy.

    python benchmarks/train_baseline.py --train_file assets/data/rotten_tomatoes/train.csv \
        --validation_file assets/data/rotten_tomatoes/test.csv --max_train_steps 50
"""

from __future__ import annotations

import argparse
import csv
import json
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    default_data_collator,
    get_scheduler,
)


def read(path: str) -> tuple[list[str], list[int]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    names = sorted({r["label"] for r in rows})
    return [r["text"] for r in rows], [names.index(r["label"]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--validation_file", required=True)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--num_warmup_steps", type=int, default=5)
    parser.add_argument("--max_train_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    accelerator = Accelerator()
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, num_labels=2)

    def dataset(path: str) -> list[dict]:
        texts, labels = read(path)
        enc = tokenizer(texts, padding="max_length", max_length=args.max_length, truncation=True)
        return [{**{k: enc[k][i] for k in enc}, "labels": labels[i]} for i in range(len(texts))]

    train_ds, eval_ds = dataset(args.train_file), dataset(args.validation_file)
    train_dl = DataLoader(train_ds, shuffle=True, collate_fn=default_data_collator,
                          batch_size=args.per_device_train_batch_size)
    eval_dl = DataLoader(eval_ds, collate_fn=default_data_collator, batch_size=args.per_device_eval_batch_size)
    no_decay = ["bias", "LayerNorm.weight"]
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=args.max_train_steps)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)

    model.train()
    step, examples, tokens, padded = 0, 0, 0, 0
    started = time.perf_counter()
    while step < args.max_train_steps:
        for batch in train_dl:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            examples += batch["labels"].shape[0] * accelerator.num_processes
            tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            padded += batch["input_ids"].numel() * accelerator.num_processes
            if step >= args.max_train_steps:
                break
    seconds = time.perf_counter() - started

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in eval_dl:
            preds = model(**batch).logits.argmax(dim=-1)
            preds, refs = accelerator.gather_for_metrics((preds, batch["labels"]))
            correct += int((preds == refs).sum())
            total += refs.numel()
    if accelerator.is_main_process:
        print(json.dumps({"train_runtime_s": seconds, "train_samples_per_second": examples / seconds,
                          "train_tokens_per_second": tokens / seconds, "padded_tokens_per_second": padded / seconds,
                          "steps": step, "eval_accuracy": correct / total, "eval_examples": total,
                          "num_processes": accelerator.num_processes}))


if __name__ == "__main__":
    main()
