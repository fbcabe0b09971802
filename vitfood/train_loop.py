"""The training loop, as a recipe: read `train` first, then each phase in the order it runs.

    setup          the run's frame, model and data, optimizer, and (when resuming) the saved state
    for each epoch:
      train_epoch    per optimizer step: compute_gradients (forward_backward per pass), optimizer_step,
                     after_step
      end_epoch      evaluate, keep the best model, save a resumable checkpoint
    finish         report pictures, model card, the final lines, the Hub push

`Training` holds the run's parts; `TrainState` (resume.py) is the little that changes from step to
step and goes into every checkpoint.
"""

from __future__ import annotations

import shutil
import signal
import time
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vitfood import checkpoint, data, image_cache, logs, publish, report
from vitfood.config import TrainConfig
from vitfood.distributed import all_reduce_sum, autocast, barrier, usable_cores
from vitfood.errors import VitfoodError, first_line
from vitfood.evaluation import EvalPasses, evaluate, improves, learning_verdict
from vitfood.execution import (compile_blocker, compile_decision, deterministic_algorithms, is_compile_failure,
                               oom_retry_allowed, resolve_micro_batch, skip_step_unless_finite, uncompile, wrap_model)
from vitfood.fileio import atomic_write_bytes
from vitfood.folder_lock import holds_lock_for_job, output_dir_lock
from vitfood.models import hf_files
from vitfood.model_card import MODEL_CARD, model_card
from vitfood.optim import Schedule, build_optimizer
from vitfood.preprocess import training_pixels_cap
from vitfood.resume import (StopSignals, TrainingInterrupted, TrainState, check_resume, host_rng_state,
                            load_optimizer_state, load_scaler_state, run_facts, set_rng_state, tensor_rng_state)
from vitfood.run import Inputs, RunContext, eval_loader, load_inputs, plural, selection_note, start_run

__all__ = ["train", "TrainingInterrupted"]


def train(cfg: TrainConfig) -> dict:
    """Fine-tune `cfg.model` on `cfg.dataset`; returns the best evaluation's results."""
    # One run per output folder, locked before anything in it is touched; --deterministic: before the model is built.
    with output_dir_lock(cfg.output_dir, holds_lock_for_job()), deterministic_algorithms(cfg.deterministic):
        t = setup(cfg)
        status = "failed"
        try:
            for cache in t.caches:
                cache.create()
            t.ctx.timeline.mark("training started")
            first_epoch, steps_done = divmod(t.state.step, t.schedule.steps_per_epoch)
            if steps_done == 0 and t.state.epochs_evaluated < first_epoch:
                end_epoch(t, first_epoch - 1)  # stopped between an epoch's last step and its evaluation
            for epoch in range(first_epoch, cfg.epochs):
                train_epoch(t, epoch, skip_steps=steps_done if epoch == first_epoch else 0)
                end_epoch(t, epoch)
            status = "finished"
        except TrainingInterrupted:
            status = "interrupted"
            raise
        finally:
            close(t, status)
        return finish(t)


@dataclass
class Training:
    """The parts of one training run, built once by `setup`."""

    ctx: RunContext
    inputs: Inputs
    train_net: torch.nn.Module  # what a training step calls: the model, or DDP around it
    eval_net: torch.nn.Module  # what evaluation calls: the model
    ddp: torch.nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: data.TrainBatchSampler
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    eval_passes: EvalPasses  # images per evaluation pass (--eval-batch-size, resolved; halved on out-of-memory)
    writer: checkpoint.BackgroundWriter  # writes the best model and the checkpoints while training goes on
    caches: list[image_cache.ImageCache]  # decoded-image caches, made when the loop starts
    schedule: Schedule
    state: TrainState
    facts: dict  # what a resumed run must share with this one (resume.run_facts)
    bad: data.BadImages
    log: logs.RunLog
    stop: StopSignals
    hub_repo: str | None  # where --push-to-hub uploads, checked before training
    steps_at_start: int  # optimizer steps done before this process started (resumed runs)
    micro: int  # images per forward/backward pass (--micro-batch-size, resolved; halved on out-of-memory)
    retry_oom: bool  # whether an out-of-memory halves `micro` and redoes the step (oom_retry_allowed)
    loss_sum: torch.Tensor  # the state's loss_sum, kept on the device: no host sync per step
    seen_sum: torch.Tensor  # the state's samples_since_log, kept on the device
    unchecked: list[tuple[int, torch.Tensor]]  # (step, 1 if its loss or gradient was a fault) since the last check
    t_log: float  # perf_counter() at the last log line, for images/s

    @property
    def cfg(self) -> TrainConfig:
        return self.ctx.cfg

    @property
    def model(self):
        return self.inputs.model


