"""What training and `--eval-only` share: the run's frame, its inputs, and --eval-only itself.

A run starts the same way whatever it does: check the flags, join the process group, pick the
device and precision, check the output folder before any time is spent, then load the model and
the dataset. It ends the same way too: run.json with its status, bad_images.txt when some images
could not be read. `evaluate_only` is that frame plus one evaluation.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vitfood import checkpoint, data, distributed, hub, report, shared_memory
from vitfood.config import TrainConfig
from vitfood.distributed import Dist, usable_cores
from vitfood.evaluation import EvalPasses, evaluate, label_map_for
from vitfood.execution import (deterministic_algorithms, determinism_in_force, eval_oom_retry_allowed,
                               resolve_eval_batch, resolve_micro_batch)
from vitfood.errors import VitfoodError
from vitfood.fileio import atomic_write_bytes, read_json, write_json
from vitfood.folder_lock import holds_lock_for_job, output_dir_lock
from vitfood.logs import Console
from vitfood.models import ImageClassifier, load_model, preprocessing_for
from vitfood.preprocess import Preprocessing
from vitfood.run_record import RUN_JSON, Timeline, device_description, environment, run_record


@dataclass
class RunContext:
    """The frame of one process's run: who it is, where it runs, where it writes."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    precision: str  # fp32, bf16 or fp16, resolved from --precision
    workers: int  # DataLoader workers, resolved from --num-workers
    out_dir: Path
    started: float  # time.time() at the start, for run.json
    resolved: dict  # run.json's "config": the flags with every 'auto' resolved, and the images used
    console: Console  # rank 0 speaks; the other ranks' console is silent
    timeline: Timeline  # the run's phases, for run.json
    env: dict | None = None  # run.json's platform, versions and git state: read at the first write

    def say(self, message: str) -> None:
        self.console.say(message)

    def write_record(self, status: str) -> None:
        """run.json (rank 0): written once the setup has succeeded (a run that fails before then leaves an
        earlier run's record alone), and again when the run ends, however it ends."""
        if self.dist.is_main:
            ended = None if status == "running" else time.time()
            self.env = self.env or environment()  # run.json is written 2-3 times: git is asked once
            record = run_record(self.resolved, self.started, ended, device_description(self.device),
                                self.timeline.events, self.env)
            write_json(self.out_dir / RUN_JSON, {**record, "status": status})

    def write_bad_images(self, bad: data.BadImages) -> None:
        if self.dist.is_main and bad.found:
            atomic_write_bytes(self.out_dir / checkpoint.BAD_IMAGES, bad.lines().encode())


def start_run(cfg: TrainConfig, training: bool) -> RunContext:
    """Flags, process group, device, precision, and the output folder checked; nothing written yet."""
    timeline = Timeline()
    timeline.mark("imports done")
    cfg.validate()
    hub.check_sources(cfg.model, cfg.dataset, (cfg.train_split, cfg.eval_split))  # offline: all missing pieces at once
    started = time.time()
    d, device, precision = distributed.setup(cfg.device, cfg.precision)
    workers = distributed.resolve_num_workers(cfg.num_workers, device.type)
    out_dir = Path(cfg.output_dir)
    if d.is_main:
        if training:
            checkpoint.prepare_output_dir(out_dir, cfg.overwrite_output_dir,
                                          resuming=cfg.resume_from_checkpoint is not None)
        else:
            checkpoint.prepare_report_dir(out_dir)
    resolved = {**asdict(cfg), "max_train_samples": cfg.train_samples(), "num_workers": workers,
                "precision": precision, "device": str(device), "deterministic_algorithms": determinism_in_force()}
    timeline.mark("device and output folder checked")
    return RunContext(cfg, d, device, precision, workers, out_dir, started, resolved, Console(enabled=d.is_main),
                      timeline)


@dataclass
class Inputs:
    """The model and the dataset of a run, loaded and matched."""

    model: ImageClassifier
    base_config: dict  # the checkpoint's config.json, kept whole in the model we save
    prep: Preprocessing
    processor: dict  # the preprocessor_config.json saved with the model (the checkpoint's own processor type)
    splits: data.Splits
    bad: data.BadImages  # unreadable images: those found before training (`check_images`), then the loop's


