"""The `vit` family: a compact Vision Transformer in plain PyTorch that reads and writes Hugging Face ViT checkpoints.

The architecture is exactly transformers' `ViTForImageClassification` (pre-norm encoder blocks,
CLS-token head), so its checkpoints load here bit-for-bit and what we save loads there. The one
structural difference is that Q, K and V are a single fused projection: one matmul instead of
three, and `F.scaled_dot_product_attention` picks flash or memory-efficient kernels on the GPU.
The fusion is undone on save, so the files carry Hugging Face's key names.

This module imports neither transformers nor torchvision: `infer.py` starts faster without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitfood.errors import VitfoodError
from vitfood.models.base import (ParamRole, check_size_multiple, labels_of, load_hf_weights, no_weight_decay,
                                 resize_position_table, roles_by_units)

NAME = "vit"

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class ViTArch:
    """The fields of a Hugging Face ViT `config.json` that define the network."""

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    labels: list[str] = field(default_factory=list)  # class names, index = class id

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ViTArch":
        if cfg.get("model_type", "vit") != "vit":
            raise VitfoodError(f"{source}: model_type is {cfg.get('model_type')!r}; vitfood trains ViT checkpoints ('vit') only")
        kwargs = {}
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps",
                     "qkv_bias", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if name in cfg and cfg[name] is not None:
                kwargs[name] = cfg[name]
        for name in ("image_size", "patch_size"):
            if isinstance(kwargs.get(name), (list, tuple)):  # some configs store (h, w)
                h, w = kwargs[name]
                if h != w:
                    raise VitfoodError(f"{source}: non-square {name} {kwargs[name]} is not supported")
                kwargs[name] = h
        arch = cls(**kwargs)
        if arch.hidden_act not in _ACTIVATIONS:
            raise VitfoodError(f"{source}: unsupported hidden_act {arch.hidden_act!r}")
        if arch.hidden_size % arch.num_attention_heads:
            raise VitfoodError(f"{source}: hidden_size {arch.hidden_size} is not divisible by num_attention_heads")
        if arch.image_size % arch.patch_size:
            raise VitfoodError(f"{source}: image_size {arch.image_size} is not divisible by patch_size {arch.patch_size}")
        # The label names a classifier head was trained on. A backbone-only config carries
        # transformers' placeholder id2label too; load_model ignores it when no head weights exist.
        arch.labels = labels_of(cfg, source)
        return arch

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, a: ViTArch):
        super().__init__()
        self.num_heads = a.num_attention_heads
        self.attn_dropout = a.attention_probs_dropout_prob
        self.norm1 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.qkv = nn.Linear(a.hidden_size, 3 * a.hidden_size, bias=a.qkv_bias)
        self.proj = nn.Linear(a.hidden_size, a.hidden_size)
        self.norm2 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.fc1 = nn.Linear(a.hidden_size, a.intermediate_size)
        self.fc2 = nn.Linear(a.intermediate_size, a.hidden_size)
        self.act = _ACTIVATIONS[a.hidden_act]
        self.dropout = nn.Dropout(a.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.dropout(self.proj(y.transpose(1, 2).reshape(B, N, D)))
        return x + self.dropout(self.fc2(self.act(self.fc1(self.norm2(x)))))


class ViT(nn.Module):
    """Patch embedding + CLS token + position embedding, encoder blocks, final LayerNorm, linear head.

    The `vit` family's `ImageClassifier` (vitfood.models.base)."""

    family = "vit"
    model_type = "vit"
    display_name = "Vision Transformer (ViT)"
    has_batchnorm = False

    def __init__(self, arch: ViTArch, num_labels: int):
        super().__init__()
        self.arch = arch
        D = arch.hidden_size
        self.patch_embed = nn.Conv2d(arch.num_channels, D, kernel_size=arch.patch_size, stride=arch.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.num_patches + 1, D))
        self.dropout = nn.Dropout(arch.hidden_dropout_prob)
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.num_hidden_layers))
        self.norm = nn.LayerNorm(D, eps=arch.layer_norm_eps)
        self.head = nn.Linear(D, num_labels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: normalised float images [B, C, H, W] -> logits [B, num_labels]."""
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))

    def reset_head(self, num_labels: int, generator: torch.Generator | None = None) -> None:
        """A fresh head, initialised as transformers does: weights N(0, 0.02), bias zero."""
        self.head = nn.Linear(self.arch.hidden_size, num_labels)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.02, generator=generator)
            self.head.bias.zero_()

    @property
    def labels(self) -> list[str]:
        return self.arch.labels

    @property
    def image_size(self) -> int:
        return self.arch.image_size

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """Biases, LayerNorm weights and the position and CLS embeddings are never decayed."""
        return no_weight_decay(name, param)

    def parameter_roles(self) -> list[ParamRole]:
        return roles_by_units(self, list(self.blocks))

    def compile_units(self) -> list[nn.Module]:
        """The blocks: identical, so one compilation serves all of them, and the parameters keep their names."""
        return list(self.blocks)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return to_hf_state_dict(self)

    def hf_config(self, base_config: dict) -> dict:
        return hf_config_for(self, base_config)

    def processor_config(self, prep_config: dict) -> dict:
        return prep_config


# ---------------------------------------------------------------- Hugging Face key names

def _hf_block_keys(i: int, prefix: str) -> dict[str, str]:
    p = f"{prefix}encoder.layer.{i}."
    return {
        "norm1": p + "layernorm_before", "norm2": p + "layernorm_after",
        "proj": p + "attention.output.dense", "fc1": p + "intermediate.dense", "fc2": p + "output.dense",
    }


def to_hf_state_dict(model: ViT) -> dict[str, torch.Tensor]:
    """Our state -> `ViTForImageClassification` key names, splitting the fused QKV projection."""
    sd = model.state_dict()
    out = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.bias"],
        "vit.layernorm.weight": sd["norm.weight"],
        "vit.layernorm.bias": sd["norm.bias"],
        "classifier.weight": sd["head.weight"],
        "classifier.bias": sd["head.bias"],
    }
    for i in range(model.arch.num_hidden_layers):
        ours = f"blocks.{i}."
        for our_name, hf_name in _hf_block_keys(i, "vit.").items():
            out[hf_name + ".weight"] = sd[ours + our_name + ".weight"]
            out[hf_name + ".bias"] = sd[ours + our_name + ".bias"]
        attn = f"vit.encoder.layer.{i}.attention.attention."
        for part, t in zip(("query", "key", "value"), sd[ours + "qkv.weight"].chunk(3, dim=0)):
            out[attn + part + ".weight"] = t
        if model.arch.qkv_bias:
            for part, t in zip(("query", "key", "value"), sd[ours + "qkv.bias"].chunk(3, dim=0)):
                out[attn + part + ".bias"] = t
    # safetensors refuses views that share storage; contiguous copies are exact.
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], arch: ViTArch, source: str) -> tuple[dict, bool]:
    """Hugging Face keys (ViTModel or ViTForImageClassification) -> our backbone keys.

    Returns (backbone state dict, whether a classifier head was present). Every backbone tensor
    must be present and no unknown key may remain: a silently half-loaded backbone trains
    but gives poor results, which is far worse than an error.
    """
    prefix = "vit." if any(k.startswith("vit.") for k in hf) else ""
    remaining = dict(hf)
    missing: list[str] = []

    def take(key: str) -> torch.Tensor | None:
        if key in remaining:
            return remaining.pop(key)
        missing.append(key)
        return None

    ours: dict[str, torch.Tensor | None] = {
        "cls_token": take(prefix + "embeddings.cls_token"),
        "pos_embed": take(prefix + "embeddings.position_embeddings"),
        "patch_embed.weight": take(prefix + "embeddings.patch_embeddings.projection.weight"),
        "patch_embed.bias": take(prefix + "embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take(prefix + "layernorm.weight"),
        "norm.bias": take(prefix + "layernorm.bias"),
    }
    for i in range(arch.num_hidden_layers):
        for our_name, hf_name in _hf_block_keys(i, prefix).items():
            ours[f"blocks.{i}.{our_name}.weight"] = take(hf_name + ".weight")
            ours[f"blocks.{i}.{our_name}.bias"] = take(hf_name + ".bias")
        attn = f"{prefix}encoder.layer.{i}.attention.attention."
        qkv_w = [take(attn + p + ".weight") for p in ("query", "key", "value")]
        ours[f"blocks.{i}.qkv.weight"] = None if None in qkv_w else torch.cat(qkv_w, dim=0)
        if arch.qkv_bias:
            qkv_b = [take(attn + p + ".bias") for p in ("query", "key", "value")]
            ours[f"blocks.{i}.qkv.bias"] = None if None in qkv_b else torch.cat(qkv_b, dim=0)
    has_head = "classifier.weight" in remaining
    # Parts of the checkpoint that vitfood does not use, on purpose: the ViTModel pooler (the
    # classification model reads the CLS token, not the pooler) and the masked-image-modelling token.
    for key in list(remaining):
        if key.startswith(("pooler.", prefix + "pooler.", "classifier.")) or key.endswith("embeddings.mask_token"):
            remaining.pop(key)
    if missing or remaining:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} backbone tensor(s), e.g. {missing[:3]}")
        if remaining:
            parts.append(f"{len(remaining)} unexpected tensor(s), e.g. {sorted(remaining)[:3]}")
        raise VitfoodError(f"{source}: not a ViT checkpoint matching its config.json: " + "; ".join(parts))
    return ours, has_head  # type: ignore[return-value]


def from_hf_classifier_state_dict(hf: dict[str, torch.Tensor], arch: ViTArch, source: str) -> dict:
    """The exact inverse of `to_hf_state_dict`: our full state, head included, for `ViT.load_state_dict`."""
    backbone, has_head = from_hf_state_dict(hf, arch, source)
    if not has_head or "classifier.bias" not in hf:
        raise VitfoodError(f"{source}: has no classifier head (classifier.weight and classifier.bias)")
    return {**backbone, "head.weight": hf["classifier.weight"], "head.bias": hf["classifier.bias"]}


# ---------------------------------------------------------------- the family: loading

def claims(config: dict) -> bool:
    """`vit` checkpoints (ViTModel, ViTForImageClassification) are this family's; custom-code ones are not."""
    return config.get("model_type", "vit") == "vit" and not config.get("auto_map")


def state_from_folder(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """A checkpoint folder's weights under our own names, for `ViT.load_state_dict` (resuming)."""
    weights = load_hf_weights(folder)
    arch = ViTArch.from_hf_config(config, str(folder / "config.json"))
    return from_hf_classifier_state_dict(weights, arch, str(folder / "model.safetensors"))


def load(model_dir: Path, hf_config: dict, labels: list[str] | None = None, seed: int = 0,
         image_size: int | None = None) -> ViT:
    """Build a ViT from a Hugging Face checkpoint folder (its config.json already read: `hf_config`).

    `labels=None` keeps the checkpoint's own classifier (inference). With `labels`, the head is kept
    only when the checkpoint was trained on exactly those labels in that order, else it is freshly
    initialised from `seed`. `image_size`: another resolution, the position embeddings resized once,
    here (bicubic). Returns the model (float32, CPU, eval mode).
    """
    arch = ViTArch.from_hf_config(hf_config, str(model_dir / "config.json"))
    weights = load_hf_weights(model_dir)
    backbone, has_head = from_hf_state_dict(weights, arch, str(model_dir))
    if image_size is not None and image_size != arch.image_size:
        check_size_multiple(image_size, arch.patch_size, "patch size", "vit")
        backbone["pos_embed"] = resize_position_table(backbone["pos_embed"], 1, image_size // arch.patch_size)
        arch.image_size = image_size
    if labels is None:
        if not has_head or not arch.labels:
            raise VitfoodError(f"{model_dir}: has no trained classifier head (a backbone-only checkpoint); train it first")
        labels = arch.labels
    # Built on the meta device, then the loaded tensors are assigned: no time spent on a random
    # initialisation that would be overwritten at once (a third of infer.py's start for ViT-B).
    with torch.device("meta"):
        model = ViT(arch, num_labels=len(labels))
    missing, unexpected = model.load_state_dict(backbone, strict=False, assign=True)
    assert not unexpected and set(missing) == {"head.weight", "head.bias"}, (missing, unexpected)
    keep_head = has_head and arch.labels == list(labels)
    model.reset_head(len(labels), generator=torch.Generator().manual_seed(seed))
    if keep_head:
        with torch.no_grad():
            model.head.weight.copy_(weights["classifier.weight"])
            model.head.bias.copy_(weights["classifier.bias"])
    assert not any(p.is_meta for p in model.parameters())
    arch.labels = list(labels)
    model.eval()
    return model


def hf_config_for(model: ViT, base_config: dict) -> dict:
    """config.json for `ViTForImageClassification`, keeping every field of the checkpoint we started from."""
    cfg = {k: v for k, v in base_config.items() if k not in ("id2label", "label2id", "num_labels", "_name_or_path")}
    labels = model.arch.labels
    cfg.update(
        architectures=["ViTForImageClassification"],
        model_type="vit",
        id2label={str(i): name for i, name in enumerate(labels)},
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="single_label_classification",
    )
    cfg["image_size"] = model.arch.image_size  # --image-size changes it
    cfg.setdefault("patch_size", model.arch.patch_size)
    return cfg
