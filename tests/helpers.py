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