# ---------------------------------------------------------------- setup

def setup(cfg: TrainConfig) -> Training:
    """Everything checked and built before the first step; on disk only the logs and run.json."""
    ctx = start_run(cfg, training=True)
    hub_repo = check_extras(ctx)
    torch.manual_seed(cfg.seed)  # dropout, if the checkpoint has any
    inputs = load_inputs(ctx, new_head=True)
    if cfg.metric_for_best_model == "top5_accuracy" and len(inputs.splits.label_names) <= 5:
        raise VitfoodError(f"--metric-for-best-model top5_accuracy: with {len(inputs.splits.label_names)} classes "
                           "every label is in the top 5, so every epoch would tie; choose accuracy or loss")
    if ctx.device.type == "cpu":
        # The workers decode on their own cores; more math threads here would only fight them.
        torch.set_num_threads(max(1, min(torch.get_num_threads(), usable_cores() - ctx.workers)))
    caches, cache_note = decode_caches(ctx, inputs)
    sampler = data.TrainBatchSampler(len(inputs.splits.train), cfg.batch_size, cfg.seed, ctx.dist.rank, ctx.dist.world)
    images = data.TrainImages(inputs.splits.train, inputs.prep, cfg.seed, cfg.flip, caches[0] if caches else None,
                              cfg.rotation, cfg.zoom, cfg.crop_scale)
    train_loader = data.make_loader(images, sampler, inputs.prep, ctx.workers, ctx.device.type == "cuda", cfg.seed)
    schedule = Schedule.for_run(len(sampler), cfg)
    optimizer = build_optimizer(inputs.model, cfg.learning_rate, cfg.weight_decay, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == "fp16")
    blocker = compile_blocker(ctx.device.type) if cfg.compile != "off" else None
    use_compile, compile_note = compile_decision(cfg.compile, ctx.device.type, cfg.epochs * len(inputs.splits.train),
                                                 blocker)
    if blocker and blocker in compile_note:
        ctx.say(f"vitfood: --compile auto: running eager, torch.compile cannot run here: {blocker}")
    ctx.resolved.update(compile="on" if use_compile else "off", compile_decision=compile_note)
    train_net, eval_net, ddp = wrap_model(inputs.model, use_compile, ctx.device, ctx.dist.world)
    # BatchNorm normalises over each pass's images: passes of --batch-size keep the result what it was meant to be.
    micro = ctx.resolved["micro_batch_size"] = cfg.batch_size if inputs.model.has_batchnorm else \
        resolve_micro_batch(cfg.micro_batch_size, cfg.batch_size, cfg.grad_accum_steps, ctx.device, ctx.dist.world)
    evals, eval_passes = eval_loader(ctx, inputs, micro, caches[1] if caches else None)
    facts = run_facts(cfg, inputs.splits.label_names, inputs.model.image_size, ctx.dist.world)
    facts["split"] = inputs.splits.rule  # the held-out split's rule (run.split_rule): a resumed run keeps it
    state = TrainState()
    if cfg.resume_from_checkpoint is not None:
        state = restore(ctx, inputs, optimizer, scaler, facts)
    bad = inputs.bad  # with what the image check found
    bad.found.update(state.bad_images)
    ctx.say(opening_line(ctx, inputs, schedule, cache_note, micro, eval_passes.size))
    log = open_logs(ctx, state.step)
    ctx.write_record("running")
    ctx.console.start_progress(schedule.total_steps, state.step)
    return Training(ctx=ctx, inputs=inputs, train_net=train_net, eval_net=eval_net, ddp=ddp, optimizer=optimizer,
                    scaler=scaler, sampler=sampler, train_loader=train_loader, eval_loader=evals,
                    eval_passes=eval_passes, writer=checkpoint.BackgroundWriter(), caches=caches, schedule=schedule,
                    state=state, facts=facts, bad=bad, log=log, stop=StopSignals(), hub_repo=hub_repo,
                    steps_at_start=state.step, micro=micro,
                    retry_oom=oom_retry_allowed(ctx.device, ctx.dist.world) and not inputs.model.has_batchnorm,
                    loss_sum=torch.tensor(state.loss_sum if ctx.dist.is_main else 0.0, device=ctx.device),
                    seen_sum=torch.tensor(state.samples_since_log, device=ctx.device), unchecked=[],
                    t_log=time.perf_counter())


