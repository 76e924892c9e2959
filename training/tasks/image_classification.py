"""Image classification: any AutoModelForImageClassification (ResNet, MobileNetV2, ViT, ...).

Transfer learning: the pretrained backbone gets a new head sized to the dataset's classes
(`ignore_mismatched_sizes`); `--freeze` chooses what trains. Augmentation is done with PIL
and torch (no torchvision): random resized crop + horizontal flip for training; evaluation
uses the model's own image processor, exactly what the served pipeline will use.
"""

from __future__ import annotations

import math

import datasets
import numpy as np
import torch
from datasets import DatasetDict
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from training import lora
from training.config import ConfigError, FinetuneConfig
from training.data import IMAGE_CANDIDATES, encode_labels, resolve_column
from training.tasks.base import TaskBundle, classification_eval_step, classification_metrics_fn

# --------------------------------------------------------------------------------------------
# Augmentation (torchvision's RandomResizedCrop semantics). Each training image draws from a generator of
# its own, seeded by (seed, epoch, index), never from the global RNG: Accelerate's loader fetches the next
# batch before the current one trains, so augmentations drawn from the global RNG would consume it ahead of
# the checkpoint that saves it, and a resumed run would crop differently from an uninterrupted one. Seeded
# per example, an image's augmentation is the same whatever the resume point or the number of processes.

INDEX_COLUMN = "__index__"


def augmentation_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator for one training image's augmentation in one epoch."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63)


