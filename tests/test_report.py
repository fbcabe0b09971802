"""vitfood.report on real files: PNGs opened with PIL, the model card's YAML parsed by the Hub client,
run.json parsed back, TensorBoard events read with TensorBoard's own reader."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitfood import logs, model_card, report, run_record
from vitfood.checkpoint import METRICS
from vitfood.fileio import write_json
from vitfood.errors import VitfoodError

NO_MPL = "vitfood: matplotlib is not installed (pip install 'vitfood[plots]'); skipped"


def write_metrics(out_dir: Path, steps: int = 30, per_epoch: int = 10) -> Path:
    """A metrics.jsonl as train_loop writes it, ending in a line cut short by a kill."""
    lines = []
    for s in range(1, steps + 1):
        lines.append({"type": "train", "step": s, "epoch": s / per_epoch, "loss": 2.0 * math.exp(-s / 10) + 0.1,
                      "learning_rate": 5e-5 * min(1.0, s / 3) * (steps - s + 1) / steps,
                      "grad_norm": None if s == 1 else 1.0 / s, "images_per_s": 40.0 + s})
        if s % per_epoch == 0:
            lines.append({"type": "eval", "step": s, "epoch": s // per_epoch, "eval_accuracy": 0.5 + s / 100,
                          "eval_loss": 1.0 - s / 60, "eval_top5_accuracy": 0.9 + s / 1000, "eval_samples": 60,
                          "images_per_s": 120.0})
    path = out_dir / METRICS
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "train", "st')
    return path


def assert_picture(path: Path, min_size: tuple[int, int]) -> None:
    """A real PNG of a plausible size with something drawn on it (not a blank canvas)."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], im.size
        grey = np.asarray(im.convert("L"))
    assert grey.min() < 80 and grey.max() > 200  # dark ink on a light background
    assert (grey < 250).mean() > 0.02  # more than a frame: lines, text, cells


def no_temp_files(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def confusion_101(seed: int = 0) -> tuple[np.ndarray, list[str], set[int]]:
    """101 classes, mostly right, with heavy confusions among a known group of 6."""
    rng = np.random.default_rng(seed)
    k = 101
    m = np.diag(rng.integers(20, 30, k))
    for _ in range(40):  # scattered single errors
        i, j = rng.integers(k, size=2)
        m[i, j] += 1
    group = {3, 17, 40, 41, 77, 99}
    for i in group:
        for j in group:
            if i != j:
                m[i, j] += 5
    return m, [f"dish_{i:03d}" for i in range(k)], group


# ---------------------------------------------------------------- pictures


def test_training_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    pyplot_before = "matplotlib.pyplot" in sys.modules
    metrics = write_metrics(tmp_path)
    out = tmp_path / report.TRAINING_CURVES
    assert report.plot_training_curves(metrics, out, best_step=30) is True
    assert_picture(out, (500, 600))
    assert no_temp_files(tmp_path)
    if not pyplot_before:  # the object API: no pyplot, so no backend switch in the user's session
        assert "matplotlib.pyplot" not in sys.modules


def test_read_metrics_skips_cut_line_and_keeps_last_per_step(tmp_path):
    write_metrics(tmp_path, steps=20)
    with open(tmp_path / METRICS, "a") as f:  # a duplicate step, as a resumed run without truncation would
        f.write('\n{"type": "train", "step": 20, "loss": 9.5}\n')
    train, evals = report.read_metrics(tmp_path / METRICS)
    assert [r["step"] for r in train] == list(range(1, 21))
    assert train[-1]["loss"] == 9.5
    assert [r["step"] for r in evals] == [10, 20]


def test_training_curves_nothing_to_plot(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / METRICS).write_text("")
    assert report.plot_training_curves(tmp_path / METRICS, tmp_path / "c.png") is False
    assert report.plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "c.png") is False
    assert not (tmp_path / "c.png").exists()


def test_top_confused_picks_the_confused_group():
    import torch

    m, _, group = confusion_101()
    picked = report.top_confused(m, 20)
    assert len(picked) == 20 and picked == sorted(picked)
    assert group <= set(picked)
    assert report.top_confused(torch.from_numpy(m), 20) == picked  # evaluate()'s tensor, as it is
    assert report.top_confused(np.eye(3, dtype=int) * 5, 20) == [0, 1, 2]


