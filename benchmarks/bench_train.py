"""Training throughput: vitfood against transformers' model, timm's and the Trainer, on the same machine.

compute    Tensors already on the device, one training step at a time (autocast, forward, loss,
           backward, clip, fused AdamW on CUDA, the loop's one finiteness check): vitfood's ViT,
           transformers' ViTForImageClassification and timm's vit_base_patch16_224 (`--impls timm`;
           a row that says so when timm is not installed) in the same loop, across precision,
           torch.compile and batch size. images/s, ms per optimizer step, MFU (3 x forward FLOPs per
           image over a matmul peak measured in the same run), peak GPU memory, and each row's speed
           against timm's row of the same settings.
e2e        Whole runs from a folder of Food-101-like JPEGs, each a new process: `train.py` against the
           guide's Trainer script as written (fp32, no workers) and tuned (bf16, workers, compile),
           same images, model, epochs and split. Steady images/s (optimizer step to step, evaluations
           left out) and the whole process's wall time. `--nproc-per-node N` adds train.py under torchrun.
guide-job  The guide's job as a user runs it: 5,000 JPEGs (4,000 train / 1,000 eval), 3 epochs, and
           `train.py --model M --dataset F --epochs 3` with no other flag (its defaults: 16 x 4,
           micro-batch auto, compile auto), run from an empty folder into its default ./vitfood-output,
           against the guide's Trainer as written (16 x 4, fp32, no workers) and tuned (bf16, the same
           64 images per optimizer step computed at once, cores - 1 workers), once compiled and once
           eager (a short run may not repay the Trainer's compilation, and 4,000 and 1,000 images are
           not whole batches of 64: the compiled Trainer compiles again for the short last batches; the
           faster of the two is the tuned Trainer). Whole-process seconds and vitfood's speed-up on each.
           Goals: >= 8x the Trainer as written, >= 4x the tuned Trainer.
steady     A run long enough for a steady rate: 6,400 JPEGs (5,120 train / 1,280 eval) x 4 epochs =
           20,480 training images. `train.py` at its defaults (nothing but --model, --dataset and
           --epochs), then with the best flags (`--best-flags`; default: 256 images a step and an
           evaluation batch, compile on), then the best flags again with the compiler cache the previous
           run left (a user's second run). Whole batches throughout (5,120 and 1,280 are multiples of 256
           and 64): no recompilation for a short last batch. Goals: >= 3,000 images/s at the defaults,
           >= 4,000 with the best flags.

Every vitfood row of the whole-process modes also gives its fixed cost, from the `timeline` of the
run.json in its output folder (seconds since the process started at each phase of the run):

    fixed cost s = whole process s - the sum, over the epochs, of the timeline's span that ends at the
                   event "epoch N evaluated" (from "first optimizer step done (with any compilation)"
                   for the first epoch, from the previous epoch's last save for the others).

So the fixed cost is everything that does not grow with the images: launching Python, the imports,
loading the dataset listing and the model, the setup, the DataLoader workers' start and the first
optimizer step with any compilation of the training step (its one step's compute is counted in:
milliseconds), the best-model and checkpoint saves after each evaluation, and after the last
evaluation the report, the model card and the process's exit. A compilation made during the first
evaluation (a compiled model's first pass without gradients) falls inside the first epoch's span: it is
counted as evaluation, not as fixed cost. Every process gets an empty compiler cache of its own,
except the steady mode's warm row, which reuses the best-flags run's. Goals: <= 15 s without a warm
compiler cache, <= 8 s with one. The whole-process modes also write one JSON line per finished run
(mode "e2e-run") with the timeline and the fixed cost's parts (start and exit, saves between epochs,
after the last evaluation).

ViT-B/16 at 224 px from a random initialisation (no download); `--model-size tiny` and `--smoke`
(tiny, CPU, seconds: what CI runs) for machines without a GPU.

    python benchmarks/bench_train.py compute --impls vitfood hf timm --precisions bf16 --compile off on --batch-sizes 256
    python benchmarks/bench_train.py compute --precisions bf16 fp32 --compile off on --batch-sizes 128 256
    python benchmarks/bench_train.py compute --model-family dinov2-base --precisions bf16 --compile off on
    python benchmarks/bench_train.py e2e --images 5000 --epochs 3 --batch-size 128 --grad-accum-steps 1 --compile
    python benchmarks/bench_train.py e2e --model-size tiny --images 400     # the CPU goal
    python benchmarks/bench_train.py guide-job --data-backend torch         # 5,000 JPEGs, 3 epochs, ViT-B
    python benchmarks/bench_train.py steady                                 # 6,400 JPEGs x 4 epochs, ViT-B
    python benchmarks/bench_train.py steady --best-flags "--batch-size 128 --grad-accum-steps 1 --compile on"
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import types
import tempfile
import time
from dataclasses import dataclass
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


def build(impl: str, checkpoint: Path, device, arch):
    """vitfood's ViT, transformers' ViTForImageClassification (same weights) or timm's ViT (its own random
    init, same shape), as (`pixels -> logits`, the module)."""
    if impl == "vitfood":
        from vitfood.models import load_model

        model, _ = load_model(checkpoint)
        return model.to(device), model
    if impl == "timm":
        model = timm_vit(arch).to(device)
        return model, model
    from transformers import AutoModelForImageClassification

    hf = AutoModelForImageClassification.from_pretrained(checkpoint).to(device)  # sdpa where the model has it
    return (lambda pixels: hf(pixel_values=pixels).logits), hf


TIMM_MISSING = "skipped: timm is not installed (pip install timm)"


def timm_vit(arch, num_classes: int = 101):
    """timm's `vit_base_patch16_224`, random init, 101 classes: ViT-B/16 as timm users build it. Another
    size (the tiny smoke model) is the same model with the checkpoint's dimensions."""
    import timm

    shape = (arch.image_size, arch.patch_size, arch.hidden_size, arch.num_hidden_layers, arch.num_attention_heads,
             arch.intermediate_size)
    dims = {} if shape == (224, 16, 768, 12, 12, 3072) else dict(
        img_size=arch.image_size, patch_size=arch.patch_size, embed_dim=arch.hidden_size,
        depth=arch.num_hidden_layers, num_heads=arch.num_attention_heads,
        mlp_ratio=arch.intermediate_size / arch.hidden_size)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=num_classes, **dims)


