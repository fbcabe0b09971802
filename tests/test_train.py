"""The training loop, in process: accumulation, determinism, lr 0, bad data, output folder checks."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import fake_small_gpu_in_evaluation, make_image_folder
from vitfood.config import TrainConfig
from vitfood.errors import VitfoodError
from vitfood.models import load_model
from vitfood.train_loop import train


def config(backbone_dir, image_folder, out: Path, **overrides) -> TrainConfig:
    base = dict(model=str(backbone_dir), dataset=str(image_folder), output_dir=str(out), epochs=1,
                batch_size=8, eval_batch_size=16, grad_accum_steps=1, learning_rate=1e-3, num_workers=0,
                logging_steps=1, warmup_ratio=0.0)
    return TrainConfig(**{**base, **overrides})


def weights(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def test_accumulating_4_batches_of_4_equals_one_batch_of_16(backbone_dir, tmp_path):
    # 32 training images: two optimizer steps either way, over the same images in the same order,
    # with the same crops (they depend on the seed, epoch and image only).
    folder = make_image_folder(tmp_path / "img", per_class=16)  # 48 images, 16 held out
    # With clipping on, equal gradients also give equal clipping; use a tiny lr-free comparison of both.
    a = train(config(backbone_dir, folder, tmp_path / "a", batch_size=16, grad_accum_steps=1, test_size=1 / 3))
    b = train(config(backbone_dir, folder, tmp_path / "b", batch_size=4, grad_accum_steps=4, test_size=1 / 3))
    assert a["step"] == b["step"] == 2
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)
    start, _ = load_model(backbone_dir, labels=["x", "y", "z"])
    assert not torch.equal(wa["vit.layernorm.weight"], start.norm.weight.detach())  # it did train


@pytest.mark.parametrize("micro", [16, 8, 3])
def test_the_micro_batch_is_a_memory_detail_not_the_recipe(backbone_dir, tmp_path, micro):
    # The recipe's 4 x 4 accumulation computed 16, 8 or 3 images per pass (3: passes that straddle the
    # loader's batches) trains the weights of the literal 4 x 4, to float32 rounding.
    folder = make_image_folder(tmp_path / "img", per_class=16)
    literal = train(config(backbone_dir, folder, tmp_path / "a", batch_size=4, grad_accum_steps=4, test_size=1 / 3))
    passes = train(config(backbone_dir, folder, tmp_path / "b", batch_size=4, grad_accum_steps=4, test_size=1 / 3,
                          micro_batch_size=micro))
    assert literal["step"] == passes["step"] == 2
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)
    record = json.loads((tmp_path / "b" / "run.json").read_text())["config"]
    assert record["micro_batch_size"] == micro


def test_an_out_of_memory_halves_the_pass_and_the_run_goes_on(backbone_dir, tmp_path, monkeypatch, capsys):
    # A GPU is faked by a model that runs out of memory above 4 images per pass: the step is redone
    # with clean gradients at 8, then 4 images, and gives the literal 4 x 4's weights.
    from vitfood import train_loop

    folder = make_image_folder(tmp_path / "img", per_class=16)
    literal = train(config(backbone_dir, folder, tmp_path / "a", batch_size=4, grad_accum_steps=4, test_size=1 / 3))
    real = train_loop.forward_backward

    def small_gpu(t, pixels, labels, sync_gradients):
        if len(labels) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return real(t, pixels, labels, sync_gradients)

    monkeypatch.setattr(train_loop, "forward_backward", small_gpu)
    monkeypatch.setattr(train_loop, "resolve_micro_batch", lambda *settings: 16)  # auto on one GPU: the whole step
    monkeypatch.setattr(train_loop, "oom_retry_allowed", lambda device, world: True)
    retried = train(config(backbone_dir, folder, tmp_path / "b", batch_size=4, grad_accum_steps=4, test_size=1 / 3))
    said = capsys.readouterr().err
    assert "out of GPU memory: computing 8 images at a time" in said and "computing 4 images at a time" in said
    assert retried["step"] == literal["step"] == 2
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["config"]["micro_batch_size"] == 4


def test_evaluations_go_on_after_an_out_of_memory_at_the_halved_size(backbone_dir, image_folder, tmp_path,
                                                                     monkeypatch, capsys):
    # A GPU is faked by evaluation passes that run out of memory above 4 images: epoch 1's evaluation halves
    # 16 to 8 to 4, epoch 2's starts at 4; the training and the metrics are those of an unhalved run.
    from vitfood import run

    whole = train(config(backbone_dir, image_folder, tmp_path / "a", epochs=2))
    fake_small_gpu_in_evaluation(monkeypatch, fits=4)
    monkeypatch.setattr(run, "eval_oom_retry_allowed", lambda device: True)
    capsys.readouterr()
    halved = train(config(backbone_dir, image_folder, tmp_path / "b", epochs=2))
    said = [line for line in capsys.readouterr().err.splitlines() if "out of GPU memory" in line]
    assert said == ["vitfood: out of GPU memory in evaluation: 8 images per pass from now on",
                    "vitfood: out of GPU memory in evaluation: 4 images per pass from now on"]
    assert halved.pop("eval_loss") == pytest.approx(whole.pop("eval_loss"), rel=1e-6, abs=0)
    assert halved == whole
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["config"]["eval_batch_size"] == 4
    assert "| eval_batch_size | `4` |" in (tmp_path / "b" / "README.md").read_text()  # the card: as it ran


def test_eval_batch_size_auto_is_the_batch_size_on_the_cpu(backbone_dir, image_folder, tmp_path, capsys):
    train(config(backbone_dir, image_folder, tmp_path / "out", eval_batch_size="auto"))
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config"]["eval_batch_size"] == 8
    assert "computed 8 at a time, evaluated 8 at a time;" in capsys.readouterr().err


def test_deterministic_changes_nothing_on_the_cpu_and_is_recorded(backbone_dir, image_folder, tmp_path):
    # The CPU's kernels are deterministic anyway: the same weights to the bit; the settings are the
    # process's own again afterwards.
    train(config(backbone_dir, image_folder, tmp_path / "a"))
    train(config(backbone_dir, image_folder, tmp_path / "b", deterministic=True))
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    record = json.loads((tmp_path / "b" / "run.json").read_text())["config"]
    assert record["deterministic"] is True
    assert re.fullmatch(r"on \(torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG=:\d+:\d+, "
                        r"cudnn.benchmark False\)", record["deterministic_algorithms"])
    assert json.loads((tmp_path / "a" / "run.json").read_text())["config"]["deterministic_algorithms"] == "off"
    assert not torch.are_deterministic_algorithms_enabled()


def test_same_seed_same_weights_whatever_the_worker_count(backbone_dir, image_folder, tmp_path):
    train(config(backbone_dir, image_folder, tmp_path / "a", num_workers=2))
    train(config(backbone_dir, image_folder, tmp_path / "b", num_workers=2))
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit for bit
    # Workers change the images in no way; they change the CPU math threads (cores - workers),
    # and with them the summation order of matmuls: equal to float32 rounding, not to the bit.
    train(config(backbone_dir, image_folder, tmp_path / "c", num_workers=0))
    wc = weights(tmp_path / "c")
    for k in wa:
        torch.testing.assert_close(wa[k], wc[k], atol=1e-5, rtol=0, msg=k)
    train(config(backbone_dir, image_folder, tmp_path / "d", seed=43))
    assert not torch.equal(wa["classifier.weight"], weights(tmp_path / "d")["classifier.weight"])


def test_learning_rate_zero_saves_the_backbone_bit_for_bit(backbone_dir, image_folder, tmp_path):
    train(config(backbone_dir, image_folder, tmp_path / "out", learning_rate=0.0, epochs=2))
    saved = weights(tmp_path / "out")
    original = load_file(str(backbone_dir / "model.safetensors"))
    backbone = {k: v for k, v in original.items() if not k.startswith("pooler.")}
    assert len(backbone) == len(saved) - 2  # + classifier weight and bias
    for k, v in backbone.items():
        assert torch.equal(saved["vit." + k], v), k


def test_unreadable_training_images_are_skipped_and_listed(backbone_dir, tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=20)
    (folder / "green_disc" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "red_stripes" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    result = train(config(backbone_dir, folder, out, max_bad_fraction=0.05))
    listed = (out / "bad_images.txt").read_text()
    assert "broken.jpg" in listed and "empty.png" in listed and "empty file" in listed
    assert result["eval_samples"] + len(listed.splitlines()) >= 13  # 62 images, ceil(0.2 x 62) held out
    # Both are found before training (their headers: tests/test_small_data.py), so the run stops in its setup.
    with pytest.raises(VitfoodError, match=r"^stopped at the start: 2 unreadable images .* --max-bad-fraction 0 "
                                           r"of the 62 allows"):
        train(config(backbone_dir, folder, tmp_path / "strict", max_bad_fraction=0.0))
    assert (tmp_path / "strict" / "bad_images.txt").read_text().strip()  # the list, also for a stopped run


def test_output_folder_is_checked_before_training(backbone_dir, image_folder, tmp_path):
    out = tmp_path / "out"
    train(config(backbone_dir, image_folder, out))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(VitfoodError, match="already holds a trained model"):
        train(config(backbone_dir, image_folder, out))
    assert (out / "model.safetensors").read_bytes() == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(VitfoodError, match="cannot write there|not a folder"):
        train(config(backbone_dir, image_folder, tmp_path / "file" / "sub"))
    with pytest.raises(VitfoodError, match="no such local folder"):  # a failed setup leaves no folder behind
        train(config(backbone_dir, tmp_path / "no-such-images", tmp_path / "fresh" / "out"))
    assert not (tmp_path / "fresh").exists()


def test_a_new_run_never_mixes_with_an_earlier_runs_checkpoints(backbone_dir, image_folder, tmp_path):
    out = tmp_path / "out"
    train(config(backbone_dir, image_folder, out, epochs=2, save_steps=1, save_total_limit=0))  # keep all
    old = {p.name for p in (out / "checkpoints").iterdir()}
    (out / "model.safetensors").unlink()  # as if the earlier run had stopped before its first evaluation
    with pytest.raises(VitfoodError, match="holds checkpoints of an earlier run; continue it with --resume"):
        train(config(backbone_dir, image_folder, out, epochs=1))
    assert {p.name for p in (out / "checkpoints").iterdir()} == old  # refused: nothing touched
    train(config(backbone_dir, image_folder, out, epochs=1, overwrite_output_dir=True))
    new = {p.name for p in (out / "checkpoints").iterdir()}
    assert len(new) == 1 and len(old) > 1  # only this run's (one epoch), none left from the earlier run


def test_split_folders_are_not_taken_for_classes(backbone_dir, tmp_path):
    make_image_folder(tmp_path / "ds" / "train", per_class=4)
    make_image_folder(tmp_path / "ds" / "validation", per_class=2, seed=1)
    with pytest.raises(VitfoodError, match="look like splits, not classes; pass --train-split train --eval-split validation"):
        train(config(backbone_dir, tmp_path / "ds", tmp_path / "a"))
    with pytest.raises(VitfoodError, match=r"no test/ folder for --eval-split test \(it has train, validation\)"):
        train(config(backbone_dir, tmp_path / "ds", tmp_path / "b", eval_split="test"))
    result = train(config(backbone_dir, tmp_path / "ds", tmp_path / "c", eval_split="validation"))
    assert result["eval_samples"] == 6


@pytest.mark.parametrize("flag, value, message", [
    ("batch_size", 0, "--batch-size must be at least 1"),
    ("test_size", 1.5, "--test-size must be between 0 and 1"),
    ("precision", "fp16", "fp16 needs a CUDA GPU"),
    ("seed", -1, "--seed must be 0 or more"),
    ("weight_decay", -0.1, "--weight-decay must not be negative"),
    ("hub_model_id", "me/food", "--hub-model-id names the repository for --push-to-hub"),
])
def test_bad_settings_are_named(backbone_dir, image_folder, tmp_path, flag, value, message):
    with pytest.raises(VitfoodError, match=message):
        train(config(backbone_dir, image_folder, tmp_path / "o", **{flag: value}))


def test_cuda_without_an_index_becomes_the_current_gpu(monkeypatch):
    # No GPU here: fake one. torch.cuda.set_device refuses a device without an index.
    from vitfood import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: chosen.append(torch.device(dev).index))
    for flag, index in (("auto", 0), ("cuda", 0), ("cuda:1", 1)):
        assert distributed.resolve_device(flag, distributed.Dist()) == torch.device("cuda", index)
    assert chosen == [0, 0, 1]
    with pytest.raises(VitfoodError, match="only 2 CUDA GPU"):
        distributed.resolve_device("cuda:5", distributed.Dist())


def test_compiled_training_saves_the_same_plain_model(backbone_dir, tmp_path):
    # torch.compile (about 20 s on this CPU): same weights as eager to float rounding, and the files
    # hold the model's own names (no torch.compile `_orig_mod.` prefix), loadable by transformers.
    folder = make_image_folder(tmp_path / "img", per_class=8)
    train(config(backbone_dir, folder, tmp_path / "eager", epochs=1))
    train(config(backbone_dir, folder, tmp_path / "compiled", epochs=1, compile=True))
    eager, compiled = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert set(eager) == set(compiled) and not any("_orig_mod" in k for k in compiled)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-5, rtol=0, msg=k)
    ckpt = sorted((tmp_path / "compiled" / "checkpoints").iterdir())[-1]
    assert not any("_orig_mod" in k for k in load_file(str(ckpt / "model.safetensors")))


def test_a_failed_last_save_fails_the_run_and_another_error_keeps_its_place(backbone_dir, image_folder, tmp_path,
                                                                          monkeypatch, capsys):
    """The last checkpoint is written in the background after the loop ends: its failure is the run's error
    (run.json says failed). When the loop itself failed, its own error goes on and the save's is one more line."""
    from vitfood import checkpoint, train_loop

    def full_disk(out_dir, step, files, keep):
        raise VitfoodError(f"cannot save a checkpoint to {out_dir / 'checkpoints'}: No space left on device "
                           "(the previous checkpoints are intact)")

    monkeypatch.setattr(checkpoint, "write_training_state", full_disk)
    out = tmp_path / "out"
    with pytest.raises(VitfoodError, match="No space left on device"):
        train(config(backbone_dir, image_folder, out))
    assert json.loads((out / "run.json").read_text())["status"] == "failed"

    def broken_report(t):
        raise RuntimeError("the loop's own error")

    monkeypatch.setattr(train_loop, "end_epoch", lambda t, epoch: (train_loop.save_checkpoint(t), broken_report(t)))
    with pytest.raises(RuntimeError, match="the loop's own error"):
        train(config(backbone_dir, image_folder, tmp_path / "second"))
    assert "vitfood: the last save failed too: cannot save a checkpoint" in capsys.readouterr().err


