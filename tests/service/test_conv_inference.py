"""service/conv_inference.py: batch norm folded into convolutions, only where it is safe."""

from __future__ import annotations


def test_batchnorm_folding_only_touches_conv_norm_blocks(pristine_models):
    """Every conv + batch-norm block of ResNet and MobileNetV2 is folded (no BatchNorm2d left to
    run), a model in training mode is not, and a model without convolutions is left alone."""
    import torch
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from service.conv_inference import fold_batchnorm, optimise_for_inference

    for name in ("mobilenet", "resnet"):
        model = AutoModelForImageClassification.from_pretrained(pristine_models / name).eval()
        norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        x = torch.randn(2, 3, 64, 64)
        with torch.inference_mode():
            expected = model(pixel_values=x).logits
        assert optimise_for_inference(model) is True
        assert norms > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        with torch.inference_mode():
            assert torch.allclose(model(pixel_values=x).logits, expected, atol=1e-4)
    training = AutoModelForImageClassification.from_pretrained(pristine_models / "resnet").train()
    assert fold_batchnorm(training) == 0
    text = AutoModelForSequenceClassification.from_pretrained(pristine_models / "sentiment").eval()
    assert optimise_for_inference(text) is False
