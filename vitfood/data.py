"""Datasets, the train/eval split, and the DataLoaders.

Design, driven by exact resumption and many processes:
- Each training sample is addressed as (index, epoch). Its crop and flip come from a generator
  seeded with (seed, epoch, index), and the epoch's order from (seed, epoch). Nothing depends on
  which worker, or how many, decoded it, so a run can be resumed from any optimizer step by
  skipping batches, and N processes see exactly the batches that one process would.
- Workers decode and resize only, handing over uint8 HWC arrays; the float conversion and the
  normalisation run on the device (`Preprocessing.normalize`). With the decoded-image cache
  (`image_cache.py`), later epochs skip the decoding too.
- An unreadable image does not stop the epoch: the worker reports it, the batch goes on without it.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitfood import shared_memory
from vitfood.errors import VitfoodError
from vitfood.hub import looks_like_hub_id, no_local_folder
from vitfood.image_cache import ImageCache
from vitfood.paths import extensions_text, images_under, is_image_name
from vitfood.preprocess import (BadImageError, Preprocessing, decode_for_training, load_rgb, open_image,
                                 random_crop_resize, training_pixels_cap)


# ---------------------------------------------------------------- records: where the images are

class Records:
    """A list of labelled images: `source(i)` is a path or bytes that PIL can open."""

    def __init__(self, labels: np.ndarray, label_names: list[str]):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.label_names = label_names

    def __len__(self) -> int:
        return len(self.labels)

    def source(self, i: int):
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def subset(self, indices: np.ndarray) -> "Records":
        return SubsetRecords(self, np.asarray(indices, dtype=np.int64))


class FolderRecords(Records):
    def __init__(self, paths: list[str], labels, label_names):
        super().__init__(labels, label_names)
        self.paths = paths

    def source(self, i):
        return self.paths[i]

    def name(self, i):
        return self.paths[i]


class ArrowRecords(Records):
    """A `datasets.Dataset` whose image column is read undecoded (bytes), so workers do the decoding."""

    def __init__(self, ds, image_column: str, label_column: str, label_names):
        super().__init__(np.asarray(ds[label_column]), label_names)
        self.ds = ds
        self.image_column = image_column

    def source(self, i):
        item = self.ds[int(i)][self.image_column]
        return item["bytes"] if item.get("bytes") else item["path"]

    def name(self, i):
        item = self.ds[int(i)][self.image_column]
        return item.get("path") or f"row {int(i)}"


class SubsetRecords(Records):
    def __init__(self, base: Records, indices: np.ndarray):
        super().__init__(base.labels[indices], base.label_names)
        self.base, self.indices = base, indices

    def source(self, i):
        return self.base.source(int(self.indices[i]))

    def name(self, i):
        return self.base.name(int(self.indices[i]))


def scan_folder(root: Path) -> FolderRecords:
    """One subfolder per class (sorted names are the labels); image files found recursively inside."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise VitfoodError(f"{root}: no class subfolders (expected one folder per class holding its images)")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        found = images_under(root / cls)
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise VitfoodError(f"{root}: the class folders hold no image files ({extensions_text()})")
    return FolderRecords(paths, labels, classes)


def _arrow_records(ds, source: str) -> ArrowRecords:
    from datasets import ClassLabel, Image as ImageFeature

    image_cols = [c for c, f in ds.features.items() if isinstance(f, ImageFeature)]
    if not image_cols:
        raise VitfoodError(f"{source}: no image column (features: {list(ds.features)})")
    label_cols = [c for c, f in ds.features.items() if isinstance(f, ClassLabel)]
    label_col = label_cols[0] if label_cols else next((c for c in ("label", "labels") if c in ds.features), None)
    if label_col is None:
        raise VitfoodError(f"{source}: no label column (a ClassLabel feature, or a column named 'label')")
    feature = ds.features[label_col]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        names = [str(v) for v in range(int(max(ds[label_col])) + 1)]
    labels = np.asarray(ds[label_col])
    unlabelled = int(((labels < 0) | (labels >= len(names))).sum()) if len(labels) else 0
    if unlabelled:  # ClassLabel's -1 for a missing label: the split and the loss need a class
        raise VitfoodError(f"{source}: {unlabelled} rows have no label in 0..{len(names) - 1} (e.g. -1, a missing "
                           f"label); remove them from the dataset first")
    ds = ds.cast_column(image_cols[0], ImageFeature(decode=False)).select_columns([image_cols[0], label_col])
    return ArrowRecords(ds, image_cols[0], label_col, names)


