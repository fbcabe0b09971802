"""How this process runs the model: compiled or not, inside DDP or not, and how many images per pass.

Decisions made once at setup from the flags and the device; each is a small function tested without
a GPU, and each says why in its docstring.
"""

from __future__ import annotations

import torch

AUTO_COMPILE_MIN_IMAGES = 100_000  # a prediction from the H200 figures, unmeasured: see benchmarks/RESULTS.md


def compile_decision(setting: str, device_type: str, train_images: int) -> tuple[bool, str]:
    """Whether to compile, and why (for run.json): --compile on/off, or auto.

    auto compiles on a GPU when the run is long enough to repay the compilation: an eager step of
    ViT-B/16 is launch-bound, so compiling saves a share of every step, but costs seconds to tens of
    seconds up front. On the CPU the kernels themselves are the cost and compiling saves little.
    """
    if setting != "auto":
        return setting == "on", setting
    if device_type != "cuda":
        return False, "off (auto: not on the CPU)"
    if train_images < AUTO_COMPILE_MIN_IMAGES:
        return False, f"off (auto: {train_images:,} training images are fewer than {AUTO_COMPILE_MIN_IMAGES:,})"
    return True, f"on (auto: {train_images:,} training images)"


def wrap_model(model, use_compile: bool, device: torch.device, world: int) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """(train_net, eval_net, ddp): the model as the training step and evaluation call it.

    Compiled block by block, in place: the blocks are identical, so one compilation serves all of them
    (a fraction of a whole-model compilation's time), and the parameters keep their names.
    """
    if use_compile:
        for block in model.blocks:
            block.compile()
    if world == 1:
        return model, model, None
    from torch.nn.parallel import DistributedDataParallel

    # The compiled blocks sit inside DDP, whose gradient hooks stay on the parameters: the all-reduce
    # still overlaps the backward pass.
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, model, ddp


def resolve_micro_batch(setting: str, batch_size: int, grad_accum_steps: int, device: torch.device, world: int) -> int:
    """--micro-batch-size as images per pass. auto: the whole optimizer step on one GPU, where an eager
    step of 16 images is bound by Python launching kernels, not by the GPU (27 ms for 16 images, 33 ms
    for 64 on an H200); --batch-size elsewhere: a CPU gains nothing from bigger passes, and under
    torchrun an out-of-memory retry on one rank would leave the others waiting in DDP's all-reduce."""
    if setting != "auto":
        return int(setting)
    if oom_retry_allowed(device, world):
        return batch_size * grad_accum_steps
    return batch_size


def oom_retry_allowed(device: torch.device, world: int) -> bool:
    """On one GPU; not under torchrun, where the other ranks would wait for the failed one in DDP's all-reduce."""
    return device.type == "cuda" and world == 1
