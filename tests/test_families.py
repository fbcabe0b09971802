"""Every model family, with every guarantee: one parametrised matrix over tiny checkpoints of each family, saved
with the family's own save_pretrained and image processor (tests/helpers.py: make_family_checkpoint).

Each family trains one epoch through the train entry point (in process), and what it saves loads in transformers
with no missing or unexpected keys, gives vitfood's logits there, and pipeline() gives infer's top-1. Beyond the
matrix: one real train.py for a non-ViT family, exact resume for a transformer and a BatchNorm family,
--image-size on ViT and DINOv2, and the one-line refusals (unsupported type, custom code, bad size).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CLASSES, FAMILIES, make_family_checkpoint, make_image_folder, run
from vitfood.config import TrainConfig
from vitfood.errors import VitfoodError
from vitfood.models import load_model, preprocessing_for, save_model
from vitfood.train_loop import train

BATCHNORM = {"resnet", "efficientnet", "mobilevit"}
REPEATED_BLOCKS = {"vit", "deit", "beit", "dinov2", "dinov2_with_registers", "siglip", "clip"}  # 2 layers each
# Names that must never be decayed, wherever a family has them (base.no_weight_decay).
TOKENS = ("position_embedding", "pos_embed", "cls_token", "class_embedding", "register_tokens", "mask_token",
          "relative_position_bias_table")


@pytest.fixture(scope="session")
def family_images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("family-images"), per_class=4)  # 12 images: 8 train, 4 eval


def family_run(family_images, ckpt, out, **overrides) -> TrainConfig:
    settings = dict(model=str(ckpt), dataset=str(family_images), output_dir=str(out), epochs=1, batch_size=4,
                    grad_accum_steps=1, learning_rate=1e-3, num_workers=0, device="cpu", precision="fp32",
                    logging_steps=1, warmup_ratio=0.0, test_size=1 / 3)
    return TrainConfig(**{**settings, **overrides})


def one_image_per_class(family_images) -> list[str]:
    return [str(sorted((family_images / cls).glob("*.jpg"))[0]) for cls in CLASSES]


def pixels_as_vitfood_and_processor(out, images) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation pixels of vitfood (its Preprocessing of the saved model) and of the saved processor."""
    from transformers import AutoImageProcessor

    from vitfood.inference import load_classifier

    clf = load_classifier(out)
    ours = clf.prep.normalize(torch.from_numpy(np.stack([clf.pixels(p) for p in images])))
    theirs = AutoImageProcessor.from_pretrained(out)([Image.open(p).convert("RGB") for p in images],
                                                     return_tensors="pt")["pixel_values"]
    return ours, theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_and_its_model_works_in_transformers_and_pipeline(family, family_images, tmp_path, capsys):
    from transformers import AutoModelForImageClassification, pipeline

    from vitfood import classify
    from vitfood.inference import load_classifier

    ckpt = make_family_checkpoint(family, tmp_path / "ckpt")
    out = tmp_path / "out"
    results = train(family_run(family_images, ckpt, out))
    first_line = next(line for line in capsys.readouterr().err.splitlines() if "training /" in line)
    assert results["epoch"] == 1 and ("BatchNorm: each pass is --batch-size images" in first_line) == (family in BATCHNORM)
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert len(steps) == 2 and all(r["grad_norm"] > 0 for r in steps)  # two AdamW steps that moved the weights

    # A model in transformers' own format: every tensor loads, the logits are vitfood's, the labels the dataset's.
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): c for i, c in enumerate(CLASSES)}
    hf, info = AutoModelForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    ours = load_classifier(out).model  # as infer.py and classify load it
    x = torch.randn(2, 3, ours.image_size, ours.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf.eval()(pixel_values=x).logits, atol=1e-5, rtol=1e-5)
    assert ours.display_name in (out / "README.md").read_text()
    # torch.compile's units: the repeated blocks of the transformers (one compilation serves them), else the model.
    assert len(ours.compile_units()) == (2 if family in REPEATED_BLOCKS else 1)

    # The weight-decay rule by role, and layer ids in order: embeddings 0, blocks 1.., head last.
    roles = ours.parameter_roles()
    for r in roles:
        if r.param.ndim < 2 or any(t in r.name for t in TOKENS):
            assert not r.decay, r.name
    assert any(r.decay for r in roles) and roles[0].layer == 0 and roles[-1].layer == max(r.layer for r in roles)

    # pipeline() and vitfood's classify (infer.py's code) agree on the top-1 of every image, and on the scores
    # when the evaluation pixels are the processor's (those are vitfood.preprocess's: tests/test_preprocess.py).
    images = one_image_per_class(family_images)
    theirs = pipeline("image-classification", model=str(out), device="cpu")(images, top_k=3)
    mine = classify(images, model_dir=out, top_k=3)
    ours_px, theirs_px = pixels_as_vitfood_and_processor(out, images)
    assert ours_px.shape == theirs_px.shape, family
    torch.testing.assert_close(ours_px, theirs_px, atol=1e-5, rtol=0)  # the saved processor's pixels, exactly
    for a, b in zip(mine, theirs):
        assert a[0]["label"] == b[0]["label"]
        np.testing.assert_allclose([p["score"] for p in a], [p["score"] for p in b], atol=1e-4)


