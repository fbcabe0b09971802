"""Makes docs/training_curves.png and docs/confusion_matrix.png, shown in docs/report.md, from a real run.

No download: a folder of 24 classes of drawn pictures (4 shapes x 6 colours, with noise, varied sizes
and positions), and a small ViT initialised at random and saved by transformers. The run is an
ordinary `train.py` command on that folder; the pictures are what it writes into its output folder.

    python docs/make_readme_pictures.py      # about two minutes on 2 CPU cores
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("disc", "square", "triangle", "stripes")
# Neighbouring colours (red/orange, green/teal, blue/purple) make some classes confusable, as dishes are.
COLOURS = {"red": (210, 40, 40), "orange": (225, 120, 30), "green": (40, 180, 60), "teal": (30, 160, 150),
           "blue": (40, 60, 210), "purple": (130, 50, 190)}


def draw(shape: str, colour: tuple, rng: np.random.Generator) -> Image.Image:
    w, h = int(rng.integers(160, 320)), int(rng.integers(160, 320))
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(80, 180, 3)))
    d = ImageDraw.Draw(img)
    s = int(min(w, h) * rng.uniform(0.35, 0.8))
    x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    fill = tuple(int(np.clip(c + rng.integers(-40, 41), 0, 255)) for c in colour)
    if shape == "disc":
        d.ellipse([x, y, x + s, y + s], fill=fill)
    elif shape == "square":
        d.rectangle([x, y, x + s, y + s], fill=fill)
    elif shape == "triangle":
        d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=fill)
    else:
        for k in range(0, s, 8):
            d.rectangle([x, y + k, x + s, y + k + 3], fill=fill)
    noise = rng.integers(-25, 26, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))


def main() -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    work = Path(tempfile.mkdtemp(prefix="vitfood-docs-"))
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for name, colour in COLOURS.items():
            folder = work / "pictures" / f"{name}_{shape}"
            folder.mkdir(parents=True)
            for i in range(40):
                draw(shape, colour, rng).save(folder / f"{i:03d}.jpg", quality=90)
    backbone = work / "vit-small-random"
    config = ViTConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=256)
    ViTModel(config).save_pretrained(backbone)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(backbone)
    out = work / "out"
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(backbone), "--dataset",
                    str(work / "pictures"), "--output-dir", str(out), "--epochs", "12", "--batch-size", "32",
                    "--grad-accum-steps", "1", "--learning-rate", "1e-3", "--logging-steps", "5"], check=True)
    for name in ("training_curves.png", "confusion_matrix.png"):
        shutil.copy(out / name, ROOT / "docs" / name)
    print(f"wrote docs/training_curves.png and docs/confusion_matrix.png (run in {out})")


if __name__ == "__main__":
    main()
