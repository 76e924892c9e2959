"""Causal language modelling: any AutoModelForCausalLM (GPT-2, SmolLM2, Llama, ...), on plain text or
on conversations.

- Plain text (a text column): tokenised, joined with EOS and cut into `--block_size` blocks; every
  token is a label.
- Conversations: a `messages` column (lists of {"role", "content"}), or `prompt`/`completion` columns
  (strings, or lists of messages). Each conversation is one example, rendered with the tokenizer's chat
  template (`--chat_template` gives one), cut at `--block_size` and padded per batch: a batch never
  puts two conversations in one attention context. With `--assistant_only_loss` (the default for
  conversations) every label is -100 but those of the assistant turns, their end-of-turn token
  included, so the model learns to stop. The assistant spans come from the template itself: with a
  `{% generation %}` block from transformers' assistant mask, otherwise (SmolLM2's template has none)
  from rendering each conversation turn by turn: an assistant turn is what its message adds to the
  rendering of the conversation before it with the generation prompt. Padding is masked by position
  (the attention mask), never by token id: pad is EOS here, and EOS is a label.

Metric: perplexity over the label tokens (the assistant tokens of the held-out conversations).
"""

from __future__ import annotations

import logging
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

from training import lora
from training.config import ConfigError, FinetuneConfig
from training.data import TEXT_CANDIDATES, conversation, is_conversational, resolve_column
from training.metrics import perplexity
from training.tasks.base import TaskBundle

logger = logging.getLogger(__name__)

IGNORE = -100


def lm_eval_step(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Summed next-token loss and number of label tokens of each example (labels -100 do not count)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="none",
        ignore_index=IGNORE,
    ).view(shift_labels.shape)
    counted = shift_labels != IGNORE
    return {"loss_sum": (loss * counted).sum(dim=1), "tokens": counted.sum(dim=1).float()}


def lm_metrics(out: dict[str, np.ndarray]) -> dict:
    """Mean loss per label token over the whole split, and its perplexity."""
    tokens = float(out["tokens"].sum())
    loss = float(out["loss_sum"].sum()) / max(tokens, 1.0)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": int(tokens)}


# --------------------------------------------------------------------------------------------
# Chat templates and assistant masks.


def read_chat_template(value: str) -> str:
    """`--chat_template`: a file holding the template, or the template itself."""
    if len(value) < 4096 and "\n" not in value and Path(value).is_file():
        return Path(value).read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ConfigError(f"--chat_template {value}: no such file, and not a Jinja template either")


def has_generation_block(template: str) -> bool:
    """Whether the template marks assistant text with `{% generation %}` (transformers' assistant mask)."""
    return "generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


class TemplateError(ValueError):
    """The chat template does not render a conversation turn by turn."""


def assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `text` (the rendered conversation): from the end of the
    generation prompt before each assistant message to the end of its turn, end-of-turn token included
    (trailing whitespace not: a model that stops at the end-of-turn token never generates it)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(head)) or (i and not head):
            raise TemplateError(f"message {i}")
        turn = upto[len(head):]
        if i == 0:  # no prompt before it: the turn starts where its content does
            start = upto.find(message["content"])
            if start < 0:
                raise TemplateError(f"message {i}")
        else:
            start = len(head)
        spans.append((start, len(head) + len(turn.rstrip())))
    return spans


def end_of_turn_token(tokenizer) -> int | None:
    """The token that ends an assistant turn in the chat template (SmolLM2: `<|im_end|>`), if it is one token."""
    probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    try:
        text = _render(tokenizer, probe)
        (start, end), = assistant_spans(tokenizer, probe, text)
    except (TemplateError, ValueError):
        return None
    tail = text[start:end].split("Hello.", 1)[-1].strip()
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    return ids[0] if len(ids) == 1 else None


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int, assistant_only: bool) -> dict:
    """input_ids and labels of one conversation (labels -100 outside the assistant turns when `assistant_only`)."""
    if assistant_only and has_generation_block(tokenizer.chat_template or ""):
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, truncation=True,
                                                max_length=max_length, return_assistant_tokens_mask=True)
        ids = list(encoded["input_ids"])
        labels = [t if m else IGNORE for t, m in zip(ids, encoded["assistant_masks"], strict=True)]
        return {"input_ids": ids, "labels": labels}
    text = _render(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length,
                        return_offsets_mapping=assistant_only)
    ids = list(encoded["input_ids"])
    if not assistant_only:
        return {"input_ids": ids, "labels": list(ids)}
    spans = assistant_spans(tokenizer, messages, text)
    # A token is the assistant's if its text overlaps an assistant span: with byte-level BPE the first one
    # may begin with the space that ends the template's prompt (GPT-2: "assistant:" + " Film").
    labels = [t if any(begin < e and max(end, begin + 1) > s for s, e in spans) else IGNORE
              for t, (begin, end) in zip(ids, encoded["offset_mapping"], strict=True)]
    return {"input_ids": ids, "labels": labels}


