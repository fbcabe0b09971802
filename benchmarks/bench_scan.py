"""What the check of every image's header before training costs (`data.unreadable_headers`, issue 19).

    python benchmarks/bench_scan.py --images 5000 [--distinct 100] [--work DIR] [--decode-sample 300]

Food-101-size JPEGs (benchmarks/common.py), scanned with 1 thread and with train.py's thread count; for
comparison, the cost of a full decode of a sample of them (what a decoding pass would cost per image).
The files were just written, so they are in the page cache: a cold disk costs more per file (the threads
are there for that). One JSON row per measurement on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_jpeg_folder  # noqa: E402

from vitfood.data import scan_folder, unreadable_headers  # noqa: E402
from vitfood.distributed import usable_cores  # noqa: E402
from vitfood.preprocess import load_rgb  # noqa: E402


def jpeg_copies(work: Path, n: int, distinct: int) -> Path:
    """N Food-101-size JPEG files in 4 class folders: copies of `distinct` made by common.py's maker (a header
    check reads the same bytes of a copy as of an original, and making 5,000 takes half an hour here)."""
    root = work / f"jpegs-{n}-of-{distinct}"
    if root.exists() and sum(1 for _ in root.rglob("*.jpg")) == n:
        return root
    made = make_jpeg_folder(work / f"originals-{distinct}", distinct, processes=usable_cores())
    originals = sorted(made.rglob("*.jpg"))
    for i in range(n):
        folder = root / f"class_{i % 4:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(originals[i % len(originals)].read_bytes())
    return root


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--work", default=None, help="folder for the JPEGs (kept for reruns); default: a temporary one")
    ap.add_argument("--distinct", type=int, default=100, help="JPEGs made; the others are copies of them")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-sample", type=int, default=300)
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scan-"))
    started = time.perf_counter()
    records = scan_folder(jpeg_copies(work, args.images, args.distinct))
    print(json.dumps({"made_or_found_s": round(time.perf_counter() - started, 2), "images": len(records)}))
    for threads in sorted({1, min(16, 2 * usable_cores())}):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            bad = unreadable_headers(records, threads=threads)
            times.append(time.perf_counter() - t0)
        assert not bad, bad[:3]
        best = min(times)
        print(json.dumps({"job": "header check", "threads": threads, "images": len(records),
                          "seconds": [round(t, 3) for t in times],
                          "us_per_image": round(1e6 * best / len(records), 1)}))
    n = min(args.decode_sample, len(records))
    t0 = time.perf_counter()
    for i in range(n):
        load_rgb(records.source(i))
    per = (time.perf_counter() - t0) / n
    print(json.dumps({"job": "full decode, for comparison", "threads": 1, "images": n,
                      "us_per_image": round(1e6 * per, 1), "extrapolated_s": round(per * len(records), 2)}))


if __name__ == "__main__":
    main()
