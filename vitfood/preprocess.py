"""Image decoding and the checkpoint's preprocessing, shared by training, evaluation and inference.

Everything here works on PIL images and uint8 arrays; the float conversion and normalisation
happen on the device, in `Preprocessing.normalize`, so DataLoader workers only decode and resize.
No torchvision or transformers import: `infer.py` stays quick to start.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from vitfood.errors import VitfoodError
from vitfood.processor_config import processor_at_size, read_processor, write_processor

# The guide's ViT image processor defaults, used for fields a preprocessor_config.json leaves out.
_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)
_EXIF_ORIENTATION = 0x0112
# Pillow filter -> torch's uint8 resize: the kernels transformers' default (torchvision) image processors call.
# BOX and HAMMING have none in torch (transformers' torchvision processors fail on them); they stay with Pillow,
# which is what transformers' PIL processors call.
_TORCH_FILTERS = {Image.Resampling.NEAREST: "nearest-exact", Image.Resampling.BILINEAR: "bilinear",
                  Image.Resampling.BICUBIC: "bicubic", Image.Resampling.LANCZOS: "lanczos"}
# The filters infer.py's GPU decoder resizes with as the CPU path does (gpu_decode._TORCH_MODE).
_GPU_FILTERS = {Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC}


class BadImageError(VitfoodError):
    """A file that is not a readable image: missing, empty, truncated, corrupt, or a decompression bomb."""


@dataclass(frozen=True)
class Preprocessing:
    """What the checkpoint's image processor does: resize, centre-crop, rescale, normalise, channel order.

    The fields are the transformers image processor's options (vitfood.processor_config reads and writes
    them); `height` x `width` is always the model's input, the size training crops are made at too.
    """

    height: int
    width: int
    mean: tuple[float, ...] = _DEFAULT_MEAN
    std: tuple[float, ...] = _DEFAULT_STD
    resample: int = Image.Resampling.BILINEAR
    shortest_edge: int | None = None  # resize the shortest edge to it (aspect kept), then centre-crop
    do_normalize: bool = True
    rescale_factor: float = 1 / 255  # 1.0: do_rescale false
    processor: str = "ViTImageProcessor"  # the image_processor_type written back
    # {"height", "width"} resize then a centre crop to height x width (DeiT's 256 -> 224); None: no crop.
    resize_height: int | None = None
    resize_width: int | None = None
    crop_pct: float | None = None  # ConvNextImageProcessor's: shortest_edge = int(height / crop_pct) below 384
    rescale_offset: bool = False  # EfficientNet's: x * rescale_factor - 1
    include_top: bool = False  # EfficientNet's: divided by std a second time
    flip_channel_order: bool = False  # MobileViT's: BGR

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "preprocessor_config.json",
                     model_type: str | None = None) -> "Preprocessing":
        """A preprocessor_config.json's options; one that vitfood would not reproduce to the pixel is a
        VitfoodError naming it. `model_type` (config.json's) names the processor when the file does not."""
        return cls(**read_processor(cfg, source, model_type))

    def to_hf_dict(self) -> dict:
        """The preprocessor_config.json of the checkpoint's own processor type: transformers' AutoImageProcessor
        and pipeline() load it and give the same pixels."""
        return write_processor(self)

    def at_size(self, size: int) -> "Preprocessing":
        """The same preprocessing for a model fine-tuned at `size` x `size` (--image-size): the crop becomes
        `size`, the resize before it keeps its proportion to the crop (DINOv2's 256 -> 224 becomes
        256 * 384 // 224 = 438 -> 384; ConvNeXt keeps its crop_pct, and from 384 up squashes as its processor
        does). to_hf_dict() then carries the new size."""
        return replace(self, **processor_at_size(self, size))

    @property
    def gpu_resizable(self) -> bool:
        """Whether infer.py's GPU decoder resizes as eval_resize does (its filter has a GPU counterpart)."""
        return self.resample in _GPU_FILTERS

    # -- on the worker: PIL image -> uint8 HWC array of the model's size

    def resize_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(resized width, resized height, crop left, crop top) for a picture of that size, as the
        checkpoint's image processor: to a fixed size, or its shortest edge, then a centre crop to the
        model's size. The CPU path (eval_resize) and the GPU path (gpu_decode) both resize by it."""
        if self.shortest_edge is None:
            rw, rh = self.resize_width or self.width, self.resize_height or self.height
        else:
            # transformers' arithmetic to the pixel: the long side truncated, not rounded (1000 x 700 -> 365 x 256).
            short, long = min(width, height), max(width, height)
            new_long = max(1, int(self.shortest_edge * long / short))
            rw, rh = (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)
        return rw, rh, _crop_offset(rw, self.width), _crop_offset(rh, self.height)

    def eval_resize(self, img: Image.Image) -> np.ndarray:
        """Deterministic: an RGB picture -> uint8 HWC of the model's size, as the checkpoint's image processor.

        Nearest, bilinear, bicubic and Lanczos run through torch's resize on uint8 (antialiased but nearest):
        the kernels transformers' default (torchvision) image processors call, so the pixels equal the
        pipeline's (Pillow's own resize is off by a level or more on many pixels), in about a third of
        Pillow's time. BOX and HAMMING stay with Pillow, as transformers' PIL processors do. (On an x86 CPU
        without AVX2, torchvision resizes bilinear through float32 instead: a level apart on a few pixels.)
        """
        rw, rh, left, top = self.resize_box(*img.size)
        mode = _TORCH_FILTERS.get(self.resample)
        if mode is None:
            pixels = np.asarray(img.resize((rw, rh), self.resample), dtype=np.uint8)
        else:
            pixels = np.array(img, dtype=np.uint8)  # writable: torch.from_numpy refuses read-only memory
            if (rw, rh) != img.size:
                # HWC memory seen as NCHW is channels-last: torch's vectorised uint8 path, no transposing copy.
                x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
                smooth = {} if mode == "nearest-exact" else {"antialias": True, "align_corners": False}
                x = torch.nn.functional.interpolate(x, size=(rh, rw), mode=mode, **smooth)
                pixels = x[0].permute(1, 2, 0).numpy()
        if (rw, rh) != (self.width, self.height):
            pixels = _crop_or_pad(pixels, left, top, self.width, self.height)
        return np.ascontiguousarray(pixels)

    # -- on the device: uint8 batch -> normalised float batch

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [B, H, W, 3] RGB (as the workers deliver it) -> the model's input [B, 3, H, W] in `dtype`.

        Rescale (with EfficientNet's offset), normalise (EfficientNet's include_top: by std twice) or not,
        in the processor's channel order (MobileViT's BGR). Channels-last: no copy is made for the permute.
        """
        x = batch.permute(0, 3, 1, 2)
        if self.flip_channel_order:
            x = x.flip(1)
        scale, shift = _normalize_constants(self, x.device)
        # Every step is per-channel affine: folded into one multiply-add per element.
        return torch.addcmul(shift, x.float(), scale).to(dtype)


@functools.lru_cache(maxsize=16)
def _normalize_constants(prep: Preprocessing, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a new tensor per batch would be a blocking host-to-GPU copy each step."""
    scale, shift = [prep.rescale_factor] * 3, [-1.0 if prep.rescale_offset else 0.0] * 3
    if prep.do_normalize:
        scale = [a / s for a, s in zip(scale, prep.std)]
        shift = [(b - m) / s for b, m, s in zip(shift, prep.mean, prep.std)]
    if prep.include_top:
        scale, shift = [a / s for a, s in zip(scale, prep.std)], [b / s for b, s in zip(shift, prep.std)]
    return torch.tensor(scale, device=device).view(1, 3, 1, 1), torch.tensor(shift, device=device).view(1, 3, 1, 1)


