"""Inference benchmarks.

cold  (CPU, any machine): wall time of `python infer.py photo.jpg` from a cold process against the
      same job through `transformers.pipeline`, side by side, median of --repeats runs each.
gpu   (CUDA): batch inference images/s, compute only (tensors already on the GPU), bf16.
folder (any machine): images/s classifying a folder of Food-101-size JPEGs, side by side: `infer.py FOLDER`
      with the GPU decoder (on a GPU), `infer.py FOLDER --decoder cpu` (PIL) and `transformers.pipeline`
      with batch_size (device=0 and bf16 autocast on a GPU). Timed from the first image to the last
      line (before listing the folder, after loading the model: process start and model load excluded),
      the median of --repeats runs; images/s counts classified images.

    python benchmarks/bench_infer.py cold --model-size base --repeats 5
    python benchmarks/bench_infer.py gpu --batch-size 256 [--compile]
    python benchmarks/bench_infer.py folder --images 5120 --batch-size 256 [--compile]
    python benchmarks/bench_infer.py folder --smoke      # tiny model, 22 photos: runs on the CPU in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, choose_mode, make_jpeg_folder, make_vit_checkpoint, table, timed_run, versions, write_jsonl

PIPELINE_JOB = ("import sys; from transformers import pipeline; "
                "p = pipeline('image-classification', model=sys.argv[1], device='cpu'); "
                "print(p(sys.argv[2], top_k=5))")


def cold(args) -> list[dict]:
    work = Path(args.work or tempfile.mkdtemp(prefix="vitfood-bench-"))
    model = make_vit_checkpoint(work / f"vit-{args.model_size}-cls", size=args.model_size, labels=101)
    photo = next((make_jpeg_folder(work / "jpegs", 4)).rglob("*.jpg"))
    ours = [sys.executable, str(ROOT / "infer.py"), str(photo), "--model", str(model)]
    theirs = [sys.executable, "-c", PIPELINE_JOB, str(model), str(photo)]
    if (args.repeats or 5) > 1:  # one run is a smoke check, not a measurement: no warm-up for it
        timed_run(ours), timed_run(theirs)  # warm the OS file cache for both, as a user's second run
    t_ours, t_theirs = [], []
    for _ in range(args.repeats or 5):  # interleaved, so drift in the machine hits both alike
        t_ours.append(timed_run(ours)[0])
        t_theirs.append(timed_run(theirs)[0])
    a, b = statistics.median(t_ours), statistics.median(t_theirs)
    return [{"job": f"cold start, ViT-{args.model_size}, 1 photo", "vitfood infer.py s": a,
             "transformers.pipeline s": b, "ratio": a / b}]


# Stdout as infer.py --json writes it; the timing on stderr, as infer.py's summary line gives it.
PIPELINE_FOLDER_JOB = """
import json, sys, time
import torch
from contextlib import nullcontext
from transformers import pipeline
from vitfood.paths import images_under

model, folder, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
cuda = torch.cuda.is_available()
p = pipeline("image-classification", model=model, device=0 if cuda else "cpu")
start = time.perf_counter()
n = 0
with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
    paths = images_under(folder)
    for path, predictions in zip(paths, p(paths, batch_size=batch_size, top_k=5)):
        sys.stdout.write(json.dumps({"image": path, "predictions": predictions}) + "\\n")
        n += 1
print(json.dumps({"images": n, "seconds": time.perf_counter() - start}), file=sys.stderr)
"""
_SUMMARY = re.compile(r"classified (\d+) images in [\d.]+ s \(([\d.]+) images/s\)")


def _job(cmd: list[str]) -> tuple[int, float]:
    """(classified images, seconds from the first image to the last line) of one infer.py or pipeline run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    last = r.stderr.strip().splitlines()[-1]
    if m := _SUMMARY.search(last):  # infer.py's summary line, timed in the process from the folder's listing on
        images, rate = int(m[1]), float(m[2])  # the rate, not the seconds: those are rounded to 0.1 s
        return images, images / rate if rate else float("inf")
    timing = json.loads(last)
    return timing["images"], timing["seconds"]


