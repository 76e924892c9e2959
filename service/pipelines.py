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

import numpy as np
import torch
from PIL import Image

from service.conv_inference import optimise_for_inference


class InputError(ValueError):
    """The caller's input cannot be processed (becomes a 422 naming `field`)."""

    def __init__(self, message: str, field: str = "inputs"):
        super().__init__(message)
        self.field = field


def _scores(logits: torch.Tensor, function: str) -> torch.Tensor:
    logits = logits.float()
    if function == "softmax":
        return torch.softmax(logits, dim=-1)
    if function == "sigmoid":
        return torch.sigmoid(logits)
    return logits


def _ranked(scores: list[float], id2label: dict, top_k: int | None) -> list[dict]:
    """One row of scores -> [{"label", "score"}] sorted by score, best first (ties: lower id first)."""
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
    if top_k is not None:
        order = order[:top_k]
    return [{"label": str(id2label.get(i, f"LABEL_{i}")), "score": scores[i]} for i in order]


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

    def finish_rows(self, logits: torch.Tensor, params: list) -> list[list[dict]]:
        """Every row of a batch's logits at once: one softmax/sigmoid per function used, one
        `tolist`, then plain Python per row (per-row tensor ops cost more than the forward for
        small models)."""
        functions = [p.function_to_apply or self.default_function for p in params]
        rows = {f: _scores(logits, f).tolist() for f in set(functions)}
        return [_ranked(rows[f][i], self.id2label, p.top_k) for i, (f, p) in enumerate(zip(functions, params, strict=True))]


class TextClassificationRunner(ClassifierMixin):
    task = "text-classification"
    batchable = True

    def __init__(self, model, tokenizer, max_input_length: int, max_input_chars: int):
        super().__init__(model)
        self.tokenizer = tokenizer
        self.max_input_chars = max_input_chars
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
            if len(text) > self.max_input_chars:
                # Tokenizing costs about a second per megabyte of text, truncated or not: cut first.
                if not params.truncate:
                    raise InputError(f"input {i} has {len(text)} characters, more than max_input_chars "
                                     f"({self.max_input_chars}) (send parameters.truncate=true to cut it)", "inputs")
                text = text[:self.max_input_chars]
            enc = self.tokenizer(text, truncation=params.truncate, max_length=self.max_length)
            if len(enc["input_ids"]) > self.max_length:
                raise InputError(
                    f"input {i} has {len(enc['input_ids'])} tokens, more than the model's {self.max_length} "
                    "(send parameters.truncate=true to cut it)", "inputs"
                )
            encodings.append(dict(enc))
        return encodings, max(len(e["input_ids"]) for e in encodings)

    def _pad(self, flat: list[dict]) -> dict[str, torch.Tensor]:
        """Pad to the longest input of the batch, as `tokenizer.pad` does, without its per-item cost."""
        longest = max(len(e["input_ids"]) for e in flat)
        left = self.tokenizer.padding_side == "left"
        values = {"input_ids": self.tokenizer.pad_token_id, "token_type_ids": self.tokenizer.pad_token_type_id,
                  "attention_mask": 0}
        batch = {}
        for key in flat[0]:
            pad = values.get(key, 0)
            rows = [([pad] * (longest - len(e[key])) + e[key]) if left else (e[key] + [pad] * (longest - len(e[key])))
                    for e in flat]
            batch[key] = torch.tensor(rows, dtype=torch.long)
        return batch

    CPU_PADDING_SLACK = 1.25

    def _chunks(self, flat: list[dict]) -> list[list[int]]:
        """Which inputs go through the model together.

        On a GPU, all of them: one launch. On a CPU, the cost of a forward pass is proportional to
        its padded tokens, so the batch is sorted by length and cut wherever padding would exceed
        `CPU_PADDING_SLACK` of the real tokens: 32 Rotten Tomatoes sentences (5 to 70 tokens)
        otherwise cost about twice their real tokens.
        """
        if self.model.device.type != "cpu" or len(flat) == 1:
            return [list(range(len(flat)))]
        order = sorted(range(len(flat)), key=lambda i: len(flat[i]["input_ids"]))
        chunks, current, real = [], [], 0
        for i in order:
            n = len(flat[i]["input_ids"])  # the longest so far: the chunk pads to it
            if current and n * (len(current) + 1) > self.CPU_PADDING_SLACK * (real + n):
                chunks.append(current)
                current, real = [], 0
            current.append(i)
            real += n
        chunks.append(current)
        return chunks

    def run_batch(self, prepared: list[list[dict]], params: list[Any]) -> list[list[list[dict]]]:
        flat = [enc for encs in prepared for enc in encs]
        device = self.model.device
        logits = [None] * len(flat)
        with torch.inference_mode():
            for chunk in self._chunks(flat):
                batch = self._pad([flat[i] for i in chunk])
                out = self.model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
                for row, i in enumerate(chunk):
                    logits[i] = out[row]
        rows = self.finish_rows(torch.stack(logits), [p for encs, p in zip(prepared, params, strict=True) for _ in encs])
        out, row = [], 0
        for encs in prepared:
            out.append(rows[row:row + len(encs)])
            row += len(encs)
        return out