def load_inputs(ctx: RunContext, new_head: bool) -> Inputs:
    """The dataset's splits and the model; `new_head`: a head for the dataset's classes (training),
    else the checkpoint's own trained head (evaluation)."""
    cfg = ctx.cfg
    model_dir = hub.resolve_model_dir(cfg.model)
    rule = split_rule(cfg, model_dir, training=new_head)
    splits = data.load_splits(cfg.dataset, cfg.train_split, cfg.eval_split, cfg.train_samples(),
                              cfg.max_eval_samples, cfg.test_size, cfg.seed, rule)
    for line in splits.warnings:
        ctx.say(f"vitfood: {line}")
    bad = check_images(ctx, [splits.train, splits.eval] if new_head else [splits.eval])
    # Training puts a new head on it (--image-size resizes its position tables); evaluation keeps its own.
    model, base_config = load_model(model_dir, labels=splits.label_names if new_head else None, seed=cfg.seed,
                                    image_size=cfg.image_size if new_head else None,
                                    trust_remote_code=cfg.trust_remote_code)
    prep, processor = preprocessing_for(model_dir, model, cfg.image_size if new_head else None)
    model.to(ctx.device)
    ctx.resolved.update(train_images=len(splits.train), eval_images=len(splits.eval), split=splits.rule,
                        model_type=model.model_type)
    ctx.timeline.mark("dataset and model loaded")
    return Inputs(model, base_config, prep, processor, splits, bad)


