"""text-classification: `{"inputs": str | [str], "parameters": {...}}` -> one ranked label list per
input, batched across requests (Inference API shape; `InferenceClient.text_classification`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Request
from fastapi.responses import Response
from pydantic import Field

from ..request_parsing import read_json
from ..settings import Settings
from .base import Call, ServedTask, StrictBody
from .classifier import ClassificationOutput, ClassificationParameters, ClassifierRunner
from .text_inputs import TextEncoder, check_client_batch, check_request_chars, split_rows


class TextClassificationRequest(StrictBody):
    inputs: str | Annotated[list[str], Field(min_length=1)] = Field(description="One text, or a list of texts (one result list per text).")
    parameters: ClassificationParameters = Field(default_factory=ClassificationParameters)
    options: dict[str, Any] | None = Field(None, description="Accepted for compatibility with the legacy Inference API; ignored.")


class TextClassificationRunner(ClassifierRunner):
    model_output = "logits"  # backend=onnx (service/onnx_backend.py)

    def __init__(self, model, tokenizer, settings: Settings):
        super().__init__(model)
        self.tokenizer = tokenizer
        self.encoder = TextEncoder(model, tokenizer, settings)

    def prepare(self, payload: tuple[list[str], Any]) -> tuple[list[dict], int]:
        texts, params = payload
        return self.encoder.encode(texts, params.truncate)

    def run_batch(self, prepared: list[list[dict]], params: list[Any]) -> list[list[list[dict]]]:
        flat = [enc for encs in prepared for enc in encs]
        logits = self.encoder.forward_rows(flat, lambda batch: self.model(**batch).logits)
        rows = self.finish_rows(torch.stack(logits), [p for encs, p in zip(prepared, params, strict=True) for _ in encs])
        return split_rows(rows, prepared)

    def onnx_probe(self) -> list[dict[str, torch.Tensor]]:
        return self.encoder.probe_batches()

    compile_dynamic = True  # backend=torch-compile: any batch of any length, one graph

    def compile_batches(self) -> list[dict[str, torch.Tensor]]:
        return self.encoder.compile_batches()

    def smoke(self):
        ids = self.tokenizer("Hello world", return_tensors="pt")["input_ids"][:, :8]
        if ids.shape[1] == 0:
            return None
        return self.model(input_ids=ids.to(self.model.device)).logits


class TextClassification(ServedTask):
    name = "text-classification"
    aliases = ("sentiment-analysis",)
    architecture_suffixes = ("ForSequenceClassification",)
    json_requests = (TextClassificationRequest,)
    response_models = (ClassificationOutput,)
    response_schema = {"type": "array", "items": {"type": "array", "items": {"$ref": "#/components/schemas/ClassificationOutput"}},
                       "title": "TextClassificationOutput"}
    response_description = "text-classification: one list of labels per input"

    def schema_limits(self, settings: Settings) -> dict[str, dict[str, dict]]:
        return {"TextClassificationRequest": {"inputs": {"maxItems": settings.max_client_batch_size}}}

    def load(self, path: Path, settings: Settings) -> TextClassificationRunner:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..loading import load_model, load_processor

        model = load_model(AutoModelForSequenceClassification, path, settings, self.name)
        return TextClassificationRunner(model, load_processor(AutoTokenizer, path, settings), settings)

    async def handle(self, request: Request, call: Call) -> Response:
        body = await read_json(request, TextClassificationRequest)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        check_client_batch(texts, call.settings)
        check_request_chars(texts, call.settings)
        result, job = await call.run(texts, body.parameters, size=len(texts))
        # Always one list per input, also for a single string: the Inference API's shape, and what
        # InferenceClient.text_classification parses (it takes element [0]).
        return call.json(result, job)
