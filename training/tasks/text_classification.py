"""Text classification: any AutoModelForSequenceClassification (BERT family, GPT-2, Llama/SmolLM2, ...).

Decoder-only models (GPT-2, Llama) read the last non-pad token: they get pad = eos in the tokenizer
*and* in the model config, or batches of different lengths would be classified from a pad position.
"""

from __future__ import annotations

import logging

from datasets import DatasetDict
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)

from training import lora
from training.config import FinetuneConfig
from training.data import TEXT_CANDIDATES, encode_labels, resolve_column
from training.tasks.base import TaskBundle, classification_eval_step, classification_metrics_fn

logger = logging.getLogger(__name__)


def load_tokenizer(config: FinetuneConfig):
    """The model's tokenizer; decoder-only models get pad = eos so batches can be padded."""
    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{config.model_name_or_path}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build(config: FinetuneConfig, raw: DatasetDict) -> TaskBundle:
    """Tokenise (truncate, no padding), encode labels, load the model with a fresh head."""
    text_col = resolve_column(raw["train"], config.text_column, TEXT_CANDIDATES, "text")
    pair_col = config.text_pair_column
    if pair_col:
        resolve_column(raw["train"], pair_col, (), "text_pair")
    base_config = AutoConfig.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    raw, labels = encode_labels(raw, config.label_column, config.label_names, getattr(base_config, "id2label", None))

    tokenizer = load_tokenizer(config)
    model_config = AutoConfig.from_pretrained(
        config.model_name_or_path, num_labels=len(labels.names), id2label=labels.id2label,
        label2id=labels.label2id, problem_type="single_label_classification",
        trust_remote_code=config.trust_remote_code,
    )
    # GPT-2 & co. find the last real token through config.pad_token_id: batched training and
    # serving break if only the tokenizer knows the pad token.
    model_config.pad_token_id = tokenizer.pad_token_id
    model, loading_info = AutoModelForSequenceClassification.from_pretrained(
        config.model_name_or_path, config=model_config, ignore_mismatched_sizes=True,
        trust_remote_code=config.trust_remote_code, output_loading_info=True,
    )
    if config.use_peft:
        model = lora.wrap(model, config, loading_info)
    max_length = min(config.max_length, tokenizer.model_max_length or config.max_length)

    def tokenize(batch: dict) -> dict:
        texts = [t if t is not None else "" for t in batch[text_col]]
        pairs = [t if t is not None else "" for t in batch[pair_col]] if pair_col else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        encoded["labels"] = batch[config.label_column]
        return encoded

    processed = raw.map(
        tokenize, batched=True, remove_columns=raw["train"].column_names,
        num_proc=config.preprocessing_num_workers, desc="Tokenizing",
    )
    lengths = {split: [len(ids) for ids in ds["input_ids"]] for split, ds in processed.items()}
    return TaskBundle(
        model=model,
        processor=tokenizer,
        train_dataset=processed["train"],
        eval_dataset=processed["validation"],
        test_dataset=processed.get("test"),
        collate_fn=DataCollatorWithPadding(tokenizer),
        eval_step=classification_eval_step,
        compute_metrics=classification_metrics_fn(len(labels.names)),
        main_metric="accuracy",
        greater_is_better=True,
        pipeline_tag="text-classification",
        labels=labels,
        train_lengths=lengths["train"] if config.group_by_length else None,
        eval_lengths=lengths["validation"],
    )
