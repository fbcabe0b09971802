"""The training loop: read it top to bottom.

setup (device, data, model, optimizer) -> for each epoch: for each micro-batch: forward, backward;
every `grad_accum_steps` micro-batches: learning rate, gradient scaling, clip, step, log ->
evaluate -> keep the best model in Hugging Face format -> save a resumable checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext, suppress
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitfood import checkpoint, data, distributed, image_cache, publish, report
from vitfood.config import TrainConfig
from vitfood.distributed import resolve_num_workers, usable_cores
from vitfood.distributed import Dist, all_reduce_sum, autocast, barrier
from vitfood.evaluation import evaluate
from vitfood.errors import VitfoodError
from vitfood.hub import resolve_model_dir
from vitfood.model import load_model
from vitfood.optim import build_optimizer, lr_at, warmup_steps_for
from vitfood.preprocess import load_preprocessing, training_pixels_cap


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived: the step in flight was finished and a checkpoint saved."""

    def __init__(self, signum: int, checkpoint_dir: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.checkpoint_dir = signum, checkpoint_dir


# What a resumed run must share with the interrupted one for the data order, the crops and the
# labels to be the same; anything else that differs only draws a warning.
_RESUME_IRRELEVANT = ("resume_from_checkpoint", "output_dir", "overwrite_output_dir",  # a moved folder is fine
                      "decode_cache", "report_to", "push_to_hub", "hub_model_id")  # same pixels, same steps
_RESUME_MUST_MATCH = ("model", "dataset", "train_split", "eval_split", "max_train_samples", "max_eval_samples",
                      "test_size", "seed", "batch_size", "grad_accum_steps", "crop_scale", "flip", "rotation", "zoom")


def train(cfg: TrainConfig) -> dict:
    """Fine-tune `cfg.model` on `cfg.dataset`; returns the best evaluation results."""
    cfg.validate()
    started = time.time()
    d, device, precision = distributed.setup(cfg.device, cfg.precision)
    out_dir = Path(cfg.output_dir)
    workers = resolve_num_workers(cfg.num_workers, device.type)
    resolved = {**asdict(cfg), "num_workers": workers, "precision": precision, "device": str(device)}  # for run.json
    hub_repo = None
    if d.is_main:
        checkpoint.prepare_output_dir(out_dir, cfg.overwrite_output_dir, resuming=cfg.resume_from_checkpoint is not None)
        if cfg.push_to_hub:  # no network or no token: say so now, not after hours of training
            hub_repo = publish.check_push(cfg.hub_model_id, None, out_dir)
        if cfg.report_to == "tensorboard":
            report.summary_writer_class()  # not installed: say so now
    torch.manual_seed(cfg.seed)  # dropout, if the checkpoint has any
    if device.type == "cpu":
        # The workers decode on their own cores; more math threads here would only fight them.
        torch.set_num_threads(max(1, min(torch.get_num_threads(), usable_cores() - workers)))

    # ---- data and model
    model_dir = resolve_model_dir(cfg.model)
    splits = data.load_splits(cfg.dataset, cfg.train_split, cfg.eval_split, cfg.max_train_samples,
                              cfg.max_eval_samples, cfg.test_size, cfg.seed)
    model, base_config = load_model(model_dir, labels=splits.label_names, seed=cfg.seed)
    prep = load_preprocessing(model_dir, model.arch.image_size)
    model.to(device)
    num_labels = len(splits.label_names)

    pin = device.type == "cuda"
    cache_bytes = image_cache.estimate_bytes(splits.train, training_pixels_cap(prep, cfg.crop_scale[0]),
                                             seed=cfg.seed) \
        if cfg.decode_cache != "off" else 0
    # Room kept for checkpoints (weights and two AdamW moments, a few of them) and the best model.
    reserve = 2**30 + 12 * sum(p.numel() * p.element_size() for p in model.parameters())
    use_cache, cache_note = image_cache.should_cache(cfg.decode_cache, cfg.epochs, d.world, cache_bytes, out_dir,
                                                     reserve)
    resolved.update(decode_cache="on" if use_cache else "off", train_images=len(splits.train),
                    eval_images=len(splits.eval))  # the images actually used, whatever --max-*-samples said
    cache_dir = out_dir / "decoded-images" / f"rank-{d.rank}"
    # Made on disk just before the loop, with the loop's cleanup: a failed setup leaves no cache behind.
    train_cache = image_cache.ImageCache(cache_dir / "train", len(splits.train)) if use_cache else None
    eval_cache = image_cache.ImageCache(cache_dir / "eval", len(splits.eval)) if use_cache else None
    train_sampler = data.TrainBatchSampler(len(splits.train), cfg.batch_size, cfg.seed, d.rank, d.world)
    train_loader = data.make_loader(data.TrainImages(splits.train, prep, cfg.seed, cfg.flip, train_cache,
                                                     cfg.rotation, cfg.zoom, cfg.crop_scale),
                                    train_sampler, prep, workers, pin, cfg.seed)
    eval_loader = data.make_loader(data.EvalImages(splits.eval, prep, eval_cache),
                                   data.EvalBatchSampler(len(splits.eval), cfg.eval_batch_size, d.rank, d.world),
                                   prep, workers, pin, cfg.seed)

    micro_per_epoch = len(train_sampler)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum_steps)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = warmup_steps_for(total_steps, cfg.warmup_ratio)

    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    forward = torch.compile(model) if cfg.compile else model  # evaluation, and training on one process
    ddp = None
    train_net = forward
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        # Compiled around DDP, not inside it: DDP then overlaps the all-reduce with the backward pass.
        train_net = torch.compile(ddp) if cfg.compile else ddp

    # ---- where the run stands; a resumed run continues from its checkpoint's state
    setup = {**{k: getattr(cfg, k) for k in _RESUME_MUST_MATCH}, "labels": splits.label_names,
             "image_size": model.arch.image_size, "world_size": d.world}
    run = {"step": 0, "epochs_evaluated": 0, "best": None, "best_step": None, "loss_sum": 0.0,
           "samples_since_log": 0, "nonfinite_skipped": 0, "bad_images": {}}
    say = _printer(d)
    if cfg.resume_from_checkpoint is not None:
        ckpt = checkpoint.find_checkpoint(out_dir, cfg.resume_from_checkpoint)
        model_state, optimizer_state, rng_state, saved = checkpoint.load_training_state(ckpt)
        _check_resume(saved, setup, cfg, say, ckpt)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        scaler.load_state_dict(saved["scaler"])
        _set_rng_state(rng_state, saved["rng"], device)
        run = saved["run"]
        say(f"vitfood: resuming from {ckpt} at optimizer step {run['step']}")
    bad = data.BadImages(len(splits.train) + len(splits.eval), cfg.max_bad_fraction)
    bad.found.update(run["bad_images"])

    def save_checkpoint() -> Path | None:
        """Rank 0 writes, the others wait: every rank holds the same weights after a step."""
        path = None
        if d.is_main:
            run.update(loss_sum=float(loss_sum.item()), samples_since_log=samples_since_log, bad_images=bad.found)
            state = {"run": run, "setup": setup, "config": asdict(cfg), "scaler": scaler.state_dict(),
                     "rng": _host_rng_state()}
            protect = {run["best_step"]} if run["best_step"] is not None else set()
            path = checkpoint.save_training_state(out_dir, run["step"], model.state_dict(), optimizer.state_dict(),
                                                  _tensor_rng_state(device), state, cfg.save_total_limit, protect)
        barrier(d)
        return path

    def end_of_epoch(epoch: int) -> None:
        """Evaluate; keep the best epoch by accuracy (the first of equals, as the Trainer); checkpoint."""
        t_eval = time.perf_counter()
        results, confusion = evaluate(forward, eval_loader, prep, device, precision, splits.label_names, d, bad)
        results.update(epoch=epoch + 1, step=run["step"])
        record = {"type": "eval", **{k: v for k, v in results.items() if k != "per_class_accuracy"},
                  "images_per_s": round(results["eval_samples"] / (time.perf_counter() - t_eval), 2)}
        _emit(record, logs, bar, d)
        run["epochs_evaluated"] = epoch + 1
        if run["best"] is None or results["eval_accuracy"] > run["best"]["eval_accuracy"]:
            run.update(best=results, best_step=run["step"])
            if d.is_main:
                checkpoint.save_best(out_dir, model, base_config, prep.to_hf_dict(), results)
                report.save_confusion(out_dir / report.CONFUSION_JSON, confusion, splits.label_names)
        if d.is_main and bad.found:
            checkpoint.atomic_write_bytes(out_dir / checkpoint.BAD_IMAGES, bad.lines().encode())
        save_checkpoint()

    say(f"vitfood: {len(splits.train)} training / {len(splits.eval)} evaluation images, {num_labels} classes; "
        f"{cfg.epochs} epochs x {steps_per_epoch} optimizer steps of {cfg.batch_size} x {cfg.grad_accum_steps} "
        f"accumulation x {d.world} process(es) = {cfg.batch_size * cfg.grad_accum_steps * d.world} images; "
        f"{device}, {precision}, {workers} workers; decoded-image cache {cache_note}")

    def write_run_record(status: str) -> None:
        """run.json: written once the setup has succeeded (a run that fails before it leaves an earlier
        run's record alone), and again when the run ends, however it ends."""
        record = report.run_record(resolved, started, None if status == "running" else time.time(),
                                   report.device_description(device))
        checkpoint.write_json(out_dir / report.RUN_JSON, {**record, "status": status})

    if d.is_main and cfg.resume_from_checkpoint is not None:
        checkpoint.truncate_metrics(out_dir / checkpoint.METRICS, run["step"])
    logs = []  # metrics.jsonl, and TensorBoard when asked for; rank 0 only
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)  # the setup succeeded: now the folder is made
        logs.append(checkpoint.MetricsLog(out_dir / checkpoint.METRICS, append=cfg.resume_from_checkpoint is not None))
        if cfg.report_to == "tensorboard":
            logs.append(report.TensorBoardLog(out_dir, resume_step=run["step"]))
        write_run_record("running")
    bar = tqdm(total=total_steps, initial=run["step"], desc="train", unit="step", disable=not d.is_main,
               dynamic_ncols=True)
    stop = _StopSignals()

    # ---- the loop
    loss_sum = torch.tensor(run["loss_sum"], device=device)  # summed on the device: no host sync per step
    samples_since_log, t_log = run["samples_since_log"], time.perf_counter()
    start_epoch, done_in_epoch = divmod(run["step"], steps_per_epoch)
    status = "failed"
    try:
        for cache in (train_cache, eval_cache) if use_cache else ():
            cache.create()
        if done_in_epoch == 0 and run["epochs_evaluated"] < start_epoch:
            end_of_epoch(start_epoch - 1)  # stopped between an epoch's last step and its evaluation
        for epoch in range(start_epoch, cfg.epochs):
            skip = done_in_epoch * cfg.grad_accum_steps if epoch == start_epoch else 0
            train_sampler.set_epoch(epoch, skip_batches=skip)
            model.train()
            window, window_loss = 0, torch.zeros((), device=device)  # this optimizer step's images and loss
            for micro, batch in enumerate(train_loader, start=skip):
                if micro % cfg.grad_accum_steps == 0:
                    lr = lr_at(run["step"], cfg.learning_rate, warmup_steps, total_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                last_micro = (micro + 1) % cfg.grad_accum_steps == 0 or micro + 1 == micro_per_epoch
                bad.add(batch.bad)

                pixels = prep.normalize(batch.pixels.to(device, non_blocking=True))
                labels = batch.labels.to(device, non_blocking=True)
                # DDP all-reduces gradients in backward; skip that on the micro-batches that don't step.
                with ddp.no_sync() if ddp is not None and not last_micro else nullcontext():
                    with autocast(device, precision):
                        logits = train_net(pixels)
                    # Summed, not averaged: the step divides by the images actually seen (below),
                    # which is exact for a short last batch, an unreadable image, or several ranks.
                    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
                    scaler.scale(loss).backward()
                window += labels.numel()
                window_loss += loss.detach()
                if not last_micro:
                    continue

                # ---- optimizer step
                seen = int(all_reduce_sum(torch.tensor(window, device=device), d).item()) if d.world > 1 else window
                grad_norm = None
                if seen > 0:
                    scaler.unscale_(optimizer)
                    # DDP already averaged over ranks: x world / seen makes it the mean over all images.
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(d.world / seen)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                    # fp16's GradScaler skips inf/NaN steps itself (and lowers its scale); elsewhere a
                    # non-finite loss or gradient is a fault: stop before it reaches the weights.
                    if precision != "fp16" and not torch.isfinite(grad_norm + window_loss).item():
                        if run["nonfinite_skipped"] >= cfg.skip_nonfinite:
                            raise VitfoodError(
                                f"non-finite loss or gradient norm at optimizer step {run['step'] + 1} (epoch "
                                f"{epoch + 1}): stopped before that step; the saved model and checkpoints are "
                                f"those of earlier steps (--skip-nonfinite N skips up to N such steps)")
                        run["nonfinite_skipped"] += 1
                        say(f"vitfood: skipped optimizer step {run['step'] + 1}: non-finite loss or gradient "
                            f"({run['nonfinite_skipped']} of --skip-nonfinite {cfg.skip_nonfinite})")
                        seen = 0
                    else:
                        loss_sum += window_loss
                        scaler.step(optimizer)
                        scaler.update()
                optimizer.zero_grad(set_to_none=True)
                run["step"] += 1
                samples_since_log += seen
                window, window_loss = 0, torch.zeros((), device=device)
                bar.update(1)

                if run["step"] % cfg.logging_steps == 0 or run["step"] == total_steps:
                    loss_total = all_reduce_sum(loss_sum.clone(), d).item()
                    elapsed = time.perf_counter() - t_log
                    record = {"type": "train", "step": run["step"], "epoch": round(run["step"] / steps_per_epoch, 4),
                              "loss": loss_total / max(1, samples_since_log), "learning_rate": lr,
                              "grad_norm": grad_norm.item() if grad_norm is not None else None,
                              "images_per_s": round(samples_since_log / elapsed, 2)}
                    _emit(record, logs, bar, d)
                    loss_sum.zero_()
                    samples_since_log, t_log = 0, time.perf_counter()

                epoch_done = micro + 1 == micro_per_epoch
                if stop.requested(d, device):
                    path = save_checkpoint()
                    raise TrainingInterrupted(stop.signum, path or out_dir)
                if cfg.save_steps and run["step"] % cfg.save_steps == 0 and not epoch_done:
                    save_checkpoint()  # (an epoch's last step is saved after its evaluation instead)

            end_of_epoch(epoch)
            t_log = time.perf_counter()  # evaluation time is not training throughput
        status = "finished"
    except TrainingInterrupted:
        status = "interrupted"
        raise
    finally:
        stop.restore()
        bar.close()
        if use_cache:  # derived data only; open files in the workers stay readable until they exit
            shutil.rmtree(cache_dir, ignore_errors=True)
            with suppress(OSError):
                cache_dir.parent.rmdir()  # the last rank out removes the folder
        for log in logs:
            log.close()
        if d.is_main:
            if bad.found:  # also when too many bad images stopped the run: the list says which
                checkpoint.atomic_write_bytes(out_dir / checkpoint.BAD_IMAGES, bad.lines().encode())
            write_run_record(status)

    best = run["best"]
    if d.is_main:
        pictures = report.write_report(out_dir, best, None, splits.label_names)
        card = report.model_card(resolved, best, splits.label_names, cfg.model, cfg.dataset, repo_id=hub_repo,
                                 files=[Path(p).name for p in pictures])
        checkpoint.atomic_write_bytes(out_dir / report.MODEL_CARD, card.encode())
    say(f"vitfood: best eval_accuracy {best['eval_accuracy']:.4f} (epoch {best['epoch']}); model saved to {out_dir}"
        + (f"; {len(bad.found)} unreadable image(s) skipped, see {out_dir / checkpoint.BAD_IMAGES}" if bad.found else ""))
    if hub_repo is not None:
        say(f"vitfood: uploading {out_dir} to the Hub ...")
        say(f"vitfood: pushed to {publish.push_output_dir(out_dir, hub_repo, None)}")
    return best


def _check_resume(saved: dict, setup: dict, cfg: TrainConfig, say, ckpt: Path) -> None:
    setup = json.loads(json.dumps(setup))  # as saved: tuples become lists
    differ = [f"{k}: {saved['setup'].get(k)!r} then, {v!r} now" for k, v in setup.items() if saved["setup"].get(k) != v]
    if differ:
        raise VitfoodError(f"cannot resume from {ckpt}: the run differs in " + "; ".join(differ))
    changed = [k for k, v in asdict(cfg).items()
               if k not in setup and k not in _RESUME_IRRELEVANT and saved["config"].get(k) != v]
    if changed:
        say(f"vitfood: warning: resuming with changed settings ({', '.join(changed)}): the run continues, "
            "but will not match an uninterrupted one exactly")


def _host_rng_state() -> dict:
    """Python's and NumPy's global RNG states as plain JSON (restored on resume, whoever uses them)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def _tensor_rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(tensors: dict, host: dict, device: torch.device) -> None:
    version, internal, gauss = host["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = host["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)


class _StopSignals:
    """SIGTERM/SIGINT ask the loop to stop after the optimizer step in flight; a second SIGINT stops now."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, d: Dist, device: torch.device) -> bool:
        if d.world > 1:  # all ranks stop at the same step, or the save's barrier would hang
            return bool(all_reduce_sum(torch.tensor(self.signum, device=device), d).item())
        return bool(self.signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _emit(record: dict, logs: list, bar, d: Dist) -> None:
    if not d.is_main:
        return
    for log in logs:
        log.write(record)
    shown = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items() if k != "type"}
    bar.write(str(shown), file=sys.stderr)


def _printer(d: Dist):
    def say(msg: str) -> None:
        if d.is_main:
            print(msg, file=sys.stderr, flush=True)
    return say

