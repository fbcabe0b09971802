"""The training's GPU paths, run for real: only where CUDA exists (the `gpu` marker; skipped elsewhere: conftest.py).

Each test runs train.py as a user does (a new process, offline), on tiny models and drawn images; independent runs go
at once (one H200 has room for many tiny runs), so that the whole file takes about 2 minutes. What each compares, and
to what tolerance, is said where it is compared. These tests first run unattended on a GPU machine: every branch here
was read for that, and none of them could be run where they were written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, make_checkpoint, make_image_folder, nan_checkpoint

pytestmark = pytest.mark.gpu

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

# Wrappers for what a test must do inside the training process, outside vitfood's code: vitfood is imported from this
# checkout (its root first on sys.path), then its command runs in the same process.
PREAMBLE = f"import os, signal, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
RUN_MAIN = "from vitfood.cli import train_main\nsys.exit(train_main(sys.argv[1:]))\n"
# A per-process cap on the caching allocator's memory (this test's only way to make a small GPU of an H200), and the
# peak it reserved, printed at exit.
CAPPED = PREAMBLE + (
    "import atexit, torch\n"
    "cap = float(os.environ['TEST_GPU_MEMORY_CAP'])\n"
    "if cap:\n"
    "    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory, 0)\n"
    "atexit.register(lambda: print('PEAK_RESERVED', torch.cuda.max_memory_reserved(0), flush=True))\n") + RUN_MAIN
# A real SIGTERM, sent by the process to itself once optimizer step TEST_SIGTERM_AT is done: a scheduler's signal at a
# known step (on a GPU the steps of a tiny model are too fast for a signal from outside to land at a chosen one).
SIGTERM_AT = PREAMBLE + (
    "from vitfood import train_loop\n"
    "at, real = int(os.environ['TEST_SIGTERM_AT']), train_loop.after_step\n"
    "def after_step(t, *args, **kwargs):\n"
    "    if t.state.step == at:\n"
    "        os.kill(os.getpid(), signal.SIGTERM)\n"
    "    return real(t, *args, **kwargs)\n"
    "train_loop.after_step = after_step\n") + RUN_MAIN


def start(args, script: str | None = None, env: dict | None = None, launcher: list[str] | None = None,
          program: str = "train.py"):
    """`program` (or a wrapper `script` around train.py's command) with `args`, started by `launcher` (Python);
    `finish` waits for it."""
    code = ["-c", script] if script else [str(ROOT / program)]
    cmd = [*(launcher or [sys.executable]), *code, *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**ENV, **(env or {})})


def finish(proc, expect: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == expect, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_all(*procs, expect: int = 0) -> list[subprocess.CompletedProcess]:
    return [finish(p, expect) for p in procs]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"]


def last_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((out / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gpu-tiny"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # 27 images: 21 for training = 6 batches of 4 = 3 optimizer steps of 4 x 2 an epoch (the resume tests' shape).
    return make_image_folder(tmp_path_factory.mktemp("gpu-images"), per_class=9)


def small_run(model, dataset, out, *extra):
    return ["--model", model, "--dataset", dataset, "--output-dir", out, "--epochs", 2, "--batch-size", 4,
            "--grad-accum-steps", 2, "--learning-rate", 1e-3, "--num-workers", 2, "--logging-steps", 1,
            "--save-steps", 1, "--save-total-limit", 0, *extra]


def test_train_py_at_its_defaults_end_to_end_and_the_output_works_in_transformers(tiny, tmp_path):
    # Every default: bf16, the whole step in one pass (micro-batch auto), evaluation batches auto, DataLoader workers
    # (cores - 1, at most 16) with pinned memory, the decoded-image cache, background saves. Only the learning rate
    # is raised, so that 6 steps teach the tiny model enough for clear top-1 answers to compare.
    from transformers import pipeline

    images = make_image_folder(tmp_path / "img", per_class=32)
    out = tmp_path / "out"
    r = finish(start(["--model", tiny, "--dataset", images, "--output-dir", out, "--learning-rate", 1e-3]))
    config = record(out)["config"]
    assert (config["precision"], config["device"], config["micro_batch_size"]) == ("bf16", "cuda:0", 64)
    assert config["eval_batch_size"] == 64 and config["decode_cache"] == "on"  # auto: never fewer than a pass
    assert config["num_workers"] == max(0, min(16, len(os.sched_getaffinity(0)) - 1)) > 0
    assert any("written in the background" in e["event"] for e in record(out)["timeline"])
    assert "best eval_accuracy" in r.stderr and losses(out)[-1][0] == 6  # 3 epochs of 2 steps of 64 (76 images)
    # infer.py (its defaults on a GPU) against transformers' pipeline on the same images: the same top-1 where the
    # pipeline's answer is clear (bf16 against fp32 may swap near-ties: a top-2 gap under 0.01 is not compared).
    paths = sorted(p for p in images.rglob("*") if p.is_file())[::12]
    theirs = pipeline("image-classification", model=str(out), device=0)([str(p) for p in paths], top_k=2)
    ours = finish(start([*map(str, paths), "--model", out, "--json", "--top-k", 1], program="infer.py"))
    ours = {x["image"]: x["predictions"][0]["label"] for x in map(json.loads, ours.stdout.splitlines())}
    clear = [(p, t[0]["label"]) for p, t in zip(paths, theirs) if t[0]["score"] - t[1]["score"] >= 0.01]
    assert len(clear) >= 2, theirs  # of 8
    assert all(ours[str(p)] == label for p, label in clear)


def test_an_out_of_memory_halves_the_pass_for_real_and_trains_as_the_halved_pass_would(tmp_path):
    # A model whose activations dominate its memory (224 px, 4 blocks), a step of 16 x 4 = 64 images. Measured first:
    # the peak memory with passes of 32 images and of 64; then a run capped half-way between them must fail its
    # whole-step pass of 64 for real, say so, go on with 32, and train exactly as the run that used 32 from the
    # start. --deterministic in both: the same passes then give the same bits; stated tolerance 1e-6 (absolute).
    model = make_checkpoint(tmp_path / "model", image_size=224, patch_size=16, hidden_size=128, num_hidden_layers=4,
                            num_attention_heads=4, intermediate_size=512)
    images = make_image_folder(tmp_path / "img", per_class=24, size=(64, 64))  # 57 for training: one step an epoch

    def args(out, *extra):
        return ["--model", model, "--dataset", images, "--output-dir", out, "--epochs", 2, "--learning-rate", 1e-3,
                "--eval-batch-size", 8, "--num-workers", 2, "--deterministic", *extra]

    uncapped = {"TEST_GPU_MEMORY_CAP": "0"}
    half, whole = run_all(start(args(tmp_path / "half", "--micro-batch-size", 32), CAPPED, uncapped),
                          start(args(tmp_path / "whole"), CAPPED, uncapped))
    peak = {name: int(r.stdout.split("PEAK_RESERVED")[-1]) for name, r in (("half", half), ("whole", whole))}
    assert "out of GPU memory" not in half.stderr + whole.stderr
    assert peak["whole"] - peak["half"] > 2**24, peak  # the premise: 25 more images' activations take > 16 MiB
    cap = (peak["half"] + peak["whole"]) // 2
    capped = finish(start(args(tmp_path / "capped"), CAPPED, {"TEST_GPU_MEMORY_CAP": str(cap)}))
    said = [line for line in capped.stderr.splitlines() if "out of GPU memory" in line]
    assert said == ["vitfood: out of GPU memory: computing 32 images at a time from now on"], capped.stderr[-2000:]
    assert record(tmp_path / "capped")["config"]["micro_batch_size"] == 32
    a, b = last_weights(tmp_path / "half"), last_weights(tmp_path / "capped")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    (steps, expected), (same_steps, got) = zip(*losses(tmp_path / "half")), zip(*losses(tmp_path / "capped"))
    assert steps == same_steps and got == pytest.approx(expected, rel=1e-6)


def test_fp16_with_the_grad_scaler_a_nan_loss_stops_it_and_resumes_across_precisions(tiny, folder, tmp_path):
    # fp16 as on a pre-sm80 GPU (forced here: an H200 would choose bf16): it trains, with its loss scale saved. A
    # checkpoint whose weights hold a NaN makes every loss NaN: the run stops at once with the one line, and saves
    # nothing. A CPU (fp32) checkpoint resumes in fp16 on the GPU (no scaler state, unfused AdamW's options then), and
    # an fp16 one in bf16.
    nan_model = nan_checkpoint(tiny, tmp_path / "nan-model")
    fp16, nan, cpu = tmp_path / "fp16", tmp_path / "nan", tmp_path / "cpu"
    procs = [start(small_run(tiny, folder, fp16, "--precision", "fp16")),
             start(small_run(nan_model, folder, nan, "--precision", "fp16")),
             start(small_run(tiny, folder, cpu, "--device", "cpu"))]
    finish(procs.pop(0))
    stopped = finish(procs.pop(0), expect=2)
    finish(procs.pop(0))
    assert record(fp16)["config"]["precision"] == "fp16"
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in losses(fp16))
    last = sorted((fp16 / "checkpoints").glob("step-*"))[-1]
    assert json.loads((last / "trainer_state.json").read_text())["scaler"]["scale"] > 0
    assert stopped.stderr.strip().splitlines()[-1].endswith(
        "non-finite loss or gradient norm at optimizer step 1 (epoch 1): stopped; that step changed no weight, and "
        "the saved model and checkpoints are those of earlier steps (--skip-nonfinite N skips up to N such steps)")
    assert not (nan / "checkpoints").exists() and not (nan / "model.safetensors").exists()
    for done, precision in ((cpu, "fp16"), (fp16, "bf16")):
        resumed = tmp_path / f"{done.name}-as-{precision}"
        shutil.copytree(done, resumed)
        for ckpt in (resumed / "checkpoints").glob("step-*"):
            if int(ckpt.name[5:]) > 2:
                shutil.rmtree(ckpt)
        for name in ("model.safetensors", "config.json", "eval_results.json"):
            (resumed / name).unlink()  # as if the run had died before saving any of its later results
        r = finish(start([*small_run(tiny, folder, resumed, "--precision", precision, "--device", "cuda"),
                          "--resume-from-checkpoint"]))
        assert "resuming from" in r.stderr and "warning: resuming with changed settings" in r.stderr
        assert record(resumed)["config"]["precision"] == precision
        assert all(torch.isfinite(v).all() for v in last_weights(resumed).values())


@pytest.mark.parametrize("deterministic", [False, True])
def test_sigterm_then_resume_on_cuda_continues_the_run(tiny, folder, tmp_path, deterministic):
    # SIGTERM after optimizer step 2 of 6 (mid-epoch 1), then --resume-from-checkpoint, against the run that was
    # never stopped. --deterministic: the same bits, weights and losses. Without it the GPU's kernels may sum in
    # another order from run to run, and AdamW moves a weight whose gradient is rounding noise (the attention's key
    # biases) by up to lr a step whatever the noise's size, either way: two runs may part by 2 x lr in each of the 4
    # steps after the resume. Stated tolerance: 1e-2 = 10 x lr absolute on the weights, 1e-2 relative on the losses.
    flags = ["--deterministic"] if deterministic else []
    full, part = tmp_path / "full", tmp_path / "part"
    procs = [start(small_run(tiny, folder, full, *flags)),
             start(small_run(tiny, folder, part, *flags), SIGTERM_AT, {"TEST_SIGTERM_AT": "2"})]
    finish(procs[0])
    stopped = finish(procs[1], expect=143)
    assert "stopped by SIGTERM" in stopped.stderr
    assert [p.name for p in sorted((part / "checkpoints").glob("step-*"))][-1] == "step-00000002"
    r = finish(start([*small_run(tiny, folder, part, *flags), "--resume-from-checkpoint"]))
    assert "at optimizer step 2" in r.stderr and "changed settings" not in r.stderr
    a, b = last_weights(full), last_weights(part)
    if deterministic:
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert losses(part) == losses(full)
        assert record(part)["config"]["deterministic_algorithms"].startswith("on (")
    else:
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-2, rtol=0, msg=k)
        assert [s for s, _ in losses(part)] == [s for s, _ in losses(full)]
        assert [x for _, x in losses(part)] == pytest.approx([x for _, x in losses(full)], rel=1e-2)


def test_compile_on_gives_the_losses_of_eager(tiny, tmp_path):
    # The blocks compiled by inductor against eager, bf16, 2 epochs of 3 steps. Stated tolerance: 2e-2 relative on
    # each step's loss (bf16 rounds differently in fused kernels, and the difference grows a little with each step).
    images = make_image_folder(tmp_path / "img", per_class=20)  # 48 for training: 3 steps of 16, no short batch

    def args(out, setting):
        return ["--model", tiny, "--dataset", images, "--output-dir", out, "--epochs", 2, "--batch-size", 16,
                "--grad-accum-steps", 1, "--learning-rate", 1e-3, "--num-workers", 2, "--logging-steps", 1,
                "--compile", setting]

    compiled, _ = run_all(start(args(tmp_path / "on", "on")), start(args(tmp_path / "off", "off")))
    assert record(tmp_path / "on")["config"]["compile"] == "on" and "torch.compile failed" not in compiled.stderr
    on, off = losses(tmp_path / "on"), losses(tmp_path / "off")
    assert [s for s, _ in on] == [s for s, _ in off] == [1, 2, 3, 4, 5, 6]
    assert [x for _, x in on] == pytest.approx([x for _, x in off], rel=2e-2)


def test_torchrun_with_one_process_and_ddp_on_nccl(tiny, folder, tmp_path):
    # torchrun's launch with one process: vitfood runs it as a single process (WORLD_SIZE 1: no process group, no
    # DDP, the out-of-memory halving allowed). What a torchrun of several processes adds on NCCL, run here in one
    # process: DDP around the model (a pass without the gradient all-reduce, then one with it), the loop's
    # all-reduces of int64 and float32 (optimizer_step's counts, host_check's verdicts), and the barrier.
    import torch.distributed as dist

    from vitfood.distributed import Dist, all_reduce_sum, barrier
    from vitfood.execution import wrap_model
    from vitfood.models import load_model

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    r = finish(start([*small_run(tiny, folder, tmp_path / "out"), "--device", "cuda"], launcher=launcher))
    assert "x 1 process(es)" in r.stderr and record(tmp_path / "out")["config"]["device"] == "cuda:0"

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, _ = load_model(tiny, labels=["a", "b", "c"])
        model.to(device)
        train_net, _, ddp = wrap_model(model, False, device, world=2)  # world > 1: DDP, over this group of one
        pixels = torch.randn(8, 3, 32, 32, device=device)
        with ddp.no_sync():
            train_net(pixels[:4]).sum().backward()
        train_net(pixels[4:]).sum().backward()
        reference, _ = load_model(tiny, labels=["a", "b", "c"])
        reference.to(device)
        reference(pixels).sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
        d = Dist(rank=0, world=2)  # the loop's collectives run only with more than one process
        flag = torch.tensor(True, device=device).long()
        counts = all_reduce_sum(torch.stack([torch.full((), 8, device=device), flag]), d)
        verdicts = all_reduce_sum(torch.tensor([0.0, 1.0, 15.0], device=device), d)
        assert counts.tolist() == [8, 1] and verdicts.tolist() == [0.0, 1.0, 15.0]
        barrier(d)
    finally:
        dist.destroy_process_group()