def load_arrow_split(dataset: str, split: str, max_rows: int):
    """A split of a save_to_disk folder or a Hub dataset, as a `datasets.Dataset`."""
    try:
        import datasets
    except ImportError:
        raise VitfoodError("the 'datasets' package is needed for Hub and save_to_disk datasets: "
                           "pip install datasets, or pass an image folder with --dataset") from None
    path = Path(dataset).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise VitfoodError(f"{path}: no split {split!r} (it has {list(loaded)})")
            return loaded[split]
        return loaded
    from vitfood.hub import download_split

    files = download_split(dataset, split, max_rows)
    return datasets.load_dataset("parquet", data_files={split: files}, split=split)


_SPLIT_NAMES = {"train", "training", "validation", "valid", "val", "test", "testing", "eval", "evaluation", "dev"}


def _refuse_split_layout(path: Path) -> None:
    """DIR/train/<class>/..., DIR/validation/<class>/... read without --eval-split would make "train" and
    "validation" the classes: a silent, useless run. Say what to pass instead."""
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if subdirs and all(d.name.lower() in _SPLIT_NAMES for d in subdirs) and \
            any(c.is_dir() for d in subdirs for c in d.iterdir()):
        names = sorted(d.name for d in subdirs)
        other = next((n for n in names if n.lower() not in ("train", "training")), names[-1])
        raise VitfoodError(f"--dataset {path}: its folders ({', '.join(names)}) look like splits, not classes; pass "
                           f"--train-split {next((n for n in names if n.lower() in ('train', 'training')), names[0])} "
                           f"--eval-split {other}")


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


@dataclass
class Splits:
    train: Records
    eval: Records
    label_names: list[str]
    available: int | None  # training images before --max-train-samples; None: only part of a Hub split was fetched
    warnings: list[str] = field(default_factory=list)  # lines for the run to print: small classes, loose images
    rule: str = "stratified"  # how --test-size was held out (STRATIFIED or RANDOM), recorded for resumption


STRATIFIED, RANDOM = "stratified", "random"  # the held-out split's rule; RANDOM: runs of vitfood before it stratified


def load_splits(dataset: str, train_split: str, eval_split: str | None, max_train_samples: int,
                max_eval_samples: int, test_size: float, seed: int, rule: str = STRATIFIED) -> Splits:
    """The training and evaluation records: --test-size of the images held out with the seed, stratified
    by class (`held_out`), or --eval-split. `rule` RANDOM repeats the split of runs made before stratification."""
    path = Path(dataset).expanduser()
    folder = path.is_dir() and not is_saved_dataset(path)
    warnings = []
    if folder:
        if eval_split is not None:
            for split in (train_split, eval_split):
                if not (path / split).is_dir():
                    present = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
                    raise VitfoodError(f"--dataset {path}: no {split}/ folder for --{'eval' if split == eval_split else 'train'}"
                                       f"-split {split} (it has {', '.join(present) or 'no folders'}); with --eval-split "
                                       "an image folder holds one folder per split, each with one folder per class")
        else:
            _refuse_split_layout(path)
        roots = [path / train_split, path / eval_split] if eval_split is not None else [path]
        warnings += [loose_images_warning(root) for root in roots if loose_images(root)]
        train = scan_folder(roots[0])
        available = len(train)
        if max_train_samples and max_train_samples < len(train):
            # Folders are listed class by class: the first N would be the first few classes only.
            pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:max_train_samples])
            train = train.subset(pick)
    elif path.exists() and not path.is_dir():
        raise VitfoodError(f"--dataset {dataset}: a file, expected a folder or a Hub dataset id")
    else:
        if not path.exists() and not looks_like_hub_id(dataset):  # a path that is not there
            raise VitfoodError(f"{no_local_folder('--dataset', dataset)}, and as a path it cannot be a Hub dataset id")
        ds = load_arrow_split(dataset, train_split, max_train_samples)
        available = len(ds) if path.is_dir() or not max_train_samples else None
        if max_train_samples and max_train_samples < len(ds):
            ds = ds.select(range(max_train_samples))
        train = _arrow_records(ds, f"{dataset}[{train_split}]")

    if eval_split is None:
        eval_index, train_index = held_out(train.labels, len(train.label_names), test_size, seed, rule, dataset)
        eval_records, train = train.subset(eval_index), train.subset(train_index)
        if rule == STRATIFIED:
            warnings += [line for line in [small_classes_warning(eval_records.labels, train.labels, train.label_names)]
                         if line]
    else:
        if folder:
            eval_folder = scan_folder(path / eval_split)
            if eval_folder.label_names != train.label_names:
                raise VitfoodError(f"{path / eval_split}: its class folders differ from {path / train_split}'s")
            eval_records = eval_folder
        else:
            ds = load_arrow_split(dataset, eval_split, max_eval_samples)
            eval_records = _arrow_records(ds, f"{dataset}[{eval_split}]")
        if max_eval_samples and max_eval_samples < len(eval_records):
            eval_records = eval_records.subset(np.arange(max_eval_samples))
    if len(train.label_names) < 2:
        raise VitfoodError(f"--dataset {dataset}: found {len(train.label_names)} class; need at least 2")
    return Splits(train=train, eval=eval_records, label_names=train.label_names, available=available,
                  warnings=warnings, rule=rule)


