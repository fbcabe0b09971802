"""Model families behind one interface (`ImageClassifier`, base.py), and the registry that picks one per checkpoint.

    vit   vitfood's own ViT (vit.py): checkpoints whose model_type is `vit`
    hf    every other type transformers' AutoModelForImageClassification maps (hf.py)

A family is a module with `NAME`, `claims(config)`, `load(...)` and `state_from_folder(...)`, listed in
FAMILIES; its models implement `ImageClassifier`. Families are imported when first used: infer.py on a `vit`
model never imports transformers.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from vitfood.errors import VitfoodError
from vitfood.fileio import atomic_write_bytes, json_bytes, read_json
from vitfood.models.base import (CONFIG_NAME, PREPROCESSOR_NAME, PYTORCH_BIN_NAME, SAFETENSORS_NAME, ImageClassifier,
                                 ParamRole, load_hf_weights, no_weight_decay)

__all__ = ["CONFIG_NAME", "PREPROCESSOR_NAME", "PYTORCH_BIN_NAME", "SAFETENSORS_NAME", "ImageClassifier", "ParamRole",
           "family_of", "hf_files", "load_hf_weights", "load_model", "no_weight_decay", "save_model",
           "state_from_folder"]

# In order: the first family that claims a checkpoint's config.json loads it.
FAMILIES = ("vitfood.models.vit", "vitfood.models.hf")


def family_of(config: dict, source: str = CONFIG_NAME, trust_remote_code: bool = False):
    """The family module for a checkpoint's config.json. Custom code (`auto_map`) is refused without
    `trust_remote_code`: no code from the Hub runs unasked."""
    if config.get("auto_map") and not trust_remote_code:
        raise VitfoodError(f"{source}: this checkpoint needs its own Python code from the Hub (auto_map); "
                           "vitfood runs it only with --trust-remote-code, once you have read that code")
    for name in FAMILIES:
        family = importlib.import_module(name)
        if family.claims(config):
            return family
    raise AssertionError("the hf family claims every other config")  # pragma: no cover


def load_model(model_dir: Path, labels: list[str] | None = None, seed: int = 0, image_size: int | None = None,
               trust_remote_code: bool = False) -> tuple[ImageClassifier, dict]:
    """A model of any family from a Hugging Face checkpoint folder, and its raw config.json.

    `labels=None` keeps the checkpoint's own classifier (inference). With `labels`, the head is kept only when
    the checkpoint was trained on exactly those labels in that order, else a new one is initialised from `seed`.
    `image_size`: fine-tune at another resolution (learned position tables resized once, here). The model is
    float32, on the CPU, in eval mode.
    """
    model_dir = Path(model_dir)
    config = read_json(model_dir / CONFIG_NAME)
    family = family_of(config, str(model_dir / CONFIG_NAME), trust_remote_code)
    kwargs = {"trust_remote_code": True} if trust_remote_code and family.NAME != "vit" else {}
    model = family.load(model_dir, config, labels=labels, seed=seed, image_size=image_size, **kwargs)
    return model, config


def state_from_folder(folder: Path, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint folder's weights as its family's `load_state_dict` takes them (resuming)."""
    config = read_json(Path(folder) / CONFIG_NAME)
    family = family_of(config, str(Path(folder) / CONFIG_NAME), trust_remote_code)
    kwargs = {"trust_remote_code": True} if trust_remote_code and family.NAME != "vit" else {}
    return family.state_from_folder(Path(folder), config, **kwargs)


def hf_files(model: ImageClassifier, base_config: dict, preprocessor: dict) -> dict[str, bytes]:
    """The files of a Hugging Face model folder, by name, in the order to write them.

    Weights first, config last: a config.json naming new labels never sits beside old weights.
    Both the best model and every checkpoint are written from here, so both load the same way.
    """
    from safetensors.torch import save

    weights = {k: v.to("cpu") for k, v in model.hf_state_dict().items()}
    return {
        SAFETENSORS_NAME: save(weights, metadata={"format": "pt"}),
        PREPROCESSOR_NAME: json_bytes(preprocessor),
        CONFIG_NAME: json_bytes(model.hf_config(base_config)),
    }


def save_model(model: ImageClassifier, out_dir: Path, base_config: dict, preprocessor: dict) -> None:
    """Write the model in Hugging Face format: config.json, model.safetensors, preprocessor_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in hf_files(model, base_config, preprocessor).items():
        atomic_write_bytes(out_dir / name, data)


def preprocessing_for(model_dir: Path, model: ImageClassifier, image_size: int | None = None):
    """(vitfood's Preprocessing, the preprocessor_config.json to save with the model) for a loaded model.

    The checkpoint's own processor decides the pixels (vitfood.preprocess reproduces it, its type kept when saved);
    with `image_size` (--image-size) it is moved to that size, so the saved processor carries it and pipeline()
    prepares images as vitfood trained on them. A family without a fixed size (no learned position table:
    ConvNeXt, ResNet, ...) takes its processor's.
    """
    from vitfood.preprocess import load_preprocessing

    prep = load_preprocessing(model_dir, None if image_size else model.image_size)
    if image_size is not None:
        prep = prep.at_size(image_size)
    if model.image_size is None:
        model.image_size = prep.height
    return prep, model.processor_config(prep.to_hf_dict())