def check_extras(ctx: RunContext) -> str | None:
    """The Hub push target and TensorBoard, checked now: not after hours of training. Returns the repo."""
    if not ctx.dist.is_main:
        return None
    if ctx.cfg.report_to == "tensorboard":
        logs.summary_writer_class()
    if ctx.cfg.push_to_hub:
        return publish.check_push(ctx.cfg.hub_model_id, None, ctx.out_dir)
    return None


def decode_caches(ctx: RunContext, inputs: Inputs) -> tuple[list[image_cache.ImageCache], str]:
    """([train cache, eval cache] or [], why): the decoded-image caches, if this run should keep them."""
    cfg = ctx.cfg
    cap = training_pixels_cap(inputs.prep, cfg.crop_scale[0])
    need = image_cache.estimate_bytes(inputs.splits.train, cap, seed=cfg.seed) if cfg.decode_cache != "off" else 0
    # Room kept for checkpoints (weights and two AdamW moments, a few of them) and the best model.
    reserve = 2**30 + 12 * sum(p.numel() * p.element_size() for p in inputs.model.parameters())
    use, note = image_cache.should_cache(cfg.decode_cache, cfg.epochs, ctx.dist.world, need, ctx.out_dir, reserve)
    ctx.resolved["decode_cache"] = "on" if use else "off"
    if not use:
        return [], note
    folder = cache_folder(ctx)
    # Made on disk only when the loop starts, with the loop's cleanup: a failed setup leaves no cache behind.
    return [image_cache.ImageCache(folder / "train", len(inputs.splits.train)),
            image_cache.ImageCache(folder / "eval", len(inputs.splits.eval))], note


def cache_folder(ctx: RunContext):
    return ctx.out_dir / "decoded-images" / f"rank-{ctx.dist.rank}"


def restore(ctx: RunContext, inputs: Inputs, optimizer, scaler, facts: dict) -> TrainState:
    """Continue from a checkpoint: weights, optimizer, loss scaler, RNGs and the run's state."""
    ckpt = checkpoint.find_checkpoint(ctx.out_dir, ctx.cfg.resume_from_checkpoint)
    model_state, optimizer_state, rng_state, saved = checkpoint.load_training_state(ckpt, ctx.cfg.trust_remote_code)
    check_resume(saved, facts, ctx.cfg, ctx.say, ckpt)
    inputs.model.load_state_dict(model_state)
    load_optimizer_state(optimizer, optimizer_state)
    load_scaler_state(scaler, saved["scaler"])
    set_rng_state(rng_state, saved["rng"], ctx.device)
    state = TrainState.from_dict(saved["run"])
    ctx.say(f"vitfood: resuming from {ckpt} at optimizer step {state.step}")
    return state


