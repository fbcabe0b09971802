"""Small and messy datasets (issue 19): the stratified split and its warnings, --max-train-samples, the model
card's metric sections, bad images found before training, and --metric-for-best-model."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from helpers import make_image_folder
from vitfood import data, model_card
from vitfood.config import TrainConfig
from vitfood.data import RANDOM, held_out, held_out_counts, load_splits, unreadable_headers
from vitfood.errors import VitfoodError
from vitfood.evaluation import improves
from vitfood.train_loop import train


def names(records):
    return [records.name(i) for i in range(len(records))]


@pytest.mark.parametrize("counts, test_size, expected", [
    ([75, 75, 75, 75], 0.2, [15, 15, 15, 15]),  # the 4 x 75: 9 to 21 each before
    ([24, 24, 24], 0.2, [5, 5, 5]),  # 14.4 -> 15 in all: largest remainders, ties to the first classes
    ([30, 7, 3], 0.25, [7, 2, 1]),  # shares 7.5, 1.75, 0.75: floors 7, 1, 0, then the remainders .75 and .75
    ([100, 2, 1, 0], 0.2, [20, 1, 0, 0]),  # the class of 2 gives one; 1 and 0 cannot
    ([10, 2, 2, 2], 0.2, [1, 1, 1, 1]),  # every class evaluated, the total kept at ceil(3.2) = 4
    ([2] * 10, 0.2, [1] * 10),  # 10 classes to evaluate: more than the 4 asked for
    ([3, 3], 0.9, [2, 2]),  # each class keeps a training image
])
def test_each_class_gives_its_share_and_every_class_of_two_is_evaluated(counts, test_size, expected):
    assert held_out_counts(np.array(counts), test_size).tolist() == expected


def test_the_split_is_stratified_seeded_and_warns_about_small_classes_and_loose_images(tmp_path):
    root = make_image_folder(tmp_path / "ds", per_class=11, size=(8, 8))
    make_image_folder(root, per_class=1, classes=("lonely",), size=(8, 8), seed=3)
    (root / "empty_class").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(root / f"stray{i}.jpg")
    s1 = load_splits(str(root), "train", None, 0, 0, 0.2, seed=1)
    counts = np.bincount(s1.eval.labels, minlength=len(s1.label_names))
    assert dict(zip(s1.label_names, counts.tolist())) == {  # 34 images: ceil(6.8) = 7 held out
        "blue_square": 3, "empty_class": 0, "green_disc": 2, "lonely": 0, "red_stripes": 2}
    assert not set(names(s1.eval)) & set(names(s1.train)) and len(s1.train) + len(s1.eval) == 34
    assert s1.warnings == [
        f"warning: 3 images directly in {root}, outside any class folder, not used (each class's images go in "
        "a folder named after the class)",
        "warning: 2 classes with fewer than 2 images, so none held out for evaluation (not in per_class_accuracy): "
        "empty_class (0), lonely (1)"]
    again, other = (load_splits(str(root), "train", None, 0, 0, 0.2, seed=s) for s in (1, 2))
    assert names(again.eval) == names(s1.eval) and names(other.eval) != names(s1.eval)
    # The rule of runs made before: ceil(0.2 x N) first images of the seed's permutation, whatever their class.
    perm = np.random.default_rng(1).permutation(10)
    assert held_out(np.zeros(10, dtype=np.int64), 1, 0.2, seed=1, rule=RANDOM)[0].tolist() == sorted(perm[:2])


def test_max_train_samples_takes_images_before_the_hold_out_as_its_help_says(tmp_path):
    root = make_image_folder(tmp_path / "ds", per_class=6, classes=("a", "b"), size=(8, 8))
    s = load_splits(str(root), "train", None, 3, 0, 0.2, seed=0)
    assert (len(s.train), len(s.eval)) == (2, 1)
    help_text = next(f.metadata["help"] for f in TrainConfig.__dataclass_fields__.values()
                     if f.name == "max_train_samples")
    assert "then held out" in help_text and "3 -> 2 + 1" in help_text
    too_few = make_image_folder(tmp_path / "ones", per_class=1, size=(8, 8))
    with pytest.raises(VitfoodError, match=r"3 images in 3 classes, none with 2 images: .* --eval-split"):
        load_splits(str(too_few), "train", None, 0, 0, 0.2, seed=0)


def results(k: int) -> dict:
    per_class = {f"c{i}": i / k for i in range(k)}
    return {"eval_accuracy": 0.5, "eval_top5_accuracy": 0.9, "eval_loss": 1.2, "eval_samples": 40,
            "per_class_accuracy": per_class, "epoch": 2, "step": 10}


def test_the_card_shows_top5_and_the_weakest_classes_only_where_they_say_something():
    few = model_card.model_card({"metric_for_best_model": "loss"}, results(4), [f"c{i}" for i in range(4)],
                                "base", "data")
    assert "top-5" not in few and "lowest accuracy" not in few
    assert "Accuracy of each evaluated class, lowest first:" in few and "| c3 | 0.7500 |" in few
    assert "the best of the run by eval_loss." in few
    many = model_card.model_card({}, results(12), [f"c{i}" for i in range(12)], "base", "data")
    assert "| top-5 accuracy | 0.9000 |" in many and "The 10 classes with the lowest accuracy:" in many
    assert "| c9 |" in many and "| c10 |" not in many and "the best of the run." in many


def test_headers_that_cannot_be_read_are_found_without_decoding(tmp_path):
    root = make_image_folder(tmp_path / "ds", per_class=3, size=(8, 8))
    (root / "green_disc" / "html.jpg").write_text("<html>404</html>")
    (root / "red_stripes" / "empty.png").write_bytes(b"")
    good = root / "blue_square" / "0000.jpg"
    (root / "blue_square" / "cut.jpg").write_bytes(good.read_bytes()[:40])  # not even a whole header
    found = {name.split("/")[-1]: why for name, why in unreadable_headers(data.scan_folder(root), threads=3)}
    assert sorted(found) == ["cut.jpg", "empty.png", "html.jpg"]  # and none of the 9 good ones
    assert (found["html.jpg"], found["empty.png"]) == ("not an image file", "empty file")


def tiny_config(backbone_dir, folder, out, **overrides) -> TrainConfig:
    base = dict(model=str(backbone_dir), dataset=str(folder), output_dir=str(out), epochs=1, batch_size=8,
                grad_accum_steps=1, learning_rate=1e-3, num_workers=0, warmup_ratio=0.0, logging_steps=50)
    return TrainConfig(**{**base, **overrides})


def test_too_many_bad_images_stop_the_run_before_its_first_step(backbone_dir, tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "ds", per_class=4, size=(8, 8))
    for i in range(2):
        (folder / "green_disc" / f"bad{i}.jpg").write_text("not a photo")
    monkeypatch.setattr("vitfood.run.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    with pytest.raises(VitfoodError, match=r"^stopped at the start: 2 unreadable images .* --max-bad-fraction "
                                           r"0.1 of the 14 allows; all listed in .*bad_images.txt; the first: "):
        train(tiny_config(backbone_dir, folder, out, max_bad_fraction=0.1))
    assert sorted(line.split("\t")[0].split("/")[-1] for line in (out / "bad_images.txt").read_text().splitlines()) \
        == ["bad0.jpg", "bad1.jpg"]
    assert sorted(p.name for p in out.iterdir()) == ["bad_images.txt"]  # no step, no record, no lock left


@pytest.mark.parametrize("metric, new, old, better", [
    ("accuracy", 0.8, 0.7, True), ("accuracy", 0.7, 0.7, False),  # a tie keeps the earlier epoch
    ("loss", 0.065, 0.34, True), ("loss", 0.34, 0.065, False), ("loss", 0.3, 0.3, False),
    ("top5_accuracy", 0.9, 0.95, False), ("loss", 0.5, math.nan, True), ("loss", math.nan, 0.5, False),
])
def test_the_best_model_metric_and_its_direction(metric, new, old, better):
    key = f"eval_{metric}"
    assert improves({key: new}, {key: old}, metric) is better
    assert improves({key: new}, None, metric)


def test_trainer_names_are_accepted_and_others_refused(backbone_dir, tmp_path):
    assert TrainConfig(metric_for_best_model="eval_loss").metric_for_best_model == "loss"
    with pytest.raises(VitfoodError, match="--metric-for-best-model must be one of accuracy, loss, top5_accuracy"):
        TrainConfig(metric_for_best_model="f1").validate()
    folder = make_image_folder(tmp_path / "ds", per_class=2, size=(8, 8))
    with pytest.raises(VitfoodError, match="top5_accuracy: with 3 classes every label is in the top 5"):
        train(tiny_config(backbone_dir, folder, tmp_path / "out", metric_for_best_model="eval_top5_accuracy"))


def test_a_resumed_run_whose_loss_falls_keeps_the_later_epoch_by_loss(backbone_dir, tmp_path, capsys):
    folder = make_image_folder(tmp_path / "ds", per_class=8, size=(16, 16))
    out = tmp_path / "out"
    train(tiny_config(backbone_dir, folder, out, epochs=1, metric_for_best_model="eval_loss"))
    train(tiny_config(backbone_dir, folder, out, epochs=3, metric_for_best_model="loss",
                      resume_from_checkpoint="latest"))
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
    best_epoch = min(evals, key=lambda r: (r["eval_loss"], r["epoch"]))["epoch"]
    assert best_epoch > 1  # the loss fell after the resume
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["epoch"] == best_epoch and saved["eval_loss"] == min(r["eval_loss"] for r in evals)
    assert f"best eval_loss {saved['eval_loss']:.4f} (epoch {best_epoch}, eval_accuracy" in capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())["config"]
    assert record["metric_for_best_model"] == "loss" and record["split"] == "stratified"


def test_runs_made_before_the_stratified_split_keep_their_own(tmp_path):
    """A checkpoint or a trained model whose record has no "split" was made with the random split: resuming it,
    or evaluating it with --eval-only, holds out the same images it did (not images it trained on)."""
    from vitfood.run import split_rule

    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "step-00000003"
    ckpt.mkdir(parents=True)
    resume = TrainConfig(output_dir=str(out), resume_from_checkpoint="latest")
    for setup, rule in (({"seed": 42}, "random"), ({"seed": 42, "split": "stratified"}, "stratified")):
        (ckpt / "trainer_state.json").write_text(json.dumps({"setup": setup}))
        assert split_rule(resume, tmp_path / "unused", training=True) == rule
        assert split_rule(TrainConfig(eval_only=True), ckpt, training=False) == rule
    (out / "run.json").write_text(json.dumps({"config": {"seed": 42}}))
    assert split_rule(TrainConfig(eval_only=True), out, training=False) == "random"
    assert split_rule(TrainConfig(), out, training=True) == "stratified"  # a new run
    assert split_rule(TrainConfig(eval_only=True), tmp_path / "hub-model", training=False) == "stratified"
