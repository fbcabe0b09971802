"""A whole vitfood training run optimises exactly as transformers' `Trainer` does, step by step.

Both sides start from the same tiny `ViTForImageClassification` checkpoint (head included, so nothing is
initialised at random) and see the same pixels: 32x32 PNGs at the model's size, with vitfood's
augmentation made the identity (`crop_scale=(1, 1)`, `flip=False`; `test_training_pixels_are_the_image_processors`
proves that claim). 64 images with 16 x 4 accumulation make every optimizer step one pass over the whole
set, so neither side's data order can matter. What is left is the optimisation itself: the loss, its
normalisation over the accumulation window, clipping, AdamW, the warmup/decay schedule.

Conventions of transformers 5.x's Trainer, aligned here on purpose:
- `learning_rate` in `log_history` is read after `optimizer.step()` and before `lr_scheduler.step()`
  (`_inner_training_loop`, "get leaning rate before update"): the rate the step used, which is what
  vitfood logs too, so step k is compared with step k, no offset. (Older releases read it after the
  scheduler step, i.e. the next step's rate; against them the comparison would need a shift of one.)
- ViTForImageClassification's forward takes `**kwargs`, so the Trainer counts the labels of the whole
  accumulation window (`num_items_in_batch`, 64 here), each micro-batch's loss is sum(CE) / 64 and is
  not divided again by the accumulation steps; the logged loss is the sum of the four, divided by the
  optimizer steps since the last log (1 with logging_steps=1): the mean CE over the window's 64 images.
  vitfood sums the CE of the window and divides by the images seen: the same quantity, and gradients
  that are the same mean. (average_tokens_across_devices only rescales across processes; here there is one.)
- `warmup_ratio` is gone from 5.x's TrainingArguments; a float `warmup_steps` below 1 is a ratio and
  becomes ceil(ratio x total steps), vitfood's rule (`optim.warmup_steps_for`).
- Both logs' `grad_norm` is the total norm before clipping (what `clip_grad_norm_` returns).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CLASSES, TINY, draw_image, make_checkpoint, make_family_checkpoint
from vitfood import checkpoint, data
from vitfood.config import TrainConfig
from vitfood.models import load_model
from vitfood.preprocess import load_preprocessing
from vitfood.train_loop import train

LABELS = sorted(CLASSES)  # vitfood numbers folder classes in sorted order; the checkpoint's head must agree
N_TRAIN = 64
SIZE = TINY["image_size"]
# 16 x 4 = 64: one optimizer step per epoch, each over every image.
RUN = dict(epochs=5, batch_size=16, grad_accum_steps=4, learning_rate=1e-3, warmup_ratio=0.3, max_grad_norm=1.0,
           weight_decay=0.0, seed=42)
# Absolute, on every parameter element (the weights are O(0.01..1)). The attention key biases set the
# floor: their gradient is zero but for rounding (see the main test), and Adam divides it by its own
# size, so they move by rounding noise times ~1e-3 x lr a step; at lr 1e-3 that is ~1e-6, while one
# step at lr 1e-2 already puts 1.2e-5 between the two sides. Hence lr 1e-3 in both tests.
WEIGHT_ATOL = 1e-5
LOG_RTOL = 1e-5  # relative, on each step's loss, learning rate and gradient norm


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """train/ and validation/ folders of PNGs at the model's size, and a checkpoint whose head has these labels."""
    root = tmp_path_factory.mktemp("trainer-equality")
    rng = np.random.default_rng(0)
    for split, count in (("train", N_TRAIN), ("validation", 2 * len(LABELS))):
        for i in range(count):
            cls = LABELS[i % len(LABELS)]
            (root / "ds" / split / cls).mkdir(parents=True, exist_ok=True)
            draw_image(cls, rng, (SIZE, SIZE)).save(root / "ds" / split / cls / f"{i:03d}.png")
    ckpt = make_checkpoint(root / "ckpt", classification_labels=LABELS)
    return {"dataset": root / "ds", "ckpt": ckpt, "root": root}


@pytest.fixture(scope="module")
def dinov2_setup(setup) -> dict:
    """The same images, and a DINOv2 classifier of transformers' (vitfood's hf family) with a processor that keeps
    32x32 images as they are (shortest edge 32, centre crop 32), as the ViT's does."""
    from transformers import BitImageProcessor

    root = setup["root"] / "dinov2"
    ckpt = make_family_checkpoint("dinov2", root / "ckpt", labels=LABELS)
    BitImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(ckpt)
    return {**setup, "ckpt": ckpt, "root": root}


