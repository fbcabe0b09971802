"""Reliability: exact resumption after signals and crashes, atomic checkpoints, safe loading, faults."""

import json
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, make_image_folder, nan_checkpoint, run

# Every step's checkpoint is kept (--save-total-limit 0, not the default 1): the tests resume from
# earlier ones and compare the checkpoints of two runs.
COMMON = ["--epochs", 2, "--batch-size", 4, "--grad-accum-steps", 2, "--learning-rate", 1e-3,
          "--logging-steps", 1, "--save-steps", 1, "--save-total-limit", 0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("res"), per_class=9)  # 27 images: 21 train = 6 batches = 3 steps/epoch


def train_args(backbone_dir, folder, out, workers):
    return ["--model", backbone_dir, "--dataset", folder, "--output-dir", out, "--num-workers", workers, *COMMON]


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"]


def evals(out):
    return [(r["step"], r["eval_accuracy"], r["eval_loss"])
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]


def last_checkpoint(out):
    return sorted((out / "checkpoints").glob("step-*"))[-1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, backbone_dir, folder):
    outs = {}
    for workers in (0, 2):
        out = tmp_path_factory.mktemp(f"full{workers}") / "out"
        r = run("train.py", *train_args(backbone_dir, folder, out, workers))
        assert r.returncode == 0, r.stderr
        outs[workers] = out
    return outs


def assert_same_run(a, b):
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (last_checkpoint(a) / "model.safetensors").read_bytes() == \
        (last_checkpoint(b) / "model.safetensors").read_bytes()
    assert losses(a) == losses(b) and evals(a) == evals(b)


