"""Inference-only rewrites of convolutional image models: same answers, less work per image.

- Batch norm folded into the convolution before it. In eval mode a BatchNorm2d is an affine map
  per channel, so it can be baked into the preceding conv's weight and bias (the profile that
  showed batch norm's share: docs/performance.md, Serving, item 6).
- Channels-last (NHWC) weights, the layout oneDNN (CPU) and cuDNN kernels are fastest in (the
  measured gain: the same item).

Logits change only by float rounding (tests/service/tasks/test_image_classification.py compares
against transformers' own pipeline).
"""

from __future__ import annotations

import torch


def fold_batchnorm(model: torch.nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d into the Conv2d it follows; return how many were folded.

    Only transformers' convolution blocks are touched: modules holding a `convolution` (Conv2d)
    and a `normalization` (BatchNorm2d) that their forward applies in that order (ResNet,
    MobileNetV1/V2, RegNet, BiT layers and shortcuts). Any other structure is left as is.
    """
    folded = 0
    for module in model.modules():
        conv, norm = getattr(module, "convolution", None), getattr(module, "normalization", None)
        if not (isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d)):
            continue
        if norm.training or norm.running_mean is None or norm.running_var is None:
            continue  # batch statistics at run time: not a fixed affine map
        with torch.no_grad():
            dtype = conv.weight.dtype
            scale = (norm.weight.float() if norm.affine else 1.0) / torch.sqrt(norm.running_var.float() + norm.eps)
            shift = norm.bias.float() if norm.affine else torch.zeros_like(scale)
            bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(scale)
            weight = conv.weight.float() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
            conv.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
            conv.bias = torch.nn.Parameter(((bias - norm.running_mean.float()) * scale + shift).to(dtype),
                                           requires_grad=False)
        module.normalization = torch.nn.Identity()
        folded += 1
    return folded


def optimise_for_inference(model: torch.nn.Module) -> bool:
    """Fold batch norms and switch to channels-last if the model has convolutions (eval mode). A PEFT
    model is left as it is: an adapter's delta is added after the convolution it wraps, so folding
    the next batch norm into that convolution would change the answers."""
    if hasattr(model, "peft_config"):
        return False
    if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return False
    fold_batchnorm(model)
    model.to(memory_format=torch.channels_last)
    return True
