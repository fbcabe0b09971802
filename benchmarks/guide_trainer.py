"""The Hugging Face image-classification guide's PyTorch script, on a local folder and checkpoint.

As the guide wrote it (its `TrainingArguments`, transforms, collator and metric), with what a
machine without network needs: `imagefolder` instead of the Hub's food101, a local checkpoint,
no push_to_hub, and accuracy computed with NumPy (the guide's `evaluate.load("accuracy")`
downloads its script). `--tuned` adds what the Trainer's own flags offer for speed: bf16 (on a
GPU), DataLoader workers with pinned memory and persistent workers, and torch_compile.

The steady training rate is measured by a callback from optimizer step to optimizer step, leaving
out the steps that contain an evaluation or a save; the line `GUIDE_RESULT {json}` reports it.

    python benchmarks/guide_trainer.py --data DIR --model DIR --output-dir OUT [--tuned --workers 16]

`--data-backend torch` reads the folder with a plain torch Dataset (same transforms, same split
sizes) for machines without the `datasets` package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's vitfood, installed or not (the GPU machine)
from vitfood.distributed import native_bf16  # noqa: E402  (bf16 only where the GPU computes it natively)


def load_food(data: str, backend: str, seed: int):
    """(train, eval, labels): the guide's 80/20 `train_test_split` of the folder."""
    if backend == "datasets":
        from datasets import load_dataset

        food = load_dataset("imagefolder", data_dir=data, split="train")
        food = food.train_test_split(test_size=0.2, seed=seed)
        return food["train"], food["test"], food["train"].features["label"].names
    from vitfood.data import scan_folder  # only the file listing; the pixels go through the guide's transforms

    records = scan_folder(Path(data))
    perm = np.random.default_rng(seed).permutation(len(records))
    n_eval = int(np.ceil(0.2 * len(records)))
    return (FolderSplit(records, perm[n_eval:]), FolderSplit(records, perm[:n_eval]), records.label_names)


class FolderSplit:
    """What `with_transform` gives the Trainer, for a plain torch Dataset: {"image", "label"} rows."""

    def __init__(self, records, indices):
        self.records, self.indices, self.transform = records, indices, None

    def with_transform(self, transform):
        self.transform = transform
        return self

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        from PIL import Image

        j = int(self.indices[i])
        row = {"image": [Image.open(self.records.paths[j])], "label": [int(self.records.labels[j])]}
        out = self.transform(row)
        return {k: v[0] for k, v in out.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum-steps", type=int, default=4)
    p.add_argument("--tuned", action="store_true", help="bf16 on a GPU, workers, pinned/persistent, torch_compile")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers with --tuned")
    p.add_argument("--no-compile", action="store_true", help="with --tuned: leave torch_compile off")
    p.add_argument("--data-backend", choices=["datasets", "torch"], default="datasets")
    args = p.parse_args()

    import torch
    from torchvision.transforms import Compose, Normalize, RandomResizedCrop, ToTensor
    from transformers import (AutoImageProcessor, AutoModelForImageClassification, DefaultDataCollator, Trainer,
                              TrainingArguments)

    train_ds, eval_ds, labels = load_food(args.data, args.data_backend, seed=42)
    label2id = {label: str(i) for i, label in enumerate(labels)}
    id2label = {str(i): label for i, label in enumerate(labels)}

    image_processor = AutoImageProcessor.from_pretrained(args.model)
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    size = (image_processor.size["shortest_edge"] if "shortest_edge" in image_processor.size
            else (image_processor.size["height"], image_processor.size["width"]))
    _transforms = Compose([RandomResizedCrop(size), ToTensor(), normalize])

    def transforms(examples):
        examples["pixel_values"] = [_transforms(img.convert("RGB")) for img in examples["image"]]
        del examples["image"]
        return examples

    train_ds, eval_ds = train_ds.with_transform(transforms), eval_ds.with_transform(transforms)  # as the guide: both

    def compute_metrics(eval_pred):
        predictions, references = eval_pred
        return {"accuracy": float((np.argmax(predictions, axis=1) == references).mean())}

    model = AutoModelForImageClassification.from_pretrained(args.model, num_labels=len(labels), id2label=id2label,
                                                            label2id=label2id)
    tuned = {}
    if args.tuned:
        tuned = dict(dataloader_num_workers=args.workers, dataloader_pin_memory=torch.cuda.is_available(),
                     dataloader_persistent_workers=args.workers > 0, torch_compile=not args.no_compile,
                     bf16=torch.cuda.is_available() and native_bf16())
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        remove_unused_columns=False,
        eval_strategy="epoch",
        save_strategy="epoch",
        learning_rate=5e-5,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum_steps,
        per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        **warmup_ratio(0.1),
        logging_steps=10,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        push_to_hub=False,
        report_to="none",
        **tuned,
    )
    clock = StepClock()
    trainer = Trainer(model=model, args=training_args, data_collator=DefaultDataCollator(), train_dataset=train_ds,
                      eval_dataset=eval_ds, processing_class=image_processor, compute_metrics=compute_metrics,
                      callbacks=[clock])
    out = trainer.train()
    images_per_step = args.batch_size * args.grad_accum_steps * max(1, training_args.world_size)
    result = {"steady_images_per_s": clock.steady_rate(images_per_step), "steps": out.global_step,
              "train_samples_per_second": out.metrics.get("train_samples_per_second"),
              "eval_accuracy": trainer.state.best_metric, "train_images": len(train_ds),
              "eval_s": clock.eval_s, "save_s": clock.save_s}
    print("GUIDE_RESULT " + json.dumps(result), flush=True)


def warmup_ratio(ratio: float) -> dict:
    """The guide's `warmup_ratio`; newer transformers take the ratio as a float `warmup_steps` instead."""
    import inspect

    from transformers import TrainingArguments

    if "warmup_ratio" in inspect.signature(TrainingArguments.__init__).parameters:
        return {"warmup_ratio": ratio}
    return {"warmup_steps": ratio}


class StepClock(TrainerCallback):
    """Times each optimizer step; a step interval that held an evaluation or a save is left out."""

    def __init__(self, skip_first: int = 2):
        self.times, self.dirty, self.skip_first = [], set(), skip_first
        self.eval_s, self.save_s = [], []  # each evaluation's and save's seconds (for projecting a part of a run)
        self.last = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())

    def on_epoch_end(self, args, state, control, **kwargs):
        self.last = time.perf_counter()  # the epoch's evaluation, then its save, follow

    def on_evaluate(self, args, state, control, **kwargs):
        self.dirty.add(len(self.times))  # the interval that ends at the next step
        self.eval_s.append(time.perf_counter() - max(self.last, self.times[-1] if self.times else 0.0))
        self.last = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self.dirty.add(len(self.times))
        self.save_s.append(time.perf_counter() - max(self.last, self.times[-1] if self.times else 0.0))
        self.last = time.perf_counter()

    def steady_rate(self, images_per_step: int) -> float | None:
        """Images over the median step time: a recompile (a short last batch) or a stall is one outlier,
        not a share of the total; vitfood's rate is the median of its logged steps likewise."""
        spans = [(self.times[k] - self.times[k - 1]) for k in range(1 + self.skip_first, len(self.times))
                 if k not in self.dirty]
        return images_per_step / statistics.median(spans) if spans else None


if __name__ == "__main__":
    main()
