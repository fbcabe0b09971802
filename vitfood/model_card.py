"""The model card: README.md in the output folder, with the Hub's metadata and a human description.

Its hyper-parameter table lists the TrainConfig fields whose metadata marks them `card=True`
(config.py), plus the images actually used; run.json keeps every setting.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vitfood.config import is_hyperparameter
from vitfood.hub import looks_like_hub_id

MODEL_CARD = "README.md"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


def is_hub_id(name: str) -> bool:
    """'ethz/food101' is a Hub id; an existing folder, or anything that looks like a path, is not."""
    return bool(name) and looks_like_hub_id(name) and bool(_HUB_ID.match(name))


def _md(value) -> str:
    """A value in a markdown table cell."""
    text = "none" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _eval_split(config: dict, hub_dataset: bool) -> str:
    """The evaluation images in a few words: a split, or the share held out of the training images.

    `train[:5000]` only for Hub datasets, which take the first rows; a folder takes a seeded sample.
    """
    if config.get("eval_split"):
        return str(config["eval_split"])
    n = config.get("max_train_samples")
    rows = f"[:{n}]" if n and hub_dataset else ""
    return f"{config.get('train_split', 'train')}{rows}, {config.get('test_size', 0.2):.0%} held out (seed {config.get('seed')})"


def model_card(config: dict, results: dict, label_names, base_model: str, dataset: str,
               repo_id: str | None = None, files: list[str] | tuple = (), warning: str | None = None,
               model_name: str = "Vision Transformer (ViT)") -> str:
    """README.md for the output folder: Hub metadata (YAML front matter) and a human description.

    The metadata makes the Hub show the task widget and the accuracy on the model page; `datasets`
    and `base_model` are set only for Hub ids (a local path there would be a broken link and leaks
    the trainer's disk layout). `repo_id` names the model in the usage snippet (else the output
    folder); `files` (e.g. write_report's pictures) are linked from the card; `warning` (e.g. that the
    model learned nothing) comes first, before the results. `model_name`: the model's family, for people
    (`ImageClassifier.display_name`).
    """
    name = repo_id.split("/")[-1] if repo_id else Path(config.get("output_dir") or "vitfood-model").name
    hub_dataset, hub_base = is_hub_id(dataset), is_hub_id(base_model)
    split = _eval_split(config, hub_dataset)
    base_md = f"[{base_model}](https://huggingface.co/{base_model})" if hub_base else f"`{Path(base_model).name}`"
    data_md = (f"[{dataset}](https://huggingface.co/datasets/{dataset})" if hub_dataset
               else f"the local dataset `{Path(dataset).expanduser().name}`")
    shown = ", ".join(f"`{n}`" for n in list(label_names)[:8])
    more = f", ... ({len(label_names)} in total; all in `config.json`'s `id2label`)" if len(label_names) > 8 else ""
    lines = [
        "---", _front_matter(name, results, base_model, dataset, split).rstrip(), "---", "",
        f"# {name}", "",
        f"A {model_name} image classifier: {base_md} fine-tuned on {data_md} with "
        "vitfood's hand-written PyTorch training loop (no `Trainer`). "
        f"It sorts an image into one of {len(label_names)} classes: {shown}{more}.", "",
        *([f"> **Warning:** {warning}", ""] if warning else []),
        *_results_section(results, f"{data_md} (split: {split})", files, len(label_names),
                          config.get("metric_for_best_model") or "accuracy"),
        *_training_section(config),
        *_usage_section(repo_id or config.get("output_dir") or "vitfood-output", config.get("model_type", "vit")),
    ]
    return "\n".join(lines)


def _front_matter(name: str, results: dict, base_model: str, dataset: str, split: str) -> str:
    import yaml

    meta = {"library_name": "transformers", "pipeline_tag": "image-classification",
            "tags": ["vitfood", "image-classification", "vision"]}
    path = Path(dataset).expanduser()
    if is_hub_id(dataset):
        meta["datasets"] = [dataset]
    if is_hub_id(base_model):
        meta["base_model"] = base_model
    meta["metrics"] = ["accuracy"]
    accuracy = results.get("eval_accuracy")
    if isinstance(accuracy, (int, float)):
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        dataset_type = dataset if is_hub_id(dataset) else path.name if saved else "imagefolder"
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"name": dataset if is_hub_id(dataset) else path.name, "type": dataset_type, "split": split},
            "metrics": [{"type": "accuracy", "value": round(float(accuracy), 4), "name": "Accuracy"}]}]}]
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)


WORST_SHOWN = 10  # classes listed by accuracy, lowest first; with no more classes than this, all are listed


def _results_section(results: dict, evaluated_on: str, files, num_classes: int, metric: str = "accuracy") -> list[str]:
    """The metrics table and the classes' accuracies. Top-5 accuracy only with more than 5 classes (with 5 or
    fewer it is 1 by definition); "the N lowest" only when there are more classes than N."""
    chosen = "" if metric == "accuracy" else f" by eval_{metric}"
    lines = ["## Evaluation results", "",
             "Evaluated on " + (f"{results['eval_samples']} images of " if "eval_samples" in results else "")
             + evaluated_on
             + (f"; the model of epoch {results['epoch']} (optimizer step {results.get('step')}), the best of the "
                f"run{chosen}." if "epoch" in results else "."), "",
             "| metric | value |", "|---|---|"]
    for key, label in (("eval_accuracy", "accuracy"), ("eval_top5_accuracy", "top-5 accuracy"),
                       ("eval_loss", "loss (cross-entropy)")):
        if key == "eval_top5_accuracy" and num_classes <= 5:
            continue
        if isinstance(results.get(key), (int, float)):
            lines.append(f"| {label} | {results[key]:.4f} |")
    per_class = results.get("per_class_accuracy") or {}
    if per_class:
        ranked = sorted(per_class.items(), key=lambda kv: (kv[1], kv[0]))
        if len(ranked) > WORST_SHOWN:
            title = f"The {WORST_SHOWN} classes with the lowest accuracy:"
        else:
            title = "Accuracy of each evaluated class, lowest first:"
        lines += ["", title, "", "| class | accuracy |", "|---|---|"]
        lines += [f"| {str(cls).replace('|', '/')} | {acc:.4f} |" for cls, acc in ranked[:WORST_SHOWN]]
    if files:
        lines += ["", "Also in this repository: " + ", ".join(f"[{Path(f).name}]({Path(f).name})" for f in files) + "."]
    return lines


def _training_section(config: dict) -> list[str]:
    lines = ["", "## Training", "", "Hyper-parameters (`run.json` holds the full configuration and the versions):", "",
             "| setting | value |", "|---|---|"]
    for key, value in config.items():
        if key in ("dataset", "model") and isinstance(value, str) and not is_hub_id(value):
            value = Path(value).name  # a local folder: its name, not the trainer's disk layout
        if is_hyperparameter(key):
            lines.append(f"| {key} | {_md(value)} |")
    if config.get("batch_size") and config.get("grad_accum_steps"):
        lines += ["", f"Each optimizer step sees {config['batch_size']} x {config['grad_accum_steps']} images per "
                  "device (batch size x gradient accumulation); AdamW, linear warmup then linear decay."]
    return lines


def _usage_section(where: str, model_type: str = "vit") -> list[str]:
    return ["", "## Usage", "", "With transformers:", "", "```python", "from transformers import pipeline", "",
            f'classifier = pipeline("image-classification", model="{where}")',
            'print(classifier("photo.jpg"))', "```", "",
            "With vitfood" + (" (no transformers needed at inference):" if model_type == "vit" else ":"), "", "```bash",
            f"python infer.py --model {where} photo.jpg", "```", "", "```python", "from vitfood import classify", "",
            f'print(classify("photo.jpg", model_dir="{where}"))', "```", ""]
