"""The evaluation pixels against transformers' own image processors, pixel for pixel, for every family.

`transformers.pipeline` is what users compare vitfood's answers with, so `Preprocessing.eval_resize` and
`normalize` (evaluation, infer.py) must hand the model the same input as the checkpoint's processor, and
what vitfood saves (`to_hf_dict`) must be that processor again.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitfood.errors import VitfoodError
from vitfood.preprocess import Preprocessing, load_preprocessing, random_crop_resize, training_pixels_cap

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


@pytest.mark.parametrize("shortest_edge, crop", [(256, 224), (50, 64), (49, 64)],
                         ids=["crop inside", "crop larger: black border", "crop larger by an odd number"])
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


@pytest.mark.parametrize("resample", [Image.Resampling.BOX, Image.Resampling.HAMMING], ids=["box", "hamming"])
def test_eval_resize_with_a_filter_torch_lacks_takes_pillow(resample):
    """BOX and HAMMING have no torch counterpart (transformers' torchvision processors fail on them): Pillow's
    resize, as its PIL processors do; the model's size and dtype all the same."""
    prep = Preprocessing(32, 32, resample=resample)
    img = _noise(90, 50, 7)
    assert np.array_equal(prep.eval_resize(img), np.asarray(img.resize((32, 32), resample)))


def test_another_filter_with_shortest_edge_crops_as_pillow_does():
    """The Pillow branch shares the torch branch's crop: a black border where the crop is larger than the resize."""
    rng = np.random.default_rng(3)
    for shortest_edge, crop in [(40, 32), (30, 48), (31, 48)]:
        prep = Preprocessing(crop, crop, shortest_edge=shortest_edge, resample=Image.Resampling.BOX)
        for w, h in [(90, 50), (50, 90), (33, 33)]:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            rw, rh, left, top = prep.resize_box(w, h)
            expected = np.asarray(img.resize((rw, rh), Image.Resampling.BOX).crop((left, top, left + crop,
                                                                                    top + crop)))
            assert np.array_equal(prep.eval_resize(img), expected), (shortest_edge, crop, w, h)


# ---------------------------------------------------------------- every family's own processor

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# Family -> its processor as the Hub's checkpoints have it, at tiny sizes: (class, options) built and saved with
# transformers' save_pretrained, or a legacy file written as it is on the Hub. `still`: a picture size the
# processor does not resample (it shows crop and normalisation alone, for the PIL processors' check).
FAMILIES = {
    "vit": ("ViTImageProcessor", dict(size={"height": 32, "width": 32}), (32, 32)),
    "deit": ("DeiTImageProcessor", dict(size={"height": 37, "width": 37}, crop_size={"height": 32, "width": 32},
                                        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD), (37, 37)),
    "beit (do_pad: not read)": ("BeitImageProcessor", dict(size={"height": 32, "width": 32}, do_pad=True,
                                                           pad_size={"height": 40, "width": 40}), (32, 32)),
    "dinov2 (bit)": ("BitImageProcessor", dict(size={"shortest_edge": 37}, crop_size={"height": 32, "width": 32},
                                               image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD), (37, 45)),
    "siglip": ("SiglipImageProcessor", dict(size={"height": 32, "width": 32}), (32, 32)),
    "clip": ("CLIPImageProcessor", dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), (45, 32)),
    # openai/clip-vit-base-patch32's file: int size (CLIP's: a shortest edge) and int crop_size (a square).
    "clip (legacy file)": (None, dict(feature_extractor_type="CLIPFeatureExtractor", size=34, crop_size=32,
                                      do_center_crop=True, resample=3), (34, 50)),
    "convnext crop_pct": ("ConvNextImageProcessor", dict(size={"shortest_edge": 32}, crop_pct=0.875,
                                                         image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD), (36, 40)),
    "convnext at 384: squashed": ("ConvNextImageProcessor", dict(size={"shortest_edge": 384}), (384, 384)),
    # microsoft/resnet-50's file: a feature extractor, an int size (ConvNeXt's: a shortest edge), crop_pct.
    "resnet (legacy file)": (None, dict(feature_extractor_type="ConvNextFeatureExtractor", size=32, crop_pct=0.875,
                                        resample=3, do_normalize=True, image_mean=IMAGENET_MEAN,
                                        image_std=IMAGENET_STD), (36, 36)),
    # google/efficientnet-b0's: nearest, its own std, include_top; here with the offset and a crop too.
    "efficientnet": ("EfficientNetImageProcessor", dict(size={"height": 37, "width": 37}, resample=0,
                                                        do_center_crop=True, crop_size={"height": 32, "width": 32},
                                                        rescale_offset=True, image_std=[0.47, 0.48, 0.49]), (37, 37)),
    "mobilevit": ("MobileViTImageProcessor", dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                                  resample=2), (36, 40)),
    # apple/mobilevit-small's file: no mean/std, no do_normalize (never normalised), BGR.
    "mobilevit (legacy file)": (None, dict(feature_extractor_type="MobileViTFeatureExtractor", size=36, crop_size=32,
                                           do_center_crop=True, do_flip_channel_order=True, resample=2), (40, 36)),
    "swin (vit's, bicubic)": ("ViTImageProcessor", dict(size={"height": 32, "width": 32}, resample=3,
                                                        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD), (32, 32)),
    "mobilenet_v2": ("MobileNetV2ImageProcessor", dict(size={"shortest_edge": 36}, crop_size=32), (40, 36)),
    "lanczos": ("ViTImageProcessor", dict(size={"height": 32, "width": 32}, resample=1), (32, 32)),
}
# Landscape, portrait, smaller than the crop (upscaled), a sliver, larger: each by another filter weight.
FAMILY_SHAPES = [(61, 47), (47, 61), (20, 13), (5, 90), (150, 97)]
ATOL = 1e-5  # in the normalised floats; a level is >= 0.015 in all of them, so this is 0 levels apart