def test_train_py_on_a_non_vit_family_then_infer_and_pipeline_agree(family_images, tmp_path):
    """What a user runs: train.py on a DINOv2 backbone (a new process); then infer.py's code (in process, as the
    matrix above: a second process would double the cost) and pipeline() give the same top-1."""
    from transformers import pipeline

    from vitfood import classify

    ckpt = make_family_checkpoint("dinov2", tmp_path / "ckpt")
    out = tmp_path / "out"
    r = run("train.py", "--model", ckpt, "--dataset", family_images, "--output-dir", out, "--epochs", 1,
            "--batch-size", 4, "--grad-accum-steps", 1, "--num-workers", 0, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "a dinov2 model at 32 px" in r.stderr.splitlines()[0]
    images = one_image_per_class(family_images)
    infer_top1 = [p[0]["label"] for p in classify(images, model_dir=out, top_k=1)]
    pipe_top1 = [p[0]["label"] for p in pipeline("image-classification", model=str(out), device="cpu")(images, top_k=1)]
    assert infer_top1 == pipe_top1 and len(infer_top1) == len(images)


@pytest.mark.parametrize("family", ["dinov2", "resnet"])  # a transformer of transformers', and a BatchNorm network
def test_exact_resume(family, family_images, tmp_path):
    """2 epochs straight, against the same run resumed from its checkpoint of step 1 (mid-epoch 1): the same final
    weights to the bit, the same losses."""
    ckpt = make_family_checkpoint(family, tmp_path / "ckpt")
    full = tmp_path / "full"
    train(family_run(family_images, ckpt, full, epochs=2, save_steps=1, save_total_limit=0))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for step_dir in (resumed / "checkpoints").glob("step-*"):
        if int(step_dir.name[5:]) > 1:
            shutil.rmtree(step_dir)
    for name in ("model.safetensors", "config.json", "eval_results.json"):
        (resumed / name).unlink()
    train(family_run(family_images, ckpt, resumed, epochs=2, save_steps=1, save_total_limit=0,
                     resume_from_checkpoint="latest"))

    def losses(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r["type"] == "train"]

    last = sorted((full / "checkpoints").glob("step-*"))[-1].name
    assert (resumed / "checkpoints" / last / "model.safetensors").read_bytes() == \
        (full / "checkpoints" / last / "model.safetensors").read_bytes()
    assert losses(resumed) == losses(full) and len(losses(full)) == 4


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_image_size_resizes_position_tables_and_transformers_agrees(family, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    ckpt = make_family_checkpoint(family, tmp_path / "ckpt")
    model, base = load_model(ckpt, labels=["a", "b"], image_size=48)
    prep, processor = preprocessing_for(ckpt, model, 48)
    assert model.image_size == 48 and (prep.height, prep.width) == (48, 48)
    save_model(model, tmp_path / "out", base, processor)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_size"] == 48
    hf, info = AutoModelForImageClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    table = [v for k, v in hf.state_dict().items() if k.endswith("position_embeddings")]
    assert [t.shape[1] for t in table] == [1 + 6 * 6]  # CLS + a 6x6 grid of 8-pixel patches
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf.eval()(pixel_values=x).logits, atol=1e-5, rtol=1e-5)
    pixels = AutoImageProcessor.from_pretrained(tmp_path / "out")(Image.new("RGB", (70, 50)),
                                                                  return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 48, 48)
    with pytest.raises(VitfoodError, match=r"^--image-size 50: \w+ needs a multiple of its patch size 8$"):
        load_model(ckpt, labels=["a", "b"], image_size=50)


def test_what_cannot_be_done_is_one_line(tmp_path):
    ckpt = make_family_checkpoint("beit", tmp_path / "beit")
    with pytest.raises(VitfoodError, match="--image-size 48: vitfood does not resize beit's relative position bias"):
        load_model(ckpt, labels=["a", "b"], image_size=48)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(VitfoodError) as e:
        load_model(tmp_path / "bert", labels=["a", "b"])
    assert "model_type is 'bert'" in str(e.value) and "dinov2, " in str(e.value) and "\n" not in str(e.value)
    custom = tmp_path / "custom"
    shutil.copytree(ckpt, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_x.XModel"}}))
    with pytest.raises(VitfoodError, match="auto_map.*--trust-remote-code"):
        load_model(custom, labels=["a", "b"])


def test_a_new_head_is_the_seeds_and_a_matching_one_is_kept(tmp_path):
    ckpt = make_family_checkpoint("convnext", tmp_path / "c", labels=["x", "y", "z"])
    a, _ = load_model(ckpt, labels=["p", "q"], seed=1)
    b, _ = load_model(ckpt, labels=["p", "q"], seed=1)
    c, _ = load_model(ckpt, labels=["p", "q"], seed=2)
    kept, _ = load_model(ckpt, labels=["x", "y", "z"], seed=1)
    original, _ = load_model(ckpt)
    head = {k: v for k, v in a.state_dict().items() if "classifier" in k}
    assert head and all(torch.equal(v, b.state_dict()[k]) for k, v in head.items())
    assert not torch.equal(a.state_dict()["net.classifier.weight"], c.state_dict()["net.classifier.weight"])
    assert torch.equal(kept.state_dict()["net.classifier.weight"], original.state_dict()["net.classifier.weight"])


def test_dinov2_is_trained_at_its_processors_size_not_its_configs(tmp_path):
    """facebook/dinov2-base says image_size 518 while its processor crops 224: the table is resized once, at load,
    to the processor's size (the model would otherwise interpolate it on every forward), and saved so."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(image_size=64, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             mlp_ratio=2)).save_pretrained(tmp_path / "ckpt")
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "ckpt")
    model, base = load_model(tmp_path / "ckpt", labels=["a", "b"])
    prep, processor = preprocessing_for(tmp_path / "ckpt", model)
    assert model.image_size == prep.height == 32
    save_model(model, tmp_path / "out", base, processor)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_size"] == 32
    again, _ = load_model(tmp_path / "out")
    assert again.net.dinov2.embeddings.position_embeddings.shape[1] == 1 + 4 * 4
