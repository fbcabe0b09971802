"""The `hf` family: every image classifier of transformers other than ViT, through its own classes.

`AutoModelForImageClassification` maps ~40 model types (DeiT, BEiT, DINOv2, SigLIP, CLIP, ConvNeXt, Swin, ResNet,
EfficientNet, MobileViT, ...). This adapter loads any of them, from a classification checkpoint or a backbone-only
one (Dinov2Model, SiglipVisionModel, CLIPVisionModel, ...), gives it a head for the dataset's labels, and presents
it to vitfood as an `ImageClassifier` (base.py): logits out, parameter roles, compile units, Hugging Face files.
The files it saves are what transformers' own `save_pretrained` writes, so `from_pretrained`, `pipeline()` and
infer.py load them.

Imported only for these families: infer.py on a `vit` model never imports transformers.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from vitfood.errors import VitfoodError, first_line
from vitfood.fileio import read_json
from vitfood.models.base import (PREPROCESSOR_NAME, ParamRole, check_size_multiple, has_batchnorm, labels_of,
                                 no_weight_decay, processor_output_size, resize_position_table, roles_by_units)

NAME = "hf"

# Learned absolute position tables that --image-size resizes: model type -> (the table's name ending in the
# model's state dict, the prefix tokens before the patch grid: CLS, distillation).
POSITION_TABLES = {
    "deit": ("embeddings.position_embeddings", 2),
    "dinov2": ("embeddings.position_embeddings", 1),
    "dinov2_with_registers": ("embeddings.position_embeddings", 1),
    "vit_msn": ("embeddings.position_embeddings", 1),
    "ijepa": ("embeddings.position_embeddings", 0),
    "siglip": ("embeddings.position_embedding.weight", 0),
    "siglip2": None,  # NaFlex: positions resized by the model itself, per image
    "clip": ("embeddings.position_embedding.weight", 1),
    "metaclip_2": ("embeddings.position_embedding.weight", 1),
}
# Types whose forward interpolates the position table to any input size: trained at their processor's size.
_INTERPOLATED = {"dinov2", "dinov2_with_registers"}
# Position information a load-time resize cannot carry over (yet): refused with --image-size, in one line.
_SIZE_REFUSED = {"beit": "relative position bias tables", "data2vec-vision": "relative position bias tables",
                 "hiera": "position embeddings per unit", "levit": "attention biases per resolution",
                 "perceiver": "its fixed latent positions", "imagegpt": "its pixel vocabulary"}


def claims(config: dict) -> bool:
    """Every checkpoint the `vit` family leaves: unsupported types are refused, in one line, by `load`."""
    return True


def _mapping() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return dict(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def supported_types() -> list[str]:
    return sorted(_mapping())


def classification_type(config: dict, source: str) -> str:
    """The model type whose classification class takes this checkpoint: its own, or for a vision tower saved
    alone (`siglip_vision_model`, `clip_vision_model`) the model it belongs to. One line naming it otherwise."""
    import transformers

    mapping, model_type = _mapping(), str(config.get("model_type"))
    if model_type in mapping:
        return model_type
    parent = model_type.removesuffix("_vision_model")
    if parent != model_type and parent in mapping:
        return parent
    raise VitfoodError(f"{source}: model_type is {config.get('model_type')!r}, which has no image-classification "
                       f"class in transformers {transformers.__version__}; supported: vit (vitfood's own), "
                       + ", ".join(t for t in sorted(mapping) if t != "vit"))


def _config_object(model_dir: Path, config: dict, target_type: str, trust_remote_code: bool):
    """transformers' config for the classification class: the checkpoint's own, or its parent's around a vision
    tower saved alone."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    if config.get("model_type") != target_type and "auto_map" not in config:
        parent = CONFIG_MAPPING[target_type](vision_config=cfg.to_dict())
        parent.id2label, parent.label2id = cfg.id2label, cfg.label2id
        cfg = parent
    return cfg


def _vision_config(cfg):
    return getattr(cfg, "vision_config", None) or cfg


def _model_class(target_type: str, config: dict, trust_remote_code: bool):
    import transformers

    if "auto_map" in config and trust_remote_code:
        return transformers.AutoModelForImageClassification
    names = _mapping()[target_type]  # DeiT maps to two: the plain classifier first, then the distilled one
    return getattr(transformers, names[0] if isinstance(names, tuple) else names)


