"""What a run leaves for its user: report pictures, model card, run record, TensorBoard, Hub push, --eval-only."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import CLASSES, make_image_folder, run
from test_train import config
from vitfood import hub
from vitfood.data import TrainImages, scan_folder
from vitfood.errors import VitfoodError
from vitfood.preprocess import Preprocessing
from vitfood.train_loop import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backbone_dir, image_folder):
    out = tmp_path_factory.mktemp("trained") / "out"
    r = run("train.py", "--model", backbone_dir, "--dataset", image_folder, "--output-dir", out, "--epochs", 2,
            "--batch-size", 8, "--grad-accum-steps", 1, "--learning-rate", 1e-3, "--num-workers", 0,
            "--logging-steps", 1)
    assert r.returncode == 0, r.stderr
    return out


def test_a_run_leaves_pictures_card_and_record(trained):
    pytest.importorskip("matplotlib")
    for name in ("training_curves.png", "confusion_matrix.png"):
        with Image.open(trained / name) as img:
            assert img.size[0] > 300 and img.size[1] > 200
            assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas
    confusion = json.loads((trained / "confusion_matrix.json").read_text())
    results = json.loads((trained / "eval_results.json").read_text())
    matrix = np.array(confusion["confusion"])
    assert confusion["labels"] == list(CLASSES) and matrix.sum() == results["eval_samples"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(results["eval_accuracy"])
    assert set(results["per_class_accuracy"]) == set(CLASSES) and 0 <= results["eval_top5_accuracy"] <= 1

    card = (trained / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == "image-classification" and "base_model" not in front  # local paths are not Hub ids
    assert f"{results['eval_accuracy']:.4f}" in card or f"{results['eval_accuracy']:.3f}" in card

    record = json.loads((trained / "run.json").read_text())
    assert record["config"]["epochs"] == 2 and record["ended"] >= record["started"]
    assert record["config"]["num_workers"] == 0 and record["config"]["precision"] == "fp32"  # resolved, not "auto"
    assert record["versions"]["torch"] and record["device"].startswith("cpu")
    assert "train.py" in " ".join(record["command"])


def test_eval_only_reproduces_the_held_out_accuracy(trained, image_folder, tmp_path):
    out = tmp_path / "report"
    r = run("train.py", "--eval-only", "--model", trained, "--dataset", image_folder, "--output-dir", out)
    assert r.returncode == 0, r.stderr
    again = json.loads((out / "eval_results.json").read_text())
    best = json.loads((trained / "eval_results.json").read_text())
    assert again["eval_samples"] == best["eval_samples"]  # the same held-out images
    assert again["eval_accuracy"] == pytest.approx(best["eval_accuracy"])
    assert again["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-4)
    assert not (out / "model.safetensors").exists() and (out / "confusion_matrix.json").exists()


def test_eval_only_leaves_a_training_runs_folder_alone(trained, image_folder):
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    r = run("train.py", "--eval-only", "--model", trained, "--dataset", image_folder, "--output-dir", trained)
    assert r.returncode == 2 and "holds a training run" in r.stderr and "pass a new --output-dir" in r.stderr
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before


def test_eval_only_names_classes_the_model_does_not_know(trained, tmp_path):
    other = make_image_folder(tmp_path / "other", per_class=3, classes=("blue_square", "purple_star"))
    r = run("train.py", "--eval-only", "--model", trained, "--dataset", other, "--output-dir", tmp_path / "o")
    assert r.returncode == 2 and "purple_star" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_eval_only_needs_a_trained_model(backbone_dir, image_folder, tmp_path):
    r = run("train.py", "--eval-only", "--model", backbone_dir, "--dataset", image_folder, "--output-dir", tmp_path)
    assert r.returncode == 2 and "no trained classifier head" in r.stderr


def test_push_to_hub_uploads_the_output_folder(backbone_dir, image_folder, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "whoami", lambda token=None: {"name": "alice", "orgs": []})
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **k: calls.setdefault("create", repo_id)
                        and f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **k: calls.setdefault("upload", k))
    out = tmp_path / "food-vit"
    train(config(backbone_dir, image_folder, out, push_to_hub=True, epochs=2, save_steps=1))
    assert calls["create"] == "alice/food-vit"
    upload = calls["upload"]
    assert upload["repo_id"] == "alice/food-vit" and upload["folder_path"] == str(out)
    from huggingface_hub.utils import filter_repo_objects

    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    sent = set(filter_repo_objects(files, allow_patterns=upload["allow_patterns"],
                                   ignore_patterns=upload["ignore_patterns"]))
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "eval_results.json"} <= sent
    assert not any(f.startswith("checkpoints/") for f in sent) and any(f.startswith("checkpoints/") for f in files)
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert card["model-index"][0]["name"] == "food-vit"


def test_push_to_hub_offline_fails_before_training(backbone_dir, image_folder, tmp_path):
    out = tmp_path / "out"
    r = run("train.py", "--model", backbone_dir, "--dataset", image_folder, "--output-dir", out, "--push-to-hub",
            "--hub-model-id", "alice/food", env_extra={"HF_TOKEN": "hf_x"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot be reached" in r.stderr and "training did not start" in r.stderr
    assert not (out / "metrics.jsonl").exists()


def test_tensorboard_gets_the_same_scalars(backbone_dir, image_folder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    train(config(backbone_dir, image_folder, out, report_to="tensorboard"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "runs")).Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in logged if r["type"] == "train"]
    assert [e.value for e in events.Scalars("eval/accuracy")] == \
        [pytest.approx(r["eval_accuracy"]) for r in logged if r["type"] == "eval"]


def test_rotation_and_zoom_change_the_crops_and_nothing_else(image_folder):
    records = scan_folder(image_folder)
    prep = Preprocessing(32, 32)
    plain = TrainImages(records, prep, seed=1, flip=True)
    augmented = TrainImages(records, prep, seed=1, flip=True, rotation=30, zoom=0.2)
    differ = 0
    for i in range(12):
        a, b = plain[(i, 0)][0], augmented[(i, 0)][0]
        assert a.shape == b.shape == (32, 32, 3) and b.dtype == np.uint8
        differ += not np.array_equal(a, b)
        np.testing.assert_array_equal(b, augmented[(i, 0)][0])  # still seeded: the same each time
    assert differ >= 10
    with pytest.raises(VitfoodError, match="--rotation"):
        config("m", "d", "o", rotation=-1).validate()
    with pytest.raises(VitfoodError, match="--zoom"):
        config("m", "d", "o", zoom=1.5).validate()


def test_help_groups_flags_and_shows_defaults():
    r = run("train.py", "--help")
    assert r.returncode == 0
    text = r.stdout
    for group in ("data:", "model:", "optimisation:", "output:", "checkpoints:"):
        assert group in text
    assert "(default: 5e-05)" in text and "--push-to-hub" in text and "--rotation" in text


def test_console_scripts_are_installed():
    scripts = [shutil.which(name, path=str(Path(sys.executable).parent)) for name in ("vitfood-train", "vitfood-infer")]
    if None in scripts:
        pytest.skip("vitfood is not pip-installed in this environment")
    for script, flag in zip(scripts, ("--learning-rate", "--top-k")):
        r = subprocess.run([script, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and flag in r.stdout
