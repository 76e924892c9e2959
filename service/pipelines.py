"""Task runners: turn prepared inputs into outputs with one batched forward pass.

A runner is called only from its model's worker thread (service/batching.py), so it may block.
`prepare` runs per request (tokenize / convert the image), `run_batch` once per micro-batch;
padding happens in `run_batch`, only as far as the longest input of that batch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class InputError(ValueError):
    """The caller's input cannot be processed (becomes a 422 naming `field`)."""

    def __init__(self, message: str, field: str = "inputs"):
        super().__init__(message)
        self.field = field


def _postprocess(logits: torch.Tensor, id2label: dict, function: str, top_k: int | None) -> list[dict]:
    """One row of logits -> [{"label", "score"}] sorted by score, best first."""
    logits = logits.float()
    if function == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif function == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        scores = logits
    order = torch.argsort(scores, descending=True).tolist()
    if top_k is not None:
        order = order[:top_k]
    return [{"label": str(id2label.get(i, f"LABEL_{i}")), "score": float(scores[i])} for i in order]


class ClassifierMixin:
    def __init__(self, model):
        self.model = model
        config = model.config
        self.id2label = {int(k): v for k, v in (config.id2label or {}).items()}
        multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self.default_function = "sigmoid" if multi_label or config.num_labels == 1 else "softmax"

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in sorted(self.id2label)]

    def finish(self, logits: torch.Tensor, params) -> list[dict]:
        return _postprocess(logits, self.id2label, params.function_to_apply or self.default_function, params.top_k)


class TextClassificationRunner(ClassifierMixin):
    task = "text-classification"
    batchable = True

    def __init__(self, model, tokenizer, max_input_length: int):
        super().__init__(model)
        self.tokenizer = tokenizer
        model_max = getattr(tokenizer, "model_max_length", None) or max_input_length
        positions = getattr(model.config, "max_position_embeddings", None) or model_max
        self.max_length = int(min(model_max, positions, max_input_length))
        if tokenizer.pad_token is None:
            pad_id = getattr(model.config, "pad_token_id", None)
            if pad_id is None:
                raise ValueError("the tokenizer has no pad token and config.json no pad_token_id")
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)

    def prepare(self, payload: tuple[list[str], Any]) -> tuple[list[dict], int]:
        """Tokenize without padding. Returns (encodings, tokens it costs once padded to its longest)."""
        texts, params = payload
        encodings = []
        for i, text in enumerate(texts):
            enc = self.tokenizer(text, truncation=params.truncate, max_length=self.max_length)
            if len(enc["input_ids"]) > self.max_length:
                raise InputError(
                    f"input {i} has {len(enc['input_ids'])} tokens, more than the model's {self.max_length} "
                    "(send parameters.truncate=true to cut it)", "inputs"
                )
            encodings.append(dict(enc))
        return encodings, max(len(e["input_ids"]) for e in encodings)

    def run_batch(self, prepared: list[list[dict]], params: list[Any]) -> list[list[list[dict]]]:
        flat = [enc for encs in prepared for enc in encs]
        batch = self.tokenizer.pad(flat, padding=True, return_tensors="pt")
        device = self.model.device
        with torch.inference_mode():
            logits = self.model(**{k: v.to(device) for k, v in batch.items()}).logits
        logits = logits.float().cpu()
        out, row = [], 0
        for encs, p in zip(prepared, params, strict=True):
            out.append([self.finish(logits[row + j], p) for j in range(len(encs))])
            row += len(encs)
        return out


class ImageClassificationRunner(ClassifierMixin):
    task = "image-classification"
    batchable = True

    def __init__(self, model, image_processor):
        super().__init__(model)
        self.processor = image_processor

    def prepare(self, payload):
        image, _params = payload
        return [image.convert("RGB")], 1

    def run_batch(self, prepared: list[list[Any]], params: list[Any]) -> list[list[dict]]:
        images = [img for imgs in prepared for img in imgs]
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            logits = self.model(pixel_values=pixel_values.to(self.model.device, self.model.dtype)).logits
        logits = logits.float().cpu()
        return [self.finish(logits[i], p) for i, p in enumerate(params)]


@dataclass
class GenerationEvent:
    """One streamed token; the last event of a generation also has `generated_text` and `details`."""

    index: int
    token: dict
    generated_text: str | None = None
    details: dict | None = None


@dataclass
class GenerationResult:
    generated_text: str
    finish_reason: str
    tokens: list[dict] = field(default_factory=list)
    prefill: list[dict] = field(default_factory=list)
    seed: int | None = None
    input_length: int = 0