def _save_processor(folder, cls_name, options):
    import json

    import transformers

    folder.mkdir()
    if cls_name is None:
        (folder / "preprocessor_config.json").write_text(json.dumps(options))
    else:
        getattr(transformers, cls_name)(**options).save_pretrained(folder)
    return folder


def _ours(prep, img):
    return prep.normalize(torch.from_numpy(prep.eval_resize(img))[None])


def _theirs(processor, img):
    return torch.as_tensor(np.asarray(processor(img, return_tensors="np")["pixel_values"])).float()


def _assert_close(ours, theirs, what=""):
    """Within ATOL everywhere (torch.testing.assert_close's isclose costs a second on 384 px pictures here)."""
    assert ours.shape == theirs.shape, what
    worst = float((ours - theirs).abs().max())
    assert worst <= ATOL, f"{what}: {worst} apart"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_pixels_equal_its_own_processor(family, tmp_path):
    """Each family's processor as transformers builds and saves it, loaded by load_preprocessing: vitfood's
    model input (eval_resize -> normalize) equals AutoImageProcessor's pixel_values (its default, torchvision,
    backend) to 1e-5 on noise of every shape; the PIL backend's on pictures it does not resample (its Pillow
    resize rounds apart from torch's: a level or more on some pixels). to_hf_dict saves the same processor
    type, which gives the same pixels again and loads back as the same Preprocessing."""
    from transformers import AutoImageProcessor

    cls_name, options, still = FAMILIES[family]
    folder = _save_processor(tmp_path / "ckpt", cls_name, options)
    prep = load_preprocessing(folder)
    theirs = AutoImageProcessor.from_pretrained(folder)
    assert theirs.backend == "torchvision" and prep.processor == type(theirs).__name__
    for i, (w, h) in enumerate(FAMILY_SHAPES + [still]):
        img = _noise(w, h, 200 + i)
        ours = _ours(prep, img)
        assert ours.shape == (1, 3, prep.height, prep.width)
        _assert_close(ours, _theirs(theirs, img), f"{family} {w}x{h}")
    pil = AutoImageProcessor.from_pretrained(folder, backend="pil")
    assert pil.backend == "pil"
    img = _noise(*still, 300)
    _assert_close(_ours(prep, img), _theirs(pil, img), f"{family}, PIL processor")

    saved = _save_processor(tmp_path / "saved", None, prep.to_hf_dict())
    again = AutoImageProcessor.from_pretrained(saved)
    assert type(again) is type(theirs)
    img = _noise(*FAMILY_SHAPES[1], 400)
    _assert_close(_ours(prep, img), _theirs(again, img), f"{family}, saved by vitfood")
    assert load_preprocessing(saved) == prep


