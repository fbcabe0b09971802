"""The configuration's metadata, the console's lines, the learning verdict, and the training-sample cap."""

import dataclasses
import io
import json
import re

import pytest

from helpers import make_image_folder, run
from vitfood.config import FREE, GUIDE_TRAIN_SAMPLES, MATCH, WARN, TrainConfig, build_parser, is_hyperparameter
from vitfood.evaluation import learning_verdict
from vitfood.logs import Console, duration


def test_every_field_says_how_it_resumes_and_whether_the_card_shows_it():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["resume"] in (MATCH, WARN, FREE), f.name
        assert isinstance(f.metadata["card"], bool), f.name
        assert f.metadata["help"], f.name
    # Spot checks of the classification: what decides the data order must match; where files go is free.
    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    assert meta["seed"]["resume"] == meta["crop_scale"]["resume"] == meta["batch_size"]["resume"] == MATCH
    assert meta["output_dir"]["resume"] == meta["decode_cache"]["resume"] == FREE
    assert meta["epochs"]["resume"] == WARN
    assert is_hyperparameter("learning_rate") and not is_hyperparameter("output_dir")
    assert is_hyperparameter("train_images")  # a fact of the run, not a flag: shown


def test_switches_off_by_default_show_only_their_positive_form():
    text = build_parser().format_help()
    for flag in ("compile", "eval-only", "push-to-hub", "overwrite-output-dir"):
        assert f"--{flag}" in text and f"--no-{flag}" not in text
    assert "--flip, --no-flip" in text  # on by default: the way to turn it off is listed
    assert "(default: False)" not in text and "(default: None)" not in text


def test_the_training_sample_cap_belongs_to_the_guides_dataset():
    assert TrainConfig().train_samples() == GUIDE_TRAIN_SAMPLES
    assert TrainConfig(dataset="./my_photos").train_samples() == 0  # every image
    assert TrainConfig(dataset="./my_photos", max_train_samples=300).train_samples() == 300
    assert TrainConfig(max_train_samples=0).train_samples() == 0


def test_duration_reads_as_a_clock():
    assert [duration(s) for s in (0, 75, 3725)] == ["0:00", "1:15", "1:02:05"]


def test_console_in_a_file_writes_plain_lines_with_progress_and_eta():
    out = io.StringIO()  # not a terminal
    console = Console(enabled=True, stream=out, every_s=0.0)
    console.start_progress(total_steps=4, done_steps=0)
    console.advance()
    console.write({"type": "train", "step": 1, "loss": 1.23456789})
    console.say("a message")
    console.close()
    text = out.getvalue()
    assert "\r" not in text  # no progress-bar frames
    lines = text.splitlines()
    assert re.fullmatch(r"step 1/4 \(25%\), [\d.]+ steps/s, ETA \d+:\d\d", lines[0])
    assert lines[1].startswith("{'step': 1, 'loss': 1.234568}  [step 1/4 (25%)")
    assert lines[2] == "a message"


def test_a_silent_console_says_nothing():
    out = io.StringIO()
    console = Console(enabled=False, stream=out, every_s=0.0)
    console.start_progress(3, 0)
    console.advance()
    console.say("rank 1 says this")
    assert out.getvalue() == ""


@pytest.mark.parametrize("confusion, accuracy, expect", [
    ([[5, 0, 0], [0, 5, 0], [0, 0, 5]], 1.0, None),  # learned
    ([[5, 0, 0], [5, 0, 0], [5, 0, 0]], 1 / 3, "no better than always predicting the most frequent class"),
    ([[8, 0, 0], [1, 0, 0], [1, 0, 0]], 0.8, "no better than always predicting"),  # 0.8 = the majority's share
    ([[9, 0, 1], [9, 1, 0], [9, 0, 1]], 11 / 30, "90% of the evaluation images were predicted as one class"),
    ([[4, 1], [1, 4]], 0.8, None),
])
def test_learning_verdict(confusion, accuracy, expect):
    verdict = learning_verdict(confusion, accuracy, 5e-5)
    if expect is None:
        assert verdict is None
    else:
        assert expect in verdict and "Small datasets and learning rates" in verdict


