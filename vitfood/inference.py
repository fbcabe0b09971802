"""Inference: the minimal argmax `predict`, and `classify`, which returns the pipeline's top-k format.

Imports neither transformers, datasets nor torchvision, so a cold `python infer.py photo.jpg`
costs little more than importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitfood.config import TrainConfig
from vitfood.model import ViT, load_model, resolve_model_dir
from vitfood.preprocess import Preprocessing, load_preprocessing, load_rgb

DEFAULT_MODEL_DIR = TrainConfig.output_dir  # what train.py writes by default


@dataclass
class Classifier:
    model: ViT
    prep: Preprocessing
    labels: list[str]
    device: torch.device

    @torch.no_grad()
    def logits(self, images: list) -> torch.Tensor:
        """Paths, bytes or PIL images -> float32 logits [N, classes]."""
        pixels = torch.from_numpy(np.stack([self.prep.eval_resize(load_rgb(im)) for im in images]))
        return self.model(self.prep.normalize(pixels.to(self.device))).float()


_loaded: dict[tuple[str, str], Classifier] = {}


def load_classifier(model_dir: str | Path = DEFAULT_MODEL_DIR, device: str = "cpu") -> Classifier:
    """Load a trained model once per (folder, device); later calls reuse it."""
    key = (str(Path(model_dir).expanduser().resolve()) if Path(model_dir).expanduser().exists() else str(model_dir), device)
    if key not in _loaded:
        path = resolve_model_dir(str(model_dir))
        model, _ = load_model(path)  # labels=None: the checkpoint's own trained head
        prep = load_preprocessing(path, model.arch.image_size)
        dev = torch.device(device)
        _loaded[key] = Classifier(model.to(dev).eval(), prep, model.arch.labels, dev)
    return _loaded[key]


def predict(image, model_dir: str | Path = DEFAULT_MODEL_DIR) -> str:
    """The label of one image: preprocess, forward, argmax, id2label."""
    clf = load_classifier(model_dir)
    return clf.labels[int(clf.logits([image])[0].argmax())]


def topk_predictions(logits: torch.Tensor, labels: list[str], k: int) -> list[list[dict]]:
    """Softmax scores, highest first: [{"label", "score"}, ...] per row, as transformers' pipeline."""
    probs = logits.softmax(dim=-1)
    scores, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [[{"label": labels[i], "score": s} for s, i in zip(row_s.tolist(), row_i.tolist())]
            for row_s, row_i in zip(scores, ids)]


def classify(images, model_dir: str | Path = DEFAULT_MODEL_DIR, top_k: int = 5, batch_size: int = 32,
             device: str = "cpu"):
    """Top-k labels with softmax scores. One image -> a list of dicts; a list of images -> a list of those."""
    clf = load_classifier(model_dir, device)
    single = not isinstance(images, (list, tuple))
    batch = [images] if single else list(images)
    out: list[list[dict]] = []
    for i in range(0, len(batch), batch_size):
        out += topk_predictions(clf.logits(batch[i : i + batch_size]), clf.labels, top_k)
    return out[0] if single else out
