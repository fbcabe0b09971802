"""Process-group setup for torchrun, and device and precision choice."""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vitfood.errors import VitfoodError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_flag: str) -> Dist:
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    use_cuda = torch.cuda.is_available() and device_flag != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_num_workers(setting: int | None, device_type: str) -> int:
    """--num-workers, or the default for the device.

    On a GPU the training process needs little CPU: one DataLoader worker per core but one, at most 16
    (the cores shared among the processes torchrun starts on this machine).
    On the CPU the model's math threads need the cores: measured on 2 cores (tiny ViT, 512 px JPEGs),
    decoding in the training process with 2 math threads beat 1 worker + 1 thread by 1.5x and 1 worker
    + 2 threads by 1.15x, and with the decoded-image cache the decoding costs little after epoch 1.
    """
    if setting is not None:
        return setting
    if device_type != "cuda":
        return 0
    # Under torchrun the processes on this machine share its cores.
    per_process = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(16, per_process - 1))


def setup(device_flag: str, precision_flag: str) -> tuple[Dist, torch.device, str]:
    """The process group (under torchrun), this process's device, and the precision to run in."""
    d = init_distributed(device_flag)
    device = resolve_device(device_flag, d)
    return d, device, resolve_precision(precision_flag, device)


def shutdown_distributed() -> None:
    """Leave the process group (torchrun runs only); NCCL warns about a process that exits without this."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(flag: str, d: Dist = Dist()) -> torch.device:
    """--device (auto, cpu, cuda, cuda:N) -> this process's device, made current; auto: a GPU if there is one."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", flag):
        raise VitfoodError(f"--device {flag!r}: not a device name (auto, cpu, cuda, cuda:N)")
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    if flag == "cuda" and d.world > 1:
        flag = f"cuda:{d.local_rank}"
    device = torch.device(flag)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VitfoodError(f"--device {flag}: no CUDA GPU is available here")
        if device.index is None:  # set_device needs an index; "cuda" means the current GPU
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise VitfoodError(f"--device {flag}: there are only {torch.cuda.device_count()} CUDA GPU(s) here")
        torch.cuda.set_device(device)
    return device


def resolve_precision(flag: str, device: torch.device) -> str:
    if flag == "auto":
        if device.type == "cuda":
            return "bf16" if native_bf16() else "fp16"
        return "fp32"
    if flag == "fp16" and device.type != "cuda":
        raise VitfoodError("--precision fp16 needs a CUDA GPU (loss scaling is a GPU feature); use bf16 or fp32")
    return flag


def native_bf16() -> bool:
    """Whether the current GPU computes in bf16 natively (sm80 and later), not by emulation.

    torch.cuda.is_bf16_supported() counts emulation by default, so it answers True on a V100 or T4. There bf16
    means emulated matmuls, the math attention kernel and an inductor that refuses bf16: fp16 with loss
    scaling is the right choice. torch before 2.3 has no `including_emulation`, and counted no emulation.
    """
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.is_bf16_supported()


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()
