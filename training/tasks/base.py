"""What a task module hands to the loop and the exporter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from training.data import LabelSpace
from training.metrics import classification_metrics

EvalStep = Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]]
Metrics = Callable[[dict[str, np.ndarray]], dict[str, Any]]


@dataclass
class TaskBundle:
    """Model, processor, ready datasets and the task's evaluation for one run."""

    model: torch.nn.Module
    processor: Any
    """Tokenizer or image processor, saved next to the model."""
    train_dataset: Dataset
    eval_dataset: Dataset
    test_dataset: Dataset | None
    collate_fn: Callable[[list[dict]], dict]
    eval_step: EvalStep
    compute_metrics: Metrics
    main_metric: str
    """Key of compute_metrics' result that picks the best model (without the `eval_` prefix)."""
    greater_is_better: bool
    pipeline_tag: str
    labels: LabelSpace | None = None
    train_lengths: list[int] | None = None
    """Per-example lengths for length-grouped batches (None: plain shuffling)."""
    eval_lengths: list[int] | None = None
    """Per-example lengths to evaluate in length order (less padding)."""
    on_train_mode: Callable[[torch.nn.Module], None] | None = None
    """Called after model.train(), e.g. to keep frozen batch-norm layers in eval mode."""
    on_epoch: Callable[[int], None] | None = None
    """Called with the epoch number before each epoch's batches are drawn (e.g. to seed augmentations)."""
    samples: Callable[[torch.nn.Module], list[dict]] | None = None
    """Sample outputs of the trained model for the model card (e.g. answers to held-out prompts)."""


def classification_eval_step(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Per-example loss and argmax prediction; gathered across processes by the loop."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    return {"loss": loss, "preds": logits.argmax(dim=-1), "labels": labels}


def classification_metrics_fn(num_classes: int) -> Metrics:
    """compute_metrics for single-label classification: loss, accuracy, macro F1, confusion matrix."""

    def compute(out: dict[str, np.ndarray]) -> dict[str, Any]:
        metrics = classification_metrics(out["labels"], out["preds"], num_classes)
        metrics["loss"] = float(out["loss"].mean())
        return metrics

    return compute