def test_fp16_a_nan_loss_never_reaches_the_weights_and_stops_the_run_at_the_next_check(backbone_dir, image_folder,
                                                                                      tmp_path, monkeypatch):
    # fp16 with its GradScaler and a GPU's fused AdamW, both of which the CPU runs too; a NaN loss at optimizer
    # step 2 of the epoch's 8. The step is skipped on the device (as the scaler's own overflow skips are), the host
    # learns of it at its next check (the epoch's end here: no log line or save is due before) and stops the run
    # there with the one line; between the checks the loop reads nothing from the device.
    from collections import Counter
    from types import SimpleNamespace

    from torch.utils._python_dispatch import TorchDispatchMode

    from vitfood import distributed, optim, train_loop

    monkeypatch.setattr(distributed, "resolve_precision", lambda flag, device: "fp16")
    monkeypatch.setattr(train_loop, "build_optimizer",
                        lambda model, lr, wd, device: optim.build_optimizer(model, lr, wd, torch.device("cuda")))
    runs = []
    real_setup = train_loop.setup
    monkeypatch.setattr(train_loop, "setup", lambda cfg: runs.append(real_setup(cfg)) or runs[-1])

    def cross_entropy(logits, labels, reduction):
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)
        return loss * float("nan") if runs[-1].state.step + 1 == 2 else loss

    monkeypatch.setattr(train_loop, "F", SimpleNamespace(cross_entropy=cross_entropy))
    reads = Counter()  # host reads of a tensor's value (a sync on a GPU), by the optimizer steps done

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:  # .item(), bool(), also inside torch's C++
                reads[runs[-1].state.step] += 1
            return func(*args, **(kwargs or {}))

    def watched(fn):
        def call(*args, **kwargs):
            with HostReads():
                return fn(*args, **kwargs)
        return call

    for name in ("compute_gradients", "optimizer_step", "after_step"):
        monkeypatch.setattr(train_loop, name, watched(getattr(train_loop, name)))
    real_tolist = torch.Tensor.tolist  # read in C++ without a dispatch on the CPU: counted here
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.update([runs[-1].state.step]) or real_tolist(self))
    out = tmp_path / "out"
    with pytest.raises(VitfoodError, match=r"^non-finite loss or gradient norm at optimizer step 2 \(epoch 1\): "
                                           r"stopped; that step changed no weight"):
        train(config(backbone_dir, image_folder, out, logging_steps=100))
    t = runs[-1]
    assert t.schedule.steps_per_epoch == t.state.step == 8 and t.state.step - 2 < train_loop.HOST_CHECK_STEPS
    assert set(reads) == {1, 8}  # the check after the first step, and the epoch's end: none in between
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    # Skipped on the device: the NaN step and the scaler's overflows (each halved the scale from 2^16).
    skipped = round(math.log2(2.0**16 / t.scaler.get_scale()))
    assert next(iter(t.optimizer.state.values()))["step"].item() == 8 - skipped and skipped >= 1
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_compile_auto_runs_eager_when_compilation_fails_and_on_stops_with_one_line(backbone_dir, tmp_path, monkeypatch,
                                                                                  capsys):
    # Compilation that fails at the first step (as inductor does without a C compiler), faked by a backend that
    # raises; --compile auto is made to compile on this CPU. auto goes on eager with one line; on stops with one
    # line (its setup's cheap look for a compiler found one).
    from vitfood import train_loop

    folder = make_image_folder(tmp_path / "img", per_class=4)

    def no_compiler(graph, example_inputs):
        raise RuntimeError("Failed to find C compiler (fake)")

    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real_compile(self, backend=no_compiler))
    monkeypatch.setattr(train_loop, "compile_decision", lambda setting, *rest: (setting != "off", "on (faked)"))
    try:
        result = train(config(backbone_dir, folder, tmp_path / "auto", batch_size=4, eval_batch_size=4, compile="auto"))
        said = capsys.readouterr().err
        with pytest.raises(VitfoodError, match=r"^--compile on: torch.compile failed \(RuntimeError: Failed to find C "
                                               r"compiler \(fake\)\); pass --compile off$"):
            train(config(backbone_dir, folder, tmp_path / "on", batch_size=4, eval_batch_size=4, compile="on"))
    finally:
        torch._dynamo.reset()
    assert said.count("torch.compile failed") == 1 and ("vitfood: --compile auto: torch.compile failed (RuntimeError: "
                                                        "Failed to find C compiler (fake)): running eager from now on"
                                                        in said)
    assert result["step"] == 3 and (tmp_path / "auto" / "model.safetensors").exists()
    record = json.loads((tmp_path / "auto" / "run.json").read_text())["config"]
    assert record["compile"] == "off" and record["compile_decision"].startswith("off (auto: torch.compile failed")
    assert json.loads((tmp_path / "on" / "run.json").read_text())["status"] == "failed"