class FastImagePreprocess:
    """The usual ImageNet preprocessing (resize the shortest edge or to a fixed size, center crop,
    rescale, normalise) done with one PIL resize and one float32 numpy expression.

    transformers' PIL processors take 4-7 ms per image on this CPU, about a MobileNetV2 forward
    pass; this path was ~20 % cheaper in a micro-benchmark and runs per request in `prepare`.
    `build` returns None unless the processor is one of this simple kind *and* this path
    reproduces its output on probe images (else the processor is used as is), so the served
    numbers never change.
    """

    def __init__(self, processor):
        size = dict(processor.size)
        self.shortest_edge = size.get("shortest_edge")
        self.fixed = (size["height"], size["width"]) if {"height", "width"} <= size.keys() else None
        crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
        self.crop = (crop["height"], crop["width"]) if crop else None
        self.resample = Image.Resampling(int(processor.resample))
        rescale = float(processor.rescale_factor) if processor.do_rescale else 1.0
        mean = np.asarray(processor.image_mean if processor.do_normalize else [0.0] * 3, dtype=np.float64)
        std = np.asarray(processor.image_std if processor.do_normalize else [1.0] * 3, dtype=np.float64)
        # (pixel * rescale - mean) / std == pixel * scale + shift
        self.scale = (rescale / std).astype(np.float32).reshape(1, 1, 3)
        self.shift = (-mean / std).astype(np.float32).reshape(1, 1, 3)

    @classmethod
    def build(cls, processor) -> FastImagePreprocess | None:
        simple = (
            getattr(processor, "do_resize", False)
            and not getattr(processor, "do_reduce_labels", False)
            and getattr(processor, "crop_pct", None) is None
            and getattr(processor, "do_pad", False) in (False, None)
            and len(getattr(processor, "image_mean", None) or []) == 3
            and getattr(processor, "resample", None) is not None
        )
        if not simple:
            return None
        try:
            fast = cls(processor)
            if fast.shortest_edge is None and fast.fixed is None:
                return None
            rng = np.random.default_rng(0)
            probes = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((28, 28), (300, 451), (640, 480))]
            expected = processor(images=probes, return_tensors="np")["pixel_values"]
            got = np.stack([fast(p) for p in probes])
            if expected.shape != got.shape or float(np.abs(expected - got).max()) > 1e-3:
                return None
        except Exception:  # any surprise: keep the processor
            return None
        return fast

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 array (3, height, width)."""
        width, height = image.size
        if self.fixed is not None:
            new_h, new_w = self.fixed
        elif width <= height:
            new_w, new_h = self.shortest_edge, int(self.shortest_edge * height / width)
        else:
            new_w, new_h = int(self.shortest_edge * width / height), self.shortest_edge
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), self.resample)
        pixels = np.asarray(image)  # uint8 (height, width, 3)
        if self.crop is not None:
            ch, cw = self.crop
            top, left = int((new_h - ch) / 2.0), int((new_w - cw) / 2.0)
            pixels = pixels[top:top + ch, left:left + cw]
        out = pixels.astype(np.float32)
        out *= self.scale
        out += self.shift
        return np.ascontiguousarray(out.transpose(2, 0, 1))


class ImageClassificationRunner(ClassifierMixin):
    task = "image-classification"
    batchable = True

    def __init__(self, model, image_processor):
        super().__init__(model)
        self.processor = image_processor
        self.fast = FastImagePreprocess.build(image_processor)
        optimise_for_inference(model)  # batch norm folded, channels-last (conv nets only)

    def prepare(self, payload):
        image, _params = payload
        image = image.convert("RGB")
        return [self.fast(image) if self.fast is not None else image], 1

    # On a CPU, convolutional networks run *slower per image* in large batches: measured here
    # (channels-last), MobileNetV2 216 images/s 4 at a time, 124 one at a time, 59 at 32; ResNet-50
    # 37, 30, ~30. The cause is glibc's allocator (a large batch's activations are fresh mmaps,
    # page-faulted in on every pass; docs/performance.md), not the caches. So on a CPU a
    # micro-batch runs through the model this many images at a time; on a GPU in one go.
    CPU_IMAGES_PER_FORWARD = 4

    def run_batch(self, prepared: list[list[Any]], params: list[Any]) -> list[list[dict]]:
        images = [img for imgs in prepared for img in imgs]
        if self.fast is not None:
            pixel_values = torch.from_numpy(np.stack(images))
        else:
            pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(self.model.device, self.model.dtype)
        step = self.CPU_IMAGES_PER_FORWARD if self.model.device.type == "cpu" else len(images)
        with torch.inference_mode():
            logits = torch.cat([self.model(pixel_values=pixel_values[i:i + step]).logits
                                for i in range(0, len(images), step)])
        return self.finish_rows(logits.float().cpu(), list(params))


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

    def __init__(self, model, tokenizer, max_input_length: int, max_new_tokens_cap: int, max_input_chars: int):
        self.model = model
        self.max_input_chars = max_input_chars
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
        # Only the end of the prompt is kept (below), so only its end is tokenized: a megabyte of text
        # would otherwise cost about a second of CPU.
        ids = self.tokenizer(prompt[-self.max_input_chars:], add_special_tokens=True)["input_ids"]
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
