"""The DataLoader's batches sized to /dev/shm (issue 17, 1.7), with its free space faked: Docker's default 64 MB."""

import types

import pytest
import torch

from vitfood import data, shared_memory
from vitfood.config import TrainConfig
from vitfood.preprocess import Preprocessing
from vitfood.run import eval_loader
from vitfood.train_loop import train

MB = 2**20
IMAGE = 224 * 224 * 3  # bytes of one image as the workers hand it over


def test_docker_default_shm_lowers_the_prefetch_and_the_auto_eval_batch():
    # 64 MB, 16 workers: 48 MB for one loader. Training batches of 16 images (2.4 MB): 20 fit, 2 are held
    # by the training process, so 18 in flight: one a worker, not 4.
    assert shared_memory.loader_prefetch(16 * IMAGE, 16, 64 * MB) == 1
    assert shared_memory.loader_prefetch(16 * IMAGE, 4, 64 * MB) == 4  # 4 workers x 4 = 16 batches fit
    assert shared_memory.loader_prefetch(16 * IMAGE, 8, 64 * MB) == 2
    # Evaluation at 256 images (38.5 MB) cannot fit one a worker: auto lowers it to what fits, 18 images
    # (48 MB over 16 + 2 batches of 147 kB images: 18.6).
    assert shared_memory.loader_prefetch(256 * IMAGE, 16, 64 * MB) is None
    assert shared_memory.eval_batch_that_fits(256, IMAGE, 16, 64 * MB) == 18
    assert shared_memory.loader_prefetch(18 * IMAGE, 16, 64 * MB) == 1
    # Room enough (a host's /dev/shm, or --shm-size 8g): nothing changes.
    assert shared_memory.loader_prefetch(256 * IMAGE, 16, 8 * 1024 * MB) == 4
    assert shared_memory.eval_batch_that_fits(256, IMAGE, 16, 8 * 1024 * MB) == 256
    # No workers, or no /dev/shm (macOS, Windows): nothing is sized.
    assert shared_memory.loader_prefetch(256 * IMAGE, 0, 64 * MB) == 4
    assert shared_memory.loader_prefetch(256 * IMAGE, 16, None) == 4
    assert shared_memory.eval_batch_that_fits(256, IMAGE, 16, None) == 256


def test_processes_on_one_machine_share_shm(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's 4 processes, each with its loaders
    assert shared_memory.budget(64 * MB) == 12 * MB
    assert shared_memory.eval_batch_that_fits(256, IMAGE, 3, 64 * MB) == 16  # 12 MB / (5 x 147 kB)
    assert shared_memory.free_bytes("/no/such/folder") is None


def loader(monkeypatch, free_mb, sampler, workers=16):
    monkeypatch.setattr(shared_memory, "free_bytes", lambda path=shared_memory.SHM: free_mb * MB)
    prep = Preprocessing(224, 224)
    return data.make_loader(data.EvalImages([], prep), sampler, prep, workers, False, 0)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than this machine's cores
def test_make_loader_fits_its_prefetch_or_says_the_fix_in_one_line(monkeypatch):
    assert loader(monkeypatch, 64, data.TrainBatchSampler(100, 16, 0), workers=8).prefetch_factor == 2
    assert loader(monkeypatch, 4096, data.TrainBatchSampler(100, 16, 0), workers=8).prefetch_factor == 4
    assert loader(monkeypatch, 64, data.TrainBatchSampler(100, 16, 0), workers=0).prefetch_factor is None
    with pytest.raises(shared_memory.ShmTooSmall) as e:
        loader(monkeypatch, 64, data.EvalBatchSampler(1000, 256))
    assert str(e.value) == (
        "shared memory: 16 DataLoader workers with batches of 256 images (36.8 MB each) do not fit in the 64 MB "
        "free in /dev/shm (Docker's default is 64 MB): give the container more (docker run --shm-size=4g), or use "
        "--num-workers 0, or a smaller --eval-batch-size")
    with pytest.raises(shared_memory.ShmTooSmall, match=r"--shm-size=1g\), or use --num-workers 18, or a smaller "
                                                          r"--batch-size$"):
        loader(monkeypatch, 64, data.TrainBatchSampler(1000, 16, 0), workers=20)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_auto_eval_batch_is_lowered_to_fit_and_an_explicit_one_is_kept(monkeypatch):
    monkeypatch.setattr(shared_memory, "free_bytes", lambda path=shared_memory.SHM: 64 * MB)
    prep = Preprocessing(224, 224)

    said = []

    def resolved(eval_batch_size, device="cuda"):
        cfg = TrainConfig(model="m", dataset="d", eval_batch_size=eval_batch_size)
        ctx = types.SimpleNamespace(cfg=cfg, resolved={}, workers=15, device=torch.device(device),
                                    dist=types.SimpleNamespace(rank=0, world=1), say=said.append)
        inputs = types.SimpleNamespace(splits=types.SimpleNamespace(eval=list(range(4000))), prep=prep)
        loader, passes = eval_loader(ctx, inputs, micro=64)
        return ctx.resolved["eval_batch_size"], passes.size, loader.prefetch_factor

    # auto on a GPU would take 256 (4,000 images / 15 workers = 266 each); 64 MB of /dev/shm hold 19
    # (48 MB over 15 + 2 batches of 147 kB images: 19.7). The run says so, and the fix.
    assert resolved("auto") == (19, 19, 1)
    assert said == ["shared memory: 64 MB free in /dev/shm, so evaluation in batches of 19 images, not 256; for "
                    "more, docker run --shm-size=3g"]  # (15 x 4 + 2) x 38.5 MB / 0.75 = 2.97 GiB
    with pytest.raises(shared_memory.ShmTooSmall, match="--eval-batch-size$"):
        resolved("128")  # the user's own size is not changed behind their back: the run stops, naming the fixes


def test_train_stops_at_setup_when_one_batch_a_worker_cannot_fit(backbone_dir, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(shared_memory, "free_bytes", lambda path=shared_memory.SHM: 100_000)  # 100 kB
    out = tmp_path / "out"
    with pytest.raises(shared_memory.ShmTooSmall, match=r"^shared memory: 2 DataLoader workers with batches of 8 "):
        train(TrainConfig(model=str(backbone_dir), dataset=str(image_folder), output_dir=str(out), epochs=1,
                          batch_size=8, grad_accum_steps=1, num_workers=2))
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()
