"""Test data made on the spot: tiny ViT checkpoints (transformers' save_pretrained) and PIL image folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("blue_square", "green_disc", "red_stripes")
TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64)


def make_checkpoint(path: Path, *, classification_labels: list[str] | None = None, seed: int = 0,
                    preprocessor: dict | None = "default", **overrides) -> Path:
    """A ViTModel (backbone only, like the in21k checkpoint) or ViTForImageClassification folder."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    if classification_labels:
        config = ViTConfig(**kwargs, id2label=dict(enumerate(classification_labels)),
                           label2id={n: i for i, n in enumerate(classification_labels)})
        model = ViTForImageClassification(config)
    else:
        model = ViTModel(ViTConfig(**kwargs))
    model.save_pretrained(path)
    if preprocessor == "default":
        size = kwargs["image_size"]
        ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(path)
    elif preprocessor is not None:
        import json

        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return path


def nan_checkpoint(source: Path, path: Path) -> Path:
    """A copy of the checkpoint with one corrupt (NaN) value in its final LayerNorm: every loss is NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, path)
    weights = load_file(str(path / "model.safetensors"))
    weights["layernorm.weight"][0] = float("nan")
    save_file(weights, str(path / "model.safetensors"))
    return path


def draw_image(cls: str, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A learnable picture: the class decides the colour and the shape; position, size and noise vary."""
    w, h = size
    background = tuple(int(v) for v in rng.integers(90, 170, 3))
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    s = int(min(w, h) * rng.uniform(0.45, 0.8))
    x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    if cls == "blue_square":
        d.rectangle([x, y, x + s, y + s], fill=(20, 30, int(rng.integers(200, 256))))
    elif cls == "green_disc":
        d.ellipse([x, y, x + s, y + s], fill=(30, int(rng.integers(200, 256)), 40))
    else:
        for k in range(0, s, 6):
            d.rectangle([x, y + k, x + s, y + k + 2], fill=(int(rng.integers(200, 256)), 30, 30))
    noise = rng.integers(-12, 13, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def make_image_folder(root: Path, per_class: int, seed: int = 0, classes=CLASSES,
                      size: tuple[int, int] | None = None) -> Path:
    """JPEGs and PNGs of varied sizes (or all of `size`), one subfolder per class."""
    rng = np.random.default_rng(seed)
    fixed = size
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = fixed or (int(rng.integers(36, 80)), int(rng.integers(36, 80)))
            img = draw_image(cls, rng, size)
            if i % 4 == 3:
                img.save(root / cls / f"{i:04d}.png")
            else:
                img.save(root / cls / f"{i:04d}.jpg", quality=90)
    return root


def run(script: str, *args, env_extra: dict | None = None, timeout: int = 180, cwd: Path | None = None):
    """Run train.py or infer.py as a user would: a new Python process, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd or ROOT)


def fake_small_gpu_in_evaluation(monkeypatch, fits: int) -> None:
    """Evaluation passes of more than `fits` images run out of memory, as on a small GPU (faked on the CPU)."""
    import torch

    from vitfood import evaluation

    real = evaluation.forward

    def small_gpu(net, pixels, *rest):
        if len(pixels) > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return real(net, pixels, *rest)

    monkeypatch.setattr(evaluation, "forward", small_gpu)


# ---------------------------------------------------------------- one tiny checkpoint per model family

_VIT_LIKE = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2)


def _family_specs():
    """family -> (config, the class it is saved as, its image processor), each minuscule, at 32x32 pixels: saved
    as the Hub holds them (DINOv2 and CLIP as backbones only, SigLIP as the whole image-text model, the
    convolutional ones with an ImageNet-style head of their own labels)."""
    import transformers as T

    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    crop = {"height": 32, "width": 32}
    return {
        "vit": (T.ViTConfig(**_VIT_LIKE, intermediate_size=32), T.ViTModel,
                T.ViTImageProcessor(size=crop)),
        "deit": (T.DeiTConfig(**_VIT_LIKE, intermediate_size=32), T.DeiTForImageClassification,
                 T.DeiTImageProcessor(size=crop, crop_size=crop)),
        "beit": (T.BeitConfig(**_VIT_LIKE, intermediate_size=32, use_relative_position_bias=True),
                 T.BeitForImageClassification, T.BeitImageProcessor(size=crop, crop_size=crop)),
        "dinov2": (T.Dinov2Config(**_VIT_LIKE, mlp_ratio=2), T.Dinov2Model,
                   T.BitImageProcessor(size={"shortest_edge": 36}, crop_size=crop)),
        "dinov2_with_registers": (T.Dinov2WithRegistersConfig(**_VIT_LIKE, mlp_ratio=2, num_register_tokens=2),
                                  T.Dinov2WithRegistersModel,
                                  T.BitImageProcessor(size={"shortest_edge": 36}, crop_size=crop)),
        "siglip": (T.SiglipConfig(vision_config=dict(**_VIT_LIKE, intermediate_size=32), text_config=text),
                   T.SiglipModel, T.SiglipImageProcessor(size=crop)),
        "clip": (T.CLIPVisionConfig(**_VIT_LIKE, intermediate_size=32), T.CLIPVisionModel,
                 T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop)),
        "convnext": (T.ConvNextConfig(image_size=32, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
                     T.ConvNextForImageClassification, T.ConvNextImageProcessor(size={"shortest_edge": 32})),
        "swin": (T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                              window_size=4), T.SwinForImageClassification, T.ViTImageProcessor(size=crop)),
        "resnet": (T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
                   T.ResNetForImageClassification, T.ConvNextImageProcessor(size={"shortest_edge": 32})),
        "efficientnet": (T.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.1,
                                              hidden_dim=320, kernel_sizes=[3, 3], in_channels=[32, 16],
                                              out_channels=[16, 24], strides=[1, 2], num_block_repeats=[1, 1],
                                              expand_ratios=[1, 2], depthwise_padding=[]),
                         T.EfficientNetForImageClassification,
                         T.EfficientNetImageProcessor(size=crop)),
        "mobilevit": (T.MobileViTConfig(image_size=32, neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16], expand_ratio=2.0,
                                        hidden_sizes=[8, 8, 8], num_attention_heads=1, mlp_ratio=1.0),
                      T.MobileViTForImageClassification,
                      T.MobileViTImageProcessor(size={"shortest_edge": 36}, crop_size=crop)),
    }


FAMILIES = ("vit", "deit", "beit", "dinov2", "dinov2_with_registers", "siglip", "clip", "convnext", "swin", "resnet",
            "efficientnet", "mobilevit")


def make_family_checkpoint(family: str, path: Path, labels: list[str] | None = None, seed: int = 0) -> Path:
    """A tiny random checkpoint of `family`, saved with its own save_pretrained and image processor.
    `labels`: a classification checkpoint with these labels (else as `_family_specs` saves it)."""
    import torch
    import transformers as T

    config, cls, processor = _family_specs()[family]
    if labels is not None:
        config.id2label, config.label2id = dict(enumerate(labels)), {n: i for i, n in enumerate(labels)}
        names = T.models.auto.modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[
            "clip" if family == "clip" else config.model_type]
        cls = getattr(T, names[0] if isinstance(names, tuple) else names)
        if family == "clip":
            config = T.CLIPConfig(vision_config=config.to_dict(), id2label=config.id2label, label2id=config.label2id)
    torch.manual_seed(seed)
    cls(config).eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path