def opening_line(ctx: RunContext, inputs: Inputs, schedule: Schedule, cache_note: str, micro: int,
                 eval_batch: int) -> str:
    """The run's first line: what it trains on (how many images of how many, and why), and how."""
    cfg, d, splits = ctx.cfg, ctx.dist, inputs.splits
    per_step = cfg.batch_size * cfg.grad_accum_steps * d.world
    batchnorm = " (BatchNorm: each pass is --batch-size images)" if inputs.model.has_batchnorm else ""
    return (f"vitfood: {len(splits.train):,} training / {len(splits.eval):,} evaluation images "
            f"({selection_note(ctx, splits)}), {plural(len(splits.label_names), 'class', 'classes')}; "
            f"{plural(cfg.epochs, 'epoch')} x {plural(schedule.steps_per_epoch, 'optimizer step')} of "
            f"{cfg.batch_size} x {cfg.grad_accum_steps} accumulation x {d.world} process(es) = {per_step} images, "
            f"computed {min(micro, cfg.batch_size * cfg.grad_accum_steps)} at a time{batchnorm}, evaluated "
            f"{eval_batch} at a time; a {inputs.model.model_type} model at {inputs.model.image_size} px; {ctx.device}, "
            f"{ctx.precision}, {plural(ctx.workers, 'worker')}; decoded-image cache {cache_note}")


def open_logs(ctx: RunContext, step: int) -> logs.RunLog:
    """metrics.jsonl (continued after the checkpoint's step when resuming), TensorBoard, the console."""
    if not ctx.dist.is_main:
        return logs.RunLog([])
    resuming = ctx.cfg.resume_from_checkpoint is not None
    metrics = ctx.out_dir / checkpoint.METRICS
    if resuming:
        logs.truncate_metrics(metrics, step)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)  # the setup succeeded: now the folder is made
    sinks = [logs.MetricsLog(metrics, append=resuming)]
    if ctx.cfg.report_to == "tensorboard":
        sinks.append(logs.TensorBoardLog(ctx.out_dir, resume_step=step))
    return logs.RunLog([*sinks, ctx.console])


# ---------------------------------------------------------------- one epoch of optimizer steps

def train_epoch(t: Training, epoch: int, skip_steps: int) -> None:
    """The optimizer steps of one epoch; a resumed epoch starts after the `skip_steps` it had done."""
    skip = skip_steps * t.cfg.grad_accum_steps
    t.sampler.set_epoch(epoch, skip_batches=skip)
    t.model.train()
    window: list[data.Batch] = []  # the loader's batches that make this optimizer step
    for index, batch in enumerate(t.train_loader, start=skip):
        t.bad.add(batch.bad)
        window.append(batch)
        if not t.schedule.closes_step(index):
            continue
        images, window_loss = eager_if_compile_fails(t, lambda: compute_gradients(t, window))
        window = []
        lr, grad_norm = optimizer_step(t, images, window_loss)
        after_step(t, epoch, lr, grad_norm, epoch_done=index + 1 == t.schedule.batches_per_epoch)


def compute_gradients(t: Training, batches: list[data.Batch]) -> tuple[int, torch.Tensor]:
    """The optimizer step's images, forward and backward `t.micro` at a time. Returns (images, summed loss).

    The gradient is a sum over images, so the passes' sizes change only the float rounding. On one GPU
    an out-of-memory halves the pass and redoes the step from clean gradients: the run goes on.
    """
    device = t.ctx.device
    pixels = torch.cat([b.pixels.to(device, non_blocking=True) for b in batches])
    labels = torch.cat([b.labels.to(device, non_blocking=True) for b in batches])
    while True:
        try:
            loss = torch.zeros((), device=device)
            for start in range(0, max(1, len(labels)), t.micro):  # one pass even when every image was bad: DDP
                end = start + t.micro  # needs every rank in each all-reduce
                loss += forward_backward(t, pixels[start:end], labels[start:end], sync_gradients=end >= len(labels))
            return len(labels), loss
        except torch.cuda.OutOfMemoryError:
            if not t.retry_oom or t.micro == 1:
                raise
        # Out of the except clause: its traceback no longer holds the failed pass's activations.
        t.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        t.micro //= 2
        t.ctx.resolved["micro_batch_size"] = t.micro
        t.ctx.say(f"vitfood: out of GPU memory: computing {t.micro} images at a time from now on")


