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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from vitfood.errors import VitfoodError

# The guide's ViT image processor defaults, used for fields a preprocessor_config.json leaves out.
_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)
_EXIF_ORIENTATION = 0x0112
# Pillow filter -> torch's uint8 antialiased resize, which computes them as transformers does.
_TORCH_FILTERS = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}


class BadImageError(VitfoodError):
    """A file that is not a readable image: missing, empty, truncated, corrupt, or a decompression bomb."""


@dataclass(frozen=True)
class Preprocessing:
    """What the checkpoint's image processor does: resize, rescale to [0, 1], normalise."""

    height: int
    width: int
    mean: tuple[float, ...] = _DEFAULT_MEAN
    std: tuple[float, ...] = _DEFAULT_STD
    resample: int = Image.Resampling.BILINEAR
    shortest_edge: int | None = None  # processors sized by {"shortest_edge"}: resize, then centre-crop
    do_normalize: bool = True
    rescale_factor: float = 1 / 255

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "preprocessor_config.json") -> "Preprocessing":
        size = cfg.get("size", 224)
        shortest = None
        if isinstance(size, int):  # the legacy ViTFeatureExtractor form, as in the in21k checkpoint
            height = width = size
        elif isinstance(size, dict) and "height" in size and "width" in size:
            height, width = int(size["height"]), int(size["width"])
        elif isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
            crop = cfg.get("crop_size") if cfg.get("do_center_crop") else None
            if isinstance(crop, int):
                crop = {"height": crop, "width": crop}
            height, width = (int(crop["height"]), int(crop["width"])) if crop else (shortest, shortest)
        else:
            raise VitfoodError(f"{source}: unsupported 'size' {size!r} (expected an int, height/width or shortest_edge)")
        mean = tuple(float(m) for m in cfg.get("image_mean") or _DEFAULT_MEAN)
        std = tuple(float(s) for s in cfg.get("image_std") or _DEFAULT_STD)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise VitfoodError(f"{source}: image_mean and image_std need 3 values each, std > 0")
        resample = int(cfg.get("resample", Image.Resampling.BILINEAR))
        if resample not in {int(r) for r in Image.Resampling}:
            raise VitfoodError(f"{source}: unknown resample {resample}")
        return cls(
            height=height, width=width, mean=mean, std=std, resample=resample, shortest_edge=shortest,
            do_normalize=bool(cfg.get("do_normalize", True)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
        )

    def to_hf_dict(self) -> dict:
        """A ViTImageProcessor config that reproduces this preprocessing in transformers."""
        out = {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": self.height, "width": self.width},
            "resample": self.resample,
            "do_rescale": self.rescale_factor != 1.0,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }
        if self.shortest_edge is not None:
            out.update(size={"shortest_edge": self.shortest_edge}, do_center_crop=True,
                       crop_size={"height": self.height, "width": self.width})
        return out

    # -- on the worker: PIL image -> uint8 HWC array of the model's size

    def resize_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(resized width, resized height, crop left, crop top) for a picture of that size, as the
        checkpoint's image processor: straight to the model's size, or its shortest edge then a centre
        crop. The CPU path (eval_resize) and the GPU path (gpu_decode) both resize by it."""
        if self.shortest_edge is None:
            return self.width, self.height, 0, 0
        # transformers' arithmetic to the pixel: the long side truncated, not rounded (1000 x 700 -> 365 x 256).
        short, long = min(width, height), max(width, height)
        new_long = max(1, int(self.shortest_edge * long / short))
        rw, rh = (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)
        return rw, rh, (rw - self.width) // 2, (rh - self.height) // 2

    def eval_resize(self, img: Image.Image) -> np.ndarray:
        """Deterministic: an RGB picture -> uint8 HWC of the model's size, as the checkpoint's image processor.

        Bilinear and bicubic, the filters ViT checkpoints ask for, run through torch's antialiased resize
        on uint8: the kernel transformers' image processors call, so the pixels equal the pipeline's
        (Pillow's own resize is off by a level or more on many pixels), in about a third of Pillow's
        time. Other filters stay with Pillow.
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
                x = torch.nn.functional.interpolate(x, size=(rh, rw), mode=mode, antialias=True, align_corners=False)
                pixels = x[0].permute(1, 2, 0).numpy()
        if (rw, rh) != (self.width, self.height):
            pixels = _crop_or_pad(pixels, left, top, self.width, self.height)
        return np.ascontiguousarray(pixels)

    # -- on the device: uint8 batch -> normalised float batch

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [B, H, W, 3] (as the workers deliver it) -> normalised [B, 3, H, W] in `dtype`.

        The result is a channels-last view: no copy is made for the permute.
        """
        x = batch.permute(0, 3, 1, 2).float()
        if self.do_normalize:
            # (x * r - mean) / std folded into one multiply-add per element.
            scale, shift = _normalize_constants(self, x.device)
            x = torch.addcmul(shift, x, scale)
        else:
            x = x * self.rescale_factor
        return x.to(dtype)


@functools.lru_cache(maxsize=16)
def _normalize_constants(prep: Preprocessing, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a new tensor per batch would be a blocking host-to-GPU copy each step."""
    scale = torch.tensor([prep.rescale_factor / s for s in prep.std], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(prep.mean, prep.std)], device=device).view(1, 3, 1, 1)
    return scale, shift


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


def load_preprocessing(model_dir: Path, image_size: int) -> Preprocessing:
    """The checkpoint's preprocessor_config.json; without one, the ViT defaults at its image size."""
    from vitfood.fileio import read_json
    from vitfood.model import PREPROCESSOR_NAME

    path = Path(model_dir) / PREPROCESSOR_NAME
    prep = Preprocessing.from_hf_dict(read_json(path), str(path)) if path.is_file() else Preprocessing(image_size, image_size)
    if (prep.height, prep.width) != (image_size, image_size):
        raise VitfoodError(f"{path}: resizes to {prep.height}x{prep.width} but the model's config.json "
                           f"has image_size {image_size}")
    return prep
