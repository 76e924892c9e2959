"""Turn a torchvision ImageNet ``state_dict`` file into a plain Hugging Face model folder.

    python -m training.import_torchvision --arch mobilenet_v2 \\
        --weights mobilenet_v2-b0353104.pth --output_dir assets/models/mobilenet_v2-imagenet

The folder holds what ``from_pretrained`` / ``pipeline("image-classification")`` expect:
``config.json`` (with the 1000 ImageNet class names as ``id2label``), ``model.safetensors``,
``preprocessor_config.json`` and a model card ``README.md``.

The weights file is read with ``torch.load(..., weights_only=True)`` (no unpickling of
arbitrary objects). Every torchvision key is renamed to the transformers layout and loaded
strictly: a key that maps nowhere, a parameter left without a value or a shape mismatch is an
error that names the keys, never a silently half-random model.

The transformers configs are set so that the Hugging Face model computes what torchvision's
model computes:

* MobileNetV2: symmetric PyTorch padding (``tf_padding=False``, the HF default is TF "SAME"
  padding), BatchNorm eps 1e-5 (HF default 1e-3), the first block's expansion folded into the
  stem (``first_layer_is_expansion=True``), 1280 output channels, ReLU6, 1000 classes (no
  TF-style "background" class at index 0).
* ResNet-18/50: torchvision's ResNet v1.5 (stride in the 3x3 convolution of a bottleneck:
  ``downsample_in_bottleneck=False``), no downsampling in the first stage, BatchNorm eps 1e-5.

Preprocessing matches torchvision's ImageNet evaluation transform: resize the shorter side to
256 (bilinear), center-crop 224, scale to [0, 1], normalise with the ImageNet mean/std.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

ARCHS = ("mobilenet_v2", "resnet18", "resnet50")
LABELS_FILE = Path(__file__).with_name("imagenet_labels.txt")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BILINEAR = 2  # PILImageResampling.BILINEAR, torchvision's default for transforms.Resize

# ResNet variants torchvision ships: (layer type, blocks per stage, output channels per stage).
_RESNET_SHAPES = {
    "resnet18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet50": ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
}


class StateDictMismatchError(ValueError):
    """The weights file does not fit the chosen architecture."""


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in torchvision's index order."""
    labels = LABELS_FILE.read_text(encoding="utf-8").splitlines()
    if len(labels) != 1000 or len(set(labels)) != 1000:
        raise RuntimeError(f"{LABELS_FILE} must hold 1000 distinct class names, found {len(labels)}")
    return labels


# --------------------------------------------------------------------------- configs


def build_config(arch: str, labels: list[str]):
    """A transformers config whose model computes what torchvision's ``arch`` computes."""
    label_kwargs = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    if arch == "mobilenet_v2":
        from transformers import MobileNetV2Config

        return MobileNetV2Config(
            num_channels=3,
            image_size=224,
            depth_multiplier=1.0,
            depth_divisible_by=8,
            min_depth=8,
            expand_ratio=6,
            output_stride=32,
            first_layer_is_expansion=True,
            finegrained_output=True,
            hidden_act="relu6",
            tf_padding=False,
            layer_norm_eps=1e-5,
            classifier_dropout_prob=0.2,  # torchvision's Dropout(p=0.2) before the classifier
            **label_kwargs,
        )
    if arch in _RESNET_SHAPES:
        from transformers import ResNetConfig

        layer_type, depths, hidden_sizes = _RESNET_SHAPES[arch]
        return ResNetConfig(
            num_channels=3,
            embedding_size=64,
            hidden_sizes=hidden_sizes,
            depths=depths,
            layer_type=layer_type,
            hidden_act="relu",
            downsample_in_first_stage=False,
            downsample_in_bottleneck=False,
            **label_kwargs,
        )
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def build_image_processor(arch: str):
    """torchvision's eval transform (Resize(256), CenterCrop(224), ImageNet mean/std) as an HF processor.

    The processors are built from their portable (torchvision-backend) class so that
    ``preprocessor_config.json`` names ``MobileNetV2ImageProcessor`` / ``ConvNextImageProcessor``
    (what microsoft/resnet-50 uses); without torchvision, ``AutoImageProcessor`` loads the
    equivalent ``*Pil`` class from the same file.
    """
    common = {
        "do_resize": True,
        "resample": BILINEAR,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    }
    if arch == "mobilenet_v2":
        name = "MobileNetV2ImageProcessor"
        kwargs = {
            "size": {"shortest_edge": 256},
            "do_center_crop": True,
            "crop_size": {"height": 224, "width": 224},
        }
    else:
        # ConvNext's processor: shortest_edge 224 with crop_pct 0.875 = resize to 256, crop 224.
        name = "ConvNextImageProcessor"
        kwargs = {"size": {"shortest_edge": 224}, "crop_pct": 224 / 256}
    import transformers
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        # Same preprocessing with the PIL backend (importing the plain name would fall back to it
        # with a warning); `save_pretrained` still records the portable class name.
        name += "Pil"
    return getattr(transformers, name)(**common, **kwargs)


