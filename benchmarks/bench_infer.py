"""Inference benchmarks.

cold  (CPU, any machine): wall time of `python infer.py photo.jpg` from a cold process against the
      same job through `transformers.pipeline`, side by side, median of --repeats runs each.
gpu   (CUDA): batch inference images/s, compute only (tensors already on the GPU), bf16.

    python benchmarks/bench_infer.py cold --model-size base --repeats 5
    python benchmarks/bench_infer.py gpu --batch-size 256 [--compile]
"""

from __future__ import annotations

import argparse
import statistics
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
    timed_run(ours), timed_run(theirs)  # warm the OS file cache for both, as a user's second run
    t_ours, t_theirs = [], []
    for _ in range(args.repeats):  # interleaved, so drift in the machine hits both alike
        t_ours.append(timed_run(ours)[0])
        t_theirs.append(timed_run(theirs)[0])
    a, b = statistics.median(t_ours), statistics.median(t_theirs)
    return [{"job": f"cold start, ViT-{args.model_size}, 1 photo", "vitfood infer.py s": a,
             "transformers.pipeline s": b, "ratio": a / b}]


def gpu(args) -> list[dict]:
    import torch

    from vitfood.model import load_model

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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=["cold", "gpu"], help="default: gpu on a GPU, cold on the CPU")
    p.add_argument("--model-size", choices=["tiny", "base"], default="base")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--work", help="folder for the generated checkpoint and photos (default: a temp folder)")
    p.add_argument("--jsonl", help="append the results to this JSON-lines file")
    args = p.parse_args()
    choose_mode(args, "bench_infer.py", gpu="gpu", cpu="cold")
    rows = cold(args) if args.mode == "cold" else gpu(args)
    write_jsonl(args.jsonl, rows)
    print(versions())
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