def eager_if_compile_fails(t: Training, work):
    """work(); when torch.compile fails in it (its first training step or evaluation compiles), --compile auto in
    one process goes on eager, with one line, and does the work again from clean gradients; otherwise one error.
    (Under torchrun the other ranks would be left waiting in DDP's all-reduce.)"""
    try:
        return work()
    except Exception as e:
        if not is_compile_failure(e):
            raise
        why = first_line(getattr(e, "inner_exception", None) or e, 200)  # what the backend raised, not dynamo's wrap
        if t.cfg.compile != "auto" or t.ctx.dist.world > 1:
            raise VitfoodError(f"--compile {t.cfg.compile}: torch.compile failed ({why}); pass --compile off") from None
    uncompile(t.model)
    t.ctx.resolved.update(compile="off", compile_decision=f"off (auto: torch.compile failed: {why})")
    t.ctx.say(f"vitfood: --compile auto: torch.compile failed ({why}): running eager from now on")
    t.optimizer.zero_grad(set_to_none=True)
    return work()


def forward_backward(t: Training, pixels: torch.Tensor, labels: torch.Tensor, sync_gradients: bool) -> torch.Tensor:
    """One pass: forward, summed loss, backward. Returns the loss, summed over the pass's images."""
    pixels = t.inputs.prep.normalize(pixels)
    # DDP all-reduces gradients in backward; skip that on the passes that don't end the step.
    with t.ddp.no_sync() if t.ddp is not None and not sync_gradients else nullcontext():
        with autocast(t.ctx.device, t.ctx.precision):
            logits = t.train_net(pixels)
        # Summed, not averaged: optimizer_step divides by the images actually seen, which is exact
        # for a short last batch, an unreadable image, or several ranks.
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        t.scaler.scale(loss).backward()
    return loss.detach()


def optimizer_step(t: Training, images: int, window_loss: torch.Tensor):
    """Mean gradient over the images seen, clipped, one AdamW step. Returns (lr, grad norm).

    No host sync: whether the step is applied is decided on the device. A non-finite loss or gradient norm
    skips the step there (no such update reaches the weights); the host learns of it at its next check
    (`after_step`), which stops the run or counts the skip under --skip-nonfinite.
    """
    d, cfg, device = t.ctx.dist, t.cfg, t.ctx.device
    lr = t.schedule.lr(t.state.step)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    loss_bad = ~torch.isfinite(window_loss)
    if d.world > 1:  # one all-reduce, read on the device: the images seen, and the ranks whose loss is not finite
        counts = all_reduce_sum(torch.stack([torch.full((), images, device=device), loss_bad.long()]), d)
        seen, loss_bad, per_image = counts[0], counts[1] > 0, d.world / counts[0].clamp(min=1)
    else:
        seen, per_image = images, 1 / max(1, images)
    t.scaler.unscale_(t.optimizer)
    # DDP already averaged over ranks: x world / seen makes it the mean over all images. One
    # foreach call instead of a mul_ per tensor (~200 launches per step for ViT-B on a GPU).
    torch._foreach_mul_([p.grad for p in t.model.parameters() if p.grad is not None], per_image)
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.max_grad_norm or float("inf"))
    grad_bad = ~torch.isfinite(grad_norm)  # the same on every rank: DDP gave them the same gradients
    # A fault stops the run (or is skipped, under --skip-nonfinite). In fp16 a non-finite gradient with a finite
    # loss is the loss scale's overflow: the step is skipped and the GradScaler lowers its scale, as designed.
    fault = loss_bad if t.ctx.precision == "fp16" else loss_bad | grad_bad
    skip_step_unless_finite(t.optimizer, loss_bad | grad_bad | (seen == 0))
    t.scaler.update()  # fp16: lowers the scale after an overflow (from unscale_'s own record); else nothing
    counted = ~fault  # the log's mean loss leaves out a fault's images (an fp16 overflow's loss is finite: kept)
    t.loss_sum += torch.where(counted, window_loss, 0.0)
    t.seen_sum += counted.long() * seen
    t.optimizer.zero_grad(set_to_none=True)
    t.state.step += 1
    t.unchecked.append((t.state.step, fault.float()))
    return lr, grad_norm