# --------------------------------------------------------------------------- key mapping


def _mobilenet_v2_key(key: str) -> str | None:
    """torchvision ``mobilenet_v2`` key -> ``MobileNetV2ForImageClassification`` key (None: unknown)."""
    conv_bn = {"0": "convolution", "1": "normalization"}
    # features.0 = Conv-BN-ReLU6 3x3/2 stem; features.1 = first block (expand ratio 1: depthwise + project).
    if m := re.fullmatch(r"features\.0\.([01])\.(.+)", key):
        return f"mobilenet_v2.conv_stem.first_conv.{conv_bn[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"features\.1\.conv\.0\.([01])\.(.+)", key):
        return f"mobilenet_v2.conv_stem.conv_3x3.{conv_bn[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"features\.1\.conv\.([12])\.(.+)", key):
        return f"mobilenet_v2.conv_stem.reduce_1x1.{conv_bn[str(int(m[1]) - 1)]}.{m[2]}"
    # features.2..17 = inverted residual blocks: conv.0 expand 1x1, conv.1 depthwise 3x3, conv.2/3 project + BN.
    if m := re.fullmatch(r"features\.(\d+)\.conv\.([01])\.([01])\.(.+)", key):
        block, sub = int(m[1]), ("expand_1x1", "conv_3x3")[int(m[2])]
        if 2 <= block <= 17:
            return f"mobilenet_v2.layer.{block - 2}.{sub}.{conv_bn[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"features\.(\d+)\.conv\.([23])\.(.+)", key):
        block = int(m[1])
        if 2 <= block <= 17:
            return f"mobilenet_v2.layer.{block - 2}.reduce_1x1.{conv_bn[str(int(m[2]) - 2)]}.{m[3]}"
    # features.18 = Conv-BN-ReLU6 1x1 to 1280 channels; classifier = [Dropout, Linear].
    if m := re.fullmatch(r"features\.18\.([01])\.(.+)", key):
        return f"mobilenet_v2.conv_1x1.{conv_bn[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"classifier\.1\.(weight|bias)", key):
        return f"classifier.{m[1]}"
    return None


def _resnet_key(key: str) -> str | None:
    """torchvision ``resnet*`` key -> ``ResNetForImageClassification`` key (None: unknown)."""
    if m := re.fullmatch(r"conv1\.weight", key):
        return "resnet.embedder.embedder.convolution.weight"
    if m := re.fullmatch(r"bn1\.(.+)", key):
        return f"resnet.embedder.embedder.normalization.{m[1]}"
    if m := re.fullmatch(r"layer([1-4])\.(\d+)\.(conv|bn)([1-3])\.(.+)", key):
        stage, block, kind, idx, rest = int(m[1]) - 1, m[2], m[3], int(m[4]) - 1, m[5]
        sub = "convolution" if kind == "conv" else "normalization"
        return f"resnet.encoder.stages.{stage}.layers.{block}.layer.{idx}.{sub}.{rest}"
    if m := re.fullmatch(r"layer([1-4])\.(\d+)\.downsample\.([01])\.(.+)", key):
        sub = ("convolution", "normalization")[int(m[3])]
        return f"resnet.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.{sub}.{m[4]}"
    if m := re.fullmatch(r"fc\.(weight|bias)", key):
        return f"classifier.1.{m[1]}"
    return None


KEY_MAPPERS: dict[str, Callable[[str], str | None]] = {
    "mobilenet_v2": _mobilenet_v2_key,
    "resnet18": _resnet_key,
    "resnet50": _resnet_key,
}


def convert_state_dict(arch: str, state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """Rename a torchvision state dict to ``model``'s keys; raise if anything does not line up.

    Strict: every source key must map to a key of ``model``, every parameter and buffer of
    ``model`` must receive a value, and shapes must be equal. The one allowance: BatchNorm's
    ``num_batches_tracked`` counters (unused at inference, absent from some older files) may be
    missing from the source.
    """
    mapper = KEY_MAPPERS[arch]
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unmapped, unexpected, mismatched = [], [], []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            unexpected.append(f"{key} (not a tensor: {type(value).__name__})")
            continue
        new_key = mapper(key)
        if new_key is None:
            unmapped.append(key)
        elif new_key not in target:
            unexpected.append(f"{key} -> {new_key}")
        elif tuple(value.shape) != tuple(target[new_key].shape):
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target[new_key].shape)}")
        else:
            mapped[new_key] = value.to(target[new_key].dtype)
    missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    problems = []
    for title, items in (
        ("keys with no counterpart in the transformers model", unmapped + unexpected),
        ("model keys the file does not provide", missing),
        ("shape mismatches", mismatched),
    ):
        if items:
            shown = "\n    ".join(items[:20]) + (
                f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            )
            problems.append(f"  {len(items)} {title}:\n    {shown}")
    if problems:
        raise StateDictMismatchError(
            f"the weights do not fit torchvision's {arch} layout ({len(state_dict)} keys in the file):\n"
            + "\n".join(problems)
        )
    for key in target:  # counters the file lacks: keep the model's own (zero)
        mapped.setdefault(key, target[key])
    return mapped