def compute_row(impl, precision, compile_, batch, checkpoint, arch, device, steps, peaks, flops_per_image) -> dict:
    import torch
    import torch.nn.functional as F

    from vitfood.distributed import autocast

    row = {"job": f"compute {impl}", "precision": precision, "compile": compile_, "batch": batch}
    forward, module = build(impl, checkpoint, device, arch)
    module.train()
    if compile_ == "on":
        forward = torch.compile(forward)
    optimizer = torch.optim.AdamW(module.parameters(), lr=5e-5, fused=device.type == "cuda")
    size = arch.image_size
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
                "MFU %": 100 * rate * 3 * flops_per_image / peaks[precision] if flops_per_image else None})
    if device.type == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def compute(args, work: Path) -> list[dict]:
    import torch

    from vitfood.fileio import read_json
    from vitfood.models.vit import ViTArch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model_family != "vit":  # vitfood's hf family (transformers' model behind vitfood's interface) vs raw
        checkpoint = make_family_checkpoint(work / args.model_family, args.model_family)
        arch, flops = types.SimpleNamespace(image_size=224), None
        args.impls = [i for i in args.impls if i != "timm"]
    else:
        checkpoint = make_vit_checkpoint(work / f"vit-{args.model_size}-cls", size=args.model_size, labels=101)
        arch = ViTArch.from_hf_config(read_json(checkpoint / "config.json"))
        flops = count_flops_per_image(arch, 101)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {p: measured_peak_flops(device, dtypes[p]) for p in args.precisions}
    print(f"forward GFLOP per image {flops / 1e9 if flops else float('nan'):.1f}; measured matmul peak "
          + ", ".join(f"{p} {v / 1e12:.1f} TFLOP/s" for p, v in peaks.items()), file=sys.stderr)
    rows = []
    for impl in args.impls:
        if impl == "timm" and importlib.util.find_spec("timm") is None:
            rows.append({"job": "compute timm", "images/s": None, "note": TIMM_MISSING})
            print(f"compute timm: {TIMM_MISSING}", file=sys.stderr, flush=True)
            continue
        for precision in args.precisions:
            for compile_ in [c for c in args.compile if c == "off" or args.compiled_impls is None
                             or impl in args.compiled_impls]:
                for batch in args.batch_sizes:
                    rows.append(compute_row(impl, precision, compile_, batch, checkpoint, arch, device, args.steps,
                                            peaks, flops))
                    print(rows[-1], file=sys.stderr, flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return with_speed_vs_timm(rows)


MODEL_FAMILIES = ("vit", "dinov2-base", "convnext-base", "siglip-base")


def make_family_checkpoint(path: Path, family: str) -> Path:
    """A real-size model of another family from its config, random weights, 101 labels, at 224 px: DINOv2 ViT-B/14,
    ConvNeXt-B, SigLIP ViT-B/16 (the vision tower of google/siglip-base-patch16-224)."""
    import torch
    import transformers as T

    if (path / "config.json").exists():
        return path
    labels = dict(id2label={i: f"class_{i}" for i in range(101)}, label2id={f"class_{i}": i for i in range(101)})
    torch.manual_seed(0)
    if family == "dinov2-base":
        model = T.Dinov2ForImageClassification(T.Dinov2Config(image_size=224, patch_size=14, **labels))
        processor = T.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    elif family == "convnext-base":
        model = T.ConvNextForImageClassification(T.ConvNextConfig(hidden_sizes=[128, 256, 512, 1024],
                                                                  depths=[3, 3, 27, 3], **labels))
        processor = T.ConvNextImageProcessor()
    else:
        model = T.SiglipForImageClassification(T.SiglipConfig(vision_config=dict(image_size=224, patch_size=16), **labels))
        processor = T.SiglipImageProcessor()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def with_speed_vs_timm(rows: list[dict]) -> list[dict]:
    """Each measured row's images/s over timm's at the same precision, compile and batch (the goal:
    vitfood >= 1.15x timm compiled); no column when timm has no measured row."""
    rate = lambda r: r.get("images/s") if isinstance(r.get("images/s"), float) else None  # noqa: E731
    timm = {(r["precision"], r["compile"], r["batch"]): rate(r) for r in rows if r["job"] == "compute timm" and rate(r)}
    if not timm:
        return rows
    for r in rows:
        peer = timm.get((r.get("precision"), r.get("compile"), r.get("batch")))
        r["speed vs timm"] = rate(r) / peer if peer and rate(r) else ""
    return rows


# ---------------------------------------------------------------- whole processes: jobs, results, fixed cost

@dataclass
class Job:
    """One command of a whole-process comparison, run as a new process."""

    name: str
    key: str  # what --jobs selects it by
    cmd: list[str]
    kind: str  # "vitfood": results read from its output folder; "guide": from the script's GUIDE_RESULT line
    settings: str = ""  # what it ran with, for the table (a vitfood row's own, read back from its run.json)
    flags: str | None = None  # the flags given to train.py beyond --model, --dataset and --epochs, for the table
    own_folder: bool = False  # run from an empty folder of its own: train.py writes to its default ./vitfood-output
    cache: str | None = None  # the jobs naming one cache share one compiler cache within a repeat: later ones warm
    part_epochs: float | None = None  # a guide job run for this many of the epochs: its whole process is projected


def run_job(cmd: list[str], log: Path, cwd: Path | None = None, cache_dir: Path | None = None) -> tuple[float, str]:
    # Each job its own, empty compiler cache, unless told to share one: none profits from kernels another
    # one compiled by accident.
    cache = cache_dir or tempfile.mkdtemp(prefix="inductor-", dir=log.parent)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    return timed_run(cmd, log, env, cwd=cwd)


def vitfood_steady_rate(out: Path, skip: int = 2) -> float | None:
    """Median images/s of the logged windows (evaluation excluded by the loop), the first `skip` left out."""
    rates = [r["images_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "train"]
    rates = rates[skip:] or rates
    return statistics.median(rates) if rates else None


EPOCH_EVALUATED = re.compile(r"epoch \d+ evaluated")


def fixed_cost(whole_s: float, timeline: list[dict]) -> dict | None:
    """The fixed cost of a run (the module's docstring defines it) and its parts, from run.json's timeline and
    the whole process's wall time measured here; None when the timeline has no evaluated epoch.

    Only differences between the timeline's times are used: its zero, the process's start as the kernel
    records it, can be off by a second (the boot time it is reckoned from is whole seconds of wall clock).
    {"fixed cost s", "saves s" (after each evaluation but the last, until the next epoch's steps),
    "after last evaluation s" (to the timeline's last event: the last saves, report, model card),
    "start and exit s" (the rest: launch to the end of the first optimizer step, and the process's exit)}
    """
    epochs = [(prev["at_s"], event["at_s"]) for prev, event in zip(timeline, timeline[1:])
              if EPOCH_EVALUATED.fullmatch(event["event"])]
    if not epochs:
        return None
    cost = whole_s - sum(end - start for start, end in epochs)
    saves = sum(nxt[0] - this[1] for this, nxt in zip(epochs, epochs[1:]))
    after_last = timeline[-1]["at_s"] - epochs[-1][1]
    return {"fixed cost s": cost, "start and exit s": cost - saves - after_last, "saves s": saves,
            "after last evaluation s": after_last}


def resolved_settings(config: dict) -> str:
    """'bf16, 16 x 4, 64 per pass, compile off, 15 workers, cache on': what a vitfood run resolved, from
    its run.json (the defaults' 'auto's decided)."""
    g = lambda key: config.get(key, "?")  # noqa: E731
    per_step = config.get("batch_size", 0) * config.get("grad_accum_steps", 0)
    micro = config.get("micro_batch_size")
    per_pass = min(micro, per_step) if isinstance(micro, int) and per_step else micro
    return (f"{g('precision')}, {g('batch_size')} x {g('grad_accum_steps')}, {per_pass} per pass, "
            f"compile {g('compile')}, {g('num_workers')} workers, cache {g('decode_cache')}")


def vitfood_result(out: Path, seconds: float) -> dict:
    record = json.loads((out / "run.json").read_text())
    timeline = record.get("timeline") or []
    cost = fixed_cost(seconds, timeline) or {}
    return {"steady images/s": vitfood_steady_rate(out),  # the loop logs the images of all ranks
            "eval accuracy": json.loads((out / "eval_results.json").read_text())["eval_accuracy"],
            "fixed cost s": cost.get("fixed cost s"), "settings": resolved_settings(record.get("config") or {}),
            "fixed cost parts": {k: v for k, v in cost.items() if k != "fixed cost s"}, "timeline": timeline}


def guide_result(stdout: str) -> dict:
    result = json.loads(stdout.split("GUIDE_RESULT ", 1)[1].splitlines()[0])
    return {"steady images/s": result["steady_images_per_s"], "eval accuracy": result["eval_accuracy"],
            "guide timings": {k: result.get(k) for k in ("train_images", "eval_s", "save_s")}}


def projection(measured_s: float, part_epochs: float, epochs: int, timings: dict, rate: float | None) -> dict | None:
    """The whole run's seconds from a measured part of it (the first `part_epochs` of `epochs`, with its one
    evaluation and save): the part's whole process, plus the remaining epochs' training at the part's steady
    rate, plus the remaining evaluations and saves at the part's. None when the part gave no figures."""
    n, evals, saves = timings.get("train_images"), timings.get("eval_s") or [], timings.get("save_s") or []
    if not (n and rate and evals):
        return None
    per_epoch_extra = statistics.mean(evals) + (statistics.mean(saves) if saves else 0.0)
    more_images = (epochs - part_epochs) * n
    more_epochs = epochs - len(evals)  # an evaluation and a save per epoch; the part made len(evals)
    total = measured_s + more_images / rate + more_epochs * per_epoch_extra
    return {"projected whole process s": total,
            "projection": f"{measured_s:.1f} s measured ({part_epochs:g} of {epochs} epochs) + {more_images:,.0f} "
                          f"images / {rate:,.1f} images/s + {more_epochs} x {per_epoch_extra:.1f} s (evaluation "
                          f"and save) = {total:.1f} s"}


def output_folder(job: Job, cwd: Path | None) -> Path:
    if job.own_folder:
        return cwd / "vitfood-output"  # train.py's default --output-dir
    return Path(job.cmd[job.cmd.index("--output-dir") + 1])


def run_jobs(jobs: list[Job], args, work: Path) -> list[dict]:
    """Every job `args.repeats` times, interleaved, so drift in the machine hits every job alike; one row
    per job with the medians. Each finished run is also written to --jsonl at once (mode "e2e-run"):
    kept if a later job fails."""
    os.sync()  # the new files and any Arrow cache are on disk: no writeback competes with the first job
    runs: dict[str, list[dict]] = {job.name: [] for job in jobs}
    for repeat in range(args.repeats):
        caches: dict[str, Path] = {}
        for i, job in enumerate(jobs):
            cwd = None
            if job.own_folder:
                cwd = work / f"run-{args.mode}-{i}-{repeat}"
                shutil.rmtree(cwd, ignore_errors=True)
                cwd.mkdir(parents=True)
            if job.cache:
                cache = caches.setdefault(job.cache, Path(tempfile.mkdtemp(prefix=f"inductor-{job.cache}-", dir=work)))
            else:
                cache = Path(tempfile.mkdtemp(prefix="inductor-", dir=work))
            try:  # one failed job must not cost the others' results
                seconds, stdout = run_job(job.cmd, work / f"log-{args.mode}-{i}-{repeat}.txt", cwd, cache)
                result = guide_result(stdout) if job.kind == "guide" else vitfood_result(output_folder(job, cwd), seconds)
            except SystemExit as e:
                print(e, file=sys.stderr, flush=True)
                continue
            except (OSError, ValueError, KeyError, IndexError) as e:
                print(f"{job.name}: its results could not be read: {e!r}", file=sys.stderr, flush=True)
                continue
            result["whole process s"] = seconds
            if job.part_epochs is not None:  # a measured part: the whole run projected from it
                result["measured s"] = seconds
                proj = projection(seconds, job.part_epochs, args.epochs, result["guide timings"],
                                  result["steady images/s"])
                # No projection, no whole-process figure: a part's seconds are not the whole job's.
                result["whole process s"] = proj["projected whole process s"] if proj else None
                result["projection"] = proj["projection"] if proj else "none: the part gave no steady rate or evaluation"
                print(f"{job.name}: projected {result['projection']}", file=sys.stderr, flush=True)
            runs[job.name].append(result)
            done = {"job": job.name, "repeat": repeat, "steady images/s": result["steady images/s"],
                    "whole process s": seconds, "eval accuracy": result["eval accuracy"]}
            if job.kind == "vitfood":
                done["fixed cost s"] = result["fixed cost s"]
            print(done, file=sys.stderr, flush=True)
            extra = {k: result[k] for k in ("settings", "fixed cost parts", "timeline", "measured s", "projection",
                                            "guide timings") if k in result}
            write_jsonl(args.jsonl, [{**done, "mode": "e2e-run", "bench": args.mode, "images": args.images,
                                      "epochs": args.epochs, "flags": job.flags, "compiler cache": str(cache),
                                      **extra}])
    rows = []
    for job in jobs:  # medians over the repeats
        results = runs[job.name]
        if not results:
            rows.append({"job": job.name, "steady images/s": None, "whole process s": None, "eval accuracy": "failed"})
            continue

        def median(key):
            values = [r[key] for r in results if r.get(key) is not None]
            return statistics.median(values) if values else None

        row = {"job": job.name}
        if job.flags is not None:
            row["flags"] = job.flags or "(none)"
        row.update({"steady images/s": median("steady images/s"), "whole process s": median("whole process s")})
        if job.kind == "vitfood":
            row["fixed cost s"] = median("fixed cost s")
        row.update({"eval accuracy": results[-1]["eval accuracy"], "runs": len(results),
                    "settings": results[-1].get("settings") or job.settings})
        if "projection" in results[-1]:
            row["projection"] = results[-1]["projection"]
        rows.append(row)
    return rows


def with_speedups(rows: list[dict]) -> list[dict]:
    """vitfood's (the first row's) speed-up over each row: steady images/s, and whole-process seconds."""
    base = rows[0]
    for r in rows:
        both = base["steady images/s"] and r["steady images/s"]
        r["vitfood speed-up (steady)"] = base["steady images/s"] / r["steady images/s"] if both else ""
        both = base["whole process s"] and r["whole process s"]
        r["vitfood speed-up (whole process)"] = r["whole process s"] / base["whole process s"] if both else ""
    return rows


def jpegs_and_backbone(args, work: Path, cores: int) -> tuple[Path, Path]:
    """The folder of `args.images` Food-101-like JPEGs (101 classes from 404 images) and the backbone."""
    classes = 101 if args.images >= 404 else 4
    t = time.perf_counter()
    folder = make_jpeg_folder(work / f"jpegs-{args.images}-{classes}", args.images, classes=classes, processes=cores)
    print(f"{args.images:,} JPEGs ready in {time.perf_counter() - t:.1f} s ({cores} processes)", file=sys.stderr,
          flush=True)
    return folder, make_vit_checkpoint(work / f"vit-{args.model_size}", size=args.model_size)


def guide_data(args, folder: Path) -> None:
    if args.data_backend == "datasets":
        # The guide's script converts the folder to Arrow on its first run and reuses that later: time
        # it as a user's second run, not its first.
        from datasets import load_dataset

        load_dataset("imagefolder", data_dir=str(folder), split="train")


def tuned_workers(args) -> int:
    return args.workers if args.workers is not None else max(0, min(16, usable_cores() - 1))


def trainer_precision() -> str:
    import torch

    from vitfood.distributed import native_bf16  # not torch's answer, which counts emulated bf16 (V100, T4)

    return "bf16" if torch.cuda.is_available() and native_bf16() else "fp32"


def e2e(args, work: Path) -> list[dict]:
    import torch

    workers = tuned_workers(args)
    folder, backbone = jpegs_and_backbone(args, work, usable_cores())
    batch = ["--batch-size", str(args.batch_size), "--grad-accum-steps", str(args.grad_accum_steps)]
    ours = ["train.py", "--model", str(backbone), "--dataset", str(folder), "--epochs", str(args.epochs),
            "--max-train-samples", "0", "--logging-steps", "1", "--overwrite-output-dir", *batch] \
        + (["--compile"] if args.compile else []) \
        + (["--num-workers", str(args.workers)] if args.workers is not None else [])  # else train.py's default
    guide = [GUIDE, "--data", str(folder), "--model", str(backbone), "--epochs", str(args.epochs),
             "--data-backend", args.data_backend]
    tuned = f"{trainer_precision()}, {args.batch_size} x {args.grad_accum_steps}, {workers} workers, " \
        + ("torch_compile" if args.compile else "eager")
    jobs = [Job("vitfood train.py", "vitfood", [sys.executable, *ours, "--output-dir", str(work / "out-vitfood")],
                "vitfood"),
            Job("Trainer, guide as written", "guide",
                [sys.executable, *guide, "--output-dir", str(work / "out-guide")], "guide",
                f"fp32, 16 x 4, no workers, {args.data_backend}"),
            Job("Trainer, tuned", "tuned",
                [sys.executable, *guide, *batch, "--tuned", "--workers", str(workers),
                 "--output-dir", str(work / "out-tuned")] + ([] if args.compile else ["--no-compile"]), "guide", tuned)]
    if args.nproc_per_node > 1:
        jobs.append(Job(f"vitfood train.py, torchrun x{args.nproc_per_node}", "ddp",
                        [sys.executable, "-m", "torch.distributed.run", "--standalone",
                         f"--nproc-per-node={args.nproc_per_node}", *ours, "--output-dir", str(work / "out-ddp")],
                        "vitfood"))
    guide_data(args, folder)
    rows = with_speedups(run_jobs([job for job in jobs if args.jobs is None or job.key in args.jobs], args, work))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{args.images} JPEGs, ViT-{args.model_size}, {args.epochs} epochs, batch {args.batch_size} x "
          f"{args.grad_accum_steps} (guide as written: 16 x 4), tuned Trainer {workers} workers, {device}", file=sys.stderr)
    return rows


GUIDE_JOB_KEYS = ["vitfood", "guide", "tuned-compiled", "tuned"]
STEADY_KEYS = ["defaults", "best", "best-warm"]
BEST_FLAGS = "--batch-size 256 --grad-accum-steps 1 --eval-batch-size 256 --compile on --logging-steps 4"
SMOKE_BEST_FLAGS = "--batch-size 8 --grad-accum-steps 1 --eval-batch-size 8 --logging-steps 1"


def train_py(backbone: Path, folder: Path, epochs: int) -> list[str]:
    """The command a user types: train.py with the model, the dataset and the epochs, nothing else."""
    return [sys.executable, str(ROOT / "train.py"), "--model", str(backbone), "--dataset", str(folder),
            "--epochs", str(epochs)]


def guide_job(args, work: Path) -> list[dict]:
    """The guide's job: train.py at its defaults against the guide's Trainer as written and tuned."""
    workers = tuned_workers(args)
    folder, backbone = jpegs_and_backbone(args, work, usable_cores())
    def guide_cmd(epochs: float) -> list[str]:
        return [sys.executable, GUIDE, "--data", str(folder), "--model", str(backbone), "--epochs", f"{epochs:g}",
                "--data-backend", args.data_backend]

    guide = guide_cmd(args.epochs)
    # As written: the whole job, or its first --guide-part epochs with the rest projected from them.
    written, part = guide, ""
    if args.guide_part is not None:
        written = guide_cmd(args.guide_part)
        part = f", measured {args.guide_part:g} of {args.epochs} epochs, the rest projected"
    # Tuned: what the Trainer's flags offer, the guide's 64 images per optimizer step computed at once.
    tuned = [*guide, "--batch-size", "64", "--grad-accum-steps", "1", "--tuned", "--workers", str(workers)]
    tuned_settings = f"{trainer_precision()}, 64 x 1, {workers} workers"
    jobs = [Job("vitfood train.py, its defaults", "vitfood", train_py(backbone, folder, args.epochs), "vitfood",
                own_folder=True),
            Job("Trainer, guide as written", "guide", [*written, "--output-dir", str(work / "out-guide")], "guide",
                f"fp32, 16 x 4, no workers, {args.data_backend}" + part, part_epochs=args.guide_part),
            Job("Trainer, tuned, compiled", "tuned-compiled", [*tuned, "--output-dir", str(work / "out-tuned-compiled")],
                "guide", f"{tuned_settings}, torch_compile"),
            Job("Trainer, tuned, eager", "tuned", [*tuned, "--no-compile", "--output-dir", str(work / "out-tuned")],
                "guide", f"{tuned_settings}, eager")]
    jobs = [job for job in jobs if job.key in args.jobs]
    guide_data(args, folder)
    rows = run_jobs(jobs, args, work)
    if jobs[0].key == "vitfood":
        rows = with_speedups(rows)
        ratio = {r["job"]: r["vitfood speed-up (whole process)"] for r in rows}
        tuned_best = [ratio[j.name] for j in jobs if j.key.startswith("tuned") and ratio[j.name] != ""]
        as_written = ratio.get("Trainer, guide as written")
        print(f"the guide's job, whole process: vitfood {rows[0]['whole process s'] or 0:.1f} s; "
              f"{f'{as_written:.2f}x' if as_written else 'n/a'} the Trainer as written (goal >= 8x), "
              f"{f'{min(tuned_best):.2f}x' if tuned_best else 'n/a'} the faster tuned Trainer (goal >= 4x)",
              file=sys.stderr)
    return rows


def best_flags_compile(flags: list[str]) -> bool:
    """Whether train.py's flags compile: `--compile on` or `--compile` alone (auto: not known here)."""
    if "--compile" not in flags:
        return False
    i = flags.index("--compile")
    return i + 1 == len(flags) or flags[i + 1] == "on" or flags[i + 1].startswith("-")


def steady(args, work: Path) -> list[dict]:
    """train.py's steady rate on 20,000+ training images: its defaults, the best flags, the best flags warm."""
    folder, backbone = jpegs_and_backbone(args, work, usable_cores())
    ours, best = train_py(backbone, folder, args.epochs), shlex.split(args.best_flags)
    jobs = [Job("train.py at its defaults", "defaults", ours, "vitfood", flags="", own_folder=True),
            Job("train.py, best flags", "best", [*ours, *best], "vitfood", flags=args.best_flags, own_folder=True,
                cache="best"),
            Job("train.py, best flags, warm compiler cache", "best-warm", [*ours, *best], "vitfood",
                flags=args.best_flags, own_folder=True, cache="best")]
    rows = run_jobs([job for job in jobs if job.key in args.jobs], args, work)
    print(f"{args.images:,} JPEGs x {args.epochs} epochs, ViT-{args.model_size}; goals: >= 3,000 images/s steady "
          "at the defaults, >= 4,000 with the best flags; fixed cost <= 15 s cold, <= 8 s with a warm compiler cache",
          file=sys.stderr)
    return rows


SIZES = {"compute": (400, 3), "e2e": (400, 3), "guide-job": (5000, 3), "steady": (6400, 4)}  # --images, --epochs
E2E_KEYS = ["vitfood", "guide", "tuned", "ddp"]
JOB_KEYS = {"e2e": E2E_KEYS, "guide-job": GUIDE_JOB_KEYS, "steady": STEADY_KEYS}


def parse_args(argv: list[str] | None = None):
    """The command line, checked (gpu_all.py's tests parse its parts' commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=["compute", "e2e", "guide-job", "steady"],
                   help="default: compute on a GPU; on the CPU e2e with the tiny model (minutes, not hours)")
    p.add_argument("--model-size", choices=["tiny", "base"], default="base")
    p.add_argument("--model-family", choices=MODEL_FAMILIES, default="vit",
                   help="compute: another family at real size, built from its config with random weights: vitfood "
                        "(its hf family) against transformers' own model, same weights")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps or images: a check that it runs")
    p.add_argument("--impls", nargs="+", choices=["vitfood", "hf", "timm"], default=["vitfood", "hf"],
                   help="compute: the models (timm: a row saying so when timm is not installed)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["bf16", "fp32"])
    p.add_argument("--compile", nargs="*", default=None,
                   help="compute: off and/or on (default: off); e2e: the flag alone compiles vitfood and the tuned Trainer")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    p.add_argument("--steps", type=int, default=20, help="compute: timed steps per row")
    p.add_argument("--images", type=int, default=None,
                   help="JPEGs in the folder (80%% train, 20%% eval); default: e2e 400, guide-job 5000, steady 6400")
    p.add_argument("--epochs", type=int, default=None, help="default: 3; steady 4")
    p.add_argument("--batch-size", type=int, default=16, help="e2e: vitfood and the tuned Trainer")
    p.add_argument("--grad-accum-steps", type=int, default=4, help="e2e: vitfood and the tuned Trainer")
    p.add_argument("--workers", type=int, default=None,
                   help="e2e: DataLoader workers (default: train.py's own); e2e and guide-job: the tuned Trainer's "
                        "(default: cores - 1, at most 16)")
    p.add_argument("--jobs", nargs="+", choices=sorted({k for keys in JOB_KEYS.values() for k in keys}),
                   help=f"e2e: some of {' '.join(E2E_KEYS)} (default: all, ddp with --nproc-per-node); "
                        f"guide-job: some of {' '.join(GUIDE_JOB_KEYS)} (default: all; --smoke leaves out "
                        f"tuned-compiled); steady: some of {' '.join(STEADY_KEYS)} (default: all, best-warm only "
                        "when the best flags compile)")
    p.add_argument("--guide-part", type=float, default=None,
                   help="guide-job: run the Trainer as written for this many epochs only (e.g. 0.25) and project its "
                        "whole process from them (its steady rate, evaluation and save); default: the whole job")
    p.add_argument("--compiled-impls", nargs="+", choices=["vitfood", "hf", "timm"], default=None,
                   help="compute: the models that get the --compile on rows (default: all of --impls)")
    p.add_argument("--best-flags", default=None,
                   help=f"steady: train.py's flags for the best rows, one quoted string (default: '{BEST_FLAGS}'; "
                        f"--smoke: '{SMOKE_BEST_FLAGS}'; a single flag as --best-flags=--compile)")
    p.add_argument("--repeats", type=int, default=1,
                   help="whole-process modes: run every job this many times, report medians")
    p.add_argument("--nproc-per-node", type=int, default=1, help="e2e: also run train.py under torchrun with N processes")
    p.add_argument("--data-backend", choices=["datasets", "torch"], default="datasets",
                   help="e2e, guide-job: how the guide's script reads the folder (torch where `datasets` is not "
                        "installed)")
    p.add_argument("--work", help="folder for generated JPEGs, checkpoints and run outputs (default: a temp folder)")
    p.add_argument("--jsonl", help="append the results to this JSON-lines file")
    args = p.parse_args(argv)
    choose_mode(args, "bench_train.py", gpu="compute", cpu="e2e", cpu_settings={"model_size": "tiny"})
    if args.mode == "compute":
        args.compile = args.compile or ["off"]
        if any(c not in ("off", "on") for c in args.compile):
            p.error("compute: --compile takes off and/or on")
    elif args.mode == "e2e":
        if args.compile not in (None, []):
            p.error("e2e: --compile takes no value")
        args.compile = args.compile is not None
    elif args.compile is not None:
        p.error(f"{args.mode}: no --compile: guide-job runs train.py at its defaults; steady's is in --best-flags")
    if args.jobs and args.mode not in JOB_KEYS:
        p.error(f"{args.mode}: no --jobs (e2e, guide-job and steady take it)")
    if args.jobs and args.mode == "e2e" and "vitfood" not in args.jobs:
        p.error("e2e: --jobs needs vitfood: the speed-ups are vitfood's over each other row")
    if args.guide_part is not None and (args.mode != "guide-job" or not 0 < args.guide_part):
        p.error("--guide-part: guide-job only, a number of epochs more than 0")
    if args.best_flags is not None and args.mode != "steady":
        p.error(f"{args.mode}: no --best-flags (steady takes it)")
    images, epochs = SIZES[args.mode]
    explicit_epochs = args.epochs is not None
    args.images = images if args.images is None else args.images
    args.epochs = epochs if args.epochs is None else args.epochs
    if args.smoke:
        args.model_size, args.steps, args.images = "tiny", 2, min(args.images, 40)
        args.epochs = args.epochs if explicit_epochs else 1
        args.batch_sizes, args.precisions = [4], ["fp32"]
        args.batch_size, args.grad_accum_steps = 4, 1
    if args.mode == "steady":
        args.best_flags = args.best_flags if args.best_flags is not None else \
            SMOKE_BEST_FLAGS if args.smoke else BEST_FLAGS
        if args.jobs is None:
            args.jobs = STEADY_KEYS if best_flags_compile(shlex.split(args.best_flags)) else ["defaults", "best"]
        if "best-warm" in args.jobs and "best" not in args.jobs:
            p.error("steady: best-warm reuses the compiler cache that the best run leaves: name best too")
    if args.mode == "guide-job" and args.jobs is None:
        # Compiling the tuned Trainer on a CPU takes minutes: the smoke run leaves it out.
        args.jobs = [k for k in GUIDE_JOB_KEYS if not (args.smoke and k == "tuned-compiled")]
    return args


def main():
    args = parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="vitfood-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run = {"compute": compute, "e2e": e2e, "guide-job": guide_job, "steady": steady}[args.mode]
    rows = run(args, work)
    write_jsonl(args.jsonl, [{**r, "mode": args.mode, "model_size": args.model_size} for r in rows])
    print(versions())
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))


if __name__ == "__main__":
    main()
