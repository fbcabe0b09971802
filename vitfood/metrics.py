"""Classification metrics from a confusion matrix: pure functions, tested without a model."""

from __future__ import annotations

import torch


def update_confusion(confusion: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Add a batch's argmax predictions to `confusion[true, predicted]` (on the device, no sync)."""
    k = confusion.shape[0]
    pred = logits.argmax(dim=-1)
    # index_add_, not bincount: bincount's output size depends on the data, a host sync on GPUs.
    confusion.view(-1).index_add_(0, labels * k + pred, torch.ones_like(labels, dtype=confusion.dtype))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).sum()


def summarize(confusion: torch.Tensor, loss_sum: float, top5_correct: int, label_names: list[str]) -> dict:
    """eval_loss (mean cross-entropy), eval_accuracy, eval_top5_accuracy, per-class accuracy."""
    confusion = confusion.double().cpu()
    total = confusion.sum().item()
    if total == 0:
        raise ValueError("no evaluation images could be read")
    per_class_total = confusion.sum(dim=1)
    diag = confusion.diagonal()
    per_class = {
        name: (diag[i] / per_class_total[i]).item()
        for i, name in enumerate(label_names) if per_class_total[i] > 0
    }
    return {
        "eval_loss": loss_sum / total,
        "eval_accuracy": diag.sum().item() / total,
        "eval_top5_accuracy": top5_correct / total,
        "eval_samples": int(total),
        "per_class_accuracy": per_class,
    }