def stop_with_sigterm(args, out):
    """train.py with `args`, stopped by SIGTERM once step 2 (mid-epoch 1) is saved, as a scheduler stops a job."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-00000002").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    # The exact command that resumes, quoted for the shell: the one typed, plus --resume-from-checkpoint.
    command = shlex.join(["python", str(ROOT / "train.py"), *map(str, args), "--resume-from-checkpoint"])
    assert f"to continue exactly where it stopped, run: {command}\n" in err
    assert 2 <= int(last_checkpoint(out).name[5:]) < 6


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_then_resume_gives_the_same_weights_and_losses(backbone_dir, folder, uninterrupted, tmp_path, workers):
    out = tmp_path / "out"
    stop_with_sigterm(train_args(backbone_dir, folder, out, workers), out)
    r = run("train.py", *train_args(backbone_dir, folder, out, workers), "--resume-from-checkpoint")
    assert r.returncode == 0, r.stderr
    assert f"resuming from {out / 'checkpoints'}" in r.stderr
    assert_same_run(uninterrupted[workers], out)


def test_sigterm_then_resume_with_deterministic_gives_the_same_bits(backbone_dir, folder, uninterrupted, tmp_path):
    # --deterministic is for GPUs; on the CPU it must keep exact resumption as it is (and record itself). The CPU's
    # kernels are deterministic already, so the run without the flag is the reference, to the bit.
    out = tmp_path / "out"
    stop_with_sigterm([*train_args(backbone_dir, folder, out, 0), "--deterministic"], out)
    r = run("train.py", *train_args(backbone_dir, folder, out, 0), "--deterministic", "--resume-from-checkpoint")
    assert r.returncode == 0, r.stderr
    assert "changed settings" not in r.stderr
    assert json.loads((out / "run.json").read_text())["config"]["deterministic_algorithms"].startswith("on (")
    assert_same_run(uninterrupted[0], out)


@pytest.mark.parametrize("step", [2, 3, 4])  # mid-epoch; the first epoch's end (after its evaluation); mid-epoch 2
def test_resume_from_a_chosen_checkpoint(backbone_dir, folder, uninterrupted, tmp_path, step):
    from vitfood.cli import train_main

    full = uninterrupted[0]
    out = tmp_path / "out"
    shutil.copytree(full, out)
    for ckpt in (out / "checkpoints").glob("step-*"):
        if int(ckpt.name[5:]) > step:
            shutil.rmtree(ckpt)
    for name in ("model.safetensors", "config.json", "eval_results.json"):
        (out / name).unlink()  # as if the run had died before saving any of its later results
    # In process (train.py's own main): the resumes by a new process are the SIGTERM tests'.
    assert train_main([*map(str, train_args(backbone_dir, folder, out, 0)), "--resume-from-checkpoint"]) == 0
    assert (last_checkpoint(out) / "model.safetensors").read_bytes() == \
        (last_checkpoint(full) / "model.safetensors").read_bytes()
    assert losses(out) == losses(full)


def test_a_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(backbone_dir, folder, uninterrupted, tmp_path):
    out = tmp_path / "out"
    # A real process, really killed (SIGKILL, no clean-up) half-way through step 5's optimizer.pt, its model
    # files already whole (steps 1, 2, 3, 4 saved whole). Found by name: how many files a checkpoint holds
    # and how many other files the run writes in between are not this test's business.
    crash = ("import os, signal, sys; import vitfood.fileio as c; real = c.fsync_write\n"
             "def write(path, data):\n"
             "    if path.parent.name.startswith('.tmp-step-00000005') and path.name == 'optimizer.pt':\n"
             "        real(path, data[: len(data) // 2]); os.kill(os.getpid(), signal.SIGKILL)\n"
             "    real(path, data)\n"
             "c.fsync_write = write\n"
             "from vitfood.cli import train_main; sys.exit(train_main(sys.argv[1:]))")
    args = [sys.executable, "-c", crash, *map(str, train_args(backbone_dir, folder, out, 0))]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == -signal.SIGKILL
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))][-1] == "step-00000004"
    assert list((out / "checkpoints").glob(".tmp-*"))  # the half-written save is there, and ignored
    r = run("train.py", *train_args(backbone_dir, folder, out, 0), "--resume-from-checkpoint")
    assert r.returncode == 0, r.stderr
    assert "step 4" in r.stderr
    assert_same_run(uninterrupted[0], out)


def test_a_malicious_optimizer_pickle_is_refused(backbone_dir, folder, uninterrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted[0], out)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (last_checkpoint(out) / "optimizer.pt").write_bytes(pickle.dumps({"state": Evil()}))
    r = run("train.py", *train_args(backbone_dir, folder, out, 0), "--resume-from-checkpoint")
    assert r.returncode == 2 and "refused to load" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_incompatible_resume_says_what_differs_and_harmless_changes_warn(backbone_dir, folder, uninterrupted, tmp_path,
                                                                         capsys):
    from vitfood.cli import train_main

    out = tmp_path / "out"
    shutil.copytree(uninterrupted[0], out)
    args = train_args(backbone_dir, folder, out, 0)
    # The refusals in process (train.py's own main, its exit status and stderr), the accepted resume as a user runs it.
    assert train_main([*map(str, args), "--batch-size", "8", "--resume-from-checkpoint"]) == 2
    assert "batch_size: 4 then, 8 now" in capsys.readouterr().err
    other = make_image_folder(tmp_path / "other", per_class=9, classes=("a", "b", "c"))
    assert train_main([*map(str, args), "--dataset", str(other), "--resume-from-checkpoint"]) == 2
    err = capsys.readouterr().err
    assert "labels:" in err and "dataset:" in err
    r = run("train.py", *args, "--epochs", 3, "--resume-from-checkpoint")
    assert r.returncode == 0, r.stderr
    assert "warning: resuming with changed settings (epochs)" in r.stderr
    assert max(s for s, _ in losses(out)) == 9


def test_no_checkpoint_to_resume(backbone_dir, folder, tmp_path, capsys):
    from vitfood.cli import train_main

    args = [*map(str, train_args(backbone_dir, folder, tmp_path / "new", 0)), "--resume-from-checkpoint"]
    assert train_main(args) == 2 and "no complete checkpoint" in capsys.readouterr().err


def test_save_total_limit_keeps_only_the_newest(backbone_dir, folder, tmp_path):
    # The best checkpoint is not kept on top of them: the best model is saved whole at the top of the
    # output folder, and a checkpoint's only other use, resuming, wants the newest.
    from vitfood.cli import train_main

    out = tmp_path / "out"
    assert train_main([*map(str, train_args(backbone_dir, folder, out, 0)), "--save-total-limit", "2"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005", "step-00000006"]


def test_nonfinite_loss_stops_before_the_step(backbone_dir, folder, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from vitfood.cli import train_main

    # A pretrained checkpoint with one corrupt (NaN) value: every loss is NaN from the first step.
    bad_ckpt = nan_checkpoint(backbone_dir, tmp_path / "nan-model")
    out = tmp_path / "out"
    args = train_args(backbone_dir, folder, out, 0)
    args[1] = bad_ckpt
    r = run("train.py", *args)
    assert r.returncode == 2 and "non-finite loss or gradient norm at optimizer step 1 (epoch 1)" in r.stderr
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()
    assert train_main([*map(str, args), "--skip-nonfinite", "2"]) == 2  # in process: train.py's own main
    err = capsys.readouterr().err
    assert "at optimizer step 3" in err and err.count("skipped optimizer step") == 2
    weights = load_file(str(out / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert torch.isfinite(weights["vit.encoder.layer.0.intermediate.dense.weight"]).all()


@pytest.fixture
def small_disk(tmp_path):
    """A real 450 KB file system (tmpfs): room for one tiny-model checkpoint, not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=450k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a tmpfs (root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_stops_with_the_previous_checkpoint_intact(backbone_dir, folder, uninterrupted, small_disk):
    out = small_disk / "out"
    r = run("train.py", *train_args(backbone_dir, folder, out, 0))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "No space left on device" in r.stderr and "previous checkpoints are intact" in r.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]  # no half-written leftovers
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    # More room, then resume: nothing was lost, the run ends exactly as an uninterrupted one.
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    r = run("train.py", *train_args(backbone_dir, folder, out, 0), "--resume-from-checkpoint")
    assert r.returncode == 0, r.stderr
    assert_same_run(uninterrupted[0], out)