def split_rule(cfg: TrainConfig, model_dir: Path, training: bool) -> str:
    """How to hold out --test-size: STRATIFIED, unless the run continues or evaluates one made before the split
    was stratified (its checkpoint's setup, or its run.json, has no "split"): then that run's own RANDOM split,
    so that it resumes exactly and is evaluated on images it never trained on. A record that cannot be read
    here is left to the checks that read it properly (restore, load_model)."""
    try:
        if training and cfg.resume_from_checkpoint is not None:
            ckpt = checkpoint.find_checkpoint(Path(cfg.output_dir), cfg.resume_from_checkpoint)
            return read_json(ckpt / checkpoint.STATE_FILE)["setup"].get("split", data.RANDOM)
        if not training and (model_dir / checkpoint.STATE_FILE).is_file():  # --eval-only of a checkpoint
            return read_json(model_dir / checkpoint.STATE_FILE)["setup"].get("split", data.RANDOM)
        if not training and (model_dir / RUN_JSON).is_file():  # --eval-only of a trained model folder
            return read_json(model_dir / RUN_JSON)["config"].get("split", data.RANDOM)
    except (VitfoodError, OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return data.STRATIFIED


def check_images(ctx: RunContext, parts: list[data.Records]) -> data.BadImages:
    """Open every image's header before any training (`data.unreadable_headers`): past --max-bad-fraction the
    run stops now, with bad_images.txt written, instead of part of the way into an epoch. Below it, the images
    found are listed and skipped as the loop skips those it finds."""
    total = sum(len(p) for p in parts)
    bad = data.BadImages(total, ctx.cfg.max_bad_fraction)
    found = [item for part in parts for item in data.unreadable_headers(part, threads=min(16, 2 * usable_cores()))]
    ctx.timeline.mark("image headers checked")
    if not found:
        return bad
    bad.found.update(found)
    listed = ctx.out_dir / checkpoint.BAD_IMAGES
    if len(bad.found) > ctx.cfg.max_bad_fraction * total:
        if ctx.dist.is_main:
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
        ctx.write_bad_images(bad)
        name, why = next(iter(bad.found.items()))
        raise VitfoodError(f"stopped at the start: {len(bad.found):,} unreadable images (found by opening each "
                           f"image's header), more than --max-bad-fraction {ctx.cfg.max_bad_fraction:g} of the "
                           f"{total:,} allows; all listed in {listed}; the first: {name}: {why}")
    name, why = next(iter(bad.found.items()))
    ctx.say(f"vitfood: warning: {plural(len(bad.found), 'image')} cannot be opened, skipped (the run lists them in "
            f"{listed}); the first: {name}: {why}")
    return bad


def selection_note(ctx: RunContext, splits: data.Splits) -> str:
    """'all 5,200 images of ./photos, 20% held out for evaluation': what the first line says was taken."""
    cfg = ctx.cfg
    held_out = cfg.eval_split is None
    taken = len(splits.train) + (len(splits.eval) if held_out else 0)
    note = data.describe_selection(cfg.dataset, cfg.train_split, taken, splits.available, cfg.train_samples(),
                                   cap_is_default=cfg.max_train_samples is None)
    return note + (f", {cfg.test_size:.0%} held out for evaluation" if held_out else f"; evaluation: {cfg.eval_split}")


def eval_loader(ctx: RunContext, inputs: Inputs, micro: int, cache=None):
    """(loader, passes): the evaluation images in batches of --eval-batch-size (resolved, for run.json), and
    the forward passes evaluation computes them in. `micro`: the training pass (resolved --micro-batch-size)."""
    cfg, records = ctx.cfg, inputs.splits.eval
    size = ctx.resolved["eval_batch_size"] = resolve_eval_batch(cfg.eval_batch_size, cfg.batch_size, micro,
                                                                len(records), ctx.workers, ctx.device, ctx.dist.world)
    image_bytes, free = inputs.prep.height * inputs.prep.width * 3, shared_memory.free_bytes()
    fits = shared_memory.eval_batch_that_fits(size, image_bytes, ctx.workers, free)
    if cfg.eval_batch_size == "auto" and fits < size:  # no bigger than the workers' batches in /dev/shm allow
        ctx.say(shared_memory.lowered_note(size, fits, image_bytes, ctx.workers, free))
        size = ctx.resolved["eval_batch_size"] = fits
    sampler = data.EvalBatchSampler(len(records), size, ctx.dist.rank, ctx.dist.world)
    loader = data.make_loader(data.EvalImages(records, inputs.prep, cache), sampler, inputs.prep, ctx.workers,
                              ctx.device.type == "cuda", ctx.cfg.seed)
    return loader, EvalPasses(size, retry_oom=eval_oom_retry_allowed(ctx.device), say=ctx.say)


def evaluate_only(cfg: TrainConfig) -> dict:
    """`train.py --eval-only`: the trained model `cfg.model` on the evaluation images of `cfg.dataset`.

    The evaluation images are those training would hold out (the same seeded split), or
    --eval-split. Writes eval_results.json, confusion_matrix.json/.png and run.json to --output-dir;
    the model there, if any, is left untouched.
    """
    with output_dir_lock(cfg.output_dir, holds_lock_for_job()), deterministic_algorithms(cfg.deterministic):
        ctx = start_run(cfg, training=False)
        inputs = load_inputs(ctx, new_head=False)
        labels = inputs.model.labels
        label_map = label_map_for(inputs.splits.label_names, labels, cfg.dataset, cfg.model)
        bad = inputs.bad
        # The training pass as training would resolve it: the same flags evaluate in the same batches.
        micro = resolve_micro_batch(cfg.micro_batch_size, cfg.batch_size, cfg.grad_accum_steps, ctx.device,
                                    ctx.dist.world)
        loader, passes = eval_loader(ctx, inputs, micro)
        try:
            results, confusion = evaluate(inputs.model, loader, inputs.prep, ctx.device, ctx.precision, labels,
                                          ctx.dist, bad, passes, label_map)
        finally:
            if ctx.dist.is_main:
                ctx.out_dir.mkdir(parents=True, exist_ok=True)
            ctx.write_bad_images(bad)  # also when too many of them stopped the evaluation
        ctx.resolved["eval_batch_size"] = passes.size  # halved, if the GPU ran out of memory
        if ctx.dist.is_main:
            write_json(ctx.out_dir / checkpoint.EVAL_RESULTS, {**results, "model": str(cfg.model),
                                                              "dataset": str(cfg.dataset)})
            report.save_confusion(ctx.out_dir / report.CONFUSION_JSON, confusion, labels)
            report.write_report(ctx.out_dir, results, confusion, labels)
            ctx.write_record("finished")
            top5 = f", top-5 {results['eval_top5_accuracy']:.4f}" if len(labels) > 5 else ""  # else always 1
            ctx.say(f"vitfood: eval_accuracy {results['eval_accuracy']:.4f}{top5} on {results['eval_samples']:,} "
                    f"images; report in {ctx.out_dir}")
        return results


def plural(n: int, word: str, words: str | None = None) -> str:
    """plural(1, 'epoch') -> '1 epoch', plural(3, 'epoch') -> '3 epochs', plural(2, 'class', 'classes')."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {words or word + 's'}"

