"""torchrun with 2 CPU processes (gloo) against one process: the same training and the same evaluation."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, make_image_folder, run


def torchrun(*args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *map(str, args), "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 27 images, 7 held out with --test-size 0.25 (an odd evaluation set), 20 for training (even: with
    # an odd count, 2 ranks would leave one image out of each epoch, one process would not).
    return make_image_folder(tmp_path_factory.mktemp("ddp"), per_class=9)


def common(backbone_dir, folder, out):
    return ["--model", backbone_dir, "--dataset", folder, "--output-dir", out, "--epochs", 2, "--test-size", 0.25,
            "--grad-accum-steps", 2, "--learning-rate", 1e-3, "--num-workers", 0, "--logging-steps", 1,
            "--save-steps", 1, "--save-total-limit", 0]  # resume tests pick older checkpoints


def test_two_processes_of_batch_b_equal_one_of_batch_2b(backbone_dir, folder, tmp_path):
    # Augmentation stays on: each crop depends on (seed, epoch, image) only, not on the process.
    one = run("train.py", *common(backbone_dir, folder, tmp_path / "one"), "--batch-size", 8,
              env_extra={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = torchrun(*common(backbone_dir, folder, tmp_path / "two"), "--batch-size", 4)
    assert two.returncode == 0, two.stderr
    assert "x 2 process(es) = 16 images" in two.stderr
    a, b = (load_file(str(sorted((tmp_path / n / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
            for n in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
    logs = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logs if x["type"] == "train"] == [1, 2, 3, 4]


def test_evaluation_counts_each_image_once_across_processes(backbone_dir, folder, tmp_path):
    args = [*common(backbone_dir, folder, tmp_path / "x"), "--learning-rate", 0, "--epochs", 1, "--batch-size", 4]
    one = run("train.py", *args)
    assert one.returncode == 0, one.stderr
    r1 = json.loads((tmp_path / "x" / "eval_results.json").read_text())
    shutil.rmtree(tmp_path / "x")
    two = torchrun(*args)
    assert two.returncode == 0, two.stderr
    r2 = json.loads((tmp_path / "x" / "eval_results.json").read_text())
    assert r1["eval_samples"] == r2["eval_samples"] == 7
    assert r1["eval_accuracy"] == r2["eval_accuracy"]
    assert r1["eval_loss"] == pytest.approx(r2["eval_loss"], abs=1e-6)
    assert r1["per_class_accuracy"] == r2["per_class_accuracy"]


def test_resume_under_torchrun(backbone_dir, folder, tmp_path):
    full = tmp_path / "full"
    r = torchrun(*common(backbone_dir, folder, full), "--batch-size", 4)
    assert r.returncode == 0, r.stderr
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for ckpt in (part / "checkpoints").glob("step-*"):
        if int(ckpt.name[5:]) > 1:  # resume mid-epoch 1
            shutil.rmtree(ckpt)
    r = torchrun(*common(backbone_dir, folder, part), "--batch-size", 4, "--resume-from-checkpoint")
    assert r.returncode == 0, r.stderr
    last = [sorted((d / "checkpoints").glob("step-*"))[-1] / "model.safetensors" for d in (full, part)]
    assert last[0].read_bytes() == last[1].read_bytes()


@pytest.mark.parametrize("major, expect", [(7, "fp16"), (8, "bf16"), (9, "bf16")])  # V100/T4, A100, H100/H200
def test_precision_auto_is_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, major, expect):
    # No GPU here: a fake one of compute capability `major`, on which torch could emulate bf16; torch's own
    # is_bf16_supported runs.
    from types import SimpleNamespace

    from vitfood.distributed import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    assert torch.cuda.is_bf16_supported()  # the trap: counting emulation, even the sm70 GPU "has" bf16
    assert resolve_precision("auto", torch.device("cuda")) == expect
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    # A torch without `including_emulation` (before 2.3) counted no emulation: asked without it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: major >= 8)
    assert resolve_precision("auto", torch.device("cuda")) == expect


def test_per_block_compile_under_ddp_stays_well_under_dynamos_recompile_limit(backbone_dir, monkeypatch):
    # torchrun's shape of a run, in this process: the blocks compiled one by one inside DDP (a gloo group of one
    # process), training passes of 8, an epoch's short last 5, an out-of-memory's halved 4 and a last image alone,
    # evaluation (no gradients, eval mode) in batches of 16, a short 3 and a 1, for two epochs. All blocks share one
    # code object, and dynamo compiles a variant of it per guard that fails (grad mode, training flag, a new batch
    # size, once, then dynamic): past torch._dynamo.config.recompile_limit it would run the blocks eagerly, silently.
    # Dynamo's guards and variants do not depend on what compiles the graphs (checked by hand with inductor on the
    # same passes without the 1s: 3 variants either way, in minutes instead of seconds on this CPU); the "eager"
    # backend keeps the test fast. (DDP's graph splitting at its buckets splits graphs, it adds no variant.)
    import torch.distributed as dist
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from vitfood.execution import wrap_model
    from vitfood.models import load_model
    from vitfood.models.vit import Block

    model, _ = load_model(backbone_dir, labels=["a", "b", "c"])
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real_compile(self, backend="eager"))
    torch._dynamo.reset()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        train_net, eval_net, ddp = wrap_model(model, True, torch.device("cpu"), world=2)  # world > 1: DDP
        assert ddp is train_net
        for epoch in range(2):
            model.train()
            for n in (8, 8, 5, 4, 1):
                train_net(torch.randn(n, 3, 32, 32)).sum().backward()
            model.eval()
            with torch.no_grad():
                for n in (16, 16, 3, 1):
                    eval_net(torch.randn(n, 3, 32, 32))
        variants = len(_debug_get_cache_entry_list(Block.forward.__code__))
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
    # Training: its first size, then any size (dynamic); evaluation: any size; and a pass of one image in each (dynamo
    # specialises size 1). Whatever the sizes, no more: 5 of the limit's 8.
    assert variants == 5 < torch._dynamo.config.recompile_limit


def test_a_stop_signal_is_read_within_host_check_steps_under_torchrun_and_at_once_alone():
    # The steps that read the device's verdicts, after a signal that came during step 3 (no log, save or epoch end
    # due): one process reads its host flag at once; torchrun's ranks agree on it at the next check.
    from vitfood.train_loop import HOST_CHECK_STEPS, check_due

    def honoured_at(world: int) -> int:
        return next(s for s in range(3, 100) if check_due(s, boundary=False, world=world, signal_here=True))

    assert honoured_at(1) == 3
    assert honoured_at(2) == HOST_CHECK_STEPS == 10
    assert [s for s in range(1, 31) if check_due(s, False, 2, False)] == [10, 20, 30]
    assert check_due(7, boundary=True, world=8, signal_here=False)