def test_a_run_that_learns_nothing_says_so(backbone_dir, tmp_path):
    # lr 0: the random head is all the model has; with seed 0 it answers one class for every one of the 6
    # evaluation images (2 a class since the split is stratified; seed 42's head got 3 of them right).
    folder = make_image_folder(tmp_path / "img", per_class=10)
    out = tmp_path / "out"
    r = run("train.py", "--model", backbone_dir, "--dataset", folder, "--output-dir", out, "--epochs", 1,
            "--batch-size", 8, "--grad-accum-steps", 1, "--learning-rate", 0, "--seed", 0)
    assert r.returncode == 0, r.stderr
    assert "vitfood: warning: this model did not learn" in r.stderr
    assert "this model did not learn" in (out / "README.md").read_text()
    # The same run's stderr is a pipe, as when logged to a file: plain lines, plurals that read right.
    assert "\r" not in r.stderr and "ETA" not in r.stderr.splitlines()[-1]
    assert re.search(r"\[step \d+/\d+ \(\d+%\), [\d.]+ steps/s", r.stderr)
    assert "3 classes; 1 epoch x 3 optimizer steps of 8 x 1" in r.stderr
    assert "1 checkpoint (" in r.stderr and "delete the folder to free the space, or keep it to train longer: the " \
        "same command with a higher --epochs and --resume-from-checkpoint" in r.stderr
    # run.json's timeline: where the whole process's time went, in order, from the process's start.
    record = json.loads((out / "run.json").read_text())
    events = [e["event"] for e in record["timeline"]]
    for event in ("imports done", "dataset and model loaded", "training started",
                  "first optimizer step done (with any compilation)", "epoch 1 evaluated",
                  "checkpoint step-00000003 and the best model: snapshot taken", "report and model card written"):
        assert event in events
    # Written by the background writer while the run went on; the end of the run waited for it.
    written = [e for e in events if e.startswith("checkpoint step-00000003 and the best model written in the "
                                                 "background in ")]
    assert len(written) == 1 and events.index(written[0]) < events.index("report and model card written")
    times = [e["at_s"] for e in record["timeline"]]
    assert times == sorted(times) and 0 < times[0] < times[-1] < 120
    assert record["config"]["compile"] == "off" and record["config"]["compile_decision"] == "off (auto: not on the CPU)"


def test_train_help_as_a_user_sees_it():
    r = run("train.py", "--help")
    assert r.returncode == 0 and "--compile " in r.stdout and "--no-compile" not in r.stdout
    assert "--micro-batch-size auto|N" in r.stdout and "--crop-scale MIN MAX" in r.stdout
    assert "--eval-batch-size auto|N" in r.stdout and "--deterministic " in r.stdout


def test_a_local_folder_trains_on_every_image_by_default(backbone_dir, tmp_path, capsys):
    from vitfood.cli import train_main

    # More images than the guide's 5,000: none may be left out without a word (tiny images, one short epoch).
    folder = make_image_folder(tmp_path / "img", per_class=1734, classes=("a", "b", "c"), size=(8, 8))
    n = sum(1 for _ in folder.rglob("*.*"))
    assert n == 5202
    out = tmp_path / "out"
    r = run("train.py", "--model", backbone_dir, "--dataset", folder, "--output-dir", out, "--epochs", 1,
            "--batch-size", 512, "--eval-batch-size", 512, "--grad-accum-steps", 1, "--decode-cache", "off",
            timeout=300)
    assert r.returncode == 0, r.stderr
    record = json.loads((out / "run.json").read_text())["config"]
    assert record["train_images"] + record["eval_images"] == n
    assert f"(all {n:,} images of {folder}, 20% held out for evaluation)" in r.stderr
    capped = ["--model", backbone_dir, "--dataset", folder, "--output-dir", tmp_path / "capped", "--epochs", 1,
              "--batch-size", 512, "--grad-accum-steps", 1, "--max-train-samples", 100, "--eval-batch-size", 512]
    assert train_main(list(map(str, capped))) == 0  # in process: train.py's own main
    assert f"(100 of the {n:,} images of {folder} (--max-train-samples 100), 20% held out" in capsys.readouterr().err


