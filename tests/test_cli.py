"""train.py and infer.py end to end, as new processes, the way a user runs them."""

import json
import shlex
import signal

import pytest

from helpers import ROOT, make_image_folder, run
from test_data import awkward_images


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backbone_dir):
    """One real training run on a learnable generated dataset, shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    folder = make_image_folder(root / "images", per_class=60, seed=1)
    out = root / "out"
    r = run("train.py", "--model", backbone_dir, "--dataset", folder, "--output-dir", out, "--epochs", 15,
            "--batch-size", 16, "--grad-accum-steps", 1, "--learning-rate", 3e-3, "--weight-decay", 0.01,
            "--num-workers", 1, "--logging-steps", 5)
    assert r.returncode == 0, r.stderr
    return folder, out, r


def test_training_learns_and_writes_the_output_folder(trained):
    folder, out, r = trained
    results = json.loads((out / "eval_results.json").read_text())
    # Golden behaviour of this seed and setup: 1.0 best accuracy; the bound leaves room for BLAS differences.
    assert results["eval_accuracy"] >= 0.9
    assert {"eval_accuracy", "eval_loss", "epoch", "eval_top5_accuracy", "per_class_accuracy"} <= set(results)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rec = [x for x in records if x["type"] == "train"]
    evals = [x for x in records if x["type"] == "eval"]
    assert len(evals) == 15 and [e["epoch"] for e in evals] == list(range(1, 16))
    assert max(e["eval_accuracy"] for e in evals) == results["eval_accuracy"]
    best = max(evals, key=lambda e: e["eval_accuracy"])
    assert results["epoch"] == best["epoch"]  # the first best epoch is what was kept
    for x in train_rec:
        assert {"step", "epoch", "loss", "learning_rate", "images_per_s"} <= set(x)
    assert train_rec[0]["step"] == 5 and train_rec[-1]["loss"] < train_rec[0]["loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "blue_square", "1": "green_disc", "2": "red_stripes"}
    assert "best eval_accuracy" in r.stderr and "Traceback" not in r.stderr


def test_infer_prints_top_k_and_json(trained):
    folder, out, _ = trained
    images = [folder / "green_disc" / "0001.jpg", folder / "red_stripes" / "0003.png"]
    r = run("infer.py", *images, "--model", out, "--json", "--top-k", 2)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["image"] for x in lines] == [str(p) for p in images]
    assert [x["predictions"][0]["label"] for x in lines] == ["green_disc", "red_stripes"]
    for x in lines:
        scores = [p["score"] for p in x["predictions"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    text = run("infer.py", images[0], "--model", out)
    assert text.returncode == 0 and text.stdout.splitlines()[0] == str(images[0])
    assert text.stdout.splitlines()[1].split()[-1] == "green_disc" and len(text.stdout.splitlines()) == 4


def test_transformers_pipeline_loads_the_output_and_agrees(trained):
    from transformers import pipeline

    import vitfood

    folder, out, _ = trained
    pipe = pipeline("image-classification", model=str(out))
    for path in [folder / "blue_square" / "0000.jpg", folder / "red_stripes" / "0007.png"]:
        theirs = pipe(str(path), top_k=3)
        ours = vitfood.classify(path, out, top_k=3)
        assert [p["label"] for p in ours] == [p["label"] for p in theirs]
        # transformers resizes with torchvision, we with PIL: pixels may differ by one level.
        assert [p["score"] for p in ours] == pytest.approx([p["score"] for p in theirs], abs=2e-3)
        assert vitfood.predict(path, out) == theirs[0]["label"]


def test_infer_bad_inputs_one_line_each_others_still_classified(trained, tmp_path):
    _, out, _ = trained
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    good = awkward_images(tmp_path / "awkward")
    (tmp_path / "truncated.jpg").write_bytes((good / "cmyk.jpg").read_bytes()[:300])
    valid = sorted(good.iterdir())
    bad = [tmp_path / "missing.jpg", tmp_path / "empty.jpg", tmp_path / "notes.jpg", tmp_path / "truncated.jpg"]
    r = run("infer.py", bad[0], *valid[:4], bad[1], bad[2], *valid[4:], bad[3], "--model", out, "--json")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 4
    for line, path in zip(errors, bad):
        assert line.startswith("infer.py: error: ") and str(path) in line
    assert [json.loads(x)["image"] for x in r.stdout.splitlines()] == [str(p) for p in valid]


def test_infer_without_a_trained_model(tmp_path, backbone_dir):
    r = run("infer.py", "x.jpg", "--model", backbone_dir)
    assert r.returncode == 2 and "no trained classifier head" in r.stderr and "Traceback" not in r.stderr
    r = run("infer.py", "x.jpg", cwd=tmp_path)  # default --model: ./vitfood-output, not trained yet
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    # Not trained yet: said so, with where it looked and the two ways on; no Hub, no prepare.py.
    assert r.stderr.startswith(f"infer.py: error: no trained model in ./vitfood-output ({tmp_path / 'vitfood-output'})")
    assert "train one first with `python train.py " in r.stderr and "or pass --model" in r.stderr
    assert "cannot be reached" not in r.stderr and "prepare.py" not in r.stderr


# A path that cannot be a Hub id (./, ~, a trailing slash, two slashes, a space) is never sent to the Hub.
@pytest.mark.parametrize("model, dataset", [("./models/nope", "data/nope/"), ("~/no-such-vit", "a/b/c")])
def test_a_missing_local_path_is_named_first_and_never_gets_hub_advice(tmp_path, model, dataset):
    from pathlib import Path

    r = run("train.py", "--model", model, "--dataset", dataset, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    where = {name: Path(name).expanduser() if name.startswith("~") else tmp_path / name for name in (model, dataset)}
    assert r.stderr == (f"train.py: error: --model {model!r}: no such local folder ({str(where[model]).rstrip('/')}); "
                        f"--dataset {dataset!r}: no such local folder ({str(where[dataset]).rstrip('/')})\n")


@pytest.mark.parametrize("argv", [
    ["train.py", "--epochs", "1.5"],  # argparse's own errors: once a 16-line usage block
    ["train.py", "--no-such-flag"],
    ["train.py", "--precision", "fp8"],
    ["train.py", "--epochs", "0"],  # the configuration's own checks
    ["infer.py"],
    ["infer.py", "x.jpg", "--top-k", "0"],
    ["prepare.py", "--max-samples", "1.5"],
])
def test_every_flag_error_is_one_line_and_exit_2(argv, tmp_path):
    r = run(*argv, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"{argv[0]}: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "usage:" not in r.stderr


def test_resume_command_is_the_typed_command_plus_the_flag():
    from vitfood.cli import resume_command
    from vitfood.config import parse_config

    argv = ["--dataset", "my photos", "--epochs", "3", "--resume-from-checkpoint", "o/checkpoints/step-2", "--seed=1"]
    line = resume_command(argv, argv0="../vitfood/train.py")
    assert line == "python ../vitfood/train.py --dataset 'my photos' --epochs 3 --seed=1 --resume-from-checkpoint"
    cfg = parse_config(shlex.split(line)[2:])  # what the shell hands train.py is what it had, resuming the newest
    assert (cfg.dataset, cfg.seed, cfg.resume_from_checkpoint) == ("my photos", 1, "latest")
    for given in (["--resume-from-checkpoint"], ["--resume-from-checkpoint=x"], ["--resume", "x"]):
        assert resume_command(["--epochs", "2", *given], argv0="train.py") == \
            "python train.py --epochs 2 --resume-from-checkpoint"
    assert resume_command(["--resume", "--epochs", "2"], argv0="/venv/bin/vitfood-train") == \
        "vitfood-train --epochs 2 --resume-from-checkpoint"


def test_the_interrupt_line_prints_the_command_to_resume(tmp_path, monkeypatch, capsys):
    from vitfood import cli, train_loop
    from vitfood.resume import TrainingInterrupted

    def stopped(cfg):
        raise TrainingInterrupted(signal.SIGINT, tmp_path / "out" / "checkpoints" / "step-00000007")

    monkeypatch.setattr(train_loop, "train", stopped)
    monkeypatch.setattr("sys.argv", ["train.py"])
    argv = ["--model", str(tmp_path), "--dataset", str(tmp_path), "--output-dir", str(tmp_path / "out"),
            "--learning-rate", "1e-3"]
    assert cli.train_main(argv) == 130
    line = capsys.readouterr().err
    assert line == (f"train.py: stopped by SIGINT after saving {tmp_path}/out/checkpoints/step-00000007; to continue "
                    f"exactly where it stopped, run: python train.py {shlex.join(argv)} --resume-from-checkpoint\n")


def test_raising_epochs_on_resume_recomputes_the_schedule_as_the_end_of_run_line_says():
    from types import SimpleNamespace

    from vitfood.optim import Schedule

    def schedule(epochs):
        return Schedule.for_run(10, SimpleNamespace(epochs=epochs, grad_accum_steps=1, warmup_ratio=0.1,
                                                    learning_rate=1e-3))

    done, longer = schedule(3), schedule(6)
    assert done.lr(done.total_steps) == 0  # the finished run's rate had decayed to 0
    # Resumed at that step with twice the epochs: back up to the longer run's value there, then down to 0 at its end.
    assert longer.warmup_steps == 6 and longer.lr(done.total_steps) == pytest.approx(1e-3 * 30 / 54)
    assert longer.lr(longer.total_steps) == 0


def test_infer_help_lists_only_what_it_accepts():
    r = run("infer.py", "--help")
    assert r.returncode == 0
    assert "(default: False)" not in r.stdout and "fp16" not in r.stdout
    assert "--precision {auto,bf16,fp32}" in r.stdout and "examples:" in r.stdout


def test_offline_hub_paths_fail_with_one_line(backbone_dir, image_folder, tmp_path):
    r = run("train.py", "--dataset", image_folder, "--output-dir", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "google/vit-base-patch16-224-in21k" in r.stderr and "--model PATH" in r.stderr
    r = run("train.py", "--model", backbone_dir, "--output-dir", tmp_path / "o")
    assert r.returncode == 2 and "'ethz/food101'" in r.stderr and "--dataset PATH" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_infer_imports_no_heavy_libraries(trained):
    _, out, _ = trained
    import subprocess
    import sys

    from helpers import ROOT

    code = ("import sys, runpy; sys.argv=['infer.py', sys.argv[1], '--model', sys.argv[2]];"
            "import vitfood.cli as c; rc=c.infer_main(sys.argv[1:]);"
            "print(sorted(m for m in ('transformers', 'datasets', 'torchvision') if m in sys.modules))")
    img = out.parent / "images" / "green_disc" / "0002.jpg"
    r = subprocess.run([sys.executable, "-c", code, str(img), str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