def nonfinite_step(t: Training, step: int, epoch: int) -> None:
    """Step `step` had a non-finite loss or gradient (already skipped on the device): stop, or count the skip."""
    if t.state.nonfinite_skipped >= t.cfg.skip_nonfinite:
        raise VitfoodError(f"non-finite loss or gradient norm at optimizer step {step} (epoch {epoch + 1}): stopped; "
                           "that step changed no weight, and the saved model and checkpoints are those of earlier "
                           "steps (--skip-nonfinite N skips up to N such steps)")
    t.state.nonfinite_skipped += 1
    t.ctx.say(f"vitfood: skipped optimizer step {step}: non-finite loss or gradient "
              f"({t.state.nonfinite_skipped} of --skip-nonfinite {t.cfg.skip_nonfinite})")


# The host reads what the device decided (the skipped steps, the stop signal under torchrun) every
# HOST_CHECK_STEPS optimizer steps, and at each log line, save, epoch end and a process's first step; the steps in
# between run without a host sync, so the CPU queues the next step while the GPU computes this one.
# Bounds: a non-finite step stops the run at most HOST_CHECK_STEPS - 1 steps later, before anything is saved
# (the skipped step never touched the weights); SIGTERM/SIGINT stop a single process after the step in flight
# (the flag is on the host), a torchrun within HOST_CHECK_STEPS steps (all ranks must agree on the step).
HOST_CHECK_STEPS = 10


def after_step(t: Training, epoch: int, lr: float, grad_norm: torch.Tensor, epoch_done: bool) -> None:
    """Count the step; at a check, read the device's verdicts; a log line every --logging-steps; a checkpoint
    when asked for or signalled."""
    step = t.state.step
    t.ctx.console.advance()
    first = step == t.steps_at_start + 1
    log_due = step % t.cfg.logging_steps == 0 or step == t.schedule.total_steps
    save_due = bool(t.cfg.save_steps) and step % t.cfg.save_steps == 0 and not epoch_done
    signalled = False
    if check_due(step, first or log_due or save_due or epoch_done, t.ctx.dist.world, bool(t.stop.signum)):
        signalled = host_check(t, epoch)
    if first:
        t.ctx.timeline.mark("first optimizer step done (with any compilation)")
    if log_due:
        log_train(t, lr, grad_norm)
    t.writer.raise_if_failed()  # a failed save stops the run now, not at the next save
    if signalled:
        path = save_checkpoint(t, wait=True)
        # Under torchrun a rank may stop for another's signal (the launcher normally sends every rank its own).
        raise TrainingInterrupted(t.stop.signum or signal.SIGTERM, path or t.ctx.out_dir)
    if save_due:
        save_checkpoint(t)  # (an epoch's last step is saved after its evaluation instead)


def check_due(step: int, boundary: bool, world: int, signal_here: bool) -> bool:
    """Whether optimizer step `step` reads the device's verdicts: at a boundary (a process's first step, a log
    line, a save, an epoch's end), every HOST_CHECK_STEPS steps, and in one process once a signal came (its flag is
    on the host; under torchrun every rank must check at the same steps, whatever signal each has seen)."""
    return boundary or step % HOST_CHECK_STEPS == 0 or (world == 1 and signal_here)


def host_check(t: Training, epoch: int) -> bool:
    """The steps since the last check: a fault stops the run or is counted; returns whether a stop signal came
    (under torchrun: to any rank, so that all stop at this step). One read of the device, one all-reduce."""
    d, device = t.ctx.dist, t.ctx.device
    verdicts = torch.stack([*(fault for _, fault in t.unchecked), torch.full((), float(t.stop.signum), device=device)])
    *faults, signalled = all_reduce_sum(verdicts, d).tolist()  # faults agree across ranks: summed, still nonzero
    for (step, _), fault in zip(t.unchecked, faults):
        if fault:
            nonfinite_step(t, step, epoch)
    t.unchecked = []
    return bool(signalled)


def log_train(t: Training, lr: float, grad_norm) -> None:
    """One metrics record: the mean loss over the images since the last one, and the throughput."""
    state = t.state
    loss_total = all_reduce_sum(t.loss_sum.clone(), t.ctx.dist).item()
    state.samples_since_log = int(t.seen_sum.item())
    elapsed = time.perf_counter() - t.t_log
    t.log.write({"type": "train", "step": state.step, "epoch": round(state.step / t.schedule.steps_per_epoch, 4),
                 "loss": loss_total / max(1, state.samples_since_log), "learning_rate": lr,
                 "grad_norm": grad_norm.item(),
                 "images_per_s": round(state.samples_since_log / elapsed, 2)})
    t.loss_sum.zero_()
    t.seen_sum.zero_()
    state.samples_since_log, t.t_log = 0, time.perf_counter()