def _crop_offset(size: int, crop: int) -> int:
    """Where transformers' (torchvision) centre crop starts: int((size - crop) / 2) inside the picture;
    a crop larger than the picture pads (crop - size) // 2 before it. (Its PIL processors pad one more
    on an odd difference; the torchvision ones are AutoImageProcessor's default.)"""
    return (size - crop) // 2 if size >= crop else -((crop - size) // 2)


def _crop_or_pad(pixels: np.ndarray, left: int, top: int, width: int, height: int) -> np.ndarray:
    """The width x height box at (left, top) of a uint8 HWC array, black where it lies outside, as PIL's crop."""
    h, w = pixels.shape[:2]
    out = np.zeros((height, width, pixels.shape[2]), dtype=np.uint8)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + width, w), min(top + height, h)
    if x1 > x0 and y1 > y0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = pixels[y0:y1, x0:x1]
    return out


def open_image(src) -> Image.Image:
    """Open a path, bytes or file object lazily (header only), refusing decompression bombs.

    The pixels are decoded by `to_rgb`; in between a caller may ask for a reduced-size decode
    (`Image.draft`) when it will shrink the picture anyway.
    """
    name = str(src) if isinstance(src, (str, Path)) else "<image bytes>"
    try:
        with warnings.catch_warnings():
            # PIL's own policy: beyond twice MAX_IMAGE_PIXELS (179 MP) it refuses; between 89 MP and 179 MP it
            # only warns, and such pictures (100 MP+ phone photos) are real: decode them, quietly.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(src, (bytes, bytearray, memoryview)):
                src = io.BytesIO(src)
            return Image.open(src)
    except FileNotFoundError:
        raise BadImageError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise BadImageError(f"{name}: is a directory, not an image") from None
    except Image.DecompressionBombError as e:
        raise BadImageError(f"{name}: refused, too many pixels ({e})") from None
    except Image.UnidentifiedImageError:
        empty = isinstance(src, (str, Path)) and Path(src).is_file() and Path(src).stat().st_size == 0
        raise BadImageError(f"{name}: {'empty file' if empty else 'not an image file'}") from None
    except OSError as e:
        raise BadImageError(f"{name}: cannot decode ({e})") from None


def exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is not worth losing the picture over
        return 1


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """Decode, apply the EXIF orientation and convert any mode (L, RGBA, P, CMYK, 16-bit) to 8-bit RGB."""
    try:
        img.load()  # full decode: a truncated file fails here, not later in a worker's resize
        if exif_orientation(img) != 1:
            img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            # 16-bit and 32-bit grey: PIL's convert("L") clips instead of scaling, which whitens
            # the picture. Scale to 8 bits ourselves.
            a = np.asarray(img).astype(np.float64)
            if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
                a = a / 257.0
            img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        if img.mode != "RGB":
            img = img.convert("RGB")
        return img
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{name}: cannot decode ({e})") from None


def load_rgb(src) -> Image.Image:
    """open_image + to_rgb: any image source -> decoded RGB PIL image. PIL images pass through."""
    if isinstance(src, Image.Image):
        return to_rgb(src)
    return to_rgb(open_image(src), str(src) if isinstance(src, (str, Path)) else "<image bytes>")


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters (same distribution), from our own generator.

    Returns (left, top, crop_width, crop_height). A generator seeded per (seed, epoch, sample)
    makes every crop independent of the worker that computes it, which is what lets a run be
    resumed exactly and gives the same augmentations for any number of DataLoader workers.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, w, h
    # Fallback: the largest centred crop within the ratio bounds.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def training_pixels_cap(prep: Preprocessing, min_scale: float = 0.08, min_ratio: float = 3 / 4) -> int:
    """The most pixels a training image needs: beyond it no crop is ever enlarged to the model's size.

    The smallest RandomResizedCrop covers min_scale of the area at aspect min_ratio, so its short
    side is sqrt(min_scale * min_ratio * area); keeping that at least the model's side gives this cap
    (0.84 MP at 224 px). Food-101's images (at most 512 px a side) stay whole; a 12 MP photo is
    decoded at reduced size, which costs nothing the crops could have used.
    """
    side = max(prep.height, prep.width)
    return math.ceil(side * side / (min_scale * min_ratio))


def decode_for_training(img: Image.Image, max_pixels: int, name: str = "<image>") -> np.ndarray:
    """An opened image -> uint8 HWC RGB, as shown (EXIF applied), shrunk to at most `max_pixels`.

    Deterministic per image, whatever crop is drawn from it later: the same array whether it is
    decoded now or read back from the decoded-image cache (`image_cache.py`), so a run gives the
    same pixels with and without the cache, and a resumed run the same as an uninterrupted one.
    """
    w, h = img.size
    if w * h > max_pixels:
        if img.format == "JPEG" and img.mode in ("RGB", "L"):
            # DCT-domain scaling: decodes at 1/2, 1/4 or 1/8 size, at least the requested size.
            scale = math.sqrt(max_pixels / (w * h))
            img.draft(img.mode, (math.ceil(w * scale), math.ceil(h * scale)))
        img = to_rgb(img, name)
        w, h = img.size
        if w * h > max_pixels:
            scale = math.sqrt(max_pixels / (w * h))
            img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BILINEAR, reducing_gap=None)
    else:
        img = to_rgb(img, name)
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy refuses read-only memory