def pad_collator(pad_token_id: int):
    """Right-pad a batch of conversations; padding gets attention 0 and label -100 by position (pad may be EOS)."""

    def collate(examples: list[dict]) -> dict:
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), longest), dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(example["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def sample_generations(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64) -> list[dict]:
    """Greedy answers to the prompts of held-out conversations (each up to its last assistant message)."""
    samples = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = messages[:last]
        encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True,
                                                return_tensors="pt")
        encoded = {k: v.to(device) for k, v in encoded.items()}
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        samples.append({"prompt": prompt[-1]["content"], "reference": messages[last]["content"], "generated": answer})
    if was_training:
        model.train()
    return samples


# --------------------------------------------------------------------------------------------


def _load(config: FinetuneConfig, conversational: bool):
    """Tokenizer (with the chat template a conversation needs, checked before the weights load) and model."""
    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    if config.chat_template:
        tokenizer.chat_template = read_chat_template(config.chat_template)
    if conversational and not tokenizer.chat_template:
        raise ConfigError(f"the data is conversational but {config.model_name_or_path} has no chat template: "
                          "give one with --chat_template (a .jinja file or the template itself)")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # lets the server pad batched prompts
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"{config.model_name_or_path}: the tokenizer has neither a pad nor an EOS token")
    model = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def _stop_at_end_of_turn(model, tokenizer) -> None:
    """generation_config's EOS includes the token that ends an assistant turn, so generation stops there."""
    end = end_of_turn_token(tokenizer)
    if end is None or model.generation_config is None:
        return
    current = model.generation_config.eos_token_id
    current = list(current) if isinstance(current, (list, tuple)) else ([] if current is None else [current])
    if end not in current:
        model.generation_config.eos_token_id = [end, *current] if current else end
        logger.info("generation stops at the end of an assistant turn: %r (id %d)", tokenizer.decode([end]), end)


def _blocks(config: FinetuneConfig, raw: DatasetDict, tokenizer, block_size: int) -> DatasetDict:
    text_col = resolve_column(raw["train"], config.text_column, TEXT_CANDIDATES, "text")
    if config.assistant_only_loss:
        raise ConfigError("--assistant_only_loss needs conversational data (a `messages` column, or `prompt` and "
                          f"`completion` columns); columns are: {', '.join(raw['train'].column_names)}")
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
    return blocks


def _conversations(config: FinetuneConfig, raw: DatasetDict, tokenizer, max_length: int) -> DatasetDict:
    assistant_only = config.assistant_only_loss is not False

    def tokenize(batch: dict) -> dict:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for row in rows:
            try:
                encoded = tokenize_conversation(tokenizer, conversation(row), max_length, assistant_only)
            except TemplateError as err:
                raise ConfigError(f"the chat template does not render the conversations turn by turn ({err} "
                                  "changes the text before it), so the assistant tokens cannot be told apart: "
                                  "give a template with {% generation %} blocks (--chat_template), or train on "
                                  "every token with --assistant_only_loss false") from None
            out["input_ids"].append(encoded["input_ids"])
            out["labels"].append(encoded["labels"])
        return out

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names,
                        num_proc=config.preprocessing_num_workers, desc="Rendering and tokenizing conversations")
    # A conversation cut at --block_size before its first assistant token has nothing to learn from.
    kept = tokenized.filter(lambda b: [any(t != IGNORE for t in labels[1:]) for labels in b["labels"]], batched=True)
    for split in tokenized:
        dropped = len(tokenized[split]) - len(kept[split])
        if dropped:
            logger.warning("%s: %d conversation(s) have no assistant token within --block_size %d: left out",
                           split, dropped, max_length)
        if len(kept[split]) == 0:
            raise ConfigError(f"no conversation of the {split} split has an assistant token within --block_size "
                              f"{max_length}; raise --block_size")
    return kept


def build(config: FinetuneConfig, raw: DatasetDict) -> TaskBundle:
    """Plain text: blocks of `block_size` tokens. Conversations: one per example, assistant tokens as labels."""
    conversational = is_conversational(raw["train"])
    tokenizer, model = _load(config, conversational)
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    block_size = min(config.block_size, max_positions or config.block_size)
    if conversational:
        _stop_at_end_of_turn(model, tokenizer)
        processed = _conversations(config, raw, tokenizer, block_size)
        collate = pad_collator(tokenizer.pad_token_id)
        lengths = {split: [len(ids) for ids in ds["input_ids"]] for split, ds in processed.items()}
    else:
        processed = _blocks(config, raw, tokenizer, block_size)
        collate = default_data_collator
        lengths = {}
    if config.use_peft:
        model = lora.wrap(model, config)

    samples = None
    if conversational and config.num_sample_generations:
        held_out = raw["validation"]
        prompts = [conversation(row) for row in held_out.select(range(min(config.num_sample_generations,
                                                                          len(held_out))))]
        prompts = [p for p in prompts if any(m["role"] == "assistant" for m in p)]

        def samples(trained_model):
            return sample_generations(trained_model, tokenizer, prompts)

    return TaskBundle(
        model=model,
        processor=tokenizer,
        train_dataset=processed["train"],
        eval_dataset=processed["validation"],
        test_dataset=processed.get("test"),
        collate_fn=collate,
        eval_step=lm_eval_step,
        compute_metrics=lm_metrics,
        main_metric="loss",
        greater_is_better=False,
        pipeline_tag="text-generation",
        train_lengths=lengths.get("train") if conversational and config.group_by_length else None,
        eval_lengths=lengths.get("validation"),
        samples=samples,
    )
