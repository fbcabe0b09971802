"""The training loop: read it top to bottom.

setup (device, data, model, optimizer) -> for each epoch: for each micro-batch: forward, backward;
every `grad_accum_steps` micro-batches: learning rate, gradient scaling, clip, step, log ->
evaluate -> keep the best model in Hugging Face format.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vitfood import checkpoint, data, metrics
from vitfood.config import TrainConfig, usable_cores
from vitfood.distributed import Dist, all_reduce_sum, autocast, barrier, init_distributed, resolve_device, resolve_precision
from vitfood.errors import VitfoodError
from vitfood.model import load_model, resolve_model_dir
from vitfood.optim import build_optimizer, lr_at, warmup_steps_for
from vitfood.preprocess import load_preprocessing


def train(cfg: TrainConfig) -> dict:
    """Fine-tune `cfg.model` on `cfg.dataset`; returns the best evaluation results."""
    cfg.validate()
    d = init_distributed(cfg.device)
    device = resolve_device(cfg.device, d)
    precision = resolve_precision(cfg.precision, device)
    out_dir = Path(cfg.output_dir)
    if d.is_main:
        checkpoint.prepare_output_dir(out_dir, cfg.overwrite_output_dir)
    torch.manual_seed(cfg.seed)  # dropout, if the checkpoint has any
    if device.type == "cpu":
        # The workers decode on their own cores; more math threads here would only fight them.
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (usable_cores() - cfg.num_workers) or 1)))

    # ---- data and model
    model_dir = resolve_model_dir(cfg.model)
    splits = data.load_splits(cfg.dataset, cfg.train_split, cfg.eval_split, cfg.max_train_samples,
                              cfg.max_eval_samples, cfg.test_size, cfg.seed)
    model, base_config = load_model(model_dir, labels=splits.label_names, seed=cfg.seed)
    prep = load_preprocessing(model_dir, model.arch.image_size)
    model.to(device)
    num_labels = len(splits.label_names)

    pin = device.type == "cuda"
    train_sampler = data.TrainBatchSampler(len(splits.train), cfg.batch_size, cfg.seed, d.rank, d.world)
    train_loader = data.make_loader(data.TrainImages(splits.train, prep, cfg.seed, cfg.flip),
                                    train_sampler, prep, cfg.num_workers, pin)
    eval_loader = data.make_loader(data.EvalImages(splits.eval, prep),
                                   data.EvalBatchSampler(len(splits.eval), cfg.eval_batch_size, d.rank, d.world),
                                   prep, cfg.num_workers, pin)

    micro_per_epoch = len(train_sampler)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum_steps)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = warmup_steps_for(total_steps, cfg.warmup_ratio)

    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    forward = torch.compile(model) if cfg.compile else model
    ddp = None
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    train_net = ddp if ddp is not None else forward

    say = _printer(d)
    say(f"vitfood: {len(splits.train)} training / {len(splits.eval)} evaluation images, {num_labels} classes; "
        f"{cfg.epochs} epochs x {steps_per_epoch} optimizer steps of {cfg.batch_size} x {cfg.grad_accum_steps} "
        f"accumulation x {d.world} process(es) = {cfg.batch_size * cfg.grad_accum_steps * d.world} images; "
        f"{device}, {precision}, {cfg.num_workers} workers")
    log = checkpoint.MetricsLog(out_dir / checkpoint.METRICS) if d.is_main else None
    bad = data.BadImages(len(splits.train) + len(splits.eval), cfg.max_bad_fraction)

    # ---- the loop
    step = 0
    best: dict | None = None
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
    samples_since_log, t_log = 0, time.perf_counter()
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not d.is_main, dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        train_sampler.set_epoch(epoch)
        model.train()
        window = 0  # images in this optimizer step's micro-batches
        for micro, batch in enumerate(train_loader):
            if micro % cfg.grad_accum_steps == 0:
                lr = lr_at(step, cfg.learning_rate, warmup_steps, total_steps)
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
            loss_sum += loss.detach()
            window += labels.numel()
            if not last_micro:
                continue

            # ---- optimizer step
            seen = int(all_reduce_sum(torch.tensor(window, device=device), d).item()) if d.world > 1 else window
            if seen > 0:
                scaler.unscale_(optimizer)
                # DDP already averaged over ranks: x world / seen turns it into the mean over all images.
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(d.world / seen)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            samples_since_log += seen
            window = 0
            bar.update(1)

            if step % cfg.logging_steps == 0 or step == total_steps:
                loss_total = all_reduce_sum(loss_sum.clone(), d).item()
                elapsed = time.perf_counter() - t_log
                record = {"type": "train", "step": step, "epoch": round(step / steps_per_epoch, 4),
                          "loss": loss_total / max(1, samples_since_log), "learning_rate": lr,
                          "grad_norm": grad_norm.item() if seen else None,
                          "images_per_s": round(samples_since_log / elapsed, 2)}
                _emit(record, log, bar, d)
                loss_sum.zero_()
                samples_since_log, t_log = 0, time.perf_counter()

        # ---- evaluate; keep the best epoch by accuracy (the first of equals, as the Trainer)
        t_eval = time.perf_counter()
        results = evaluate(forward, eval_loader, prep, device, precision, splits.label_names, d, bad)
        results["epoch"] = epoch + 1
        results["step"] = step
        record = {"type": "eval", **{k: v for k, v in results.items() if k != "per_class_accuracy"},
                  "images_per_s": round(results["eval_samples"] / (time.perf_counter() - t_eval), 2)}
        _emit(record, log, bar, d)
        if best is None or results["eval_accuracy"] > best["eval_accuracy"]:
            best = results
            if d.is_main:
                checkpoint.save_best(out_dir, model, base_config, prep.to_hf_dict(), best)
            barrier(d)
        if d.is_main and bad.found:
            checkpoint.atomic_write_bytes(out_dir / checkpoint.BAD_IMAGES, bad.lines().encode())
        t_log = time.perf_counter()  # evaluation time is not training throughput

    bar.close()
    if log is not None:
        log.close()
    say(f"vitfood: best eval_accuracy {best['eval_accuracy']:.4f} (epoch {best['epoch']}); "
        f"model saved to {out_dir}" + (f"; {len(bad.found)} unreadable image(s) skipped, see {out_dir / checkpoint.BAD_IMAGES}" if bad.found else ""))
    return best


@torch.no_grad()
def evaluate(net, loader, prep, device, precision, label_names, d: Dist, bad: data.BadImages) -> dict:
    """Accuracy, top-5 and loss over the whole evaluation set, each image counted once across ranks."""
    net.eval()
    k = len(label_names)
    confusion = torch.zeros((k, k), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    for batch in loader:
        bad.add(batch.bad)
        pixels = prep.normalize(batch.pixels.to(device, non_blocking=True))
        labels = batch.labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = net(pixels)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        metrics.update_confusion(confusion, logits, labels)
        top5 += metrics.topk_correct(logits, labels, 5)
    for t in (confusion, loss_sum, top5):
        all_reduce_sum(t, d)
    try:
        return metrics.summarize(confusion, loss_sum.item(), int(top5.item()), label_names)
    except ValueError:
        raise VitfoodError("no evaluation image could be read; see bad_images.txt in the output folder") from None


def _emit(record: dict, log, bar, d: Dist) -> None:
    if not d.is_main:
        return
    log.write(record)
    shown = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items() if k != "type"}
    bar.write(str(shown), file=sys.stderr)


def _printer(d: Dist):
    def say(msg: str) -> None:
        if d.is_main:
            print(msg, file=sys.stderr, flush=True)
    return say

