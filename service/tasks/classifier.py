"""What the classification tasks share: their parameters, their output rows, and logits -> ranked
labels for a whole batch at once."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from .base import StrictBody

FunctionToApply = Literal["softmax", "sigmoid", "none"]


class ClassificationParameters(StrictBody):
    top_k: int | None = Field(None, ge=1, description="Return only the k most probable labels (text: all labels by default; images: 5).")
    function_to_apply: FunctionToApply | None = Field(
        None, description="softmax, sigmoid or none (raw logits). Default: sigmoid for multi-label or single-logit models, else softmax."
    )
    truncate: bool = Field(True, description="Text only: cut inputs longer than the model's max length (true) or refuse them with 422 (false).")


class ClassificationOutput(BaseModel):
    label: str
    score: float


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


class ClassifierRunner:
    """The label side of a classifier runner: id2label, the default score function, ranked rows."""


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