def test_confusion_matrix_figure_shows_most_confused_only(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    m, labels, group = confusion_101()
    figures = []
    monkeypatch.setattr(report, "_save_png", lambda fig, path: figures.append(fig))
    assert report.plot_confusion_matrix(m, labels, tmp_path / "cm.png", max_classes=20) is True
    ax = figures[0].axes[0]
    assert "20 of 101 classes" in ax.get_title()
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert shown == [t.get_text() for t in ax.get_xticklabels()] and len(shown) == 20
    assert {labels[i] for i in group} <= set(shown)
    cells = {t.get_text() for t in ax.texts}
    assert "5" in cells  # the counts of the group's confusions are written in their cells
    image = ax.get_images()[0].get_array()
    assert image.shape == (20, 20) and float(image.max()) <= 1.0  # row-normalised colours

    figures.clear()
    small = np.array([[5, 1, 0], [0, 4, 2], [1, 0, 6]])
    report.plot_confusion_matrix(small, ["a", "b", "c"], tmp_path / "cm.png")
    ax = figures[0].axes[0]
    assert "of 3 classes" not in ax.get_title()
    np.testing.assert_allclose(ax.get_images()[0].get_array()[1], [0, 4 / 6, 2 / 6])


def test_confusion_matrix_png(tmp_path):
    pytest.importorskip("matplotlib")
    m, labels, _ = confusion_101()
    out = tmp_path / report.CONFUSION_PNG
    assert report.plot_confusion_matrix(m, labels, out) is True
    assert_picture(out, (600, 600))
    assert no_temp_files(tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        report.plot_confusion_matrix(m, labels[:-1], out)


def test_save_and_load_confusion(tmp_path):
    import torch

    m, labels, _ = confusion_101()
    path = tmp_path / report.CONFUSION_JSON
    report.save_confusion(path, torch.from_numpy(m), labels)  # what evaluate() holds: an int64 tensor
    data = json.loads(path.read_text())  # plain JSON, one row per line
    assert set(data) == {"labels", "confusion"} and len(path.read_text().splitlines()) == 101 + 5
    loaded, names = report.load_confusion(path)
    assert names == labels and np.array_equal(np.array(loaded), m)
    with pytest.raises(ValueError):
        report.save_confusion(path, [[1, 2], [3, 4]], ["a", "b", "c"])


def test_write_report_both_pictures(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path)
    m, labels, _ = confusion_101()
    report.save_confusion(tmp_path / report.CONFUSION_JSON, m, labels)
    results = {"eval_accuracy": 0.8, "epoch": 3, "step": 30}
    written = report.write_report(tmp_path, results, None, None)  # the confusion from confusion_matrix.json
    assert written == [str(tmp_path / report.TRAINING_CURVES), str(tmp_path / report.CONFUSION_PNG)]
    for path in written:
        assert_picture(Path(path), (500, 500))

    other = tmp_path / "eval-only"
    other.mkdir()  # --eval-only into a fresh folder: no metrics.jsonl, a confusion matrix in hand
    assert report.write_report(other, results, m[:3, :3], labels[:3]) == [str(other / report.CONFUSION_PNG)]


def test_without_matplotlib_one_line_and_no_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    metrics = write_metrics(tmp_path)
    assert report.plot_training_curves(metrics, tmp_path / report.TRAINING_CURVES) is False
    assert capsys.readouterr().err == f"{NO_MPL} training_curves.png\n"
    assert report.plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b"], tmp_path / report.CONFUSION_PNG) is False
    assert capsys.readouterr().err == f"{NO_MPL} confusion_matrix.png\n"
    assert report.write_report(tmp_path, {}, [[1, 0], [0, 1]], ["a", "b"]) == []
    assert capsys.readouterr().err == f"{NO_MPL} training_curves.png, confusion_matrix.png\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS]


# ---------------------------------------------------------------- model card

CONFIG = {"dataset": "ethz/food101", "train_split": "train", "eval_split": None, "max_train_samples": 5000,
          "test_size": 0.2, "model": "google/vit-base-patch16-224-in21k", "epochs": 3, "batch_size": 16,
          "grad_accum_steps": 4, "learning_rate": 5e-5, "seed": 42, "output_dir": "/home/me/runs/vitfood-output",
          "resume_from_checkpoint": None}


def results_for(labels: list[str]) -> dict:
    per_class = {name: round(0.5 + i / (2 * len(labels)), 4) for i, name in enumerate(labels)}
    return {"eval_loss": 0.61, "eval_accuracy": 0.87345, "eval_top5_accuracy": 0.97, "eval_samples": 1000,
            "per_class_accuracy": per_class, "epoch": 3, "step": 237}


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    head, _, body = card[4:].partition("\n---\n")
    assert body, "front matter not closed"
    return yaml.safe_load(head)


def test_model_card_hub_ids(tmp_path):
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    labels = [f"dish_{i:03d}" for i in range(101)]
    card = model_card.model_card(CONFIG, results_for(labels), labels, CONFIG["model"], CONFIG["dataset"],
                             repo_id="alice/vit-food", files=["training_curves.png"])
    (tmp_path / "README.md").write_text(card)
    meta = metadata_load(tmp_path / "README.md")  # the Hub client's own parser
    assert meta == front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
    assert meta["tags"] == ["vitfood", "image-classification", "vision"]
    assert meta["datasets"] == ["ethz/food101"] and meta["base_model"] == "google/vit-base-patch16-224-in21k"
    assert meta["metrics"] == ["accuracy"]
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "vit-food" and len(results) == 1
    r = results[0]
    assert (r.task_type, r.dataset_type, r.metric_type, r.metric_value) == (
        "image-classification", "ethz/food101", "accuracy", 0.8734)
    assert r.dataset_split == "train[:5000], 20% held out (seed 42)"
    assert ModelCard(card).data.to_dict()["base_model"] == CONFIG["model"]  # parses as a card, eval results included

    body = card.split("\n---\n", 1)[1]
    assert "| accuracy | 0.8734 |" in body and "| top-5 accuracy | 0.9700 |" in body
    worst = re.findall(r"^\| (dish_\d+) \| ([0-9.]+) \|$", body, re.M)
    assert [w[0] for w in worst] == labels[:10]  # the ten lowest, lowest first
    assert "| learning_rate | `5e-05` |" in body and "output_dir" not in body  # no local paths in the card
    assert 'pipeline("image-classification", model="alice/vit-food")' in body
    assert "python infer.py --model alice/vit-food photo.jpg" in body
    assert "[training_curves.png](training_curves.png)" in body


def test_model_card_local_paths(tmp_path):
    from huggingface_hub import ModelCard

    data, base = tmp_path / "my photos", tmp_path / "backbone"
    data.mkdir()
    base.mkdir()
    config = {**CONFIG, "dataset": str(data), "model": str(base), "output_dir": str(tmp_path / "food: run #1")}
    card = model_card.model_card(config, results_for(["a", "b", "c"]), ["a", "b", "c"], str(base), str(data))
    meta = front_matter(card)
    assert "datasets" not in meta and "base_model" not in meta
    assert str(tmp_path) not in card.split("## Usage")[0]  # nothing of the local disk in metadata and tables
    assert "| dataset | `my photos` |" in card and "| model | `backbone` |" in card
    index = meta["model-index"][0]
    assert index["name"] == "food: run #1"  # quoted by the YAML writer, not broken by ':' and '#'
    assert index["results"][0]["dataset"] == {"name": "my photos", "type": "imagefolder",
                                              "split": "train, 20% held out (seed 42)"}
    ModelCard(card)  # the Hub client accepts it

    no_eval = model_card.model_card(config, {}, ["a", "b"], str(base), str(data))
    assert "model-index" not in front_matter(no_eval)


def test_is_hub_id(tmp_path):
    assert model_card.is_hub_id("ethz/food101") and model_card.is_hub_id("food101")
    for path in (str(tmp_path), "./data", "/data/food", "~/food", "a/b/c", ""):
        assert not model_card.is_hub_id(path), path


# ---------------------------------------------------------------- run.json


def test_run_record_round_trip(tmp_path):
    heavy_before = {m for m in ("datasets", "transformers", "tensorboard") if m in sys.modules}
    started = datetime(2025, 3, 1, 12, 0, 0).timestamp()
    record = run_record.run_record(CONFIG, started, started + 3723.4, "cpu (2 cores)")
    write_json(tmp_path / run_record.RUN_JSON, record)
    run = json.loads((tmp_path / run_record.RUN_JSON).read_text())
    assert run["config"] == CONFIG and run["command"] == sys.argv and run["device"] == "cpu (2 cores)"
    start, end = datetime.fromisoformat(run["started"]), datetime.fromisoformat(run["ended"])
    assert start.utcoffset() == timedelta(0) and start.timestamp() == started
    assert end - start == timedelta(seconds=3723) and run["duration_s"] == 3723.4
    versions = run["versions"]
    assert set(run_record._VERSIONED) | {"python"} <= set(versions)
    assert versions["torch"] == version("torch") and versions["Pillow"] == version("pillow")
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert run["platform"]
    # versions come from metadata: reading them imports nothing heavy
    assert {m for m in ("datasets", "transformers", "tensorboard") if m in sys.modules} == heavy_before
    assert run_record.run_record(CONFIG, started, None, "cpu")["ended"] is None


def test_versions_of_missing_packages(monkeypatch):
    monkeypatch.setattr(run_record, "_VERSIONED", ("torch", "no-such-package-vitfood"))
    assert run_record.package_versions()["no-such-package-vitfood"] is None


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state(tmp_path):
    repo, pkg = tmp_path / "repo", tmp_path / "repo" / "vitfood"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert run_record.git_state(pkg) == {"commit": head, "dirty": False}
    (pkg / "notes.txt").write_text("untracked files do not make it dirty")
    assert run_record.git_state(pkg)["dirty"] is False
    (pkg / "__init__.py").write_text("x = 2\n")
    assert run_record.git_state(pkg) == {"commit": head, "dirty": True}

    copy = repo / "venv" / "site-packages" / "vitfood"  # an installed copy inside someone's repository
    copy.mkdir(parents=True)
    (copy / "__init__.py").write_text("")
    assert run_record.git_state(copy) is None
    outside = tmp_path / "plain"
    outside.mkdir()
    assert run_record.git_state(outside) is None


def test_git_state_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert run_record.git_state() is None

    def slow_git(*args, **kwargs):
        raise subprocess.TimeoutExpired("git", 5)

    monkeypatch.setattr(subprocess, "run", slow_git)
    assert run_record.run_record({}, 0.0, None, "cpu")["git"] is None


def test_device_description_cpu():
    assert re.fullmatch(r"cpu \(\d+ cores\)", run_record.device_description("cpu"))


# ---------------------------------------------------------------- TensorBoard


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    train, evals = report.read_metrics(write_metrics(tmp_path, steps=20))
    tb = logs.TensorBoardLog(tmp_path)
    for record in sorted(train + evals, key=lambda r: (r["step"], r["type"] == "eval")):
        tb.write(record)
    tb.close()
    scalars = read_scalars(tmp_path / logs.TENSORBOARD_DIR)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/images_per_s", "train/epoch",
            "eval/accuracy", "eval/loss", "eval/top5_accuracy", "eval/samples", "eval/images_per_s",
            "eval/epoch"} == set(scalars)
    assert sorted(scalars["train/loss"]) == list(range(1, 21))
    assert scalars["train/loss"][7] == pytest.approx(train[6]["loss"], rel=1e-6)
    assert 1 not in scalars["train/grad_norm"]  # None (no gradient norm) is left out, not logged as 0
    assert scalars["eval/accuracy"] == pytest.approx({10: 0.6, 20: 0.7})


def test_tensorboard_resume_hides_the_killed_runs_tail(tmp_path):
    pytest.importorskip("tensorboard")
    tb = logs.TensorBoardLog(tmp_path)
    for step in range(1, 9):  # killed after step 8; its last checkpoint was at step 5
        tb.write({"type": "train", "step": step, "loss": 1.0})
    tb.close()
    tb = logs.TensorBoardLog(tmp_path, resume_step=5)
    for step in range(6, 11):
        tb.write({"type": "train", "step": step, "loss": 2.0})
    tb.close()
    loss = read_scalars(tmp_path / logs.TENSORBOARD_DIR)["train/loss"]
    assert loss == {**{s: 1.0 for s in range(1, 6)}, **{s: 2.0 for s in range(6, 11)}}


def test_tensorboard_missing_is_one_line_error(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(VitfoodError) as e:
        logs.TensorBoardLog(tmp_path)
    assert str(e.value) == ("--report-to tensorboard needs the tensorboard package: "
                            "pip install 'vitfood[tensorboard]'")
    assert not (tmp_path / logs.TENSORBOARD_DIR).exists()