def load_torchvision_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a torchvision checkpoint safely (tensors only) and unwrap common containers."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    # Some training scripts save {"model": state_dict, ...} or {"state_dict": ...}.
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise StateDictMismatchError(f"{path} holds a {type(obj).__name__}, not a state dict")
    # DataParallel / DDP checkpoints prefix every key with "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def build_model(arch: str, state_dict: Mapping[str, torch.Tensor], labels: list[str] | None = None):
    """An eval-mode transformers classifier holding ``state_dict``'s weights."""
    from transformers import MobileNetV2ForImageClassification, ResNetForImageClassification

    labels = labels if labels is not None else imagenet_labels()
    config = build_config(arch, labels)
    cls = MobileNetV2ForImageClassification if arch == "mobilenet_v2" else ResNetForImageClassification
    model = cls(config)
    mapped = convert_state_dict(arch, state_dict, model)
    model.load_state_dict(mapped, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- output folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_card(arch: str, weights: Path, source: str | None, license_id: str, n_params: int) -> str:
    title = {"mobilenet_v2": "MobileNetV2", "resnet18": "ResNet-18", "resnet50": "ResNet-50"}[arch]
    origin = source or f"the torchvision-format state dict `{weights.name}`"
    return f"""---
library_name: transformers
pipeline_tag: image-classification
license: {license_id}
tags:
- image-classification
- vision
- torchvision
- {arch.replace("_", "-")}
datasets:
- imagenet-1k
---

# {title} (ImageNet-1k), converted from torchvision

Weights: converted from {origin} (sha256 `{_sha256(weights)}`) by
`python -m training.import_torchvision --arch {arch}`; every tensor was mapped and loaded
strictly, so this model computes what torchvision's `{arch}` computes ({n_params:,} parameters).

- Labels: the 1000 ImageNet-1k classes in torchvision's order (no background class).
- Preprocessing: resize the shorter side to 256 (bilinear), center-crop 224, ImageNet mean/std.

```python
from transformers import pipeline

classify = pipeline("image-classification", model="path/to/this/folder")
classify("cat.jpg")
```
"""


def _portable_processor_name(output_dir: Path) -> None:
    """Make ``preprocessor_config.json`` name the portable class, not the ``*Pil`` fallback."""
    import json

    path = output_dir / "preprocessor_config.json"
    data = json.loads(path.read_text())
    name = data.get("image_processor_type", "")
    if name.endswith("Pil"):
        data["image_processor_type"] = name[: -len("Pil")]
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only modes; give the folder the usual umask-based ones."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def import_torchvision(
    arch: str,
    weights: str | Path,
    output_dir: str | Path,
    *,
    source: str | None = None,
    license_id: str = "bsd-3-clause",
    overwrite: bool = False,
) -> Path:
    """Convert ``weights`` (torchvision ``arch`` state dict) into a Hugging Face folder at ``output_dir``.

    The folder is written beside the target and renamed into place, so a reader never sees a
    half-written model.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    weights, output_dir = Path(weights), Path(output_dir)
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty (pass --overwrite to replace it)")

    model = build_model(arch, load_torchvision_state_dict(weights))
    processor = build_image_processor(arch)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _portable_processor_name(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        (tmp / "README.md").write_text(_model_card(arch, weights, source, license_id, n_params))
        _make_readable(tmp)
        if output_dir.is_symlink() or output_dir.is_file():
            output_dir.unlink()
        elif output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-import-torchvision",
        description="Convert a torchvision ImageNet state_dict (.pth) into a Hugging Face model folder.",
    )
    parser.add_argument(
        "--arch", required=True, choices=ARCHS, help="torchvision architecture of the weights"
    )
    parser.add_argument("--weights", required=True, type=Path, help="torchvision state_dict file (.pth)")
    parser.add_argument("--output_dir", required=True, type=Path, help="Hugging Face folder to write")
    parser.add_argument("--source", default=None, help="where the weights came from (for the model card)")
    parser.add_argument("--license", dest="license_id", default="bsd-3-clause", help="model card license id")
    parser.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists")
    args = parser.parse_args(argv)
    try:
        out = import_torchvision(
            args.arch,
            args.weights,
            args.output_dir,
            source=args.source,
            license_id=args.license_id,
            overwrite=args.overwrite,
        )
    except (StateDictMismatchError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