class _Capture:
    """Last logits processor of `generate`: remembers the final log-probabilities of each step."""

    def __init__(self):
        self.logprobs: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        self.logprobs = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _Streamer:
    """Receives token ids from `generate`, decodes them incrementally and emits events."""

    def __init__(self, runner: TextGenerationRunner, capture: _Capture, stop: list[str], emit, cancelled):
        self.runner, self.capture, self.stop, self.emit, self.cancelled = runner, capture, stop, emit, cancelled
        self.prompt_seen = False
        self.ids: list[int] = []
        self.tokens: list[dict] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.stop_hit = False
        self.eos_hit = False

    def put(self, value: torch.Tensor):
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        token_id = int(value.reshape(-1)[0])
        logprob = None
        if self.capture.logprobs is not None:
            value_lp = float(self.capture.logprobs[0, token_id])
            logprob = value_lp if math.isfinite(value_lp) else None
        self.ids.append(token_id)
        special = token_id in self.runner.special_ids
        if token_id in self.runner.eos_ids:
            self.eos_hit = True
        text = self.runner.tokenizer.decode([token_id]) if special else self._decode_new()
        token = {"id": token_id, "text": text, "logprob": logprob, "special": special}
        self.tokens.append(token)
        if not special:
            self.text += text
            if self.stop and any(s in self.text for s in self.stop):
                self.stop_hit = True
        if self.emit is not None:
            self.emit(token)

    def _decode_new(self) -> str:
        # TGI's incremental detokenisation: decode a small window, emit only completed characters.
        tok = self.runner.tokenizer
        visible = [i for i in self.ids if i not in self.runner.special_ids]
        prefix = tok.decode(visible[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        new = tok.decode(visible[self.prefix_offset:], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(visible)
            return new[len(prefix):]
        return ""

    def end(self):
        pass

    def should_stop(self) -> bool:
        return self.stop_hit or self.cancelled()


class _StopCriterion:
    def __init__(self, streamer: _Streamer):
        self.streamer = streamer

    def __call__(self, input_ids, scores, **kwargs):
        done = self.streamer.should_stop()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class TextGenerationRunner:
    task = "text-generation"
    batchable = False

    def __init__(self, model, tokenizer, max_input_length: int, max_new_tokens_cap: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens_cap = max_new_tokens_cap
        positions = (
            getattr(model.config, "max_position_embeddings", None)
            or getattr(model.config, "n_positions", None)
            or max_input_length
        )
        self.context = int(positions)
        self.max_input_length = int(min(max_input_length, positions))
        self.special_ids = set(tokenizer.all_special_ids)
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.default_max_new_tokens = min(gen.max_new_tokens or 20, max_new_tokens_cap)
        self._seed_lock = threading.Lock()

    @property
    def labels(self):
        return None

    def generate(self, prompt: str, p, emit: Callable[[dict], None] | None, cancelled: Callable[[], bool]) -> GenerationResult:
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise InputError("the prompt has no tokens", "inputs")
        keep = min(p.truncate or self.max_input_length, self.max_input_length, self.context - 1)
        ids = ids[-keep:]  # keep the end of the prompt, as TGI does
        # never run past the model's context: finish_reason "length" says it stopped early
        max_new = min(p.max_new_tokens or self.default_max_new_tokens, self.context - len(ids))
        sample = bool(p.do_sample or p.temperature not in (None, 1.0) or p.top_k or p.top_p not in (None, 1.0) or p.typical_p not in (None, 1.0))
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": sample, "pad_token_id": self.pad_id}
        if sample:
            kwargs.update(temperature=p.temperature or 1.0, top_k=p.top_k or 0, top_p=p.top_p or 1.0)
            if p.typical_p:
                kwargs["typical_p"] = p.typical_p
        else:  # neutralise sampling knobs a generation_config.json may set
            kwargs.update(temperature=None, top_k=None, top_p=None)
        if p.repetition_penalty:
            kwargs["repetition_penalty"] = p.repetition_penalty
        capture = _Capture()
        streamer = _Streamer(self, capture, p.stop or [], emit, cancelled)
        input_ids = torch.tensor([ids], device=self.model.device)
        with torch.inference_mode():
            if sample and p.seed is not None:
                torch.manual_seed(p.seed)
            self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                logits_processor=[capture],
                stopping_criteria=[_StopCriterion(streamer)],
                streamer=streamer,
                **kwargs,
            )
        if streamer.stop_hit:
            reason = "stop_sequence"
        elif streamer.eos_hit:
            reason = "eos_token"
        else:
            reason = "length"
        text = streamer.text
        if p.return_full_text:
            text = prompt + text
        prefill = []
        if p.details and p.decoder_input_details:
            prefill = [{"id": i, "text": self.tokenizer.decode([i]), "logprob": None} for i in ids]
        return GenerationResult(text, reason, streamer.tokens, prefill, p.seed, len(ids))