def folder(args) -> list[dict]:
    import torch

    from vitfood.distributed import usable_cores

    work = Path(args.work or tempfile.mkdtemp(prefix="vitfood-bench-"))
    model = make_vit_checkpoint(work / f"vit-{args.model_size}-cls", size=args.model_size, labels=101)
    classes = 101 if args.images >= 404 else 4  # the folder bench_train.py e2e makes: made once for both
    photos = make_jpeg_folder(work / f"jpegs-{args.images}-{classes}", args.images, classes=classes,
                              processes=usable_cores())
    infer = [sys.executable, str(ROOT / "infer.py"), str(photos), "--model", str(model), "--json",
             "--batch-size", str(args.batch_size), *(["--compile"] if args.compile else [])]
    cuda = torch.cuda.is_available()
    jobs = [("vitfood infer.py, GPU decode", [*infer, "--decoder", "gpu"])] if cuda else []
    jobs += [("vitfood infer.py, CPU decode (PIL)", [*infer, "--decoder", "cpu"]),
             ("transformers.pipeline" + (", bf16 autocast" if cuda else ""),
              [sys.executable, "-c", PIPELINE_FOLDER_JOB, str(model), str(photos), str(args.batch_size)])]
    runs: dict[str, list[tuple[int, float]]] = {name: [] for name, _ in jobs}
    for _ in range(args.repeats or 1):  # interleaved, so drift in the machine hits all alike
        for name, cmd in jobs:
            runs[name].append(_job(cmd))
    rows = []
    for name, _ in jobs:
        seconds = statistics.median(s for _, s in runs[name])
        images = runs[name][0][0]
        rows.append({"job": name, "model": f"ViT-{args.model_size}", "images": images, "batch": args.batch_size,
                     "seconds": seconds, "images/s": images / seconds})
    for r in rows:
        r["vs pipeline"] = r["images/s"] / rows[-1]["images/s"]
    return rows


def gpu(args) -> list[dict]:
    import torch

    from vitfood.models import load_model

    if not torch.cuda.is_available():
        raise SystemExit("gpu: no CUDA device here")
    work = Path(args.work or tempfile.mkdtemp(prefix="vitfood-bench-"))
    model, _ = load_model(make_vit_checkpoint(work / "vit-base-cls", size="base", labels=101))
    model = model.cuda().eval().to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch_size, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(10):
            net(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(args.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            net(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    t = statistics.median(times)
    return [{"job": f"GPU inference bf16 batch {args.batch_size}" + (" compiled" if args.compile else ""),
             "images/s": args.batch_size / t, "ms/batch": t * 1000}]


def parse_args(argv: list[str] | None = None):
    """The command line, checked (gpu_all.py's tests parse its parts' commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=["cold", "gpu", "folder"], help="default: gpu on a GPU, cold on the CPU")
    p.add_argument("--model-size", choices=["tiny", "base"], default="base")
    p.add_argument("--repeats", type=int, help="runs of each job, the median kept (default: 5 for cold, 1 for folder)")
    p.add_argument("--images", type=int, default=5120, help="folder: photos in the folder")
    p.add_argument("--smoke", action="store_true", help="folder: tiny model, 22 photos, batches of 8")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--work", help="folder for the generated checkpoint and photos (default: a temp folder)")
    p.add_argument("--jsonl", help="append the results to this JSON-lines file")
    args = p.parse_args(argv)
    choose_mode(args, "bench_infer.py", gpu="gpu", cpu="cold")
    if args.smoke:  # 22 photos: infer.py prints its summary line from 20 on; batches of 8, 8 and 6
        args.model_size, args.images, args.batch_size = "tiny", 22, 8
    return args


def main():
    args = parse_args()
    rows = {"cold": cold, "gpu": gpu, "folder": folder}[args.mode](args)
    write_jsonl(args.jsonl, rows)
    print(versions())
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