def random_crop_resize(pixels: np.ndarray, prep: Preprocessing, rng: np.random.Generator, flip: bool,
                       rotation: float = 0.0, zoom: float = 0.0, scale=(0.08, 1.0)) -> np.ndarray:
    """RandomResizedCrop (+ flip, rotation, zoom) of a uint8 HWC image -> uint8 HWC of the model's size.

    The resize is torch's antialiased bilinear on uint8, the filter of the guide's RandomResizedCrop.
    The crop is copied into channels-last (HWC) memory first: torch then takes its vectorised uint8
    path and returns channels-last too, so the HWC result needs no transposing copy. 0.1 ms a crop
    on one core here, against 0.3 ms from the strided slice and 0.65 ms for Pillow.
    """
    h, w = pixels.shape[:2]
    left, top, cw, ch = random_resized_crop_box(w, h, rng, scale)
    crop = torch.from_numpy(pixels[top : top + ch, left : left + cw]).permute(2, 0, 1).unsqueeze(0)
    out = torch.nn.functional.interpolate(crop.contiguous(memory_format=torch.channels_last),
                                          size=(prep.height, prep.width), mode="bilinear", antialias=True,
                                          align_corners=False)[0].permute(1, 2, 0)
    if flip and rng.random() < 0.5:
        out = out.flip(1)
    if rotation or zoom:  # drawn after the flip: runs without them keep their crops and flips
        degrees = rng.uniform(-rotation, rotation) if rotation else 0.0
        out = rotate_zoom(out, degrees, rng.uniform(1 - zoom, 1 + zoom) if zoom else 1.0)
    return np.ascontiguousarray(out.numpy())


def rotate_zoom(hwc: torch.Tensor, degrees: float, scale: float) -> torch.Tensor:
    """Rotate a uint8 HWC image about its centre and magnify it by `scale` (< 1 shrinks), same size out.

    Corners the rotation or shrinking uncovers are filled by reflection, as Keras' RandomRotation and
    RandomZoom (the guide's TensorFlow augmentations) do by default, so no black wedges appear.
    """
    h, w = hwc.shape[:2]
    x = hwc.permute(2, 0, 1).unsqueeze(0).float()
    c, s = math.cos(math.radians(degrees)) / scale, math.sin(math.radians(degrees)) / scale
    # The rotation in pixels, written in affine_grid's coordinates (both axes scaled to [-1, 1]).
    theta = torch.tensor([[[c, -s * h / w, 0.0], [s * w / h, c, 0.0]]])
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    y = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)


PREPROCESSOR_CONFIG = "preprocessor_config.json"


def load_preprocessing(model_dir: Path, image_size: int | None = None) -> Preprocessing:
    """The checkpoint's preprocessor_config.json; a ViT without one takes the ViT defaults at its image size.

    A file that names no processor type takes config.json's model_type's, as AutoImageProcessor does.
    `image_size`, when given, must be the size the processor makes.
    """
    from vitfood.fileio import read_json

    path = Path(model_dir) / PREPROCESSOR_CONFIG
    config_path = Path(model_dir) / "config.json"
    cfg = read_json(path) if path.is_file() else None
    model_type = None
    if not (cfg and (cfg.get("image_processor_type") or cfg.get("feature_extractor_type"))):
        model_type = read_json(config_path).get("model_type") if config_path.is_file() else None
    if cfg is not None:
        prep = Preprocessing.from_hf_dict(cfg, str(path), model_type)
    elif model_type not in (None, "vit") or image_size is None:
        # Another family's pixels (timm's transforms, a ConvNeXt's crop_pct) are not the ViT defaults.
        raise VitfoodError(f"{path}: not found; without it vitfood takes the ViT defaults, and only for a ViT "
                           f"checkpoint of known size (this one's model_type: {model_type})")
    else:
        prep = Preprocessing(image_size, image_size)
    if image_size is not None and (prep.height, prep.width) != (image_size, image_size):
        raise VitfoodError(f"{path}: resizes to {prep.height}x{prep.width} but the model's config.json "
                           f"has image_size {image_size}")
    return prep
