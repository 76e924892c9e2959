"""The served tasks. Adding one = a module in this package + one line in TASKS."""

from __future__ import annotations

from .base import Call, ServedTask
from .feature_extraction import FeatureExtraction
from .image_classification import ImageClassification
from .text_classification import TextClassification
from .text_generation import TextGeneration

TASKS: dict[str, ServedTask] = {
    task.name: task
    for task in (TextClassification(), TextGeneration(), ImageClassification(), FeatureExtraction())
}


def task_for_tag(tag: object) -> str | None:
    """The task a model card's pipeline_tag names (its own name or an alias), else None."""
    for name, task in TASKS.items():
        if tag == name or tag in task.aliases:
            return name
    return None


__all__ = ["TASKS", "Call", "ServedTask", "task_for_tag"]
