"""One module per task: build model + processor, preprocess, collate, metrics; nothing else."""

from __future__ import annotations

from collections.abc import Callable

from datasets import DatasetDict

from training.config import FinetuneConfig
from training.tasks.base import TaskBundle


def build_task(config: FinetuneConfig, raw: DatasetDict) -> TaskBundle:
    """Dispatch to the task module named by `config.task`."""
    from training.tasks import image_classification, text_classification, text_generation

    builders: dict[str, Callable[[FinetuneConfig, DatasetDict], TaskBundle]] = {
        "text-classification": text_classification.build,
        "text-generation": text_generation.build,
        "image-classification": image_classification.build,
    }
    return builders[config.task](config, raw)


__all__ = ["TaskBundle", "build_task"]
