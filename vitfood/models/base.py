"""What every model family gives the rest of vitfood: the `ImageClassifier` interface, and the rules families share.

The training loop, checkpoints, inference and the model card see a model only through this interface; only
`vitfood.models` knows how a family builds, names or stores its layers. Two families exist:

    vit   vitfood's own Vision Transformer (vit.py): fused QKV, SDPA, no transformers import (infer.py starts fast)
    hf    any other model type that transformers' AutoModelForImageClassification maps (hf.py)

This module imports neither transformers nor torchvision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from vitfood.errors import VitfoodError, first_line

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PYTORCH_BIN_NAME = "pytorch_model.bin"
PREPROCESSOR_NAME = "preprocessor_config.json"


@dataclass(frozen=True)
class ParamRole:
    """A parameter's part in the optimizer: decayed or not, and its depth (0 = embeddings, then one per block,
    last = what follows the blocks: final norm and head) for a layer-wise learning rate."""

    name: str
    param: nn.Parameter
    decay: bool
    layer: int


@runtime_checkable
class ImageClassifier(Protocol):
    """A model of any family, as vitfood uses it. It is an `nn.Module` whose forward takes normalised pixels
    [B, C, H, W] and returns logits [B, classes] (a tensor, not transformers' output object)."""

    family: str  # the registry key: "vit" or "hf"
    model_type: str  # config.json's model_type: "vit", "dinov2", "convnext", ...
    labels: list[str]  # class names, index = class id
    image_size: int  # the side of the square images it is trained and evaluated at

    @property
    def display_name(self) -> str:
        """For people (the model card, prepare.py): 'Vision Transformer (ViT)', 'DINOv2', 'ConvNeXT'."""

    @property
    def has_batchnorm(self) -> bool:
        """BatchNorm layers: a pass's size changes the result, so passes stay at --batch-size."""

    def parameter_roles(self) -> list[ParamRole]:
        """Every trainable parameter with its weight-decay role and layer id (see `no_weight_decay`)."""

    def compile_units(self) -> list[nn.Module]:
        """What torch.compile compiles in place: the repeated blocks (one compilation serves all), else the model."""

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the names transformers' checkpoint files use (contiguous CPU-able copies)."""

    def hf_config(self, base_config: dict) -> dict:
        """config.json for transformers, with this model's labels (id2label, label2id) and image size."""

    def processor_config(self, prep_config: dict) -> dict:
        """preprocessor_config.json to save, from vitfood's `Preprocessing.to_hf_dict()` (the checkpoint's own
        processor type, at this model's size): a family may add what its processor needs beyond the pixels."""


# ---------------------------------------------------------------- weight decay by parameter role

# Learned offsets and tokens, not weights whose size needs bounding: decaying them towards zero only erases
# what pretraining put there (timm's and the ViT/DeiT/BEiT recipes' rule).
_NO_DECAY_NAMES = re.compile(
    r"(^|[._])(pos_embed|position_embeddings?|cls_token|class_embedding|register_tokens|mask_token|"
    r"distillation_token|dist_token|relative_position_bias_table|absolute_pos_embed|rel_pos_[hw]|"
    r"position_embedding)([._]|$)")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Never decayed: biases and every norm's weights (any tensor of fewer than 2 dimensions: LayerNorm,
    BatchNorm, GroupNorm, layer scale), position embeddings (absolute tables, relative-position bias tables),
    and the CLS, register, mask and distillation tokens."""
    return param.ndim < 2 or bool(_NO_DECAY_NAMES.search(name))


def roles_by_units(module: nn.Module, units: list[nn.Module], prefix: str = "") -> list[ParamRole]:
    """`parameter_roles` from the compile units in module order: a parameter inside unit i is layer i + 1; one
    before the first unit (embeddings) is 0; one after the last (final norm, head) is len(units) + 1."""
    owner = {}
    for i, unit in enumerate(units):
        for p in unit.parameters():
            owner[id(p)] = i + 1
    roles, seen_unit = [], False
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        layer = owner.get(id(p))
        if layer is not None:
            seen_unit = True
        else:
            layer = len(units) + 1 if seen_unit else 0
        roles.append(ParamRole(prefix + name, p, not no_weight_decay(name, p), layer))
    return roles


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


# ---------------------------------------------------------------- --image-size

def resize_position_table(table: torch.Tensor, prefix_tokens: int, new_grid: int) -> torch.Tensor:
    """A learned absolute position table [(1,) prefix + g*g, D] -> [(1,) prefix + new_grid^2, D]: the grid part
    resized bicubically (align_corners=False), the prefix tokens' (CLS, distillation) rows kept as they are."""
    squeeze = table.ndim == 2
    t = table.unsqueeze(0) if squeeze else table
    prefix, grid = t[:, :prefix_tokens], t[:, prefix_tokens:]
    old = int(round(grid.shape[1] ** 0.5))
    if old * old != grid.shape[1]:
        raise VitfoodError(f"--image-size: a position table of {grid.shape[1]} positions is not a square grid")
    if old != new_grid:
        dim = grid.shape[-1]
        g = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
        g = F.interpolate(g, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
        grid = g.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(table.dtype)
    out = torch.cat([prefix, grid], dim=1)
    return out[0].contiguous() if squeeze else out.contiguous()


def check_size_multiple(size: int, multiple: int, what: str, model_type: str) -> None:
    if size < multiple or size % multiple:
        raise VitfoodError(f"--image-size {size}: {model_type} needs a multiple of its {what} {multiple}")


def processor_output_size(processor: dict) -> int | None:
    """The side of the images a preprocessor_config.json produces: its centre crop, else its size (ConvNeXt's
    {shortest_edge} with crop_pct also ends at shortest_edge). None when it does not say."""
    crop = processor.get("crop_size") if processor.get("do_center_crop") else None
    size = crop or processor.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        side = size.get("height", size.get("shortest_edge"))
        return int(side) if side else None
    return None


# ---------------------------------------------------------------- Hugging Face files

def load_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Read `model.safetensors`, else `pytorch_model.bin` without unpickling arbitrary objects."""
    st = model_dir / SAFETENSORS_NAME
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except Exception as e:  # a truncated or foreign file
            raise VitfoodError(f"{st}: cannot read safetensors weights ({e})") from None
    bin_path = model_dir / PYTORCH_BIN_NAME
    if bin_path.is_file():
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses pickled code; also covers corrupt files
            raise VitfoodError(f"{bin_path}: refused to load ({first_line(e, 200)})") from None
    if any(model_dir.glob("*.index.json")):
        raise VitfoodError(f"{model_dir}: sharded checkpoints are not supported (ViT-B/L fit in one file)")
    raise VitfoodError(f"{model_dir}: no {SAFETENSORS_NAME} or {PYTORCH_BIN_NAME}")


def labels_of(config: dict, source: str) -> list[str]:
    """config.json's id2label as a list, index = class id."""
    id2label = config.get("id2label") or {}
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        raise VitfoodError(f"{source}: id2label keys must be class indices, got {list(id2label)[:3]}") from None

