"""The decoded-image cache: each image decoded once, its pixels kept on disk for the later epochs.

Why: on a small machine, decoding is most of what a training image costs (0.7 ms of about 1 ms on
one core for a Food-101 JPEG); reading the decoded pixels back from the page cache and cropping them
costs about 0.2 ms. FFCV's approach, without a conversion step: the first epoch fills the cache.

Layout of a cache folder: `index.npy`, a memory-mapped [N, 3] int64 table shared by every process
(offset, height << 32 | width, writer), and one append-only `data-<writer>.u8` per process that
writes. A worker writes the pixels first and the entry's writer field last, so an entry that is
visible is complete. Each image is written by one process (the one that first decodes it in an
epoch), so entries never race. The cache holds only derived data: it is made empty at the start of
a run and removed at its end, and a run gives the same pixels with or without it.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from vitfood.fileio import human_bytes
from vitfood.preprocess import BadImageError, open_image

_ABSENT = -1


class ImageCache:
    def __init__(self, folder: Path, num_images: int):
        """The cache for `num_images` images; nothing is on disk until `create()` (so a run that fails
        in its setup leaves nothing). Create it in the main process, before the DataLoader workers start."""
        self.folder, self.num_images = Path(folder), num_images
        self._open()

    def create(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)  # a killed run's leftovers: only derived data
        self.folder.mkdir(parents=True)
        index = np.lib.format.open_memmap(self.folder / "index.npy", mode="w+", dtype=np.int64, shape=(self.num_images, 3))
        index[:, 2] = _ABSENT
        index.flush()
        del index

    def _open(self) -> None:
        self._index = None  # opened lazily: each worker process maps the file itself
        self._readers: dict[int, int] = {}
        self._writer_fd, self._end, self.full = None, 0, False

    def __getstate__(self):  # DataLoader workers get the location, not open files or mappings
        return {"folder": self.folder, "num_images": self.num_images}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    @property
    def index(self) -> np.ndarray:
        if self._index is None:
            self._index = np.load(self.folder / "index.npy", mmap_mode="r+")
        return self._index

    def get(self, i: int) -> np.ndarray | None:
        """The pixels stored for image i (a writable uint8 HWC array), or None."""
        offset, shape, writer = (int(v) for v in self.index[i])
        if writer == _ABSENT:
            return None
        fd = self._readers.get(writer)
        if fd is None:
            fd = self._readers[writer] = os.open(self.folder / f"data-{writer}.u8", os.O_RDONLY)
        h, w = shape >> 32, shape & 0xFFFFFFFF
        out = np.empty((h, w, 3), dtype=np.uint8)
        if os.preadv(fd, [out], offset) != out.nbytes:
            return None  # cannot happen short of someone truncating the file: decode again
        return out

    def put(self, i: int, pixels: np.ndarray) -> None:
        """Store image i's pixels. A full disk only stops this process's caching, never the run."""
        if self.full:
            return
        pid = os.getpid()
        try:
            if self._writer_fd is None or self._writer_pid != pid:
                self._writer_fd = os.open(self.folder / f"data-{pid}.u8", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                self._writer_pid, self._end = pid, 0
            data = np.ascontiguousarray(pixels, dtype=np.uint8)
            written = os.pwrite(self._writer_fd, data, self._end)
            if written != data.nbytes:
                raise OSError(28, "short write")
        except OSError as e:
            self.full = True
            print(f"vitfood: decoded-image cache stopped growing ({e.strerror or e}); training goes on without it",
                  file=sys.stderr)
            return
        h, w = pixels.shape[:2]
        self.index[i, 0] = self._end
        self.index[i, 1] = (h << 32) | w
        self.index[i, 2] = pid  # last: the entry is visible only once its pixels are in the file
        self._end += data.nbytes


def estimate_bytes(records, max_pixels: int, sample: int = 32, seed: int = 0) -> int:
    """Bytes the cache would take: the mean decoded size of a sample of images (headers only) x N."""
    n = len(records)
    picks = np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False)
    sizes = []
    for i in picks:
        try:
            w, h = open_image(records.source(int(i))).size
        except BadImageError:
            continue
        sizes.append(3 * min(w * h, max_pixels))
    return math.ceil(np.mean(sizes) * n) if sizes else 0


def should_cache(setting: str, epochs: int, world: int, need_bytes: int, folder: Path,
                 reserve_bytes: int = 0) -> tuple[bool, str]:
    """Whether to cache, and why, for --decode-cache auto|on|off.

    Checkpoints come first: the cache is never allowed to take the room that `reserve_bytes` (what
    the run's checkpoints and model need, with a margin) keeps free. Beyond that, auto caches when an
    image is read more than once (several epochs), by one process per machine (under torchrun each
    rank would keep its own copy), and when the cache takes at most half of the free space.
    """
    if setting == "off":
        return False, "off"
    if not (hasattr(os, "pwrite") and hasattr(os, "preadv")):  # Windows, some older macOS Pythons
        return False, "off (this platform has no os.pwrite/os.preadv)"
    existing = next(p for p in (Path(folder), *Path(folder).parents) if p.exists())  # made only when training starts
    free = shutil.disk_usage(existing).free
    size, free_text = human_bytes(need_bytes), human_bytes(free)
    if need_bytes + reserve_bytes > free:
        return False, f"off: about {size}, which with room for the checkpoints is more than the {free_text} free"
    if setting == "on":
        return True, f"on, about {size}"
    if epochs < 2:
        return False, "off (auto: one epoch reads each image once)"
    if world > 1:
        return False, "off (auto: several processes; --decode-cache on gives each its own copy)"
    if 2 * need_bytes > free - reserve_bytes:
        return False, f"off (auto: about {size} is more than half the {free_text} free)"
    return True, f"on, about {size}"