# ---------------------------------------------------------------- end of an epoch, checkpoints

def end_epoch(t: Training, epoch: int) -> None:
    """Evaluate; keep the best epoch by --metric-for-best-model (the first of equals, as the Trainer); checkpoint."""
    ctx, inputs, state = t.ctx, t.inputs, t.state
    started = time.perf_counter()
    results, confusion = eager_if_compile_fails(t, lambda: evaluate(
        t.eval_net, t.eval_loader, inputs.prep, ctx.device, ctx.precision, inputs.splits.label_names, ctx.dist, t.bad,
        t.eval_passes))
    ctx.resolved["eval_batch_size"] = t.eval_passes.size  # halved, if the GPU ran out of memory
    results.update(epoch=epoch + 1, step=state.step)
    t.log.write({"type": "eval", **{k: v for k, v in results.items() if k != "per_class_accuracy"},
                 "images_per_s": round(results["eval_samples"] / (time.perf_counter() - started), 2)})
    state.epochs_evaluated = epoch + 1
    ctx.timeline.mark(f"epoch {epoch + 1} evaluated")
    best = None
    if improves(results, state.best, t.cfg.metric_for_best_model):
        state.best, state.best_step, best = results, state.step, (results, confusion)
    ctx.write_bad_images(t.bad)
    save_checkpoint(t, best=best)
    t.t_log = time.perf_counter()  # evaluation time is not training throughput


def save_checkpoint(t: Training, best: tuple | None = None, wait: bool = False) -> Path | None:
    """A snapshot of the training state (and, with `best` = (results, confusion), of the new best model),
    written by the background writer while training goes on. Rank 0 writes; every rank holds the same
    weights. `wait`: return once it is on the disk, on every rank (a stopping run: under torchrun a rank
    that exits first gets the others killed)."""
    ctx, state = t.ctx, t.state
    path = None
    # The log window's loss summed over all ranks (each holds its own share): on resume rank 0 carries it.
    state.loss_sum = float(all_reduce_sum(t.loss_sum.clone(), ctx.dist).item())
    state.samples_since_log = int(t.seen_sum.item())
    if ctx.dist.is_main:
        mark_written(ctx, t.writer.wait())  # the save in flight lands first: one snapshot in memory at a time
        state.bad_images = t.bad.found
        saved = {"run": state.to_dict(), "setup": t.facts, "config": asdict(t.cfg), "scaler": t.scaler.state_dict(),
                 "rng": host_rng_state()}
        model_files = hf_files(t.model, t.inputs.base_config, t.inputs.processor)  # once for both saves
        files = checkpoint.training_state_files(model_files, t.optimizer.state_dict(), tensor_rng_state(ctx.device),
                                                saved)
        path = checkpoint.checkpoint_dir(ctx.out_dir, state.step)
        what = f"checkpoint {path.name}" + (" and the best model" if best else "")
        ctx.timeline.mark(f"{what}: snapshot taken")
        t.writer.submit(what, [*best_model_jobs(t, model_files, best),
                               write_checkpoint_job(ctx.out_dir, state.step, files, t.cfg.save_total_limit)])
        if wait:
            mark_written(ctx, t.writer.wait())
    barrier(ctx.dist)
    return path


def best_model_jobs(t: Training, model_files: dict, best: tuple | None) -> list:
    """The writer's jobs for a new best model: its files at the top of the output folder, its confusion matrix."""
    if best is None:
        return []
    results, confusion = best
    out_dir, labels = t.ctx.out_dir, t.inputs.splits.label_names
    files = checkpoint.best_model_files(model_files, results)
    return [lambda: checkpoint.write_best(out_dir, files),
            lambda: report.save_confusion(out_dir / report.CONFUSION_JSON, confusion, labels)]


