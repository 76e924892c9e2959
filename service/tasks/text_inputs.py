"""What the tasks that encode texts share (text-classification, feature-extraction): bounded
tokenizing without padding per request, and padding per micro-batch, only as far as needed."""

from __future__ import annotations

import torch

from ..errors import ApiError, InputError
from ..settings import Settings


def check_request_chars(texts: list[str], settings: Settings) -> None:
    """Bound the tokenizing one request can cost (each input is cut to max_input_chars first)."""
    total = sum(min(len(t), settings.max_input_chars) for t in texts)
    if total > settings.max_request_chars:
        raise ApiError(413, f"inputs: {total} characters in this request after cutting each input to "
                            f"max_input_chars ({settings.max_input_chars}); at most max_request_chars "
                            f"({settings.max_request_chars}) per request", "payload_too_large")


def check_client_batch(texts: list[str], settings: Settings) -> None:
    if len(texts) > settings.max_client_batch_size:
        raise ApiError(422, f"inputs: at most {settings.max_client_batch_size} texts per request "
                            "(max_client_batch_size)", "validation")


class TextEncoder:
    """Tokenizes per request and pads per batch for one model and tokenizer."""

    # On a CPU a forward pass costs in proportion to its padded tokens: a sorted batch is cut
    # wherever padding would exceed this share of the real tokens (docs/performance.md).
    CPU_PADDING_SLACK = 1.25

    def __init__(self, model, tokenizer, settings: Settings):
        self.model, self.tokenizer = model, tokenizer
        self.max_input_chars = settings.max_input_chars
        model_max = getattr(tokenizer, "model_max_length", None) or settings.max_input_length
        positions = getattr(model.config, "max_position_embeddings", None) or model_max
        self.max_length = int(min(model_max, positions, settings.max_input_length))
        if tokenizer.pad_token is None:
            pad_id = getattr(model.config, "pad_token_id", None)
            if pad_id is None:
                raise ValueError("the tokenizer has no pad token and config.json no pad_token_id")
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)

    def encode(self, texts: list[str], truncate: bool) -> tuple[list[dict], int]:
        """Tokenize without padding. Returns (encodings, tokens it costs once padded to its longest)."""
        encodings = []
        for i, text in enumerate(texts):
            if len(text) > self.max_input_chars:
                # Tokenizing costs in proportion to the text, truncated or not: cut first.
                if not truncate:
                    raise InputError(f"input {i} has {len(text)} characters, more than max_input_chars "
                                     f"({self.max_input_chars}) (send truncate=true to cut it)", "inputs")
                text = text[:self.max_input_chars]
            enc = self.tokenizer(text, truncation=truncate, max_length=self.max_length)
            if len(enc["input_ids"]) > self.max_length:
                raise InputError(
                    f"input {i} has {len(enc['input_ids'])} tokens, more than the model's {self.max_length} "
                    "(send truncate=true to cut it)", "inputs"
                )
            encodings.append(dict(enc))
        return encodings, max(len(e["input_ids"]) for e in encodings)

    def pad(self, flat: list[dict]) -> dict[str, torch.Tensor]:
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

    def chunks(self, flat: list[dict]) -> list[list[int]]:
        """Which inputs go through the model together.

        On a GPU, all of them: one launch. On a CPU, the batch is sorted by length and cut wherever
        padding would exceed `CPU_PADDING_SLACK` of the real tokens (short and long sentences padded
        together cost far more than their real tokens: docs/performance.md, Serving, item 2).
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

    # Inputs of different lengths, so that a probe batch is padded (ONNX export and its check).
    PROBE_TEXTS = ("Hello world", "A longer sentence, with some punctuation, to pad the others against.", "ok")

    def _probe_encodings(self) -> list[dict]:
        return [dict(self.tokenizer(t, truncation=True, max_length=self.max_length)) for t in self.PROBE_TEXTS]

    def probe_batches(self) -> list[dict[str, torch.Tensor]]:
        """A padded batch of three texts and a single text, as `forward_rows` feeds the model."""
        encodings = self._probe_encodings()
        return [self.pad(encodings), self.pad(encodings[:1])]

    def compile_batches(self) -> list[dict[str, torch.Tensor]]:
        """Batches of every shape the compiled model must have a graph for before it serves
        (service/compiled_backend.py): the probe batches (several inputs and one, of several tokens)
        and, where the tokenizer adds no special tokens (so that a one-token input can come), the same
        of one token."""
        batches = self.probe_batches()
        if len(self.tokenizer("")["input_ids"]) <= 1:
            encodings = self._probe_encodings()
            one_token = [{k: v[:1] for k, v in e.items()} for e in encodings[:2]]
            batches += [self.pad(one_token), self.pad(one_token[:1])]
        return [{k: v.to(self.model.device) for k, v in batch.items()} for batch in batches]

    def forward_rows(self, flat: list[dict], forward) -> list[torch.Tensor]:
        """`forward(batch) -> tensor (rows, ...)` over each chunk; one output row per input, in order."""
        device = self.model.device
        rows: list = [None] * len(flat)
        with torch.inference_mode():
            for chunk in self.chunks(flat):
                batch = {k: v.to(device) for k, v in self.pad([flat[i] for i in chunk]).items()}
                out = forward(batch).float().cpu()
                for row, i in enumerate(chunk):
                    rows[i] = out[row]
        return rows


def split_rows(rows: list, prepared: list[list]) -> list[list]:
    """A flat list of per-input results back into one list per request."""
    out, row = [], 0
    for encs in prepared:
        out.append(rows[row:row + len(encs)])
        row += len(encs)
    return out