def random_resized_crop(image: Image.Image, size: tuple[int, int], scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), generator: torch.Generator | None = None) -> Image.Image:
    """Crop a random area (scale) of random aspect (ratio), resized to size = (height, width)."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(1).uniform_(*scale, generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio, generator=generator)))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            break
    else:  # fall back to a central crop within the ratio bounds
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            w, h = round(height * ratio[1]), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return image.resize((size[1], size[0]), Image.BILINEAR, box=(left, top, left + w, top + h))


class TrainTransform:
    """RGB -> random resized crop -> random flip -> rescale + normalise like the processor."""

    def __init__(self, processor) -> None:
        probe = processor(Image.new("RGB", (320, 320)), return_tensors="pt")["pixel_values"]
        self.size = tuple(probe.shape[-2:])
        rescale = processor.rescale_factor if getattr(processor, "do_rescale", True) else 1.0
        mean = np.array(processor.image_mean if getattr(processor, "do_normalize", True) else [0.0] * 3)
        std = np.array(processor.image_std if getattr(processor, "do_normalize", True) else [1.0] * 3)
        # pixel * scale + shift == (pixel * rescale - mean) / std
        self.scale = torch.tensor(rescale / std, dtype=torch.float32).view(3, 1, 1)
        self.shift = torch.tensor(-mean / std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = random_resized_crop(image.convert("RGB"), self.size, generator=generator)
        if float(torch.rand(1, generator=generator)) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        return pixels * self.scale + self.shift


# --------------------------------------------------------------------------------------------
# Freezing.


def _stage_list(backbone: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The backbone's main sequence of blocks: the largest ModuleList (ResNet/ConvNext stages,
    MobileNetV2 inverted residual layers, ViT encoder layers)."""
    lists = [m for m in backbone.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else None


def apply_freeze(model: torch.nn.Module, policy: str) -> None:
    """`none`: train all; `backbone`: head only; `partial:N`: head + last N stages + what follows them."""
    if policy == "none":
        return
    backbone = model.base_model
    if backbone is model:
        raise ConfigError(f"--freeze {policy}: cannot tell backbone from head in {type(model).__name__}")
    for param in backbone.parameters():
        param.requires_grad = False
    if policy.startswith("partial:"):
        n = int(policy.split(":")[1])
        stages = _stage_list(backbone)
        if stages is None or n > len(stages):
            raise ConfigError(f"--freeze {policy}: the backbone has {len(stages) if stages else 0} stages")
        if n == 0:
            return
        first = next(stages[-n].parameters())
        unfreeze = False
        # named_parameters follows registration order: the last N stages and anything registered
        # after them (final conv, pooler, layer norm) train.
        for _, param in backbone.named_parameters():
            unfreeze = unfreeze or param is first
            if unfreeze:
                param.requires_grad = True


def fix_batchnorm_momentum(model: torch.nn.Module) -> None:
    """Some ports (transformers' MobileNetV2) carry TensorFlow's BN momentum (0.997, the weight of
    the *old* statistics); PyTorch's momentum weighs the *new* batch, so 0.997 would overwrite the
    pretrained running statistics with each batch. Use PyTorch's default 0.1 instead."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and (module.momentum or 0) > 0.5:
            module.momentum = 0.1


def use_channels_last(model: torch.nn.Module) -> bool:
    """Store a convolutional network's weights channels-last (NHWC): PyTorch's oneDNN (CPU) and
    cuDNN kernels are faster in that layout, 2x for MobileNetV2 training on this CPU
    (docs/performance.md). Outputs and saved weights are unchanged: save_pretrained writes
    contiguous tensors. Returns whether the model had convolutions to convert."""
    if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return False
    model.to(memory_format=torch.channels_last)
    return True


# On a CPU a convolutional network runs faster per image in small forward passes (glibc
# page-faults a large batch's activations in again on every pass): MobileNetV2 channels-last,
# 4 images ~215 images/s vs 64 images ~58. Evaluation results do not depend on the split.
CPU_EVAL_IMAGES_PER_FORWARD = 4


def image_eval_step(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """classification_eval_step, a few images per forward on a CPU."""
    pixels = batch["pixel_values"]
    if pixels.device.type != "cpu" or len(pixels) <= CPU_EVAL_IMAGES_PER_FORWARD:
        return classification_eval_step(model, batch)
    step = CPU_EVAL_IMAGES_PER_FORWARD
    parts = [classification_eval_step(model, {"pixel_values": pixels[i:i + step], "labels": batch["labels"][i:i + step]})
             for i in range(0, len(pixels), step)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def frozen_batchnorm_to_eval(model: torch.nn.Module) -> None:
    """Frozen batch-norm layers keep their pretrained running statistics."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False)):
            module.eval()


# --------------------------------------------------------------------------------------------


def build(config: FinetuneConfig, raw: DatasetDict) -> TaskBundle:
    """Load processor + model with a new head; on-the-fly transforms; freeze policy."""
    image_col = resolve_column(raw["train"], config.image_column, IMAGE_CANDIDATES, "image")
    if not isinstance(raw["train"].features[image_col], datasets.Image):
        raw = raw.cast_column(image_col, datasets.Image())  # e.g. a csv column of file paths
    raw, labels = encode_labels(raw, config.label_column, config.label_names)
    processor = AutoImageProcessor.from_pretrained(config.model_name_or_path,
                                                   trust_remote_code=config.trust_remote_code)
    model, loading_info = AutoModelForImageClassification.from_pretrained(
        config.model_name_or_path, num_labels=len(labels.names), id2label=labels.id2label,
        label2id=labels.label2id, ignore_mismatched_sizes=True, trust_remote_code=config.trust_remote_code,
        output_loading_info=True,
    )
    fix_batchnorm_momentum(model)
    apply_freeze(model, config.freeze)
    if config.use_peft:  # adapters on the convolutions (groups == 1) and linear layers; batch norms frozen
        model = lora.wrap(model, config, loading_info)
    if config.channels_last:
        use_channels_last(model)
    train_transform = TrainTransform(processor)
    label_col = config.label_column
    epoch = [0]  # the epoch being trained, set by the loop (on_epoch)

    def train_batch(batch: dict) -> dict:
        pixels = [train_transform(img, augmentation_generator(config.seed, epoch[0], index))
                  for img, index in zip(batch[image_col], batch[INDEX_COLUMN], strict=True)]
        return {"pixel_values": pixels, "labels": batch[label_col]}

    def eval_batch(batch: dict) -> dict:
        pixels = processor([img.convert("RGB") for img in batch[image_col]], return_tensors="pt")["pixel_values"]
        return {"pixel_values": list(pixels), "labels": batch[label_col]}

    keep = [image_col, label_col]
    splits = {split: ds.select_columns(keep) for split, ds in raw.items()}
    splits["train"] = splits["train"].add_column(INDEX_COLUMN, list(range(len(splits["train"]))))
    splits["train"].set_transform(train_batch)
    for split in ("validation", "test"):
        if split in splits:
            splits[split].set_transform(eval_batch)

    def collate(examples: list[dict]) -> dict:
        return {
            "pixel_values": torch.stack([ex["pixel_values"] for ex in examples]),
            "labels": torch.tensor([ex["labels"] for ex in examples], dtype=torch.long),
        }

    return TaskBundle(
        model=model,
        processor=processor,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        test_dataset=splits.get("test"),
        collate_fn=collate,
        eval_step=image_eval_step,
        compute_metrics=classification_metrics_fn(len(labels.names)),
        main_metric="accuracy",
        greater_is_better=True,
        pipeline_tag="image-classification",
        labels=labels,
        # Frozen batch norms keep their pretrained statistics (--freeze, and LoRA, which freezes them all).
        on_train_mode=frozen_batchnorm_to_eval if config.freeze != "none" or config.use_peft else None,
        on_epoch=lambda e: epoch.__setitem__(0, e),
    )
