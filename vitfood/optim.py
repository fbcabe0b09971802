"""The optimizer and the learning-rate schedule: how long a run is in optimizer steps, and the rate at each."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vitfood.models import ImageClassifier


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """As transformers' Trainer: ceil(ratio x total optimizer steps)."""
    return math.ceil(total_steps * warmup_ratio)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0, then linear decay to 0, for optimizer step `step` (0-based).

    The same values as transformers' get_linear_schedule_with_warmup: the first step of a warmup
    runs at lr 0, and the step after the last would run at 0 again.
    """
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    return base_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def build_optimizer(model: ImageClassifier, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with two groups: decayed weights, and the parameters the model's family says are never decayed
    (biases, norms, position embeddings, CLS/register/mask/distillation tokens, relative-position tables)."""
    decay, no_decay = [], []
    for role in model.parameter_roles():
        (decay if role.decay else no_decay).append(role.param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused CUDA kernel updates every parameter in a few launches instead of several per tensor.
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


@dataclass(frozen=True)
class Schedule:
    """The run's length in batches and optimizer steps, and the learning rate at each step."""

    batches_per_epoch: int  # the loader's batches per epoch, per process
    grad_accum_steps: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    base_lr: float

    @classmethod
    def for_run(cls, batches_per_epoch: int, cfg) -> Schedule:
        """`cfg`: the TrainConfig (epochs, grad_accum_steps, warmup_ratio, learning_rate)."""
        steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum_steps)
        total = cfg.epochs * steps_per_epoch
        return cls(batches_per_epoch, cfg.grad_accum_steps, steps_per_epoch, total,
                   warmup_steps_for(total, cfg.warmup_ratio), cfg.learning_rate)

    def lr(self, step: int) -> float:
        return lr_at(step, self.base_lr, self.warmup_steps, self.total_steps)

    def closes_step(self, batch: int) -> bool:
        """Whether batch `batch` of an epoch is the last of its optimizer step (an epoch's tail may be short)."""
        return (batch + 1) % self.grad_accum_steps == 0 or batch + 1 == self.batches_per_epoch