def run_vitfood(setup: dict, name: str, settings: dict) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """(train records of metrics.jsonl, the final weights under Hugging Face names)."""
    out = setup["root"] / name
    train(TrainConfig(model=str(setup["ckpt"]), dataset=str(setup["dataset"]), eval_split="validation",
                      output_dir=str(out), crop_scale=(1.0, 1.0), flip=False, precision="fp32", device="cpu",
                      num_workers=0, logging_steps=1, **settings))
    records = [r for r in map(json.loads, (out / checkpoint.METRICS).read_text().splitlines()) if r["type"] == "train"]
    # The last step's weights: output_dir/model.safetensors is the best epoch's, not necessarily the last.
    state = checkpoint.load_training_state(checkpoint.list_checkpoints(out)[-1])[0]
    model, _ = load_model(setup["ckpt"], labels=LABELS)
    model.load_state_dict(state)
    return records, model.hf_state_dict()


class ProcessedImages(torch.utils.data.Dataset):
    """As the guide feeds the Trainer: the checkpoint's image processor's output, and the class index."""

    def __init__(self, folder: Path, processor):
        self.items = []
        for label, cls in enumerate(LABELS):
            for path in sorted((folder / cls).glob("*.png")):
                with Image.open(path) as img:
                    pixels = processor(img.convert("RGB"), return_tensors="pt")["pixel_values"][0]
                self.items.append({"pixel_values": pixels, "labels": label})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def run_trainer(setup: dict, name: str, settings: dict,
                trainer_class=None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """(the Trainer's per-step log records, its final weights)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

    assert settings["warmup_ratio"] < 1  # a float warmup_steps of 1 or more would mean steps, not a ratio
    args = TrainingArguments(
        output_dir=str(setup["root"] / name), num_train_epochs=settings["epochs"],
        per_device_train_batch_size=settings["batch_size"], gradient_accumulation_steps=settings["grad_accum_steps"],
        learning_rate=settings["learning_rate"], warmup_steps=settings["warmup_ratio"], lr_scheduler_type="linear",
        max_grad_norm=settings["max_grad_norm"], weight_decay=settings["weight_decay"], optim="adamw_torch",
        seed=settings["seed"], logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, bf16=False, fp16=False, disable_tqdm=True)
    model = AutoModelForImageClassification.from_pretrained(setup["ckpt"])
    dataset = ProcessedImages(setup["dataset"] / "train", AutoImageProcessor.from_pretrained(setup["ckpt"]))
    trainer = (trainer_class or Trainer)(model=model, args=args, train_dataset=dataset)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return logs, file_weights(trainer.model, setup["root"] / name / "final")


def file_weights(hf_model, folder: Path) -> dict[str, torch.Tensor]:
    """A transformers model's weights under its checkpoint-file names, which vitfood's to_hf_state_dict writes.

    transformers 5.x renames ViT's modules in memory (vit.layers.N.attention.q_proj, ...) and maps the
    names back on save_pretrained, so `state_dict()` keys differ from the file's; a save round trip is exact.
    """
    from safetensors.torch import load_file

    hf_model.save_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


def assert_weights_equal(ours: dict, theirs: dict, skip: tuple[str, ...] = ()) -> None:
    assert set(ours) == set(theirs)
    for k in ours:
        if k not in skip:
            torch.testing.assert_close(ours[k], theirs[k], atol=WEIGHT_ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def start_weights(setup: dict) -> dict[str, torch.Tensor]:
    model, _ = load_model(setup["ckpt"], labels=LABELS)
    return model.hf_state_dict()


def test_training_pixels_are_the_image_processors(setup):
    """The premise of the comparisons: with crop_scale (1, 1) and no flip, vitfood trains on the image itself.

    The crop box is the whole image: the area scale is 1 and, for a square image, any aspect ratio the
    sampler may draw either rounds to the full 32x32 or is rejected, and after 10 rejections the fallback
    is the whole image too; the resize from 32x32 to 32x32 then changes no pixel. Every epoch's item is
    the PNG's pixels exactly; normalised, they equal the Trainer's ViTImageProcessor output to float32
    rounding (x * 2/255 - 1 against (x / 255 - 0.5) / 0.5: an ulp at most).
    """
    from transformers import ViTImageProcessor

    records = data.scan_folder(setup["dataset"] / "train")
    assert records.label_names == LABELS and len(records) == N_TRAIN
    prep = load_preprocessing(setup["ckpt"], SIZE)
    images = data.TrainImages(records, prep, seed=RUN["seed"], flip=False, crop_scale=(1.0, 1.0))
    processor = ViTImageProcessor.from_pretrained(setup["ckpt"])
    for i in range(len(records)):
        with Image.open(records.name(i)) as img:
            original = np.asarray(img.convert("RGB"))
        for epoch in range(RUN["epochs"]):
            crop, _, bad = images[(i, epoch)]
            assert bad is None and np.array_equal(crop, original), (records.name(i), epoch)
        theirs = processor(Image.fromarray(original), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(prep.normalize(torch.from_numpy(crop)[None])[0], theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["vit", "dinov2"])  # vitfood's own ViT, and one of transformers' (hf family)
def test_a_vitfood_run_is_the_trainers_run_step_by_step(request, family):
    """5 epochs = 5 optimizer steps with warmup, decay and clipping: each step's loss, learning rate and
    gradient norm, and the last step's weights, are the Trainer's."""
    from transformers import AutoModelForImageClassification

    setup = request.getfixturevalue("setup" if family == "vit" else "dinov2_setup")
    start = start_weights(setup)
    # Same starting point, bit for bit: vitfood's fused-QKV model and transformers' read the same tensors.
    hf_start = file_weights(AutoModelForImageClassification.from_pretrained(setup["ckpt"]), setup["root"] / "hf-start")
    assert set(start) == set(hf_start) and all(torch.equal(start[k], hf_start[k]) for k in start)

    # DINOv2 in 3 steps, not 5 (the suite's time): still a warmup step at rate 0, decay and clipping.
    run = RUN if family == "vit" else dict(RUN, epochs=3)
    ours, our_weights = run_vitfood(setup, "vitfood", run)
    theirs, their_weights = run_trainer(setup, "trainer", run)

    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, run["epochs"] + 1))
    for key in ("loss", "learning_rate", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in ours], dtype=torch.float64),
                                   torch.tensor([r[key] for r in theirs], dtype=torch.float64),
                                   rtol=LOG_RTOL, atol=0, msg=lambda m, key=key: f"{key} per step: {m}")
    # The schedule was exercised, not a constant rate: step 1 of ceil(0.3 x 5) = 2 warmup steps runs at 0.
    assert ours[0]["learning_rate"] == 0 and max(r["learning_rate"] for r in ours) == RUN["learning_rate"]
    assert any(r["grad_norm"] > RUN["max_grad_norm"] for r in ours)  # so clipping took part

    assert_weights_equal(our_weights, their_weights)
    # Equal, and not because nothing moved: every tensor moved far beyond the tolerance, except the
    # attention key biases, whose gradient is zero but for rounding (a key bias adds q . b to every score
    # of a query's row, and softmax ignores a shift shared by the row), and DINOv2's mask token (used only
    # in masked-image pretraining).
    for k in start:
        moved = (our_weights[k] - start[k]).abs().max()
        if k.endswith("mask_token"):
            assert moved == 0, k
            continue
        assert moved < 10 * WEIGHT_ATOL if k.endswith("attention.key.bias") else moved > 50 * WEIGHT_ATOL, (k, moved)


POSITION_AND_CLS = ("vit.embeddings.position_embeddings", "vit.embeddings.cls_token")
DECAY_ATOL = 1e-7  # absolute; the two sides' embeddings otherwise agree to a few float32 ulps (~5e-9)


def test_weight_decay_spares_position_and_cls_embeddings_unlike_the_trainer(setup):
    """vitfood's one deliberate difference from the stock Trainer: which parameters are decayed.

    vitfood (as timm's ViT) never decays biases, LayerNorm weights, the position embeddings and the CLS
    token: the embeddings are learned offsets, not weights whose size needs bounding, and shrinking
    them towards zero only erases what pretraining put there. The Trainer's `get_decay_parameter_names`
    spares biases and LayerNorm weights only, so it decays the two embeddings as well. One optimizer
    step at the full rate shows exactly that: everything else agrees, and the two embeddings differ by
    AdamW's decoupled decay, p0 x lr x wd (torch's AdamW multiplies p by 1 - lr x wd before the update).
    A Trainer that also spares the two embeddings gives vitfood's weights everywhere.
    """
    from transformers import Trainer

    class TimmDecayTrainer(Trainer):
        def get_decay_parameter_names(self, model):
            names = super().get_decay_parameter_names(model)
            assert set(POSITION_AND_CLS) <= set(names)  # else this filter would be a silent no-op
            return [n for n in names if n not in POSITION_AND_CLS]

    # wd 1 rather than the usual 0.1: lr x wd = 1e-3 makes the decay of these O(0.02) embeddings (up to
    # ~6e-5) stand hundreds of times above DECAY_ATOL, with the main run's lr (see WEIGHT_ATOL).
    # No warmup: one step, at the full rate.
    settings = dict(RUN, epochs=1, warmup_ratio=0.0, weight_decay=1.0)
    start = start_weights(setup)
    _, ours = run_vitfood(setup, "vitfood-wd", settings)
    stock_logs, stock = run_trainer(setup, "trainer-wd", settings)
    _, timm_like = run_trainer(setup, "trainer-wd-timm", settings, TimmDecayTrainer)

    assert_weights_equal(ours, stock, skip=POSITION_AND_CLS)
    (step,) = stock_logs
    assert step["learning_rate"] == settings["learning_rate"]
    for k in POSITION_AND_CLS:
        decay = start[k] * step["learning_rate"] * settings["weight_decay"]
        assert decay.abs().max() > 100 * DECAY_ATOL, k  # so the next check can tell decay from no decay
        torch.testing.assert_close(ours[k] - stock[k], decay, atol=DECAY_ATOL, rtol=0,
                                   msg=lambda m, k=k: f"{k}: {m}")
    assert_weights_equal(ours, timm_like)