def write_checkpoint_job(out_dir: Path, step: int, files: dict, keep: int):
    """The writer's job for a checkpoint, with the step and files of now (training goes on while it writes)."""
    return lambda: checkpoint.write_training_state(out_dir, step, files, keep)


def mark_written(ctx: RunContext, written: tuple[str, float] | None) -> None:
    """The timeline's note of a save the writer finished, made when the training thread next waits for it (at
    the next save, or the end): its place in the timeline is that wait, not the moment the write ended."""
    if written is not None:
        ctx.timeline.mark(f"{written[0]} written in the background in {written[1]:.2f} s")


# ---------------------------------------------------------------- the end

def close(t: Training, status: str) -> None:
    """However the loop ended: the last save landed, signal handlers back, caches gone, logs closed, run.json's
    status. A save that failed in the background is raised here when the loop finished or was stopped (a
    stopped run must not say its checkpoint is there when it is not); after another error, that error
    goes on and the failed save is one more line."""
    try:
        mark_written(t.ctx, t.writer.wait())
    except BaseException as e:
        if status != "failed" or not isinstance(e, Exception):  # the failed save is the news; or a Ctrl-C
            status = "failed" if isinstance(e, Exception) else "interrupted"
            raise
        # The loop's own error goes on (it says why the run stopped); the save's is one more line.
        t.ctx.say(f"vitfood: the last save failed too: {first_line(e).removeprefix('VitfoodError: ')}")
    finally:
        close_the_rest(t, status)


def close_the_rest(t: Training, status: str) -> None:
    """close() once no save is in flight."""
    t.stop.restore()
    t.ctx.console.close()
    if t.caches:  # derived data only; open files in the workers stay readable until they exit
        folder = cache_folder(t.ctx)
        shutil.rmtree(folder, ignore_errors=True)
        with suppress(OSError):
            folder.parent.rmdir()  # the last rank out removes the folder
    t.log.close()
    t.ctx.write_bad_images(t.bad)  # also when too many bad images stopped the run: the list says which
    t.ctx.write_record(status)


def finish(t: Training) -> dict:
    """The report and model card, the final lines (with a warning when the model learned nothing), the push."""
    ctx, best, labels = t.ctx, t.state.best, t.inputs.splits.label_names
    verdict = None
    if ctx.dist.is_main:
        # Absent when a run resumed into another --output-dir never beat the best it brought along.
        saved = ctx.out_dir / report.CONFUSION_JSON
        confusion = report.load_confusion(saved)[0] if saved.is_file() else None
        if confusion is not None:
            verdict = learning_verdict(confusion, best["eval_accuracy"], t.cfg.learning_rate)
        pictures = report.write_report(ctx.out_dir, best, confusion, labels)
        card = model_card(ctx.resolved, best, labels, t.cfg.model, t.cfg.dataset, repo_id=t.hub_repo,
                          files=[Path(p).name for p in pictures], warning=verdict, model_name=t.model.display_name)
        atomic_write_bytes(ctx.out_dir / MODEL_CARD, card.encode())
        ctx.timeline.mark("report and model card written")
        ctx.write_record("finished")  # again, with the report in the timeline
    bad = f"; {plural(len(t.bad.found), 'unreadable image')} skipped, see {ctx.out_dir / checkpoint.BAD_IMAGES}" \
        if t.bad.found else ""
    key = f"eval_{t.cfg.metric_for_best_model}"
    also = f", eval_accuracy {best['eval_accuracy']:.4f}" if key != "eval_accuracy" else ""
    ctx.say(f"vitfood: best {key} {best[key]:.4f} (epoch {best['epoch']}{also}); model saved to "
            f"{ctx.out_dir}{bad}")
    if verdict is not None:
        ctx.say(f"vitfood: warning: {verdict}")
    kept = checkpoint.checkpoints_summary(ctx.out_dir) if ctx.dist.is_main else None
    if kept:
        ctx.say(f"vitfood: {kept}")
    if t.hub_repo is not None:
        ctx.say(f"vitfood: uploading {ctx.out_dir} to the Hub ...")
        ctx.say(f"vitfood: pushed to {publish.push_output_dir(ctx.out_dir, t.hub_repo, None)}")
    return best
