"""feature-extraction: sentence embeddings, the job of TEI. `{"inputs": str | [str], "normalize",
"truncate", ...}` (parameters at the root, as TEI and `InferenceClient.feature_extraction` send them)
-> one vector per input, batched across requests like the classifiers.

A folder is this task when its card says `feature-extraction` or `sentence-similarity`, or when it
is a sentence-transformers folder (`modules.json`). Pooling follows its `1_Pooling/config.json`
(mean when there is none), the longest input its `sentence_bert_config.json`. The Inference API's
sentence-similarity shape (`{"inputs": {"source_sentence", "sentences"}}`, what
`InferenceClient.sentence_similarity` sends) is answered with cosine similarities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import Request
from fastapi.responses import Response
from pydantic import Field

from ..errors import InputError
from ..folders import InvalidFolder
from ..request_parsing import read_json_data, validate
from ..settings import Settings
from .base import Call, ServedTask, StrictBody
from .text_inputs import TextEncoder, check_client_batch, check_request_chars, split_rows

POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken")


class FeatureExtractionRequest(StrictBody):
    inputs: str | Annotated[list[str], Field(min_length=1)] = Field(description="One text, or a list of texts (one vector per text).")
    normalize: bool = Field(True, description="Scale each vector to unit length (TEI's default).")
    truncate: bool = Field(True, description="Cut inputs longer than the model's max length (true) or refuse them with 422 (false).")
    truncation_direction: Literal["right", "left"] = Field("right", description="Which end of a long input is cut.")
    prompt_name: str | None = Field(None, description="A prompt of the model's config_sentence_transformers.json to prepend.")
    dimensions: int | None = Field(None, ge=1, description="Keep only the first N dimensions (Matryoshka models), before normalizing.")
    encoding_format: Literal["float"] | None = Field(None, description="float only.")


class SentenceSimilarityInputs(StrictBody):
    source_sentence: str
    sentences: list[str] = Field(min_length=1)


class SentenceSimilarityRequest(StrictBody):
    inputs: SentenceSimilarityInputs = Field(description="The Inference API's sentence-similarity shape.")
    parameters: dict[str, Any] | None = None


def _modules(path: Path) -> list[dict]:
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [m for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []


def read_pooling(path: Path) -> str:
    """The pooling mode of a sentence-transformers folder ("mean_tokens" when it says none)."""
    folder = next((m.get("path") for m in _modules(path) if str(m.get("type", "")).endswith("Pooling")), "1_Pooling")
    try:
        config = json.loads((path / str(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "mean_tokens"
    chosen = [mode for mode in POOLING_MODES if config.get(f"pooling_mode_{mode}")]
    unknown = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k[13:] not in POOLING_MODES]
    if unknown or len(chosen) > 1:
        raise InvalidFolder(f"{folder}/config.json asks for pooling {', '.join(unknown or chosen)}; served: one of "
                            f"{', '.join(POOLING_MODES)}")
    return chosen[0] if chosen else "mean_tokens"


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(batch, tokens, dim) hidden states -> (batch, dim), as sentence-transformers' Pooling does."""
    mask_f = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls_token":
        return hidden[:, 0]
    if mode == "max_tokens":
        return hidden.masked_fill(mask_f == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "lasttoken":  # the last real token, with left or right padding
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
        return hidden[torch.arange(hidden.shape[0]), last]
    summed, count = (hidden * mask_f).sum(dim=1), mask_f.sum(dim=1).clamp(min=1e-9)
    return summed / (count.sqrt() if mode == "mean_sqrt_len_tokens" else count)


@dataclass
class Embeddings:
    """One request's vectors, and the tokens they cost (for OpenAI's usage counts)."""

    vectors: list[list[float]]
    tokens: int


class FeatureExtractionRunner:
    labels = None
    model_output = "last_hidden_state"  # backend=onnx: the encoder runs there, pooling stays here

    def onnx_probe(self) -> list[dict[str, torch.Tensor]]:
        return self.encoder.probe_batches()

    compile_dynamic = True  # backend=torch-compile: any batch of any length, one graph

    def compile_batches(self) -> list[dict[str, torch.Tensor]]:
        return self.encoder.compile_batches()

    def __init__(self, model, tokenizer, settings: Settings, pooling: str, max_seq_length: int | None,
                 prompts: dict[str, str]):
        self.model, self.tokenizer, self.pooling, self.prompts = model, tokenizer, pooling, prompts
        self.encoder = TextEncoder(model, tokenizer, settings)
        if max_seq_length:
            self.encoder.max_length = min(self.encoder.max_length, int(max_seq_length))

    @property
    def dimension(self) -> int:
        return int(self.model.config.hidden_size)

    def prepare(self, payload: tuple[list[str], FeatureExtractionRequest]) -> tuple[list[dict], int]:
        texts, params = payload
        if params.prompt_name is not None:
            if params.prompt_name not in self.prompts:
                raise InputError(f"unknown prompt {params.prompt_name!r} (this model has: "
                                 f"{', '.join(self.prompts) or 'none'})", "prompt_name")
            texts = [self.prompts[params.prompt_name] + t for t in texts]
        if params.dimensions is not None and params.dimensions > self.dimension:
            raise InputError(f"at most {self.dimension} for this model", "dimensions")
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = params.truncation_direction
        try:
            return self.encoder.encode(texts, params.truncate)
        finally:
            self.tokenizer.truncation_side = side

    def _embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(**batch).last_hidden_state
        return pool(hidden.float(), batch["attention_mask"], self.pooling)

    def run_batch(self, prepared: list[list[dict]], params: list[FeatureExtractionRequest]) -> list[Embeddings]:
        flat = [enc for encs in prepared for enc in encs]
        vectors = self.encoder.forward_rows(flat, self._embed)
        options = [p for encs, p in zip(prepared, params, strict=True) for _ in encs]
        rows = []
        for vector, p in zip(vectors, options, strict=True):
            if p.dimensions is not None:
                vector = vector[:p.dimensions]
            if p.normalize:
                vector = torch.nn.functional.normalize(vector, dim=-1)
            rows.append(vector.tolist())
        return [Embeddings(vectors, sum(len(e["input_ids"]) for e in encs))
                for vectors, encs in zip(split_rows(rows, prepared), prepared, strict=True)]

    def smoke(self):
        batch = self.tokenizer(["Hello world"], return_tensors="pt")
        return self._embed({k: v.to(self.model.device) for k, v in batch.items()})


class FeatureExtraction(ServedTask):
    name = "feature-extraction"
    aliases = ("sentence-similarity",)
    has_labels = False
    json_requests = (FeatureExtractionRequest, SentenceSimilarityRequest)
    response_schema = {"anyOf": [{"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                                 {"type": "array", "items": {"type": "number"}, "title": "SentenceSimilarityOutput"}],
                       "title": "FeatureExtractionOutput"}
    response_description = ("feature-extraction: one vector per input (sentence-similarity inputs: one "
                            "cosine similarity per sentence)")

    def schema_limits(self, settings: Settings) -> dict[str, dict[str, dict]]:
        # sentence-similarity: the source sentence counts as one of the texts
        return {"FeatureExtractionRequest": {"inputs": {"maxItems": settings.max_client_batch_size}},
                "SentenceSimilarityInputs": {"sentences": {"maxItems": settings.max_client_batch_size - 1}}}

    def model_constraints(self, runner: FeatureExtractionRunner) -> dict[str, dict[str, dict]]:
        names = sorted(runner.prompts)
        prompt = {"anyOf": [{"type": "string", "enum": names}, {"type": "null"}]} if names else {"type": "null"}
        dimensions = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": runner.dimension}, {"type": "null"}]}
        return {"FeatureExtractionRequest": {"prompt_name": prompt, "dimensions": dimensions}}

    def recognises(self, path: Path, card: dict, config: dict) -> bool:
        return (path / "modules.json").is_file()

    def load(self, path: Path, settings: Settings) -> FeatureExtractionRunner:
        from transformers import AutoModel, AutoTokenizer

        from ..loading import load_model, load_processor

        pooling = read_pooling(path)
        # The base model is all a sentence encoder uses: a checkpoint's pooler or LM head may be absent.
        model = load_model(AutoModel, path, settings, self.name, ignore_missing=lambda key: key.startswith("pooler."))
        st_config = _json(path / "sentence_bert_config.json")
        prompts = _json(path / "config_sentence_transformers.json").get("prompts") or {}
        return FeatureExtractionRunner(model, load_processor(AutoTokenizer, path, settings), settings, pooling,
                                       st_config.get("max_seq_length"), {str(k): str(v) for k, v in prompts.items()})

    async def handle(self, request: Request, call: Call) -> Response:
        data = await read_json_data(request)
        if isinstance(data, dict) and isinstance(data.get("inputs"), dict):  # sentence-similarity
            body = validate(SentenceSimilarityRequest, data, strict=True)
            texts = [body.inputs.source_sentence, *body.inputs.sentences]
            check_client_batch(texts, call.settings)
            check_request_chars(texts, call.settings)
            result, job = await call.run(texts, FeatureExtractionRequest(inputs=texts), size=len(texts))
            source = torch.tensor(result.vectors[0])
            return call.json([float(source @ torch.tensor(v)) for v in result.vectors[1:]], job)
        body = validate(FeatureExtractionRequest, data, strict=True)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        check_client_batch(texts, call.settings)
        check_request_chars(texts, call.settings)
        result, job = await call.run(texts, body, size=len(texts))
        return call.json(result.vectors, job)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        raise InvalidFolder(f"{path.name} is not a JSON object")
    return data