# ---------------------------------------------------------------- the held-out split

def held_out(labels: np.ndarray, num_classes: int, test_size: float, seed: int, rule: str = STRATIFIED,
             dataset: str = "the dataset") -> tuple[np.ndarray, np.ndarray]:
    """(evaluation indices, training indices), each sorted, for --test-size.

    As datasets' `train_test_split`, ceil(test_size x N) images are held out, chosen by one seeded
    permutation: the same seed gives the same split. Unlike it (which stratifies only when asked to,
    `stratify_by_column`), STRATIFIED holds out each class's share (`held_out_counts`): each class's first
    images in the permutation's order. RANDOM, the permutation's first images whatever their class, is
    kept for runs made before the split was stratified, so that they resume and evaluate on their own split.
    """
    n = len(labels)
    perm = np.random.default_rng(seed).permutation(n)
    if rule == RANDOM:
        n_eval = math.ceil(test_size * n)
        if n_eval < 1 or n - n_eval < 1:
            raise VitfoodError(f"--dataset {dataset}: {n} images are too few to split with --test-size {test_size}")
        return np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
    counts = np.bincount(labels, minlength=num_classes)
    quota = held_out_counts(counts, test_size)
    if quota.sum() < 1:
        raise VitfoodError(f"--dataset {dataset}: {n} images in {num_classes} classes, none with 2 images: no "
                           "image can be held out for evaluation without leaving its class out of training; "
                           "add images (or raise --max-train-samples), or pass --eval-split")
    # Each class's images in the permutation's order; its first quota[c] are held out.
    ordered = perm[np.argsort(labels[perm], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_class = np.arange(n) - starts[labels[ordered]]
    held = ordered[rank_in_class < quota[labels[ordered]]]
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def held_out_counts(counts: np.ndarray, test_size: float) -> np.ndarray:
    """Images to hold out of each class: test_size of it, rounded by largest remainder so that the total is
    ceil(test_size x N), within two bounds that come first: a class of at least 2 images gives at least 1 (so
    it is evaluated) and keeps at least 1 (so it is trained). When the bounds force it, the total differs:
    more when many small classes each give one, fewer when the classes cannot give that many."""
    counts = np.asarray(counts, dtype=np.int64)
    share = test_size * counts
    low = (counts >= 2).astype(np.int64)
    high = np.maximum(counts - 1, 0)
    take = np.clip(np.floor(share).astype(np.int64), low, high)
    target = math.ceil(test_size * counts.sum())
    # One image at a time to the class furthest below its share (the largest remainder; ties: the lower
    # class index), or from the one furthest above it: a few steps, each over the classes.
    while take.sum() != target:
        if take.sum() < target:
            room = take < high
            if not room.any():
                break
            gap = np.where(room, share - take, -np.inf)
            take[int(np.argmax(gap))] += 1
        else:
            room = take > low
            if not room.any():
                break
            gap = np.where(room, share - take, np.inf)
            take[int(np.argmin(gap))] -= 1
    return take


def small_classes_warning(eval_labels: np.ndarray, train_labels: np.ndarray, label_names: list[str]) -> str | None:
    """One line naming every class that has fewer than 2 images, so none of it is evaluated."""
    n = len(label_names)
    counts = np.bincount(eval_labels, minlength=n) + np.bincount(train_labels, minlength=n)
    small = [f"{label_names[c]} ({counts[c]})" for c in range(n) if counts[c] < 2]
    if not small:
        return None
    return (f"warning: {len(small)} class{'' if len(small) == 1 else 'es'} with fewer than 2 images, so none held "
            f"out for evaluation (not in per_class_accuracy): {', '.join(small)}")


def loose_images(root: Path) -> int:
    """Image files directly in the dataset's root folder, outside every class folder: not used."""
    return sum(1 for p in root.iterdir() if p.is_file() and is_image_name(p.name))


def loose_images_warning(root: Path) -> str:
    n = loose_images(root)
    return (f"warning: {n} image{'' if n == 1 else 's'} directly in {root}, outside any class folder, not used "
            "(each class's images go in a folder named after the class)")


# ---------------------------------------------------------------- torch datasets: decode in workers

class TrainImages(Dataset):
    """Item (index, epoch) -> (uint8 HWC crop or None, label, None or (image name, why it is unreadable)).

    With a cache, an image is decoded the first time it is drawn and read back afterwards; the
    crop is drawn from the same pixels either way.
    """

    def __init__(self, records: Records, prep: Preprocessing, seed: int, flip: bool, cache: ImageCache | None = None,
                 rotation: float = 0.0, zoom: float = 0.0, crop_scale: tuple[float, float] = (0.08, 1.0)):
        self.records, self.prep, self.seed, self.flip, self.cache = records, prep, seed, flip, cache
        self.rotation, self.zoom, self.crop_scale = rotation, zoom, crop_scale
        self.max_pixels = training_pixels_cap(prep, crop_scale[0])

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        index, epoch = key
        rng = np.random.default_rng([self.seed, epoch, index])
        pixels = self.cache.get(index) if self.cache is not None else None
        if pixels is None:
            name = self.records.name(index)
            try:
                pixels = decode_for_training(open_image(self.records.source(index)), self.max_pixels, name)
            except BadImageError as e:
                return None, int(self.records.labels[index]), (name, _reason(e, name))
            if self.cache is not None:
                self.cache.put(index, pixels)
        crop = random_crop_resize(pixels, self.prep, rng, self.flip, self.rotation, self.zoom, self.crop_scale)
        return crop, int(self.records.labels[index]), None


class EvalImages(Dataset):
    """Item index -> (uint8 HWC resized image or None, label, None or (image name, why it is unreadable))."""

    def __init__(self, records: Records, prep: Preprocessing, cache: ImageCache | None = None):
        self.records, self.prep, self.cache = records, prep, cache

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        pixels = self.cache.get(index) if self.cache is not None else None
        if pixels is None:
            try:
                pixels = self.prep.eval_resize(load_rgb(self.records.source(index)))
            except BadImageError as e:
                return None, int(self.records.labels[index]), (self.records.name(index), _reason(e, self.records.name(index)))
            if self.cache is not None:
                self.cache.put(index, pixels)
        return pixels, int(self.records.labels[index]), None


def _reason(e: BadImageError, name: str) -> str:
    msg = str(e)
    return msg[len(name) + 2:] if msg.startswith(name + ": ") else msg


@dataclass
class Batch:
    pixels: torch.Tensor  # uint8 [B, H, W, 3]; B may be 0 when every image of the batch was bad
    labels: torch.Tensor  # int64 [B]
    bad: list[tuple[str, str]]  # (image name, reason) for each image left out

    def pin_memory(self):
        self.pixels, self.labels = self.pixels.pin_memory(), self.labels.pin_memory()
        return self


def make_collate(height: int, width: int):
    def collate(items) -> Batch:
        good = [it for it in items if it[0] is not None]
        if good:
            pixels = torch.from_numpy(np.stack([it[0] for it in good]))
        else:
            pixels = torch.empty((0, height, width, 3), dtype=torch.uint8)
        labels = torch.tensor([it[1] for it in good], dtype=torch.int64)
        return Batch(pixels, labels, [it[2] for it in items if it[0] is None])
    return collate


class BadImages:
    """Unreadable images met so far (training and evaluation), and the limit on how many may be."""

    def __init__(self, total_images: int, max_fraction: float):
        self.found: dict[str, str] = {}  # image name -> reason
        self.total, self.max_fraction = total_images, max_fraction

    def add(self, found: list[tuple[str, str]]) -> None:
        self.found.update(found)
        if found and len(self.found) > self.max_fraction * self.total:
            name, why = next(iter(self.found.items()))
            raise VitfoodError(f"stopped at {len(self.found)} unreadable images, more than --max-bad-fraction "
                               f"{self.max_fraction} of the {self.total} allows (all listed in bad_images.txt in the "
                               f"output folder); the first: {name}: {why}")

    def lines(self) -> str:
        return "".join(f"{name}\t{why}\n" for name, why in sorted(self.found.items()))


def unreadable_headers(records: Records, threads: int = 8) -> list[tuple[str, str]]:
    """(image name, why) for each image whose header cannot be read: what `open_image`, the loop's own first
    step, refuses (missing, empty, not an image, a decompression bomb). No pixel is decoded, so this costs
    little (see benchmarks/RESULTS.md, "Bad images before training"); a file cut short past its header is
    still found only when the loop decodes it. Threads, because most of the time is waiting for the disk."""

    def check(i: int):
        name = records.name(i)
        try:
            open_image(records.source(i)).close()
        except BadImageError as e:
            return name, _reason(e, name)
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return [found for found in pool.map(check, range(len(records))) if found]


# ---------------------------------------------------------------- samplers: order, shards, resume

class TrainBatchSampler:
    """Per-epoch seeded shuffle, split across `world` ranks, cut into batches of (index, epoch).

    Rank r takes every world-th index of the epoch's permutation, so the union of the ranks'
    k-th batches is exactly the k-th batch of a single process with world x the batch size.
    Under several ranks the permutation's tail is dropped to a multiple of `world` so that every
    rank takes the same number of steps (DistributedSampler pads with repeats instead, which
    would count some images twice). `set_epoch(e, skip)` resumes mid-epoch after `skip` batches.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world = rank, world
        self.per_rank = num_samples // world
        if self.per_rank < 1:
            raise VitfoodError(f"{num_samples} training images cannot be shared by {world} processes")
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        mine = perm[: self.per_rank * self.world][self.rank :: self.world]
        for b in range(self.skip, len(self)):
            chunk = mine[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(int(i), self.epoch) for i in chunk]


class EvalBatchSampler:
    """In order, each rank a strided share; no padding, so every image is counted exactly once."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world: int = 1):
        self.indices = np.arange(num_samples)[rank::world]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for b in range(len(self)):
            yield [int(i) for i in self.indices[b * self.batch_size : (b + 1) * self.batch_size]]


def make_loader(dataset: Dataset, batch_sampler, prep: Preprocessing, num_workers: int, pin_memory: bool,
                seed: int) -> DataLoader:
    """The workers' batches in flight sized to the free space of /dev/shm (`vitfood.shared_memory`); a
    ShmTooSmall error when not even one batch a worker fits."""
    image_bytes = prep.height * prep.width * 3  # the workers hand over uint8 HWC pixels
    free = shared_memory.free_bytes() if num_workers else None
    prefetch = shared_memory.loader_prefetch(batch_sampler.batch_size * image_bytes, num_workers, free)
    if prefetch is None:
        flag = "--eval-batch-size" if isinstance(batch_sampler, EvalBatchSampler) else "--batch-size"
        raise shared_memory.too_small(batch_sampler.batch_size, image_bytes, num_workers, free, flag)
    # The loader's own generator: its worker seeds are then not drawn from the global torch RNG,
    # which a resumed run restores to the checkpoint's state and must not see consumed differently.
    return DataLoader(
        dataset,
        generator=torch.Generator().manual_seed(seed),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=make_collate(prep.height, prep.width),
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch if num_workers > 0 else None,
    )


def describe_selection(dataset: str, train_split: str, taken: int, available: int | None, cap: int,
                       cap_is_default: bool) -> str:
    """Which training images a run takes and why, for its first line: a capped folder is never silent."""
    if available is not None and taken >= available:
        return f"all {taken:,} images of {dataset}"
    if cap_is_default:
        why = "the guide's subset; --max-train-samples 0 takes all"
    else:
        why = f"--max-train-samples {cap}"
    if available is None:
        return f"the first {taken:,} images of {dataset}[{train_split}] ({why})"
    return f"{taken:,} of the {available:,} images of {dataset} ({why})"
