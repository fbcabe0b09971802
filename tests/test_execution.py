"""How evaluation runs: --eval-batch-size's choice, out-of-memory halving, and --deterministic's settings.
Decisions on "cuda" are tested with torch.device objects: no GPU needed."""

import json
import os

import pytest
import torch

from helpers import CLASSES, fake_small_gpu_in_evaluation, make_checkpoint, make_image_folder
from vitfood import data, run
from vitfood.config import TrainConfig
from vitfood.distributed import Dist
from vitfood.errors import VitfoodError
from vitfood.evaluation import EvalPasses, evaluate
from vitfood.execution import deterministic_algorithms, resolve_eval_batch
from vitfood.models import load_model
from vitfood.preprocess import load_preprocessing

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("setting, batch, micro, images, workers, device, world, expect", [
    ("auto", 16, 16, 25_250, 0, CPU, 1, 16),  # the CPU: --batch-size, the guide's evaluation batch
    ("auto", 4, 4, 25_250, 0, CPU, 1, 4),
    ("auto", 16, 64, 25_250, 15, CUDA, 1, 256),  # Food-101's validation split: the cap
    ("auto", 16, 64, 1_000, 15, CUDA, 1, 66),  # the guide's 1,000 held out: a batch for each of 15 workers
    ("auto", 16, 64, 200, 15, CUDA, 1, 64),  # never fewer than a training pass
    ("auto", 128, 512, 25_250, 15, CUDA, 1, 512),  # a pass of 512 that fits with gradients fits without
    ("auto", 16, 64, 200, 0, CUDA, 1, 200),  # decoded in the training process: one batch
    ("auto", 16, 16, 2_000, 2, CUDA, 8, 125),  # torchrun: each rank's 250 images, 2 workers per rank
    ("auto", 16, 16, 25_250, 1, CUDA, 8, 256),
    ("48", 16, 64, 25_250, 15, CUDA, 1, 48),  # N: N, even below a training pass
    ("48", 16, 16, 25_250, 0, CPU, 1, 48),
])
def test_eval_batch_size(setting, batch, micro, images, workers, device, world, expect):
    assert resolve_eval_batch(setting, batch, micro, images, workers, device, world) == expect


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1.5", ""])
def test_a_bad_eval_batch_size_is_one_line_naming_the_flag(value, capsys):
    from vitfood.cli import train_main

    with pytest.raises(VitfoodError, match=f"--eval-batch-size must be auto or a whole number of images, at least 1, "
                                           f"got {value!r}"):
        TrainConfig(eval_batch_size=value).validate()
    assert train_main(["--eval-batch-size", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: --eval-batch-size must be auto") and err.count("\n") == 1
    TrainConfig(eval_batch_size=64).validate()  # a number from Python, as the field once was
    assert TrainConfig(eval_batch_size=64).eval_batch_size == "64"


# ---------------------------------------------------------------- out of memory in evaluation

@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("clf"), classification_labels=list(CLASSES))
    model, _ = load_model(path)
    return model.eval(), load_preprocessing(path, model.arch.image_size)


def batches(n_batches=3, size=16, seed=0):
    """Loader batches of random pictures and labels, as the evaluation loader yields them."""
    g = torch.Generator().manual_seed(seed)
    return [data.Batch(torch.randint(0, 256, (size, 32, 32, 3), dtype=torch.uint8, generator=g),
                       torch.randint(0, len(CLASSES), (size,), generator=g), []) for _ in range(n_batches)]


class SmallGpu(torch.nn.Module):
    """The model on a GPU that runs out of memory above `fits` images per pass; counts the passes' sizes."""

    def __init__(self, model, fits: int):
        super().__init__()
        self.model, self.fits, self.passes = model, fits, []

    def forward(self, pixels):
        if len(pixels) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        self.passes.append(len(pixels))
        return self.model(pixels)


def run_eval(net, prep, passes, loader):
    return evaluate(net, loader, prep, CPU, "fp32", list(CLASSES), Dist(), data.BadImages(48, 0.0), passes)


def test_an_out_of_memory_in_evaluation_halves_the_passes_and_the_results_stay(classifier):
    model, prep = classifier
    loader = batches()
    whole, whole_confusion = run_eval(model, prep, EvalPasses(16, retry_oom=False, say=print), loader)
    said = []
    small = SmallGpu(model, fits=5)
    passes = EvalPasses(16, retry_oom=True, say=said.append)
    halved, halved_confusion = run_eval(small, prep, passes, loader)
    assert passes.size == 4 and small.passes == [4] * 12  # 16, 8, then 4 for the rest: no retry per batch
    assert said == ["vitfood: out of GPU memory in evaluation: 8 images per pass from now on",
                    "vitfood: out of GPU memory in evaluation: 4 images per pass from now on"]
    assert torch.equal(halved_confusion, whole_confusion)
    assert halved.pop("eval_loss") == pytest.approx(whole.pop("eval_loss"), rel=1e-6, abs=0)
    assert halved == whole  # accuracy, top-5, per class: counts
    run_eval(small, prep, passes, loader)  # a later evaluation starts at the halved size
    assert said[2:] == [] and small.passes == [4] * 24


def test_an_out_of_memory_that_cannot_be_retried_is_one_line_naming_the_flag(classifier):
    model, prep = classifier
    with pytest.raises(VitfoodError, match=r"^out of memory in evaluation at 16 images per pass \(OutOfMemoryError: "
                                           r"CUDA out of memory \(fake\)\); use a smaller --eval-batch-size$"):
        run_eval(SmallGpu(model, fits=5), prep, EvalPasses(16, retry_oom=False, say=print), batches())  # the CPU
    with pytest.raises(VitfoodError, match=r"^out of GPU memory in evaluation even at 1 image per pass .*"
                                           r"a smaller --eval-batch-size cannot help$"):
        run_eval(SmallGpu(model, fits=0), prep, EvalPasses(16, retry_oom=True, say=lambda line: None), batches())


def test_eval_only_goes_on_after_an_out_of_memory(tmp_path, monkeypatch, capsys):
    # --eval-only as a user runs it, on a faked GPU that runs out of memory above 4 images per pass.
    from vitfood.cli import train_main

    folder = make_image_folder(tmp_path / "img", per_class=8)
    model = make_checkpoint(tmp_path / "model", classification_labels=list(CLASSES))
    args = ["--eval-only", "--model", str(model), "--dataset", str(folder), "--batch-size", "4",
            "--eval-batch-size", "16", "--num-workers", "0"]
    assert train_main([*args, "--output-dir", str(tmp_path / "a")]) == 0
    fake_small_gpu_in_evaluation(monkeypatch, fits=4)
    assert train_main([*args, "--output-dir", str(tmp_path / "c")]) == 2  # the CPU: no retry, one line
    assert capsys.readouterr().err.splitlines()[-1] == (
        "train.py: error: out of memory in evaluation at 16 images per pass (OutOfMemoryError: CUDA out of memory "
        "(fake)); use a smaller --eval-batch-size")
    monkeypatch.setattr(run, "eval_oom_retry_allowed", lambda device: True)  # as on a GPU
    assert train_main([*args, "--output-dir", str(tmp_path / "b")]) == 0
    assert "4 images per pass from now on" in capsys.readouterr().err
    a, b = (json.loads((tmp_path / out / "eval_results.json").read_text()) for out in "ab")
    assert b.pop("eval_loss") == pytest.approx(a.pop("eval_loss"), rel=1e-6, abs=0) and a == b
    assert json.loads((tmp_path / "b" / "run.json").read_text())["config"]["eval_batch_size"] == 4


# ---------------------------------------------------------------- --deterministic

@pytest.fixture
def clean_environ(monkeypatch):
    """os.environ without CUBLAS_WORKSPACE_CONFIG for the test, as it was afterwards."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"})


def test_deterministic_algorithms_for_the_run_then_as_before(clean_environ):
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    torch.backends.cudnn.benchmark = True  # as a user's script may have it
    try:
        with deterministic_algorithms(True):
            assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # before cuBLAS starts
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = False


def test_an_operation_without_a_deterministic_version_is_one_line(clean_environ):
    with pytest.raises(VitfoodError, match=r"^--deterministic: PyTorch has no deterministic version of put_ on this "
                                           r"device; run without --deterministic$"):
        with deterministic_algorithms(True):
            torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))  # one such operation, on the CPU too
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="something else"):  # other errors pass through
        with deterministic_algorithms(True):
            raise RuntimeError("something else")


# ---------------------------------------------------------------- --compile where it cannot work

@pytest.mark.parametrize("device, env, found, blocker", [
    ("cpu", {}, {"g++"}, None),
    ("cpu", {}, set(), "no C++ compiler (g++; inductor builds CPU kernels with it, or $CXX)"),
    ("cpu", {"CXX": "clang++"}, {"clang++"}, None),
    ("cuda", {}, {"clang"}, None),
    ("cuda", {}, {"g++"}, "no C compiler (Triton builds its kernels with gcc, clang or $CC): install gcc"),
    ("cuda", {"CC": "/opt/cc"}, {"gcc"}, "$CC (/opt/cc) is not found; Triton builds its kernels with it"),
])
def test_compile_blocker_finds_a_missing_compiler(monkeypatch, device, env, found, blocker):
    # A slim container, faked: only the programs in `found` exist; Triton is there.
    import shutil

    from vitfood.execution import compile_blocker

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")} | env)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in found else None)
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    assert compile_blocker(device) == blocker


def test_compile_on_where_it_cannot_work_is_one_line_before_training_and_auto_runs_eager():
    from vitfood.execution import compile_decision

    why = "no C compiler (Triton builds its kernels with gcc, clang or $CC): install gcc"
    with pytest.raises(VitfoodError, match=r"^--compile on: torch.compile cannot run here: no C compiler \(Triton .*"
                                           r"install gcc; or pass --compile off$"):
        compile_decision("on", "cuda", 10**6, why)
    assert compile_decision("auto", "cuda", 10**6, why) == (False, f"off (auto: torch.compile cannot run here: {why})")
    assert compile_decision("off", "cuda", 10**6, why) == (False, "off")