@pytest.mark.parametrize("setting, device, images, expect", [
    ("on", "cpu", 10, (True, "on")),
    ("off", "cuda", 10**6, (False, "off")),
    ("auto", "cpu", 10**6, (False, "off (auto: not on the CPU)")),
    ("auto", "cuda", 12_000, (False, "off (auto: 12,000 training images are fewer than 100,000)")),
    ("auto", "cuda", 227_250, (True, "on (auto: 227,250 training images)")),  # Food-101's train split, 3 epochs
])
def test_compile_decision(setting, device, images, expect):
    from vitfood.execution import compile_decision

    assert compile_decision(setting, device, images) == expect



def test_counts_read_right():
    from vitfood.run import plural

    assert [plural(1, "epoch"), plural(3, "epoch"), plural(2, "class", "classes"), plural(1, "class", "classes"),
            plural(1200, "image")] == ["1 epoch", "3 epochs", "2 classes", "1 class", "1,200 images"]


def test_a_checkpoint_of_the_version_before_crop_scale_and_micro_batches_resumes(tmp_path):
    # What b3f074c saved: no crop_scale in the setup; compile a bool; no micro_batch_size in the config.
    from dataclasses import asdict

    from vitfood.resume import check_resume, run_facts

    cfg = TrainConfig(dataset="./photos")
    facts = run_facts(cfg, ["a", "b"], 224, 1)
    old_setup = {k: v for k, v in facts.items() if k != "crop_scale"}
    old_config = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k != "micro_batch_size"}
    old_config["compile"] = False
    said = []
    check_resume({"setup": old_setup, "config": old_config}, facts, cfg, said.append, tmp_path)
    assert said == []  # the same run: nothing refused, nothing changed
    with pytest.raises(Exception, match="differs in crop_scale"):
        check_resume({"setup": old_setup, "config": old_config}, run_facts(
            TrainConfig(dataset="./photos", crop_scale=(0.5, 1.0)), ["a", "b"], 224, 1), cfg, said.append, tmp_path)


def test_a_checkpoint_of_the_version_before_eval_batch_auto_and_deterministic_resumes(tmp_path):
    # Before: eval_batch_size a number, 16 by default; no deterministic. The same command resumes in silence.
    from dataclasses import asdict

    from vitfood.resume import check_resume, run_facts

    def resume(old_eval_batch: int, cfg: TrainConfig) -> list[str]:
        old_config = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k != "deterministic"}
        old_config["eval_batch_size"] = old_eval_batch
        facts = run_facts(cfg, ["a", "b"], 224, 1)
        said = []
        check_resume({"setup": facts, "config": old_config}, facts, cfg, said.append, tmp_path)
        return said

    assert resume(16, TrainConfig(dataset="./photos")) == []  # the old default: today's auto
    assert resume(64, TrainConfig(dataset="./photos", eval_batch_size=64)) == []  # --eval-batch-size 64, then and now
    assert resume(64, TrainConfig(dataset="./photos")) == [
        "vitfood: warning: resuming with changed settings (eval_batch_size): the run continues, but will not match "
        "an uninterrupted one exactly"]
    assert "deterministic" in resume(16, TrainConfig(dataset="./photos", deterministic=True))[0]


def test_choices_are_checked_from_python_too():
    from vitfood.errors import VitfoodError

    with pytest.raises(VitfoodError, match="--compile must be one of auto, on, off, got 'yes'"):
        TrainConfig(compile="yes").validate()
