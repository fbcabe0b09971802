"""Training throughput: vitfood against transformers' model and the Trainer, on the same machine.

compute  Tensors already on the device, one training step at a time (autocast, forward, loss,
         backward, clip, fused AdamW on CUDA, the loop's one finiteness check): vitfood's ViT and
         transformers' ViTForImageClassification in the same loop, across precision, torch.compile
         and batch size. images/s, ms per optimizer step, MFU (3 x forward FLOPs per image over a
         matmul peak measured in the same run) and peak GPU memory.
e2e      Whole runs from a folder of Food-101-like JPEGs, each a new process: `train.py` against the
         guide's Trainer script as written (fp32, no workers) and tuned (bf16, workers, compile),
         same images, model, epochs and split. Steady images/s (optimizer step to step, evaluations
         left out) and the whole process's wall time. `--nproc-per-node N` adds train.py under torchrun.

ViT-B/16 at 224 px from a random initialisation (no download); `--model-size tiny` and `--smoke`
(tiny, CPU, seconds: what CI runs) for machines without a GPU.

    python benchmarks/bench_train.py compute --precisions bf16 fp32 --compile off on --batch-sizes 128 256
    python benchmarks/bench_train.py e2e --images 5000 --epochs 3 --batch-size 128 --grad-accum-steps 1 --compile
    python benchmarks/bench_train.py e2e --model-size tiny --images 400     # the CPU goal
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, choose_mode, count_flops_per_image, make_jpeg_folder, make_vit_checkpoint, table, timed_run, versions, write_jsonl

from vitfood.distributed import usable_cores

GUIDE = str(ROOT / "benchmarks" / "guide_trainer.py")


# ---------------------------------------------------------------- compute only

def measured_peak_flops(device, dtype) -> float:
    """FLOP/s of large square matmuls in `dtype`: the MFU's denominator, measured, not a datasheet's."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    iters, best = (50 if device.type == "cuda" else 5), 0.0
    for _ in range(3):  # the best of three: a busy moment must not inflate the MFU
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t))
    return best


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(impl: str, checkpoint: Path, device):
    """vitfood's ViT or transformers' ViTForImageClassification, same weights, as `pixels -> logits`."""
    if impl == "vitfood":
        from vitfood.model import load_model

        model, _ = load_model(checkpoint)
        return model.to(device), model
    from transformers import ViTForImageClassification

    hf = ViTForImageClassification.from_pretrained(checkpoint, attn_implementation="sdpa").to(device)
    return (lambda pixels: hf(pixel_values=pixels).logits), hf


