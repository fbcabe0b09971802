"""Checkpoints: each is a complete Hugging Face model, resumes exactly (old format too), is pruned, is summed up."""

import io
import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import CLASSES, make_image_folder, run
from vitfood import checkpoint
from vitfood.fileio import human_bytes
from vitfood.errors import VitfoodError
from vitfood.models import load_model, save_model
from vitfood.preprocess import load_preprocessing

HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
RESUME_FILES = ("optimizer.pt", "rng_state.pt", "trainer_state.json")


@pytest.fixture(scope="module")
def trained(backbone_dir):
    """A tiny model one optimizer step into training, so that the optimizer state holds tensors."""
    model, base_config = load_model(backbone_dir, labels=list(CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    model.eval()
    preprocessor = load_preprocessing(backbone_dir, model.arch.image_size).to_hf_dict()
    return model, base_config, preprocessor, optimizer


def save(out, step, trained, keep=0):
    model, base_config, preprocessor, optimizer = trained
    return checkpoint.save_training_state(out, step, model, base_config, preprocessor, optimizer.state_dict(),
                                          {"torch": torch.get_rng_state()}, {"run": {"step": step}}, keep)


def assert_all_equal(a, b):
    """Nested dicts, lists and tensors: the same structure, every tensor bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_all_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_all_equal(x, y)
    else:
        assert a == b


def assert_loads_whole_in_transformers(ckpt, vitfood_model):
    """from_pretrained finds every weight where it belongs, and computes what vitfood computes."""
    from transformers import ViTForImageClassification

    hf, info = ViTForImageClassification.from_pretrained(ckpt, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert [hf.config.id2label[i] for i in range(len(CLASSES))] == list(CLASSES)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(pixel_values=pixels).logits, vitfood_model.eval()(pixels),
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- save_training_state / load_training_state

def test_a_checkpoint_is_a_hugging_face_model_beside_its_resume_state(trained, tmp_path):
    ckpt = save(tmp_path / "out", 7, trained)
    assert ckpt == tmp_path / "out" / "checkpoints" / "step-00000007"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(HF_FILES + RESUME_FILES)
    assert_loads_whole_in_transformers(ckpt, trained[0])


def test_the_checkpoint_and_the_best_model_are_the_same_files(trained, tmp_path):
    model, base_config, preprocessor, _ = trained
    save_model(model, tmp_path / "best", base_config, preprocessor)
    ckpt = save(tmp_path / "out", 1, trained)
    for name in HF_FILES:
        assert (ckpt / name).read_bytes() == (tmp_path / "best" / name).read_bytes(), name


def test_load_training_state_gives_back_exactly_what_was_saved(trained, tmp_path):
    model, _, _, optimizer = trained
    rng = {"torch": torch.get_rng_state()}
    state = {"run": {"step": 3, "best": 0.5}, "setup": {"labels": list(CLASSES)}}
    ckpt = checkpoint.save_training_state(tmp_path / "out", 3, *trained[:3], optimizer.state_dict(), rng, state, 0)
    model_state, optimizer_state, rng_state, saved = checkpoint.load_training_state(ckpt)
    assert_all_equal(model.state_dict(), model_state)  # vitfood's own names (fused qkv), as ViT.load_state_dict takes
    assert_all_equal(optimizer.state_dict(), optimizer_state)
    assert_all_equal(rng, rng_state)
    assert saved == state


def test_a_checkpoint_of_the_old_format_still_resumes(trained, tmp_path):
    """Before checkpoints were Hugging Face models they held vitfood's own names and no config.json."""
    model, _, _, optimizer = trained
    ckpt = tmp_path / "out" / "checkpoints" / "step-00000005"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    for name, obj in (("optimizer.pt", optimizer.state_dict()), ("rng_state.pt", {"torch": torch.get_rng_state()})):
        buf = io.BytesIO()
        torch.save(obj, buf)
        (ckpt / name).write_bytes(buf.getvalue())
    (ckpt / "trainer_state.json").write_text(json.dumps({"run": {"step": 5}}))
    assert checkpoint.find_checkpoint(tmp_path / "out", "latest") == ckpt
    model_state, optimizer_state, _, saved = checkpoint.load_training_state(ckpt)
    assert_all_equal(model.state_dict(), model_state)
    assert_all_equal(optimizer.state_dict(), optimizer_state)
    assert saved == {"run": {"step": 5}}


def test_a_damaged_checkpoint_is_one_error_naming_the_file(trained, tmp_path):
    ckpt = save(tmp_path / "out", 1, trained)
    (ckpt / "config.json").unlink()
    with pytest.raises(VitfoodError, match=r"step-00000001/config\.json: file not found"):
        checkpoint.load_training_state(ckpt)
    ckpt = save(tmp_path / "out", 2, trained)
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(VitfoodError, match=r"step-00000002/model\.safetensors: refused to load"):
        checkpoint.load_training_state(ckpt)
    ckpt = save(tmp_path / "out", 3, trained)
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(VitfoodError, match=r"step-00000003: incomplete \(optimizer\.pt is missing\)"):
        checkpoint.load_training_state(ckpt)


# ---------------------------------------------------------------- pruning and the summary

def steps(out):
    return [checkpoint.checkpoint_step(p) for p in checkpoint.list_checkpoints(out)]


@pytest.mark.parametrize("keep, kept", [(0, [1, 2, 3, 4]), (1, [4]), (2, [3, 4]), (9, [1, 2, 3, 4])])
def test_save_total_limit_keeps_the_newest(trained, tmp_path, keep, kept):
    for step in (1, 2, 3, 4):
        save(tmp_path / "out", step, trained, keep=keep)
    assert steps(tmp_path / "out") == kept


def test_pruning_never_removes_the_checkpoint_just_saved(trained, tmp_path):
    # Resumed from step 2 while step 4 of the abandoned run is still there: step 3 is the run's newest.
    for step in (2, 4):
        save(tmp_path / "out", step, trained)
    save(tmp_path / "out", 3, trained, keep=1)
    assert steps(tmp_path / "out") == [3, 4]
    save(tmp_path / "out", 4, trained, keep=1)  # reaching step 4 replaces the old one
    assert steps(tmp_path / "out") == [4]


def test_checkpoints_summary(trained, tmp_path):
    out = tmp_path / "out"
    assert checkpoint.checkpoints_summary(out) is None
    (out / "checkpoints").mkdir(parents=True)
    assert checkpoint.checkpoints_summary(out) is None
    save(out, 1, trained)
    size = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
    assert checkpoint.checkpoints_summary(out) == (
        f"1 checkpoint ({human_bytes(size)}) in {out / 'checkpoints'}: delete the folder to free the space, or keep "
        "it to train longer: the same command with a higher --epochs and --resume-from-checkpoint continues from the "
        "last step, with the learning-rate schedule recomputed for the new total (the rate, decayed to 0, goes back "
        "up to the new schedule's value at this step and decays to 0 by the new end)")
    save(out, 2, trained)
    assert checkpoint.checkpoints_summary(out).startswith("2 checkpoints (")


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (9_940, "9.9 KB"), (9_960, "10 KB"), (325_400, "325 KB"),
    (999_400, "999 KB"), (999_500, "1.0 MB"), (987_000_000, "987 MB"), (1_400_000_000, "1.4 GB"),
    (86_000_000_000, "86 GB"),
])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


