"""How this process runs the model: compiled or not, inside DDP or not, and how many images per pass.

Decisions made once at setup from the flags and the device; each is a small function tested without
a GPU, and each says why in its docstring.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager

import torch

from vitfood.errors import VitfoodError, first_line

AUTO_COMPILE_MIN_IMAGES = 100_000  # a prediction from the H200 figures, unmeasured: see benchmarks/RESULTS.md


def compile_decision(setting: str, device_type: str, train_images: int,
                     blocker: str | None = None) -> tuple[bool, str]:
    """Whether to compile, and why (for run.json): --compile on/off, or auto.

    auto compiles on a GPU when the run is long enough to repay the compilation: an eager step of
    ViT-B/16 is launch-bound, so compiling saves a share of every step, but costs seconds to tens of
    seconds up front. On the CPU the kernels themselves are the cost and compiling saves little.
    `blocker` (compile_blocker's answer): why compiling cannot work here; on then fails before training starts,
    auto runs eager.
    """
    if setting != "auto":
        if setting == "on" and blocker:
            raise VitfoodError(f"--compile on: torch.compile cannot run here: {blocker}; or pass --compile off")
        return setting == "on", setting
    if device_type != "cuda":
        return False, "off (auto: not on the CPU)"
    if train_images < AUTO_COMPILE_MIN_IMAGES:
        return False, f"off (auto: {train_images:,} training images are fewer than {AUTO_COMPILE_MIN_IMAGES:,})"
    if blocker:
        return False, f"off (auto: torch.compile cannot run here: {blocker})"
    return True, f"on (auto: {train_images:,} training images)"


def compile_blocker(device_type: str) -> str | None:
    """Why torch.compile cannot work on this machine, found without compiling anything; None when it may.

    Inductor builds a GPU's kernels with Triton, which compiles each kernel's launcher with a C compiler ($CC,
    else gcc or clang: triton/runtime/build.py), and the CPU's kernels with a C++ compiler ($CXX, else g++).
    Slim containers have none: without this look the run would die at its first step, after its whole setup.
    Whatever else fails in compilation is caught at the step (is_compile_failure).
    """
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # an older torch: Triton comes with the CUDA wheels
            return None
        if not has_triton():
            return "Triton is not installed or does not support this GPU (pip install triton)"
        cc = os.environ.get("CC")
        if cc is not None:
            return None if shutil.which(cc) else f"$CC ({cc}) is not found; Triton builds its kernels with it"
        if shutil.which("gcc") or shutil.which("clang"):
            return None
        return "no C compiler (Triton builds its kernels with gcc, clang or $CC): install gcc"
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else f"no C++ compiler ({cxx}; inductor builds CPU kernels with it, or $CXX)"


def is_compile_failure(e: BaseException) -> bool:
    """Whether `e` is torch.compile's backend failing (inductor, Triton, the C compiler), not the model's code."""
    exc = sys.modules.get("torch._dynamo.exc")  # loaded by any compilation: imported here it would cost the CLI
    return exc is not None and isinstance(e, exc.BackendCompilerFailed)


def uncompile(model: torch.nn.Module) -> None:
    """Undo wrap_model's Module.compile() on every submodule it compiled: they run eager from now on."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


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


def skip_step_unless_finite(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step(), unless `skip` (a bool on the device), with no host sync where the device is a GPU.

    The fused AdamW kernel (the GPU's, optim.build_optimizer) takes the flag as the GradScaler hands it over, as
    the optimizer's `found_inf`: a step it marks leaves the parameters, the moments and the step count as they
    were (torch/optim/adam.py, _fused_adam). An unfused optimizer (the CPU's) cannot take it and reads the flag:
    on the CPU that is no sync, the value is already computed.
    """
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skip.item():
        optimizer.step()


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


def eval_oom_retry_allowed(device: torch.device) -> bool:
    """On a GPU, under torchrun too: evaluation calls the model without DDP and sums each rank's images before
    the one all-reduce at its end, so a rank may halve its passes alone."""
    return device.type == "cuda"


EVAL_BATCH_MAX = 256  # 4 x the 64 images from which an eager step stops being launch-bound: little more to gain


def resolve_eval_batch(setting: str, batch_size: int, micro_batch: int, eval_images: int, workers: int,
                       device: torch.device, world: int) -> int:
    """--eval-batch-size as images per evaluation batch. auto on a GPU: past the batches of 16 images where an
    eager step is bound by Python launching kernels (900-1,400 images/s on an H200, benchmarks/RESULTS.md), up
    to EVAL_BATCH_MAX, but no bigger than leaves each DataLoader worker a batch of this rank's share to decode
    (a worker decodes a whole batch: a small evaluation set in a few big batches would keep the others idle);
    never fewer than a training pass (one that fits with its gradients fits without them). On the CPU
    --batch-size (the guide's evaluation batch is its training batch): a CPU gains nothing from bigger batches.
    """
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return batch_size
    per_worker = -(-eval_images // world) // max(1, workers)
    return max(min(EVAL_BATCH_MAX, per_worker), micro_batch, batch_size)


@contextmanager
def deterministic_algorithms(on: bool):
    """--deterministic: PyTorch's deterministic algorithms for the run, and the process's settings back after it
    (train() may be called again from Python). An operation with no deterministic version is one error naming it.

    cuBLAS computes deterministically only with a fixed workspace, read when it starts: set here, before the
    model is built and before any matmul, and left set (harmless). A process that ran cuBLAS before calling
    train() keeps the workspace it started with. cuDNN's benchmark mode would pick its kernels by timing them.
    """
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    except RuntimeError as e:
        if "deterministic" not in str(e).lower():
            raise
        raise VitfoodError(nondeterministic_message(e)) from None
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def nondeterministic_message(e: RuntimeError) -> str:
    """The one line for PyTorch's refusal of an operation under --deterministic, naming the operation."""
    line = first_line(e, 300).removeprefix("RuntimeError: ")
    op, found, _ = line.partition(" does not have a deterministic implementation")
    why = f"PyTorch has no deterministic version of {op} on this device" if found else line
    return f"--deterministic: {why}; run without --deterministic"


def determinism_in_force() -> str:
    """For run.json: whether this process runs PyTorch's deterministic algorithms, as torch reports it."""
    if not torch.are_deterministic_algorithms_enabled():
        return "off"
    return (f"on (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG="
            f"{os.environ.get('CUBLAS_WORKSPACE_CONFIG')}, cudnn.benchmark {torch.backends.cudnn.benchmark})")
