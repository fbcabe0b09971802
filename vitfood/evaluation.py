"""Evaluation: the metrics over a whole evaluation set (accuracy, top-5, loss, confusion matrix), and
what they say about a run. The metrics are pure functions, tested without a model."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitfood import data
from vitfood.config import BEST_MODEL_METRICS
from vitfood.distributed import Dist, all_reduce_sum, autocast
from vitfood.errors import VitfoodError, first_line


@dataclass
class EvalPasses:
    """Images per forward pass of evaluation: the loader's batch (--eval-batch-size, resolved) until the GPU runs
    out of memory, then half as many, for the rest of the run (later evaluations would only run out again)."""

    size: int
    retry_oom: bool  # whether an out-of-memory halves them (execution.eval_oom_retry_allowed)
    say: Callable[[str], None]


@torch.no_grad()
def evaluate(net, loader, prep, device, precision, label_names, d: Dist, bad: data.BadImages, passes: EvalPasses,
             label_map: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """(results, confusion) over the whole evaluation set, each image counted once across ranks.

    `label_map[dataset label] = model label` when the dataset numbers its classes differently.
    """
    net.eval()
    k = len(label_names)
    confusion = torch.zeros((k, k), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    if label_map is not None:
        label_map = label_map.to(device)
    for batch in loader:
        bad.add(batch.bad)
        pixels = batch.pixels.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        if label_map is not None:
            labels = label_map[labels]
        logits = batch_logits(net, pixels, prep, device, precision, passes)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        update_confusion(confusion, logits, labels)
        top5 += topk_correct(logits, labels, 5)
    for t in (confusion, loss_sum, top5):
        all_reduce_sum(t, d)
    try:
        return summarize(confusion, loss_sum.item(), int(top5.item()), label_names), confusion.cpu()
    except ValueError:
        raise VitfoodError("no evaluation image could be read; see bad_images.txt in the output folder") from None


def batch_logits(net, pixels: torch.Tensor, prep, device, precision, passes: EvalPasses) -> torch.Tensor:
    """A batch's logits (float32), `passes.size` images per forward pass. An image's logits do not depend on
    the other images of its pass (beyond float rounding where kernels change with the pass's size), and the
    metrics are sums and counts over images: the same whatever the passes. On a GPU an out-of-memory halves
    the passes and redoes the batch: the run goes on."""
    while True:
        try:
            return torch.cat([forward(net, part, prep, device, precision) for part in pixels.split(passes.size)])
        except torch.cuda.OutOfMemoryError as e:
            if not passes.retry_oom or passes.size == 1:
                raise VitfoodError(eval_oom_message(passes, e)) from None
        # Out of the except clause: its traceback no longer holds the failed pass's activations.
        torch.cuda.empty_cache()
        passes.size //= 2
        passes.say(f"vitfood: out of GPU memory in evaluation: {passes.size} images per pass from now on")


def forward(net, pixels: torch.Tensor, prep, device, precision) -> torch.Tensor:
    with autocast(device, precision):
        return net(prep.normalize(pixels)).float()


def eval_oom_message(passes: EvalPasses, e: BaseException) -> str:
    if passes.size == 1:
        return (f"out of GPU memory in evaluation even at 1 image per pass ({first_line(e, 120)}): the model, its "
                "training state or other processes fill the GPU; a smaller --eval-batch-size cannot help")
    return (f"out of memory in evaluation at {passes.size} images per pass ({first_line(e, 120)}); "
            "use a smaller --eval-batch-size")


def label_map_for(dataset_labels: list[str], model_labels: list[str], dataset: str, model: str) -> torch.Tensor:
    """Dataset class index -> the trained model's class index, matched by name."""
    unknown = [name for name in dataset_labels if name not in model_labels]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise VitfoodError(f"--dataset {dataset}: class(es) {shown} are not among the {len(model_labels)} "
                           f"labels of --model {model}")
    return torch.tensor([model_labels.index(name) for name in dataset_labels], dtype=torch.int64)


# ---------------------------------------------------------------- metrics: pure functions

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


def improves(results: dict, best: dict | None, metric: str) -> bool:
    """Whether an evaluation's `results` replace `best` under --metric-for-best-model `metric` (accuracy,
    loss or top5_accuracy; loss: lower is better). Only a strictly better value replaces: a tie keeps the
    earlier epoch, as the Trainer (`np.greater` / `np.less`). A NaN is never better, and anything beats one."""
    if best is None:
        return True
    key = f"eval_{metric}"
    new, old = float(results[key]), float(best.get(key, math.nan))
    if math.isnan(old):
        return not math.isnan(new)
    return new > old if BEST_MODEL_METRICS[metric] else new < old


def learning_verdict(confusion, accuracy: float, learning_rate: float) -> str | None:
    """Why a run's best model looks like it learned nothing, or None when it learned something.

    Two signs, read from the best epoch's confusion matrix (rows true, columns predicted): accuracy no
    better than always answering the most frequent class, or one class taking almost every prediction.
    """
    rows = [[int(v) for v in row] for row in (confusion.tolist() if hasattr(confusion, "tolist") else confusion)]
    total = sum(map(sum, rows))
    if total == 0 or len(rows) < 2:
        return None
    majority = max(map(sum, rows)) / total
    predicted = [sum(col) for col in zip(*rows)]
    top = max(range(len(rows)), key=lambda i: predicted[i])
    if accuracy <= majority + 1e-9:
        sign = (f"the best accuracy ({accuracy:.4f}) is no better than always predicting the most frequent class "
                f"({majority:.4f})")
    elif len(rows) > 2 and predicted[top] >= 0.9 * total:
        sign = f"{predicted[top] / total:.0%} of the evaluation images were predicted as one class"
    else:
        return None
    if learning_rate == 0:
        causes = "--learning-rate 0 keeps the weights as they were loaded"
    else:
        causes = (f"too few optimizer steps (more --epochs, or fewer images per step: --grad-accum-steps, "
                  f"--batch-size); or the learning rate, {learning_rate:g}: the guide's 5e-5 suits fine-tuning a "
                  "pretrained ViT, a randomly initialised or tiny model needs about 1e-3")
    return (f"this model did not learn: {sign}. Likely causes: {causes}; see README.md, 'Small datasets and "
            "learning rates'")
