"""The output folder: checked before training, the best model written atomically into it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vitfood.errors import VitfoodError
from vitfood.model import SAFETENSORS_NAME, ViT, atomic_write_bytes, save_model

__all__ = ["atomic_write_bytes", "prepare_output_dir", "save_best", "write_json", "MetricsLog"]

EVAL_RESULTS = "eval_results.json"
METRICS = "metrics.jsonl"
BAD_IMAGES = "bad_images.txt"


def prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail before the first step, not at the first save, when the folder is unusable.

    A folder that already holds a trained model is left alone unless --overwrite-output-dir:
    a second run must not silently replace the first one's result.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise VitfoodError(f"--output-dir {out_dir}: exists and is not a folder")
    if (out_dir / SAFETENSORS_NAME).exists() and not overwrite:
        raise VitfoodError(f"--output-dir {out_dir}: already holds a trained model; "
                           "choose another folder or pass --overwrite-output-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise VitfoodError(f"--output-dir {out_dir}: cannot write there ({e.strerror or e})") from None


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def save_best(out_dir: Path, model: ViT, base_config: dict, preprocessor: dict, results: dict) -> None:
    """The model in Hugging Face format, then the results that describe it."""
    try:
        save_model(model, out_dir, base_config, preprocessor)
        write_json(out_dir / EVAL_RESULTS, results)
    except OSError as e:
        raise VitfoodError(f"cannot save the model to {out_dir}: {e.strerror or e} "
                           "(the previously saved files are intact)") from None


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed at once so a killed run keeps its history."""

    def __init__(self, path: Path):
        self.file = open(path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