def test_processor_table_matches_transformers():
    """vitfood's copy of each processor's class defaults (what fills a file's missing options) and of the
    model_type -> processor map is transformers' own; every option the classes take is read or has no effect."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    from vitfood import processor_config as pc

    known = pc.OPTIONS_READ | pc.OPTIONS_WITHOUT_PIXEL_EFFECT
    for name, (_, defaults) in pc._PROCESSORS.items():
        for cls in (getattr(transformers, name), getattr(transformers, name + "Pil")):
            assert set(cls.valid_kwargs.__annotations__) <= known, (cls, set(cls.valid_kwargs.__annotations__) - known)
            for key, value in defaults.items():
                theirs = getattr(cls, key, None)
                theirs = tuple(theirs) if isinstance(theirs, list) else theirs
                assert value == (dict(theirs) if isinstance(theirs, dict) else theirs), (cls, key)
    for model_type, name in pc.MODEL_TYPE_PROCESSOR.items():
        assert IMAGE_PROCESSOR_MAPPING_NAMES[model_type]["torchvision"] == name, model_type


@pytest.mark.parametrize("cfg, option", [
    ({"do_resize": False}, "do_resize"),
    ({"size": {"shortest_edge": 32}}, "size"),  # no crop: each picture at its own aspect ratio
    ({"size": {"shortest_edge": 32, "longest_edge": 64}, "do_center_crop": True, "crop_size": 32}, "size"),
    ({"size": {"height": 32, "width": 32}, "do_center_crop": True}, "crop_size"),
    ({"size": 32, "do_pad": True, "pad_size": {"height": 40, "width": 40}}, "do_pad"),
    ({"size": 32, "resample": 7}, "resample"),
    ({"image_processor_type": "ConvNextImageProcessor", "size": 32, "do_center_crop": True, "crop_size": 24},
     "do_center_crop"),
    ({"image_processor_type": "ConvNextImageProcessor", "size": {"height": 32, "width": 32}}, "size"),
    ({"image_processor_type": "CLIPImageProcessor", "use_square_size": True}, "use_square_size"),
    ({"image_processor_type": "LevitImageProcessor", "size": 32}, "LevitImageProcessor"),
    ({"image_processor_type": "ViTImageProcessor", "auto_map": {"AutoImageProcessor": "p.MyProcessor"}}, "auto_map"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"rescale_factor": "1/255"}, "rescale_factor"),
    ({"image_processor_type": "ConvNextImageProcessor", "size": 32, "crop_pct": 0}, "crop_pct"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_an_option_vitfood_would_not_reproduce_is_one_line_naming_it(tmp_path, cfg, option):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(VitfoodError) as e:
        load_preprocessing(tmp_path)
    message = str(e.value)
    assert "\n" not in message and option in message and str(tmp_path / "preprocessor_config.json") in message


def test_a_file_without_a_type_takes_the_model_types_processor(tmp_path):
    """As AutoImageProcessor: config.json's model_type names it (here DINOv2's: an int size is a shortest edge).
    Without a file only a ViT takes the ViT defaults."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 36, "crop_size": 32}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    prep = load_preprocessing(tmp_path)
    assert (prep.processor, prep.shortest_edge, prep.height, prep.resample) == ("BitImageProcessor", 36, 32, 3)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert load_preprocessing(tmp_path, 36).resize_height is None  # ViT's: an int size is a square
    (tmp_path / "preprocessor_config.json").unlink()  # no file: the ViT defaults, for a ViT only
    assert load_preprocessing(tmp_path, 36) == Preprocessing(36, 36)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "timm_wrapper"}))
    with pytest.raises(VitfoodError, match="preprocessor_config.json: not found.*timm_wrapper"):
        load_preprocessing(tmp_path, 36)


@pytest.mark.parametrize("family, size, resize", [
    ("vit", 48, (None, None)), ("deit", 48, (None, 55)), ("dinov2 (bit)", 48, (55, None)),
    ("convnext crop_pct", 48, (54, None)), ("convnext crop_pct", 400, (None, None)), ("mobilevit", 48, (54, None)),
])
def test_at_size_scales_resize_and_crop_together(tmp_path, family, size, resize):
    """at_size(n) (--image-size): the model's input n x n, the resize before the crop in proportion (floored,
    as timm's crop_pct), ConvNeXt from 384 up squashed as its processor does; its to_hf_dict gives the same
    pixels in transformers at the new size."""
    from transformers import AutoImageProcessor

    cls_name, options, _ = FAMILIES[family]
    prep = load_preprocessing(_save_processor(tmp_path / "ckpt", cls_name, options)).at_size(size)
    assert (prep.height, prep.width, (prep.shortest_edge, prep.resize_height)) == (size, size, resize)
    saved = _save_processor(tmp_path / "saved", None, prep.to_hf_dict())
    assert load_preprocessing(saved, size) == prep
    img = _noise(90, 70, 5)
    _assert_close(_ours(prep, img), _theirs(AutoImageProcessor.from_pretrained(saved), img), f"{family} at {size}")


def test_at_size_refuses_what_it_cannot_make():
    with pytest.raises(VitfoodError, match="positive"):
        Preprocessing(32, 32).at_size(0)
    with pytest.raises(VitfoodError, match="32x48"):
        Preprocessing(32, 48).at_size(64)


def test_training_crops_are_made_at_the_processors_crop_size():
    """RandomResizedCrop makes the model's input: crop_size where there is one (DeiT's 37 -> 32), not size."""
    prep = Preprocessing.from_hf_dict({"image_processor_type": "DeiTImageProcessor", "size": 37, "crop_size": 32})
    rng = np.random.default_rng(0)
    crop = random_crop_resize(np.zeros((50, 70, 3), np.uint8), prep, rng, flip=True)
    assert crop.shape == (32, 32, 3) and training_pixels_cap(prep) == training_pixels_cap(Preprocessing(32, 32))


def test_filters_without_a_gpu_resize_are_decoded_on_the_cpu():
    """infer.py's GPU decoder resizes nearest, bilinear and bicubic as eval_resize; a checkpoint with another
    filter is routed to the CPU path (auto) or refused (--decoder gpu), never resized differently."""
    from vitfood.gpu_decode import make_decoder

    lanczos = Preprocessing(32, 32, resample=Image.Resampling.LANCZOS)
    assert Preprocessing(32, 32, resample=Image.Resampling.BICUBIC).gpu_resizable and not lanczos.gpu_resizable
    decoder, note = make_decoder("auto", lanczos, torch.device("cuda"))  # no GPU needed: it is refused first
    assert decoder is None and "LANCZOS" in note
    with pytest.raises(VitfoodError, match="--decoder gpu: .*LANCZOS"):
        make_decoder("gpu", lanczos, torch.device("cuda"))
