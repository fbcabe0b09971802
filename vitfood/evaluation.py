"""Evaluation: the metrics over a whole evaluation set, and `train.py --eval-only`."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from vitfood import checkpoint, data, distributed, metrics, report
from vitfood.config import TrainConfig
from vitfood.distributed import resolve_num_workers
from vitfood.distributed import Dist, all_reduce_sum, autocast
from vitfood.errors import VitfoodError
from vitfood.hub import resolve_model_dir
from vitfood.model import load_model
from vitfood.preprocess import load_preprocessing


@torch.no_grad()
def evaluate(net, loader, prep, device, precision, label_names, d: Dist, bad: data.BadImages,
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
        pixels = prep.normalize(batch.pixels.to(device, non_blocking=True))
        labels = batch.labels.to(device, non_blocking=True)
        if label_map is not None:
            labels = label_map[labels]
        with autocast(device, precision):
            logits = net(pixels)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        metrics.update_confusion(confusion, logits, labels)
        top5 += metrics.topk_correct(logits, labels, 5)
    for t in (confusion, loss_sum, top5):
        all_reduce_sum(t, d)
    try:
        return metrics.summarize(confusion, loss_sum.item(), int(top5.item()), label_names), confusion.cpu()
    except ValueError:
        raise VitfoodError("no evaluation image could be read; see bad_images.txt in the output folder") from None


def label_map_for(dataset_labels: list[str], model_labels: list[str], dataset: str, model: str) -> torch.Tensor:
    """Dataset class index -> the trained model's class index, matched by name."""
    unknown = [name for name in dataset_labels if name not in model_labels]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise VitfoodError(f"--dataset {dataset}: class(es) {shown} are not among the {len(model_labels)} "
                           f"labels of --model {model}")
    return torch.tensor([model_labels.index(name) for name in dataset_labels], dtype=torch.int64)


def evaluate_only(cfg: TrainConfig) -> dict:
    """`train.py --eval-only`: the trained model `cfg.model` on the evaluation images of `cfg.dataset`.

    The evaluation images are those training would hold out (the same seeded split), or
    --eval-split. Writes eval_results.json, confusion_matrix.json/.png and run.json to --output-dir;
    the model there, if any, is left untouched.
    """
    cfg.validate()
    started = time.time()
    d, device, precision = distributed.setup(cfg.device, cfg.precision)
    out_dir = Path(cfg.output_dir)
    if d.is_main:
        checkpoint.prepare_report_dir(out_dir)
    model_dir = resolve_model_dir(cfg.model)
    model, _ = load_model(model_dir)  # the checkpoint's own trained head
    prep = load_preprocessing(model_dir, model.arch.image_size)
    splits = data.load_splits(cfg.dataset, cfg.train_split, cfg.eval_split, cfg.max_train_samples,
                              cfg.max_eval_samples, cfg.test_size, cfg.seed)
    label_map = label_map_for(splits.label_names, model.arch.labels, cfg.dataset, cfg.model)
    workers = resolve_num_workers(cfg.num_workers, device.type)
    loader = data.make_loader(data.EvalImages(splits.eval, prep),
                              data.EvalBatchSampler(len(splits.eval), cfg.eval_batch_size, d.rank, d.world),
                              prep, workers, device.type == "cuda", cfg.seed)
    model.to(device)
    bad = data.BadImages(len(splits.eval), cfg.max_bad_fraction)
    try:
        results, confusion = evaluate(model, loader, prep, device, precision, model.arch.labels, d, bad, label_map)
    finally:
        if d.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        if d.is_main and bad.found:  # also when too many of them stopped the evaluation
            checkpoint.atomic_write_bytes(out_dir / checkpoint.BAD_IMAGES, bad.lines().encode())
    if d.is_main:
        checkpoint.write_json(out_dir / checkpoint.EVAL_RESULTS, {**results, "model": str(cfg.model),
                                                                  "dataset": str(cfg.dataset)})
        report.save_confusion(out_dir / report.CONFUSION_JSON, confusion, model.arch.labels)
        report.write_report(out_dir, results, confusion, model.arch.labels)
        resolved = {**asdict(cfg), "num_workers": workers, "precision": precision, "device": str(device)}
        checkpoint.write_json(out_dir / report.RUN_JSON, report.run_record(
            resolved, started, time.time(), report.device_description(device)))
        print(f"vitfood: eval_accuracy {results['eval_accuracy']:.4f}, top-5 {results['eval_top5_accuracy']:.4f} "
              f"on {results['eval_samples']} images; report in {out_dir}", file=sys.stderr)
    return results
