"""preprocessor_config.json <-> Preprocessing's fields: transformers' image processors, option by option.

vitfood reproduces, to the pixel, the image processors of the families it trains: what transformers'
`AutoImageProcessor` (its default torchvision backend) gives for the same file. `_PROCESSORS` holds each
one's class defaults (transformers fills the options a file leaves out from them), checked against
transformers in tests/test_preprocess.py. An option, or a value, vitfood would not reproduce is one
VitfoodError naming it and the file: never silently different pixels. No transformers import: infer.py
reads checkpoints without it. It deals in Preprocessing's fields (dicts) and reads a Preprocessing only by
its attributes, so that vitfood.preprocess imports it and not the other way round.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from PIL import Image

from vitfood.errors import VitfoodError

if TYPE_CHECKING:
    from vitfood.preprocess import Preprocessing

_HALF = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN and _STD
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # OPENAI_CLIP_STD
_BASE = dict(resample=Image.Resampling.BICUBIC, image_mean=_HALF, image_std=_HALF, default_to_square=True,
             crop_size=None, do_resize=True, do_center_crop=None, do_rescale=True, rescale_factor=1 / 255,
             do_normalize=True)
_SHORTEST = dict(size={"shortest_edge": 224}, default_to_square=False, crop_size={"height": 224, "width": 224},
                 do_center_crop=True)

# Type -> (its kind, its class defaults). The kinds: "base": resize, optional centre crop, rescale, normalise,
# do_pad; "nopad": the same, do_pad ignored; "convnext": crop_pct's resize and crop, do_pad ignored;
# "efficientnet": the rescale offset and include_top, do_pad ignored; "mobilevit": BGR, never normalised.
_PROCESSORS: dict[str, tuple[str, dict]] = {
    "ViTImageProcessor": ("base", {**_BASE, "resample": Image.Resampling.BILINEAR,
                                   "size": {"height": 224, "width": 224}}),
    "DeiTImageProcessor": ("base", {**_BASE, "size": {"height": 256, "width": 256},
                                    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True}),
    "BeitImageProcessor": ("nopad", {**_BASE, "size": {"height": 224, "width": 224},
                                     "crop_size": {"height": 224, "width": 224}, "do_center_crop": False}),
    "BitImageProcessor": ("base", {**_BASE, **_SHORTEST, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD}),
    "CLIPImageProcessor": ("base", {**_BASE, **_SHORTEST, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD}),
    "SiglipImageProcessor": ("base", {**_BASE, "size": {"height": 224, "width": 224}, "default_to_square": False}),
    "ConvNextImageProcessor": ("convnext", {**_BASE, "size": {"shortest_edge": 384}, "default_to_square": False,
                                            "crop_pct": 224 / 256}),
    "EfficientNetImageProcessor": ("efficientnet", {**_BASE, "size": {"height": 346, "width": 346},
                                                    "crop_size": {"height": 289, "width": 289},
                                                    "do_center_crop": False, "rescale_offset": False,
                                                    "include_top": True}),
    "MobileViTImageProcessor": ("mobilevit", {**_BASE, **_SHORTEST, "crop_size": {"height": 256, "width": 256},
                                              "do_normalize": None, "do_flip_channel_order": True}),
    "MobileNetV1ImageProcessor": ("base", {**_BASE, **_SHORTEST, "resample": Image.Resampling.BILINEAR,
                                           "size": {"shortest_edge": 256}}),
    "MobileNetV2ImageProcessor": ("nopad", {**_BASE, **_SHORTEST, "resample": Image.Resampling.BILINEAR,
                                            "size": {"shortest_edge": 256}}),
}
# config.json's model_type -> the processor AutoImageProcessor takes when the file names none.
MODEL_TYPE_PROCESSOR = {
    "vit": "ViTImageProcessor", "vit_msn": "ViTImageProcessor", "vit_mae": "ViTImageProcessor",
    "ijepa": "ViTImageProcessor", "swin": "ViTImageProcessor", "swinv2": "ViTImageProcessor",
    "dinat": "ViTImageProcessor", "swiftformer": "ViTImageProcessor", "deit": "DeiTImageProcessor",
    "beit": "BeitImageProcessor", "data2vec-vision": "BeitImageProcessor", "dinov2": "BitImageProcessor",
    "bit": "BitImageProcessor", "hiera": "BitImageProcessor", "focalnet": "BitImageProcessor",
    "clip": "CLIPImageProcessor", "metaclip_2": "CLIPImageProcessor", "siglip": "SiglipImageProcessor",
    "convnext": "ConvNextImageProcessor", "convnextv2": "ConvNextImageProcessor", "resnet": "ConvNextImageProcessor",
    "regnet": "ConvNextImageProcessor", "cvt": "ConvNextImageProcessor", "efficientnet": "EfficientNetImageProcessor",
    "mobilevit": "MobileViTImageProcessor", "mobilevitv2": "MobileViTImageProcessor",
    "mobilenet_v1": "MobileNetV1ImageProcessor", "mobilenet_v2": "MobileNetV2ImageProcessor",
}
# Every option of those processors is read, or changes nothing in the pixels of an RGB picture: vitfood
# decodes every picture to RGB (EXIF applied), as the pipeline's load_image does, and the processors'
# _preprocess reads no data_format. Other keys are no option of the type: transformers ignores them too.
OPTIONS_READ = {"do_resize", "size", "default_to_square", "resample", "do_center_crop", "crop_size", "do_rescale",
                "rescale_factor", "do_normalize", "image_mean", "image_std", "do_pad", "pad_size", "crop_pct",
                "rescale_offset", "include_top", "do_flip_channel_order", "use_square_size",
                "image_processor_type", "feature_extractor_type", "auto_map"}
OPTIONS_WITHOUT_PIXEL_EFFECT = {"do_convert_rgb", "data_format", "input_data_format", "device", "return_tensors",
                                "disable_grouping", "image_seq_length", "do_reduce_labels", "processor_class"}
# Pillow's filters 0-5 (nearest, Lanczos, bilinear, bicubic, box, hamming); not Pillow 13's Magic Kernel ones.
_FILTERS = {int(f) for f in (Image.Resampling.NEAREST, Image.Resampling.LANCZOS, Image.Resampling.BILINEAR,
                             Image.Resampling.BICUBIC, Image.Resampling.BOX, Image.Resampling.HAMMING)}
_CONVNEXT_WARP = 384  # ConvNextImageProcessor: from this shortest_edge up it squashes, without crop_pct


def processor_type(cfg: dict, source: str, model_type: str | None = None) -> str:
    """The processor a preprocessor_config.json asks for, as AutoImageProcessor resolves it: its
    image_processor_type (a legacy ...Fast or ...FeatureExtractor name mapped), else model_type's."""
    if "AutoImageProcessor" in (cfg.get("auto_map") or {}):
        raise VitfoodError(f"{source}: auto_map: a custom image processor (code from the checkpoint), "
                           "whose pixels vitfood cannot reproduce")
    name = cfg.get("image_processor_type") or (cfg.get("feature_extractor_type") or "").replace(
        "FeatureExtractor", "ImageProcessor")
    name = name[:-4] if name.endswith("Fast") else name
    if not name:
        name = MODEL_TYPE_PROCESSOR.get(model_type or "vit", "")
        if not name:
            raise VitfoodError(f"{source}: no image_processor_type, and model_type {model_type!r} has no image "
                               f"processor vitfood reproduces (types: {', '.join(sorted(MODEL_TYPE_PROCESSOR))})")
    if name not in _PROCESSORS:
        raise VitfoodError(f"{source}: image_processor_type {name!r}: vitfood does not reproduce its pixels "
                           f"(it does: {', '.join(_PROCESSORS)})")
    return name