def test_a_read_only_output_folder_fails_before_training(backbone_dir, folder, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    r = run("train.py", *train_args(backbone_dir, folder, small_disk / "out", 0))
    assert r.returncode == 2 and "cannot write there (Read-only file system)" in r.stderr
    assert "train:" not in r.stderr  # no step was taken


def test_a_resume_takes_this_runs_optimizer_options_and_any_precisions_scaler(backbone_dir):
    # A CPU run's checkpoint (unfused AdamW, weight decay 0) resumed as on a GPU (fused AdamW: built for "cuda",
    # which the CPU runs too) with --weight-decay 0.5, in fp16 (a GradScaler, which a CPU checkpoint has no state for).
    import io

    import torch

    from vitfood.models import load_model
    from vitfood.optim import build_optimizer
    from vitfood.resume import load_optimizer_state, load_scaler_state

    model, _ = load_model(backbone_dir, labels=["a", "b"])
    cpu_run = build_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    cpu_run.step()
    buf = io.BytesIO()
    torch.save(cpu_run.state_dict(), buf)  # as checkpoint.py writes it, read back as it reads it
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    before = [p.detach().clone() for p in model.parameters()]

    def one_step_after_resume(load) -> list:
        with torch.no_grad():
            for p, b in zip(model.parameters(), before):
                p.copy_(b)
        gpu_run = build_optimizer(model, 1e-3, 0.5, torch.device("cuda"))
        load(gpu_run)
        gpu_run.step()
        return gpu_run, [p.detach().clone() for p in model.parameters()]

    resumed, after = one_step_after_resume(lambda opt: load_optimizer_state(opt, saved))
    assert [g["fused"] for g in resumed.param_groups] == [True, True]
    assert [g["weight_decay"] for g in resumed.param_groups] == [0.5, 0.0]
    decayed = {id(p) for p in resumed.param_groups[0]["params"]}
    state = next(iter(resumed.state.values()))
    assert state["step"].item() == 2 and state["step"].dtype == torch.float32  # the fused kernel's step count
    # torch's own load keeps the checkpoint's options: unfused, no decay. The difference of one step is the
    # decay itself, lr x 0.5 x the weight, on the decayed group only: the new --weight-decay applies.
    kept, plain = one_step_after_resume(lambda opt: opt.load_state_dict(saved))
    assert [g["fused"] for g in kept.param_groups] == [None, None] or not kept.param_groups[0]["fused"]
    for p, b, a, q in zip(model.parameters(), before, after, plain):
        expected = 1e-3 * 0.5 * b if id(p) in decayed else torch.zeros_like(b)
        torch.testing.assert_close(q - a, expected, atol=1e-7, rtol=1e-3)
    # The loss scale: a CPU/bf16/fp32 checkpoint saved none (a disabled scaler's state is {}).
    fp16 = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError, match="empty"):
        fp16.load_state_dict({})  # the crash this mends
    load_scaler_state(fp16, {})
    assert fp16.get_scale() == 2.0**16  # a fresh scale
    load_scaler_state(fp16, {**fp16.state_dict(), "scale": 1024.0})  # an fp16 checkpoint's scale is kept
    assert fp16.get_scale() == 1024.0
    load_scaler_state(torch.amp.GradScaler("cpu", enabled=False), fp16.state_dict())  # fp16 into bf16: no use


def test_a_checkpoint_from_before_a_must_match_setting_resumes(tmp_path):
    # Every must-match setting an older vitfood did not have (its checkpoint lacks it) reads as the field's own
    # default, which is what the run did then: the same command resumes, and a changed value is still refused.
    from dataclasses import asdict

    from vitfood.config import MATCH, TrainConfig, fields_where
    from vitfood.errors import VitfoodError
    from vitfood.resume import check_resume, run_facts

    cfg = TrainConfig(dataset="./photos")
    facts = run_facts(cfg, ["a", "b"], 224, 1)
    defaults = json.loads(json.dumps(asdict(TrainConfig())))
    newer = [n for n in fields_where("resume", MATCH) if facts[n] == defaults[n]]  # (not max_train_samples: resolved)
    assert {"rotation", "zoom", "crop_scale", "flip"} <= set(newer)
    old_setup = {k: v for k, v in facts.items() if k not in newer}
    old_config = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in newer}
    said = []
    check_resume({"setup": old_setup, "config": old_config}, facts, cfg, said.append, tmp_path)
    assert said == []
    rotated = TrainConfig(dataset="./photos", rotation=7.0)
    with pytest.raises(VitfoodError, match=r"the run differs in rotation: 0.0 then, 7.0 now$"):
        check_resume({"setup": old_setup, "config": old_config}, run_facts(rotated, ["a", "b"], 224, 1), rotated,
                     said.append, tmp_path)