def load(model_dir: Path, config: dict, labels: list[str] | None = None, seed: int = 0,
         image_size: int | None = None, trust_remote_code: bool = False) -> "HFClassifier":
    """Any checkpoint of a type AutoModelForImageClassification maps, as an `ImageClassifier` (float32, CPU, eval).

    `labels=None` keeps the checkpoint's own head (inference). With `labels`, the head is kept only when the
    checkpoint has one trained on exactly those labels in that order; otherwise a new one, whatever the model
    calls it, made by transformers for len(labels) classes and initialised from `seed` (N(0, initializer_range)
    weights, zero biases, unit norms). Every backbone tensor must load: a missing one is an error, never a silently
    re-initialised layer. `image_size`: learned position tables resized once, here (bicubic).
    """
    source = str(model_dir / "config.json")
    custom = "auto_map" in config and trust_remote_code  # its own classes, named by its config (registry checked)
    target_type = str(config.get("model_type")) if custom else classification_type(config, source)
    cfg = _config_object(model_dir, config, target_type, trust_remote_code)
    saved_labels = labels_of(config, source)
    inference = labels is None
    if inference:
        if not saved_labels:
            raise VitfoodError(f"{model_dir}: has no trained classifier head (a backbone-only checkpoint); train it first")
        labels = saved_labels
    keep_head = saved_labels == list(labels)
    cfg.num_labels = len(labels)
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {name: i for i, name in enumerate(labels)}
    cls = _model_class(target_type, config, trust_remote_code)
    with _quiet_transformers():
        try:
            if config.get("model_type") != target_type and "auto_map" not in config:
                net, missing = _around_vision_tower(model_dir, cls, cfg)
            else:
                net, info = cls.from_pretrained(model_dir, config=cfg, dtype=torch.float32,
                                                ignore_mismatched_sizes=True, output_loading_info=True,
                                                local_files_only=True, trust_remote_code=trust_remote_code)
                missing = set(info.get("missing_keys") or ()) | {k for k, *_ in info.get("mismatched_keys") or ()}
        except VitfoodError:
            raise
        except Exception as e:  # pickled code refused by weights_only, a corrupt file, a config it cannot build
            raise VitfoodError(f"{model_dir}: transformers cannot load it as {cls.__name__} "
                               f"({first_line(e, 200)})") from None
    head = head_parameter_names(net)
    backbone_missing = sorted(k for k in missing if k not in head)
    if backbone_missing:
        raise VitfoodError(f"{model_dir}: not a {target_type} checkpoint matching its config.json: missing "
                           f"{len(backbone_missing)} backbone tensor(s), e.g. {backbone_missing[:3]}")
    head_loaded = not (missing & head)
    if not (keep_head and head_loaded):
        if inference:
            raise VitfoodError(f"{model_dir}: has no trained classifier head (a backbone-only checkpoint); train it first")
        reset_head(net, seed)
    processor_file = model_dir / PREPROCESSOR_NAME
    processor_size = processor_output_size(read_json(processor_file)) if processor_file.is_file() else None
    if image_size is None and target_type in _INTERPOLATED and processor_size:
        # DINOv2's config says 518 px while its processor crops 224: the model would interpolate its position
        # table on every forward; resized once here, to the processor's size, it need not.
        image_size = processor_size
    if image_size is not None:
        net = _at_image_size(net, cls, target_type, image_size)
    model = HFClassifier(net, str(config.get("model_type")), target_type, list(labels))
    if model.image_size is None:  # no learned position table: the size its processor gives
        model.image_size = image_size or processor_size
    model.eval()
    return model


def _around_vision_tower(model_dir: Path, cls, cfg) -> tuple[nn.Module, set[str]]:
    """A vision tower saved alone (CLIPVisionModel, SiglipVisionModel): loaded by its own class, which knows its
    file's key names, into the classification model's `vision_model`. Returns (model, keys left unloaded)."""
    from transformers import AutoModel

    tower = AutoModel.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    net = cls(cfg)
    result = net.vision_model.load_state_dict(tower.state_dict(), strict=False)
    if result.unexpected_keys:
        raise VitfoodError(f"{model_dir}: its vision tower does not fit {cls.__name__}: unexpected "
                           f"{sorted(result.unexpected_keys)[:3]}")
    head = head_parameter_names(net)
    return net, {f"vision_model.{k}" for k in result.missing_keys} | head


@contextlib.contextmanager
def _quiet_transformers():
    """from_pretrained reports the new head's weights as newly initialised and a full SigLIP's text tower as unused:
    both expected here, and checked above; its other warnings still show."""
    from transformers.utils import logging

    before, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # "Loading weights" bars: noise in a training run's output
    try:
        yield
    finally:
        logging.set_verbosity(before)
        if bars:
            logging.enable_progress_bar()


_BACKBONE_ATTRS = ("vision_model", "model", "backbone", "timm_model")


