"""The DataLoader's batches in /dev/shm: how many may be in flight, sized to the room there is (issue 17, 1.7).

Each worker hands its batches to the training process through shared memory (files in /dev/shm on Linux), and
a loader keeps `prefetch_factor` batches a worker in flight. Docker gives a container 64 MB of /dev/shm unless
told otherwise; 16 workers x 4 batches x 38.5 MB (256 evaluation images at 224 px) would need 2.4 GB, and a
worker that writes past the end dies with "Bus error" - after a whole epoch, at the first evaluation. So at
setup, from the free space of /dev/shm:

- the prefetch is lowered from PREFETCH towards 1 until the loader's batches fit (`loader_prefetch`);
- `--eval-batch-size auto` is lowered until one batch a worker fits (`eval_batch_that_fits`);
- and when even one batch a worker cannot fit, the run stops before training with one line naming the fixes
  (`ShmTooSmall`).

Only one loader is active at a time (training, then evaluation: the persistent training workers hold no batch
between epochs), so each may take SHARE of the free space, divided among the processes torchrun starts on this
machine. Where there is no /dev/shm (macOS, Windows) nothing is sized.
"""

from __future__ import annotations

import math
import os

from vitfood.errors import VitfoodError

SHM = "/dev/shm"
PREFETCH = 4  # batches a worker prepares ahead when there is room
SHARE = 0.75  # of the free space, for one loader's batches: the rest for the batch being pinned, NCCL, other users
# Batches alive besides the prefetched ones: the one the training process holds, and the one being pinned.
# Measured (benchmarks/RESULTS.md, 2026-12-02): 2 workers x prefetch 2 of 10 MB batches with one held: 50 MB.
HELD = 2


def free_bytes(path: str = SHM) -> int | None:
    """Free space of /dev/shm in bytes; None where there is none."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return None
    return st.f_bavail * st.f_frsize


def budget(free: int) -> int:
    """Bytes one loader of this process may keep in /dev/shm."""
    return int(free * SHARE) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun's processes here


def loader_prefetch(batch_bytes: int, workers: int, free: int | None) -> int | None:
    """The prefetch factor whose batches fit: PREFETCH where there is room, fewer where not; None when not even
    one batch a worker fits."""
    if workers == 0 or free is None:
        return PREFETCH
    fits = (budget(free) // max(1, batch_bytes) - HELD) // workers
    return min(PREFETCH, fits) if fits >= 1 else None


def eval_batch_that_fits(size: int, image_bytes: int, workers: int, free: int | None) -> int:
    """--eval-batch-size auto's `size`, lowered until one batch a worker fits; `size` where no batch size fits."""
    if workers == 0 or free is None:
        return size
    fits = budget(free) // ((workers + HELD) * image_bytes)
    return min(size, fits) if fits >= 1 else size


class ShmTooSmall(VitfoodError):
    pass


def shm_size_gb(batch_bytes: int, workers: int) -> int:
    """`docker run --shm-size` in GB that holds the full prefetch of batches of `batch_bytes`."""
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, math.ceil((workers * PREFETCH + HELD) * batch_bytes / SHARE * ranks / 2**30))


def too_small(batch: int, image_bytes: int, workers: int, free: int, flag: str) -> ShmTooSmall:
    """The one line for a loader whose batches cannot fit even one a worker: what it needs, and the fixes."""
    batch_bytes = batch * image_bytes
    most = max(0, budget(free) // max(1, batch_bytes) - HELD)
    return ShmTooSmall(
        f"shared memory: {workers} DataLoader workers with batches of {batch} images ({batch_bytes / 2**20:.1f} MB "
        f"each) do not fit in the {free / 2**20:.0f} MB free in {SHM} (Docker's default is 64 MB): give the container "
        f"more (docker run --shm-size={shm_size_gb(batch_bytes, workers)}g), or use --num-workers {most}, or a "
        f"smaller {flag}")


def lowered_note(auto: int, size: int, image_bytes: int, workers: int, free: int) -> str:
    """The line a run says when /dev/shm lowered --eval-batch-size auto."""
    return (f"shared memory: {free / 2**20:.0f} MB free in {SHM}, so evaluation in batches of {size} images, not "
            f"{auto}; for more, docker run --shm-size={shm_size_gb(auto * image_bytes, workers)}g")
