"""Image decoding, the split, and the data order: what decides which pixels the model sees."""

import warnings

import numpy as np
import pytest
from PIL import Image

from helpers import make_image_folder
from vitfood.data import EvalBatchSampler, TrainBatchSampler, TrainImages, load_splits
from vitfood.errors import VitfoodError
from vitfood.preprocess import BadImageError, Preprocessing, load_rgb, random_resized_crop_box


def awkward_images(folder):
    """Valid images that trip naive loaders, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.gif")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16)).save(folder / "sixteen_bit.png")
    rgb.save(folder / "png_named.jpg", format="PNG")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one_pixel.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape 50x30, shown rotated 90 degrees: portrait 30x50
    rgb.save(folder / "exif_rotated.jpg", exif=exif)
    return folder


def test_awkward_images_become_rgb(tmp_path):
    folder = awkward_images(tmp_path)
    for path in sorted(folder.iterdir()):
        img = load_rgb(path)
        assert img.mode == "RGB", path.name
    assert load_rgb(folder / "exif_rotated.jpg").size == (30, 50)
    # 16-bit white stays white (PIL's own convert would clip 65535 at 255 only by luck; 32768 -> 128 checks scaling)
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "mid16.png")
    assert load_rgb(tmp_path / "mid16.png").getpixel((0, 0)) == (128, 128, 128)
    assert load_rgb(folder / "sixteen_bit.png").getpixel((0, 0)) == (255, 255, 255)


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, quality=95)
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    for name, why in [("empty.jpg", "empty file"), ("text.jpg", "not an image"), ("truncated.jpg", "cannot decode"),
                      ("missing.jpg", "file not found")]:
        with pytest.raises(BadImageError, match=why) as e:
            load_rgb(tmp_path / name)
        assert name in str(e.value)


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 10,000 pixels: over twice the limit
    with pytest.raises(BadImageError, match="too many pixels"):
        load_rgb(tmp_path / "big.png")
    # Between the limit and twice it PIL only warns: such photos are real (100 MP phones), and decode.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning escapes to the user's console either
        assert load_rgb(tmp_path / "big.png").size == (100, 100)


def test_crop_boxes_stay_inside_and_depend_only_on_the_seed():
    boxes = [random_resized_crop_box(512, 384, np.random.default_rng([42, 0, i])) for i in range(500)]
    for left, top, w, h in boxes:
        assert 0 <= left and 0 <= top and left + w <= 512 and top + h <= 384 and w > 0 and h > 0
    assert boxes == [random_resized_crop_box(512, 384, np.random.default_rng([42, 0, i])) for i in range(500)]
    areas = np.array([w * h for _, _, w, h in boxes]) / (512 * 384)
    assert 0.08 * 0.9 < areas.min() and areas.max() <= 1.0 and 0.4 < areas.mean() < 0.65  # U(0.08, 1)-ish


def test_training_crop_is_the_same_whichever_worker_makes_it(image_folder):
    splits = load_splits(str(image_folder), "train", None, 0, 0, 0.2, seed=1)
    ds = TrainImages(splits.train, Preprocessing(32, 32), seed=7, flip=True)
    a, b = ds[(3, 1)], ds[(3, 1)]
    assert a[0].shape == (32, 32, 3) and a[0].dtype == np.uint8 and np.array_equal(a[0], b[0])
    assert not np.array_equal(a[0], ds[(3, 2)][0])  # another epoch, another crop


def test_split_is_seeded_and_disjoint(image_folder):
    s1 = load_splits(str(image_folder), "train", None, 0, 0, 0.2, seed=1)
    s2 = load_splits(str(image_folder), "train", None, 0, 0, 0.2, seed=1)
    s3 = load_splits(str(image_folder), "train", None, 0, 0, 0.2, seed=2)
    names = lambda r: [r.name(i) for i in range(len(r))]  # noqa: E731
    assert len(s1.eval) == 15 and len(s1.train) == 57  # ceil(0.2 * 72) held out, as train_test_split
    assert names(s1.eval) == names(s2.eval) and names(s1.eval) != names(s3.eval)
    assert not set(names(s1.eval)) & set(names(s1.train))
    assert s1.label_names == ["blue_square", "green_disc", "red_stripes"]
    capped = load_splits(str(image_folder), "train", None, 30, 0, 0.2, seed=1)
    assert len(capped.train) + len(capped.eval) == 30
    assert len(set(capped.train.labels.tolist())) == 3  # a random 30, not the first class's 30


def test_eval_split_folders(tmp_path):
    make_image_folder(tmp_path / "train", 4)
    make_image_folder(tmp_path / "validation", 2, seed=5)
    s = load_splits(str(tmp_path), "train", "validation", 0, 0, 0.2, seed=0)
    assert (len(s.train), len(s.eval)) == (12, 6)


def test_dataset_errors_name_the_flag(tmp_path):
    with pytest.raises(VitfoodError, match="no class subfolders"):
        load_splits(str(tmp_path), "train", None, 0, 0, 0.2, 0)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(VitfoodError, match="a file"):
        load_splits(str(tmp_path / "f.txt"), "train", None, 0, 0, 0.2, 0)
    with pytest.raises(VitfoodError, match="no such local folder"):
        load_splits(str(tmp_path / "nope"), "train", None, 0, 0, 0.2, 0)


def test_save_to_disk_dataset(tmp_path, image_folder):
    datasets = pytest.importorskip("datasets")
    paths = sorted(p for p in image_folder.rglob("*") if p.is_file())
    names = sorted({p.parent.name for p in paths})
    ds = datasets.Dataset.from_dict(
        {"image": [str(p) for p in paths], "label": [names.index(p.parent.name) for p in paths]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    s = load_splits(str(tmp_path / "saved"), "train", None, 40, 0, 0.25, seed=0)
    assert s.label_names == names and (len(s.train), len(s.eval)) == (30, 10)
    # ClassLabel known: the held-out 10 are stratified, a quarter of each class among the first 40 rows (24, 16, 0).
    assert np.bincount(s.eval.labels, minlength=3).tolist() == [6, 4, 0]
    assert load_rgb(s.train.source(0)).mode == "RGB"


def test_ranks_share_the_single_process_batches():
    one = TrainBatchSampler(40, batch_size=8, seed=3)
    ranks = [TrainBatchSampler(40, batch_size=4, seed=3, rank=r, world=2) for r in range(2)]
    for s in [one, *ranks]:
        s.set_epoch(2)
    for big, *small in zip(one, *ranks):
        assert sorted(big) == sorted(sum(small, []))
    one.set_epoch(2, skip_batches=3)
    assert len(list(one)) == 2  # resumed after 3 of 5 batches


def test_eval_sampler_counts_each_image_once():
    shards = [list(EvalBatchSampler(11, 4, rank=r, world=3)) for r in range(3)]
    seen = sorted(i for shard in shards for batch in shard for i in batch)
    assert seen == list(range(11))


def test_hub_split_fetches_only_the_shards_it_needs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from vitfood.hub import _first_shards, split_shards

    files = ["README.md", "data/validation-00000-of-00001.parquet", "data/train-00001-of-00003.parquet",
             "data/train-00000-of-00003.parquet", "data/train-00002-of-00003.parquet", "data/training-x.parquet"]
    assert split_shards(files, "train") == [f"data/train-0000{i}-of-00003.parquet" for i in range(3)]
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.parquet"))
        pq.write_table(pa.table({"x": list(range(10))}), paths[-1])
    asked = []

    def download(ps):  # lazily, as the Hub download is: record which shards were fetched
        for p in ps:
            asked.append(p)
            yield p

    assert _first_shards(download(paths), 15) == paths[:2] and asked == paths[:2]
    assert _first_shards(iter(paths), 10) == paths[:1]
    assert _first_shards(iter(paths), 0) == paths