def head_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The classification head, whatever the model calls it: the top-level parts that are not the backbone
    (`net.base_model`, or the vision tower of SigLIP and CLIP)."""
    base = net.base_model
    return [(name, m) for name, m in net.named_children()
            if m is not base and name not in _BACKBONE_ATTRS and any(True for _ in m.parameters())]


def head_parameter_names(net: nn.Module) -> set[str]:
    return {f"{name}.{p}" for name, m in head_modules(net) for p, _ in m.named_parameters()}


@torch.no_grad()
def reset_head(net: nn.Module, seed: int) -> None:
    """A new head, the same for the same seed: Linear weights N(0, initializer_range), biases zero, norms one."""
    g = torch.Generator().manual_seed(seed)
    std = float(getattr(net.config, "initializer_range", 0.02) or 0.02)
    for _, head in head_modules(net):
        for m in head.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if m.bias is not None:  # LayerNorm(bias=False) has none
                    m.bias.zero_()


def _at_image_size(net: nn.Module, cls, target_type: str, size: int) -> nn.Module:
    """The model rebuilt at `size` x `size`: learned position tables resized (bicubic), config.image_size set."""
    vision = _vision_config(net.config)
    old = vision.image_size if isinstance(getattr(vision, "image_size", None), int) else None
    if old == size:
        return net
    if target_type in _SIZE_REFUSED:
        raise VitfoodError(f"--image-size {size}: vitfood does not resize {target_type}'s "
                           f"{_SIZE_REFUSED[target_type]}; fine-tune it at its own size ({old})")
    patch = getattr(vision, "patch_size", None)
    if isinstance(patch, int):
        check_size_multiple(size, patch, "patch size", target_type)
    table = POSITION_TABLES.get(target_type)
    if table is None:  # no learned absolute table: the model takes the size as it is
        if target_type not in POSITION_TABLES and any("position_embedding" in k for k, _ in net.named_parameters()):
            raise VitfoodError(f"--image-size {size}: vitfood does not resize {target_type}'s position embeddings; "
                               f"fine-tune it at its own size ({old})")
        if old is not None:
            vision.image_size = size
        return net
    state = net.state_dict()
    suffix, prefix_tokens = table
    keys = [k for k in state if k.endswith(suffix)]
    if len(keys) != 1:
        raise VitfoodError(f"--image-size: no single {suffix} in this {target_type} model")
    state[keys[0]] = resize_position_table(state[keys[0]], prefix_tokens, size // patch)
    vision.image_size = size
    rebuilt = cls(net.config)  # the new size's buffers (position ids, ...) made the model's own way
    rebuilt.load_state_dict(state, strict=True)
    return rebuilt


class HFClassifier(nn.Module):
    """A transformers image classifier as vitfood's `ImageClassifier`: pixels in, logits out."""

    family = NAME

    def __init__(self, net: nn.Module, model_type: str, target_type: str, labels: list[str]):
        super().__init__()
        self.net = net
        self.model_type = target_type  # what it is trained and saved as (siglip for a siglip_vision_model tower)
        self.loaded_type = model_type
        self.labels = labels
        vision = _vision_config(net.config)
        size = getattr(vision, "image_size", None)
        fixed = target_type in POSITION_TABLES or target_type in _SIZE_REFUSED
        self.image_size = int(size) if fixed and isinstance(size, int) else None  # None: the processor's size
        self.has_batchnorm = has_batchnorm(net)
        self._units = _repeated_blocks(net)

    @property
    def display_name(self) -> str:
        return f"{type(self.net).__name__.removesuffix('ForImageClassification')} (transformers)"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=pixels).logits

    def parameter_roles(self) -> list[ParamRole]:
        """Layer ids by repeated block; without repeated blocks (convolutional stages of different widths) the
        backbone is layer 0 and the head layer 1."""
        if self._units:
            return roles_by_units(self, self._units)
        head = {f"net.{name}" for name in head_parameter_names(self.net)}
        return [ParamRole(r.name, r.param, r.decay, 1 if r.name in head else 0) for r in roles_by_units(self, [])]

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        return no_weight_decay(name, param)

    def compile_units(self) -> list[nn.Module]:
        return self._units or [self.net]

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Under the file names transformers' save_pretrained writes (5.x renames some modules in memory)."""
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(self.net, self.net.state_dict())
        return {k: v.detach().contiguous().clone() for k, v in state.items()}

    def hf_config(self, base_config: dict) -> dict:
        """transformers' own config.json for the model (its labels and image size included); `base_config` is
        not needed: the model's config object already holds every field of the checkpoint it came from."""
        cfg = self.net.config.to_diff_dict()
        cfg.pop("_name_or_path", None)
        cfg.update(architectures=[type(self.net).__name__], problem_type="single_label_classification",
                   id2label={str(i): name for i, name in enumerate(self.labels)},
                   label2id={name: i for i, name in enumerate(self.labels)})
        return cfg

    def processor_config(self, prep_config: dict) -> dict:
        return prep_config


def _repeated_blocks(net: nn.Module) -> list[nn.Module]:
    """The blocks torch.compile compiles one by one: the instances of the model's own unit of splitting
    (`_no_split_modules`: ViTLayer, Dinov2Layer, ...) when there are several, all of one shape, so that one
    compilation serves them all. Convolutional stages of different widths would each recompile: the whole
    model is compiled instead ([])."""
    names = set(getattr(net, "_no_split_modules", None) or ())
    best: list[nn.Module] = []
    for cls_name in names:
        found = [m for m in net.modules() if type(m).__name__ == cls_name]
        shapes = {tuple((n, tuple(p.shape)) for n, p in m.named_parameters()) for m in found}
        if len(found) >= 2 and len(shapes) == 1 and len(found) > len(best):
            best = found
    return best


def state_from_folder(folder: Path, config: dict, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint folder's weights as `HFClassifier.load_state_dict` takes them (for resuming)."""
    model = load(folder, config, labels=None, trust_remote_code=trust_remote_code)
    return model.state_dict()
