"""The evaluation resize against transformers' own image processors, pixel for pixel.

`transformers.pipeline` is what users compare vitfood's answers with, so `Preprocessing.eval_resize`
(evaluation, infer.py's CPU path) must hand the model the same pixels as the checkpoint's processor.
"""

import numpy as np
import pytest
from PIL import Image

from vitfood.preprocess import Preprocessing

# Wider, taller, smaller than the model (upscaling), the model's own size, a long side that transformers
# truncates rather than rounds (1000 x 700 at shortest edge 256: 365, not 366), and a sliver.
SHAPES = [(512, 384), (384, 512), (100, 80), (224, 224), (1000, 700), (7, 300), (257, 1000)]


def _processor_pixels(processor, img: Image.Image) -> np.ndarray:
    """The processor's output undone to uint8 HWC: it rescales and normalises with mean = std = 0.5."""
    x = processor(img, return_tensors="pt")["pixel_values"][0]
    return ((x * 0.5 + 0.5) * 255).round().permute(1, 2, 0).numpy().astype(np.int64)


def _noise(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels: any offset or filter difference shows at once, unlike in a smooth picture."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC], ids=["bilinear", "bicubic"])
def test_eval_resize_equals_vit_image_processor(resample):
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 224, "width": 224}, resample=resample,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    prep = Preprocessing.from_hf_dict(processor.to_dict())
    for i, (w, h) in enumerate(SHAPES):
        img = _noise(w, h, i)
        ours = prep.eval_resize(img)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
        assert np.array_equal(ours, _processor_pixels(processor, img)), (w, h)


@pytest.mark.parametrize("shortest_edge, crop", [(256, 224), (50, 64)], ids=["crop inside", "crop larger: black border"])
@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC], ids=["bilinear", "bicubic"])
def test_eval_resize_equals_shortest_edge_and_centre_crop(resample, shortest_edge, crop):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": shortest_edge}, resample=resample, do_center_crop=True,
                                   crop_size={"height": crop, "width": crop}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    prep = Preprocessing.from_hf_dict(processor.to_dict())
    assert (prep.height, prep.width, prep.shortest_edge) == (crop, crop, shortest_edge)
    for i, (w, h) in enumerate(SHAPES):
        img = _noise(w, h, 100 + i)
        assert np.array_equal(prep.eval_resize(img), _processor_pixels(processor, img)), (w, h)


def test_eval_resize_with_another_filter_still_takes_pillow():
    """Lanczos has no torch counterpart: Pillow's resize, the model's size and dtype all the same."""
    prep = Preprocessing(32, 32, resample=Image.Resampling.LANCZOS)
    img = _noise(90, 50, 7)
    expected = np.asarray(img.resize((32, 32), Image.Resampling.LANCZOS))
    assert np.array_equal(prep.eval_resize(img), expected)


def test_another_filter_with_shortest_edge_crops_as_pillow_does():
    """The Pillow branch shares the torch branch's crop: a black border where the crop is larger than the resize."""
    rng = np.random.default_rng(3)
    for shortest_edge, crop in [(40, 32), (30, 48)]:
        prep = Preprocessing(crop, crop, shortest_edge=shortest_edge, resample=Image.Resampling.LANCZOS)
        for w, h in [(90, 50), (50, 90), (33, 33)]:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            rw, rh, left, top = prep.resize_box(w, h)
            expected = np.asarray(img.resize((rw, rh), Image.Resampling.LANCZOS).crop((left, top, left + crop,
                                                                                        top + crop)))
            assert np.array_equal(prep.eval_resize(img), expected), (shortest_edge, crop, w, h)