def compute_row(impl, precision, compile_, batch, checkpoint, device, steps, peaks, flops_per_image) -> dict:
    import torch
    import torch.nn.functional as F

    from vitfood.distributed import autocast

    row = {"job": f"compute {impl}", "precision": precision, "compile": compile_, "batch": batch}
    forward, module = build(impl, checkpoint, device)
    module.train()
    if compile_ == "on":
        forward = torch.compile(forward)
    optimizer = torch.optim.AdamW(module.parameters(), lr=5e-5, fused=device.type == "cuda")
    size = module.config.image_size if impl == "hf" else module.arch.image_size
    pixels = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 101, (batch,), device=device)

    def step():
        with autocast(device, precision):
            logits = forward(pixels)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        if not torch.isfinite(norm + loss).item():  # the loop's one host sync per optimizer step
            raise RuntimeError("non-finite loss")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(3 if compile_ == "off" else 5):  # warm-up: kernels chosen, graphs compiled
            step()
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
    except torch.OutOfMemoryError:
        return {**row, "images/s": "OOM"}
    seconds = (time.perf_counter() - t) / steps
    rate = batch / seconds
    row.update({"images/s": rate, "ms/step": seconds * 1000,
                "MFU %": 100 * rate * 3 * flops_per_image / peaks[precision]})
    if device.type == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def compute(args, work: Path) -> list[dict]:
    import torch

    from vitfood.fileio import read_json
    from vitfood.model import ViTArch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = make_vit_checkpoint(work / f"vit-{args.model_size}-cls", size=args.model_size, labels=101)
    arch = ViTArch.from_hf_config(read_json(checkpoint / "config.json"))
    flops = count_flops_per_image(arch, 101)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {p: measured_peak_flops(device, dtypes[p]) for p in args.precisions}
    print(f"forward GFLOP per image {flops / 1e9:.1f}; measured matmul peak "
          + ", ".join(f"{p} {v / 1e12:.1f} TFLOP/s" for p, v in peaks.items()), file=sys.stderr)
    rows = []
    for impl in args.impls:
        for precision in args.precisions:
            for compile_ in args.compile:
                for batch in args.batch_sizes:
                    rows.append(compute_row(impl, precision, compile_, batch, checkpoint, device, args.steps, peaks,
                                            flops))
                    print(rows[-1], file=sys.stderr, flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- end to end, whole processes

def run_job(cmd: list[str], log: Path) -> tuple[float, str]:
    # Each job its own, empty compiler cache: none profits from kernels another one compiled.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-", dir=log.parent)}
    return timed_run(cmd, log, env)


def vitfood_steady_rate(out: Path, skip: int = 2) -> float | None:
    """Median images/s of the logged windows (evaluation excluded by the loop), the first `skip` left out."""
    rates = [r["images_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "train"]
    rates = rates[skip:] or rates
    return statistics.median(rates) if rates else None


def e2e(args, work: Path) -> list[dict]:
    import torch

    cores = usable_cores()
    workers = args.workers if args.workers is not None else max(0, min(16, cores - 1))
    classes = 101 if args.images >= 404 else 4
    folder = make_jpeg_folder(work / f"jpegs-{args.images}-{classes}", args.images, classes=classes, processes=cores)
    backbone = make_vit_checkpoint(work / f"vit-{args.model_size}", size=args.model_size)
    batch = ["--batch-size", str(args.batch_size), "--grad-accum-steps", str(args.grad_accum_steps)]
    ours = ["train.py", "--model", str(backbone), "--dataset", str(folder), "--epochs", str(args.epochs),
            "--max-train-samples", "0", "--logging-steps", "1", "--overwrite-output-dir", *batch] \
        + (["--compile"] if args.compile else []) \
        + (["--num-workers", str(args.workers)] if args.workers is not None else [])  # else train.py's default
    guide = [GUIDE, "--data", str(folder), "--model", str(backbone), "--epochs", str(args.epochs),
             "--data-backend", args.data_backend]
    jobs = [("vitfood train.py", [sys.executable, *ours, "--output-dir", str(work / "out-vitfood")], "vitfood"),
            ("Trainer, guide as written", [sys.executable, *guide, "--output-dir", str(work / "out-guide")], "guide"),
            ("Trainer, tuned", [sys.executable, *guide, *batch, "--tuned", "--workers", str(workers),
                                "--output-dir", str(work / "out-tuned")] + ([] if args.compile else ["--no-compile"]),
             "guide")]
    if args.nproc_per_node > 1:
        jobs.append((f"vitfood train.py, torchrun x{args.nproc_per_node}",
                     [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc-per-node={args.nproc_per_node}", *ours,
                      "--output-dir", str(work / "out-ddp")], "vitfood-ddp"))
    if args.data_backend == "datasets":
        # The guide's script converts the folder to Arrow on its first run and reuses that later: time
        # it as a user's second run, not its first.
        from datasets import load_dataset

        load_dataset("imagefolder", data_dir=str(folder), split="train")
    os.sync()  # the new files and the Arrow cache are on disk: no writeback competes with the first job
    runs: dict[str, list] = {name: [] for name, _, _ in jobs}
    for repeat in range(args.repeats):  # interleaved, so drift in the machine hits every job alike
        for name, cmd, kind in jobs:
            try:
                seconds, stdout = run_job(cmd, work / f"log-{list(runs).index(name)}-{repeat}.txt")
            except SystemExit as e:  # one failed job must not cost the others' results
                print(e, file=sys.stderr, flush=True)
                continue
            if kind == "guide":
                result = json.loads(stdout.split("GUIDE_RESULT ", 1)[1].splitlines()[0])
                rate, accuracy = result["steady_images_per_s"], result["eval_accuracy"]
            else:
                out = Path(cmd[cmd.index("--output-dir") + 1])
                rate = vitfood_steady_rate(out)  # the loop logs images of all ranks
                accuracy = json.loads((out / "eval_results.json").read_text())["eval_accuracy"]
            runs[name].append((rate, seconds, accuracy))
            done = {"job": name, "repeat": repeat, "steady images/s": rate, "whole process s": seconds,
                    "eval accuracy": accuracy}
            print(done, file=sys.stderr, flush=True)
            write_jsonl(args.jsonl, [{**done, "mode": "e2e-run", "images": args.images}])  # kept if a later job fails
    rows = []
    for name, results in runs.items():  # medians over the repeats
        if not results:
            rows.append({"job": name, "steady images/s": None, "whole process s": None, "eval accuracy": "failed"})
            continue
        rates = [r for r, _, _ in results if r]
        rows.append({"job": name, "steady images/s": statistics.median(rates) if rates else None,
                     "whole process s": statistics.median(s for _, s, _ in results),
                     "eval accuracy": results[-1][2], "runs": len(results)})
    base = rows[0]
    for r in rows:
        both = base["steady images/s"] and r["steady images/s"]
        r["vitfood speed-up (steady)"] = base["steady images/s"] / r["steady images/s"] if both else ""
        both = base["whole process s"] and r["whole process s"]
        r["vitfood speed-up (whole process)"] = r["whole process s"] / base["whole process s"] if both else ""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{args.images} JPEGs, ViT-{args.model_size}, {args.epochs} epochs, batch {args.batch_size} x "
          f"{args.grad_accum_steps} (guide as written: 16 x 4), tuned Trainer {workers} workers, {device}", file=sys.stderr)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=["compute", "e2e"],
                   help="default: compute on a GPU; on the CPU e2e with the tiny model (minutes, not hours)")
    p.add_argument("--model-size", choices=["tiny", "base"], default="base")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps or images: a check that it runs")
    p.add_argument("--impls", nargs="+", choices=["vitfood", "hf"], default=["vitfood", "hf"])
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["bf16", "fp32"])
    p.add_argument("--compile", nargs="*", default=None,
                   help="compute: off and/or on (default: off); e2e: the flag alone compiles vitfood and the tuned Trainer")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    p.add_argument("--steps", type=int, default=20, help="compute: timed steps per row")
    p.add_argument("--images", type=int, default=400, help="e2e: JPEGs in the folder (80%% train, 20%% eval)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="e2e: vitfood and the tuned Trainer")
    p.add_argument("--grad-accum-steps", type=int, default=4, help="e2e: vitfood and the tuned Trainer")
    p.add_argument("--workers", type=int, default=None,
                   help="e2e: DataLoader workers (default: train.py's own; the tuned Trainer gets cores - 1, <= 16)")
    p.add_argument("--repeats", type=int, default=1, help="e2e: run every job this many times, report medians")
    p.add_argument("--nproc-per-node", type=int, default=1, help="e2e: also run train.py under torchrun with N processes")
    p.add_argument("--data-backend", choices=["datasets", "torch"], default="datasets",
                   help="e2e: how the guide's script reads the folder (torch where `datasets` is not installed)")
    p.add_argument("--work", help="folder for generated JPEGs, checkpoints and run outputs (default: a temp folder)")
    p.add_argument("--jsonl", help="append the results to this JSON-lines file")
    args = p.parse_args()
    choose_mode(args, "bench_train.py", gpu="compute", cpu="e2e", cpu_settings={"model_size": "tiny"})
    if args.mode == "compute":
        args.compile = args.compile or ["off"]
        if any(c not in ("off", "on") for c in args.compile):
            p.error("compute: --compile takes off and/or on")
    else:
        if args.compile not in (None, []):
            p.error("e2e: --compile takes no value")
        args.compile = args.compile is not None
    if args.smoke:
        args.model_size, args.steps, args.images, args.epochs = "tiny", 2, min(args.images, 40), 1
        args.batch_sizes, args.precisions = [4], ["fp32"]
        args.batch_size, args.grad_accum_steps = 4, 1
    work = Path(args.work or tempfile.mkdtemp(prefix="vitfood-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = compute(args, work) if args.mode == "compute" else e2e(args, work)
    write_jsonl(args.jsonl, [{**r, "mode": args.mode, "model_size": args.model_size} for r in rows])
    print(versions())
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))


if __name__ == "__main__":
    main()