# ---------------------------------------------------------------- the checkpoints of a real run

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ckpt-images"), per_class=5)  # 12 train images: 3 steps


@pytest.fixture(scope="module")
def run_out(tmp_path_factory, backbone_dir, images):
    out = tmp_path_factory.mktemp("ckpt-run") / "out"
    r = run("train.py", "--model", backbone_dir, "--dataset", images, "--output-dir", out, "--num-workers", 0,
            "--epochs", 1, "--batch-size", 4, "--grad-accum-steps", 1, "--learning-rate", 1e-3,
            "--save-steps", 1, "--save-total-limit", 0)
    assert r.returncode == 0, r.stderr
    return out


def test_every_checkpoint_of_a_run_loads_whole_in_transformers(run_out, backbone_dir):
    ckpts = checkpoint.list_checkpoints(run_out)
    assert len(ckpts) >= 2
    for ckpt in ckpts:
        model, _ = load_model(backbone_dir, labels=list(CLASSES))
        model.load_state_dict(checkpoint.load_training_state(ckpt)[0])  # the model as a resume sees it
        assert_loads_whole_in_transformers(ckpt, model)


def test_infer_and_the_pipeline_take_a_checkpoint(run_out, images):
    from transformers import pipeline

    ckpt = checkpoint.list_checkpoints(run_out)[0]
    image = images / CLASSES[0] / "0000.jpg"
    r = run("infer.py", "--model", ckpt, "--json", "--top-k", 3, image)
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.splitlines()
    assert sorted(p["label"] for p in json.loads(line)["predictions"]) == sorted(CLASSES)
    predictions = pipeline("image-classification", model=str(ckpt), top_k=3)(str(image))
    assert sorted(p["label"] for p in predictions) == sorted(CLASSES)



def test_the_background_writer_runs_one_save_at_a_time_in_order():
    import threading
    import time

    writer = checkpoint.BackgroundWriter()
    assert writer.wait() is None  # nothing handed over yet
    log, in_flight = [], threading.Semaphore(1)

    checked = threading.Event()  # the second save may start at once: it waits until the first's log is read

    def job(name, seconds, after=None):
        def run_job():
            assert in_flight.acquire(blocking=False), "two saves at once"
            time.sleep(seconds)
            if after is not None:
                assert after.wait(10)
            log.append((name, threading.current_thread().name))
            in_flight.release()
        return run_job

    writer.submit("first", [job("a", 0.2), job("b", 0)])
    assert log == []  # handed over: the caller goes on while it writes
    writer.submit("second", [job("c", 0, after=checked)])  # waits for the first to land
    assert [name for name, _ in log] == ["a", "b"]
    checked.set()
    what, seconds = writer.wait()
    assert what == "second" and seconds >= 0
    assert [name for name, _ in log] == ["a", "b", "c"]
    assert {thread for _, thread in log} != {threading.current_thread().name}  # written off the caller's thread


def test_a_failed_background_save_is_raised_at_the_next_wait_and_stops_what_follows():
    writer = checkpoint.BackgroundWriter()
    ran = []

    def fail():
        raise VitfoodError("cannot save a checkpoint to out/checkpoints: No space left on device "
                           "(the previous checkpoints are intact)")

    writer.submit("checkpoint step-00000002", [fail, lambda: ran.append("after")])
    with pytest.raises(VitfoodError, match="No space left on device"):
        writer.wait()
    assert ran == []  # the best model's files before a checkpoint that failed: none after the failure
    assert writer.wait() is None  # raised once
    with pytest.raises(VitfoodError, match="previous checkpoints are intact"):
        writer.submit("checkpoint step-00000003", [fail])
        writer.submit("checkpoint step-00000004", [lambda: ran.append("next")])  # the failure surfaces first
    assert ran == []
