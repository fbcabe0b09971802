"""The decoded-image cache: same pixels as decoding, same weights with or without it, gone after the run."""

import multiprocessing
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from vitfood.data import TrainImages, scan_folder
from vitfood.image_cache import ImageCache, estimate_bytes, should_cache
from vitfood.preprocess import Preprocessing, decode_for_training, open_image, training_pixels_cap
from vitfood.train_loop import train
from test_train import config

PREP = Preprocessing(32, 32)


def test_cached_crops_equal_decoded_crops(image_folder, tmp_path):
    records = scan_folder(image_folder)
    plain = TrainImages(records, PREP, seed=7, flip=True)
    cache = ImageCache(tmp_path / "cache", len(records))
    cache.create()
    cached = TrainImages(records, PREP, seed=7, flip=True, cache=cache)
    for epoch in (0, 1, 2):  # epoch 0 fills the cache, the others read it
        for i in range(len(records)):
            a, b = plain[(i, epoch)], cached[(i, epoch)]
            assert a[1] == b[1] and a[2] is b[2] is None
            np.testing.assert_array_equal(a[0], b[0])
    assert (np.load(tmp_path / "cache" / "index.npy")[:, 2] == -1).sum() == 0  # every image was stored
    first = open_image(records.source(0))
    np.testing.assert_array_equal(cache.get(0), decode_for_training(first, training_pixels_cap(PREP)))


def _fill(cache, arrays):
    for i, a in arrays.items():
        cache.put(i, a)


def test_a_worker_process_writes_what_the_main_process_reads(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {i: rng.integers(0, 256, (int(rng.integers(1, 40)), int(rng.integers(1, 40)), 3), dtype=np.uint8)
              for i in (0, 3, 4)}
    cache = ImageCache(tmp_path / "c", 6)
    cache.create()
    for method in ("fork", "spawn"):  # Linux's default, and the default on macOS/Windows (pickled state)
        proc = multiprocessing.get_context(method).Process(target=_fill, args=(cache, arrays))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        for i in range(6):
            got = cache.get(i)
            if i in arrays:
                np.testing.assert_array_equal(got, arrays[i])
                assert got.flags.writeable
            else:
                assert got is None
        cache = ImageCache(tmp_path / "c", 6)  # starts empty again
        cache.create()
        assert cache.get(0) is None


def test_large_photos_are_cached_at_the_size_the_crops_need(tmp_path):
    big = tmp_path / "big.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 1500 wide, 2000 high
    Image.new("RGB", (2000, 1500), (10, 200, 30)).save(big, quality=90, exif=exif)
    cap = training_pixels_cap(PREP)  # 32 px model: 32 * 32 / 0.06 = 17,067 pixels
    pixels = decode_for_training(open_image(big), cap)
    h, w = pixels.shape[:2]
    assert h * w <= cap and h > w and abs(h / w - 2000 / 1500) < 0.05
    assert tuple(pixels[h // 2, w // 2]) == pytest.approx((10, 200, 30), abs=3)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(small)
    assert decode_for_training(open_image(small), cap).shape == (30, 40, 3)  # under the cap: untouched


def test_training_with_and_without_the_cache_gives_the_same_weights(backbone_dir, image_folder, tmp_path):
    common = dict(epochs=3, num_workers=2, flip=True)
    train(config(backbone_dir, image_folder, tmp_path / "on", decode_cache="on", **common))
    train(config(backbone_dir, image_folder, tmp_path / "off", decode_cache="off", **common))
    on, off = load_file(str(tmp_path / "on" / "model.safetensors")), load_file(str(tmp_path / "off" / "model.safetensors"))
    assert all((on[k] == off[k]).all() for k in on)
    assert not (tmp_path / "on" / "decoded-images").exists()  # removed at the end of the run


def test_a_full_disk_stops_the_cache_not_the_reads(tmp_path, capsys):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a tmpfs (root)")
    try:
        cache = ImageCache(mnt / "c", 10)
        cache.create()
        arrays = [np.full((64, 64, 3), i, dtype=np.uint8) for i in range(10)]  # 12 KB each: the 6th or so fills it
        for i, a in enumerate(arrays):
            cache.put(i, a)
        assert cache.full
        assert "cache stopped growing" in capsys.readouterr().err
        stored = [i for i in range(10) if cache.get(i) is not None]
        assert 0 < len(stored) < 10
        for i in stored:
            np.testing.assert_array_equal(cache.get(i), arrays[i])
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_when_the_cache_is_used(tmp_path, image_folder):
    records = scan_folder(image_folder)
    need = estimate_bytes(records, training_pixels_cap(PREP))
    sizes = [Image.open(p).size for p in records.paths]
    exact = sum(3 * w * h for w, h in sizes)
    assert 0.5 * exact < need < 2 * exact
    assert should_cache("auto", 3, 1, need, tmp_path) == (True, should_cache("on", 1, 1, need, tmp_path)[1])
    assert should_cache("auto", 1, 1, need, tmp_path)[0] is False
    assert should_cache("auto", 3, 2, need, tmp_path)[0] is False
    assert should_cache("off", 3, 1, need, tmp_path) == (False, "off")
    free = shutil.disk_usage(tmp_path).free
    assert "more than half" in should_cache("auto", 3, 1, free // 2 + 1, tmp_path)[1]
    assert should_cache("on", 3, 1, free // 2 + 1, tmp_path)[0] is True  # asked for, and it fits
    # The checkpoints' room is never given to the cache, even when asked for.
    on, why = should_cache("on", 3, 1, need, tmp_path, reserve_bytes=free - need // 2)
    assert on is False and "room for the checkpoints" in why
