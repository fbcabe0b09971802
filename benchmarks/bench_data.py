"""The training-time image pipeline on one core: vitfood's against the guide's, same JPEGs, one run.

guide:   PIL decode + convert("RGB"), torchvision RandomResizedCrop(224), ToTensor, Normalize
vitfood: decode once (into the decoded-image cache), then per epoch a seeded crop of the cached
         pixels resized by torch on channels-last uint8; normalisation happens later, on the device.
         The first epoch's decoding and cache writes are counted. Also shown: vitfood with the
         cache off (each epoch decodes again).

Both run in this process with one torch thread, image by image, as one DataLoader worker does.

    python benchmarks/bench_data.py --images 400 --epochs 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import make_jpeg_folder, table, versions, write_jsonl


def per_image_ms(fn, items) -> float:
    t = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - t) * 1000 / len(items)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--epochs", type=int, default=3, help="the guide trains 3")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--work", help="folder for the generated JPEGs (default: a temp folder)")
    p.add_argument("--jsonl", help="append the results to this JSON-lines file")
    args = p.parse_args()

    import torch
    from PIL import Image
    from torchvision import transforms as T

    from vitfood.data import TrainImages, scan_folder
    from vitfood.image_cache import ImageCache
    from vitfood.preprocess import Preprocessing

    torch.set_num_threads(1)  # per core, as each DataLoader worker runs
    work = Path(args.work or tempfile.mkdtemp(prefix="vitfood-bench-"))
    records = scan_folder(make_jpeg_folder(work / f"jpegs-{args.images}", args.images))
    paths = records.paths
    for path in paths:  # read every file once: all three pipelines start from the OS file cache
        Path(path).read_bytes()

    guide = T.Compose([T.RandomResizedCrop(args.size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    prep = Preprocessing(args.size, args.size)
    no_cache = TrainImages(records, prep, seed=0, flip=True)
    cache = ImageCache(work / "decoded-images", len(records))
    cache.create()
    cached = TrainImages(records, prep, seed=0, flip=True, cache=cache)
    indices = range(len(records))

    ms = {"guide": [], "vitfood, cache off": [], "vitfood": []}
    for epoch in range(args.epochs):  # interleaved, so drift in the machine hits all alike
        ms["guide"].append(per_image_ms(lambda path: guide(Image.open(path).convert("RGB")), paths))
        ms["vitfood, cache off"].append(per_image_ms(lambda i: no_cache[(i, epoch)], indices))
        ms["vitfood"].append(per_image_ms(lambda i: cached[(i, epoch)], indices))
    shutil.rmtree(cache.folder, ignore_errors=True)

    base = sum(ms["guide"]) / args.epochs
    rows = []
    for name, per_epoch in ms.items():
        mean = sum(per_epoch) / args.epochs
        rows.append({"pipeline": name, "epoch 1 ms/img": per_epoch[0],
                     "later epochs ms/img": sum(per_epoch[1:]) / max(1, args.epochs - 1),
                     f"mean over {args.epochs} epochs ms/img": mean, "images/s per core": 1000 / mean,
                     "speed vs guide": base / mean})
    write_jsonl(args.jsonl, [{**r, "images": args.images, "epochs": args.epochs} for r in rows])
    print(versions())
    print(f"{args.images} Food-101-like JPEGs (<= 512 px, quality 90), {args.epochs} epochs, one core")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
