"""Causal language modelling: any AutoModelForCausalLM (GPT-2, SmolLM2, Llama, ...)."""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

from training.config import ConfigError, FinetuneConfig
from training.data import TEXT_CANDIDATES, resolve_column
from training.metrics import perplexity
from training.tasks.base import TaskBundle


def lm_eval_step(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Mean token loss of each block (blocks have equal length, so their mean is the corpus mean)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="none"
    ).view(shift_labels.shape)
    return {"loss": loss.mean(dim=1)}


def lm_metrics(out: dict[str, np.ndarray]) -> dict:
    loss = float(out["loss"].mean())
    return {"loss": loss, "perplexity": perplexity(loss)}


def build(config: FinetuneConfig, raw: DatasetDict) -> TaskBundle:
    """Tokenise, concatenate (eos between documents) and cut into `block_size` blocks."""
    text_col = resolve_column(raw["train"], config.text_column, TEXT_CANDIDATES, "text")
    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # lets the server pad batched prompts
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    block_size = min(config.block_size, max_positions or config.block_size)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict) -> dict:
        ids = tokenizer([t for t in batch[text_col] if t], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + eos for doc in ids]}

    def group(batch: dict) -> dict:
        tokens = list(chain.from_iterable(batch["input_ids"]))
        total = (len(tokens) // block_size) * block_size
        blocks = [tokens[i:i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names,
                        num_proc=config.preprocessing_num_workers, desc="Tokenizing")
    blocks = tokenized.map(group, batched=True, batch_size=1000, num_proc=config.preprocessing_num_workers,
                           desc=f"Grouping into blocks of {block_size}")
    for split, ds in blocks.items():
        if len(ds) == 0:
            raise ConfigError(f"the {split} split has fewer than --block_size {block_size} tokens; lower --block_size")
    return TaskBundle(
        model=model,
        processor=tokenizer,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        test_dataset=blocks.get("test"),
        collate_fn=default_data_collator,
        eval_step=lm_eval_step,
        compute_metrics=lm_metrics,
        main_metric="loss",
        greater_is_better=False,
        pipeline_tag="text-generation",
    )