def read_processor(cfg: dict, source: str = "preprocessor_config.json", model_type: str | None = None) -> dict:
    """A preprocessor_config.json dict -> the fields of the Preprocessing that gives its processor's pixels."""
    name = processor_type(cfg, source, model_type)
    kind, defaults = _PROCESSORS[name]

    def opt(key):  # transformers: an option missing or null takes the class default
        value = cfg.get(key)
        return defaults.get(key) if value is None else value

    def refuse(key, why):
        return VitfoodError(f"{source}: {key} {opt(key)!r}: {why} ({name}); vitfood would give other pixels")

    def positive(key):
        value = opt(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise refuse(key, "expected a number > 0")
        return float(value)

    if name == "CLIPImageProcessor" and cfg.get("use_square_size"):  # its __init__ reads it
        raise refuse("use_square_size", "CLIP's KOSMOS-2 square resize is not reproduced")
    if not opt("do_resize"):
        raise refuse("do_resize", "pictures would keep their own sizes")
    resample = opt("resample")
    if not isinstance(resample, int) or isinstance(resample, bool) or resample not in _FILTERS:
        raise refuse("resample", "not one of the filters transformers resizes with (0-5)")
    size = _size_dict(opt("size"), bool(opt("default_to_square")), "size", source)
    mean, std = _channels(opt("image_mean"), "image_mean", source), _channels(opt("image_std"), "image_std", source)
    if min(std) <= 0:
        raise refuse("image_std", "needs values > 0")
    rescale = positive("rescale_factor") if opt("do_rescale") else 1.0
    fields = dict(processor=name, mean=mean, std=std, resample=resample, rescale_factor=rescale,
                  do_normalize=bool(opt("do_normalize")))
    center_crop = bool(opt("do_center_crop"))
    crop = _size_dict(opt("crop_size"), True, "crop_size", source) if center_crop else None
    if center_crop and set(crop) != {"height", "width"}:
        raise refuse("crop_size", "a centre crop needs height and width")

    if kind == "convnext":
        if set(size) != {"shortest_edge"}:
            raise refuse("size", "ConvNeXt's resize takes shortest_edge only")
        if center_crop:
            raise refuse("do_center_crop", "a second centre crop after crop_pct's is not reproduced")
        crop_pct = positive("crop_pct")
        return {**fields, "crop_pct": crop_pct, **_convnext(crop_pct, size["shortest_edge"], source)}

    if kind == "efficientnet":
        fields.update(rescale_offset=bool(opt("rescale_offset")) and bool(opt("do_rescale")),
                      include_top=bool(opt("include_top")))
    if kind == "mobilevit":  # MobileViT's processors never normalise, whatever do_normalize says
        fields.update(do_normalize=False, flip_channel_order=bool(opt("do_flip_channel_order")))
    if set(size) == {"height", "width"}:
        shortest, resized = None, (size["height"], size["width"])
    elif set(size) == {"shortest_edge"}:
        shortest, resized = size["shortest_edge"], None
        if not center_crop:
            raise refuse("size", "shortest_edge without do_center_crop gives pictures of their own aspect ratio")
    else:
        raise refuse("size", f"only height/width or shortest_edge resizes are reproduced, not {sorted(size)}")
    height, width = (crop["height"], crop["width"]) if center_crop else resized
    if kind == "base" and opt("do_pad") and opt("pad_size") is not None:
        pad = _size_dict(opt("pad_size"), True, "pad_size", source)
        if (pad.get("height"), pad.get("width")) != (height, width):
            raise refuse("do_pad", f"padding to {pad} is not reproduced")
    if resized is not None and resized == (height, width):
        resized = None  # a crop of the whole picture
    return dict(height=height, width=width, shortest_edge=shortest, resize_height=resized and resized[0],
                resize_width=resized and resized[1], **fields)


def _convnext(crop_pct: float, shortest_edge: int, source: str) -> dict:
    """The size fields of ConvNextImageProcessor at `shortest_edge` s: below 384, the shortest edge to
    int(s / crop_pct), then a centre crop to s x s; from 384 up, squashed to s x s."""
    if shortest_edge >= _CONVNEXT_WARP:
        return dict(height=shortest_edge, width=shortest_edge, shortest_edge=None)
    resize_to = int(shortest_edge / crop_pct)
    if resize_to < 1:
        raise VitfoodError(f"{source}: crop_pct {crop_pct}: resizes to nothing at {shortest_edge}")
    return dict(height=shortest_edge, width=shortest_edge, shortest_edge=resize_to)


def _size_dict(value, default_to_square: bool, key: str, source: str) -> dict:
    """transformers' get_size_dict: an int is a square or, where the processor does not default to square,
    a shortest edge; a pair is (height, width). Every value a positive int."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    elif isinstance(value, dict):
        value = {k: v for k, v in value.items() if v is not None}
    if not isinstance(value, dict) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()):
        raise VitfoodError(f"{source}: {key} {value!r}: expected a positive int, a pair or a dict of them")
    return dict(value)


def _channels(value, key: str, source: str) -> tuple[float, float, float]:
    """image_mean / image_std: three numbers, or one for all channels (transformers broadcasts it)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise VitfoodError(f"{source}: {key} {value!r}: expected 3 numbers (one per RGB channel)")
    return tuple(float(v) for v in value)


def write_processor(prep: Preprocessing) -> dict:
    """The preprocessor_config.json of `prep`'s processor type that gives its pixels in transformers."""
    kind = _PROCESSORS.get(prep.processor, ("base", {}))[0]
    out = {
        "image_processor_type": prep.processor,
        "do_resize": True,
        "resample": int(prep.resample),
        "do_rescale": prep.rescale_factor != 1.0 or prep.rescale_offset,
        "rescale_factor": prep.rescale_factor,
        "do_normalize": prep.do_normalize,
        "image_mean": list(prep.mean),
        "image_std": list(prep.std),
    }
    if kind == "convnext":
        return {**out, "size": {"shortest_edge": prep.height}, "crop_pct": prep.crop_pct, "do_center_crop": False}
    if kind == "efficientnet":
        out.update(rescale_offset=prep.rescale_offset, include_top=prep.include_top)
    if kind == "mobilevit":
        out.update(do_flip_channel_order=prep.flip_channel_order)
    if prep.shortest_edge is not None:
        size = {"shortest_edge": prep.shortest_edge}
    else:
        size = {"height": prep.resize_height or prep.height, "width": prep.resize_width or prep.width}
    crop = prep.shortest_edge is not None or (prep.resize_height or prep.height, prep.resize_width or prep.width) != (
        prep.height, prep.width)
    out.update(size=size, do_center_crop=crop)
    if crop:
        out["crop_size"] = {"height": prep.height, "width": prep.width}
    return out


def processor_at_size(prep: Preprocessing, size: int) -> dict:
    """Preprocessing.at_size's changed fields: the model's input `size` x `size`, the resize before the crop
    in proportion."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise VitfoodError(f"image size {size!r}: expected a positive number of pixels")
    if prep.height != prep.width:
        raise VitfoodError(f"image size {size}: the checkpoint's processor makes {prep.height}x{prep.width} "
                           "pictures, not squares; vitfood resizes only square inputs")
    old = prep.height
    if prep.crop_pct is not None:
        return _convnext(prep.crop_pct, size, f"image size {size}")

    def scaled(n):  # floor, as timm's int(size / crop_pct): 256 at 224 -> 438 at 384
        return None if n is None else max(1, n * size // old)

    return dict(height=size, width=size, shortest_edge=scaled(prep.shortest_edge),
                resize_height=scaled(prep.resize_height), resize_width=scaled(prep.resize_width))
