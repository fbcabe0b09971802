"""What a run leaves besides the model: pictures, a model card, run.json, and optional TensorBoard logs.

Everything here reads what the training loop already wrote (metrics.jsonl, eval_results.json, the
confusion matrix) and is called by rank 0 only. matplotlib and tensorboard are optional extras:
without matplotlib the pictures are skipped with one line on stderr; asking for TensorBoard without
it fails before training starts, not hours later.
"""

from __future__ import annotations

import io
import json
import math
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from vitfood.checkpoint import METRICS
from vitfood.errors import VitfoodError, first_line
from vitfood.fileio import atomic_write_bytes

TRAINING_CURVES = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_JSON = "confusion_matrix.json"
RUN_JSON = "run.json"
MODEL_CARD = "README.md"
TENSORBOARD_DIR = "runs"

# ---------------------------------------------------------------- pictures (matplotlib, optional)


def _figure_class():
    """matplotlib's Figure, or None when matplotlib is not installed.

    The object API (Figure + savefig) renders with Agg without pyplot: no backend is switched and no
    global figure registry is touched, so a user's interactive session (a notebook calling train())
    is left exactly as it was.
    """
    try:
        import matplotlib.figure
    except ImportError:
        return None
    return matplotlib.figure.Figure


def _say_no_matplotlib(names: list[str]) -> None:
    print(f"vitfood: matplotlib is not installed (pip install 'vitfood[plots]'); skipped {', '.join(names)}",
          file=sys.stderr, flush=True)


def _save_png(fig, out_png: Path) -> None:
    """Render in memory, then temp file + rename: a reader never sees half a PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(Path(out_png), buf.getvalue())


def read_metrics(metrics_path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) from metrics.jsonl, each sorted by step, the last one per step kept.

    A line cut short by a killed run is skipped rather than failing the whole report.
    """
    train, evals = {}, {}
    path = Path(metrics_path)
    if not path.is_file():
        return [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        if record.get("type") == "train":
            train[record["step"]] = record
        elif record.get("type") == "eval":
            evals[record["step"]] = record
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _series(records: list[dict], key: str) -> tuple[list, list]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_training_curves(metrics_path, out_png, best_step: int | None = None) -> bool:
    """training_curves.png: loss, learning rate and evaluation accuracy against optimizer steps.

    Three panels sharing the x axis, so a loss spike can be read against the learning rate at that
    step. The evaluation loss sits beside the training loss (overfitting shows as the two diverging).
    Returns False, without raising, when matplotlib is missing or the log holds nothing to plot.
    """
    Figure = _figure_class()
    if Figure is None:
        _say_no_matplotlib([Path(out_png).name])
        return False
    train, evals = read_metrics(Path(metrics_path))
    if not train and not evals:
        return False

    fig = Figure(figsize=(8, 9))
    ax_loss, ax_lr, ax_acc = fig.subplots(3, 1, sharex=True)
    ax_loss.plot(*_series(train, "loss"), label="training loss", color="tab:blue")
    ax_loss.plot(*_series(evals, "eval_loss"), "o-", label="evaluation loss", color="tab:orange")
    ax_loss.set_ylabel("cross-entropy")
    ax_lr.plot(*_series(train, "learning_rate"), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_acc.plot(*_series(evals, "eval_accuracy"), "o-", label="accuracy", color="tab:red")
    ax_acc.plot(*_series(evals, "eval_top5_accuracy"), "s--", label="top-5 accuracy", color="tab:purple")
    ax_acc.set_ylabel("evaluation")
    ax_acc.set_xlabel("optimizer step")
    if best_step is not None:
        ax_acc.axvline(best_step, color="grey", linestyle=":", label=f"best (step {best_step})")
    for ax in (ax_loss, ax_lr, ax_acc):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0] and ax is not ax_lr:
            ax.legend(loc="best", fontsize="small")
    fig.suptitle("Training curves")
    _save_png(fig, Path(out_png))
    return True


def _as_array(confusion):
    """A KxK int64 NumPy array from a list of lists, an array, or a tensor (also on the GPU)."""
    import numpy as np

    if hasattr(confusion, "detach"):
        confusion = confusion.detach().cpu().numpy()
    return np.asarray(confusion, dtype=np.int64)


def top_confused(confusion, k: int) -> list[int]:
    """Indices of the k classes involved in the most errors, as the true or the predicted class.

    With 101 classes a full matrix is an unreadable carpet; the errors concentrate on a few
    look-alike dishes, and those are the rows worth reading. Returned in label order.
    """
    import numpy as np

    m = _as_array(confusion)
    off = m - np.diag(np.diag(m))
    mass = off.sum(axis=0) + off.sum(axis=1)
    order = sorted(range(len(m)), key=lambda i: (-mass[i], i))  # ties: the earlier label
    return sorted(order[:k])


def plot_confusion_matrix(confusion, label_names, out_png, max_classes: int = 20, title: str = "") -> bool:
    """confusion_matrix.png: rows are the true class, colours the fraction of that class's images.

    Rows are normalised over all of the class's images (also those predicted as a class not shown),
    so a colour reads "x% of the true class went there" whatever the class sizes. Counts are written
    in the cells while they stay legible. Above `max_classes` classes only the most confused ones are
    shown, and the title says so.
    """
    import numpy as np

    Figure = _figure_class()
    if Figure is None:
        _say_no_matplotlib([Path(out_png).name])
        return False
    m = _as_array(confusion)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(label_names):
        raise ValueError(f"confusion matrix of shape {m.shape} does not match {len(label_names)} labels")
    k = len(label_names)
    shown = top_confused(m, max_classes) if k > max_classes else list(range(k))
    n = len(shown)
    rate = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    sub, sub_rate = m[np.ix_(shown, shown)], rate[np.ix_(shown, shown)]
    names = [str(label_names[i]) for i in shown]

    side = max(5.0, 0.42 * n + 2.5)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    image = ax.imshow(sub_rate, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n), names, rotation=90, fontsize=8 if n > 12 else 10)
    ax.set_yticks(range(n), names, fontsize=8 if n > 12 else 10)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if sub[i, j]:
                    ax.text(j, i, str(sub[i, j]), ha="center", va="center", fontsize=7 if n > 12 else 9,
                            color="white" if sub_rate[i, j] > 0.5 else "black")
    heading = title or "Confusion matrix"
    if n < k:
        heading += f"\nthe {n} of {k} classes involved in the most confusions"
    ax.set_title(heading)
    _save_png(fig, Path(out_png))
    return True


def save_confusion(path, confusion, labels) -> None:
    """confusion_matrix.json: {"labels": [...], "confusion": [[...], ...]}, rows true, columns predicted.

    Kept apart from eval_results.json (101 x 101 counts would bury its few numbers, and they would be
    copied into every metrics.jsonl record); one row per line so it stays diffable and readable.
    """
    rows = [[int(v) for v in row] for row in (confusion.tolist() if hasattr(confusion, "tolist") else confusion)]
    if len(rows) != len(labels) or any(len(r) != len(labels) for r in rows):
        raise ValueError(f"confusion matrix must be {len(labels)} x {len(labels)}")
    text = ('{\n  "labels": ' + json.dumps(list(labels)) + ',\n  "confusion": [\n    '
            + ",\n    ".join(json.dumps(r) for r in rows) + "\n  ]\n}\n")
    atomic_write_bytes(Path(path), text.encode())


def load_confusion(path) -> tuple[list[list[int]], list[str]]:
    """(confusion, labels) as written by save_confusion."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return data["confusion"], data["labels"]


def write_report(out_dir, results: dict | None, confusion, label_names) -> list[str]:
    """The pictures of a finished run (after training, and after --eval-only); returns the paths written.

    `confusion` may be None: the one saved in out_dir/confusion_matrix.json is used, if any. Without
    matplotlib this prints one line and writes nothing: a missing extra never fails a finished run.
    """
    out_dir = Path(out_dir)
    curves, matrix = out_dir / TRAINING_CURVES, out_dir / CONFUSION_PNG
    if _figure_class() is None:
        _say_no_matplotlib([curves.name, matrix.name])
        return []
    if confusion is None and (out_dir / CONFUSION_JSON).is_file():
        confusion, label_names = load_confusion(out_dir / CONFUSION_JSON)
    results = results or {}
    written = []
    if plot_training_curves(out_dir / METRICS, curves, best_step=results.get("step")):
        written.append(str(curves))
    if confusion is not None:
        title = "Confusion matrix"
        if isinstance(results.get("eval_accuracy"), (int, float)):
            title += f" (accuracy {results['eval_accuracy']:.4f}"
            title += f", epoch {results['epoch']})" if "epoch" in results else ")"
        plot_confusion_matrix(confusion, label_names, matrix, title=title)
        written.append(str(matrix))
    return written


# ---------------------------------------------------------------- the model card (README.md)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
# Settings that change nothing about the model; run.json keeps them all.
_NOT_HYPERPARAMETERS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps",
                        "save_steps", "save_total_limit", "num_workers", "decode_cache", "eval_only", "report_to",
                        "push_to_hub", "hub_model_id", "device", "max_bad_fraction", "skip_nonfinite")


def is_hub_id(name: str) -> bool:
    """'ethz/food101' is a Hub id; an existing folder, or anything that looks like a path, is not."""
    return bool(name) and not Path(name).expanduser().exists() and not name.startswith((".", "/", "~")) \
        and bool(_HUB_ID.match(name))


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
               repo_id: str | None = None, files: list[str] | tuple = ()) -> str:
    """README.md for the output folder: Hub metadata (YAML front matter) and a human description.

    The metadata makes the Hub show the task widget and the accuracy on the model page; `datasets`
    and `base_model` are set only for Hub ids (a local path there would be a broken link and leaks
    the trainer's disk layout). `repo_id` names the model in the usage snippet (else the output
    folder); `files` (e.g. write_report's pictures) are linked from the card.
    """
    import yaml

    name = repo_id.split("/")[-1] if repo_id else Path(config.get("output_dir") or "vitfood-model").name
    where = repo_id or config.get("output_dir") or "vitfood-output"
    hub_dataset, hub_base = is_hub_id(dataset), is_hub_id(base_model)
    path = Path(dataset).expanduser()
    dataset_type = dataset if hub_dataset else (
        path.name if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file() else "imagefolder")
    accuracy = results.get("eval_accuracy")

    meta = {"library_name": "transformers", "pipeline_tag": "image-classification",
            "tags": ["vitfood", "image-classification", "vision"]}
    if hub_dataset:
        meta["datasets"] = [dataset]
    if hub_base:
        meta["base_model"] = base_model
    meta["metrics"] = ["accuracy"]
    if isinstance(accuracy, (int, float)):
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"name": dataset if hub_dataset else path.name, "type": dataset_type,
                        "split": _eval_split(config, hub_dataset)},
            "metrics": [{"type": "accuracy", "value": round(float(accuracy), 4), "name": "Accuracy"}]}]}]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)

    base_md = f"[{base_model}](https://huggingface.co/{base_model})" if hub_base else f"`{Path(base_model).name}`"
    data_md = f"[{dataset}](https://huggingface.co/datasets/{dataset})" if hub_dataset else f"the local dataset `{path.name}`"
    shown = ", ".join(f"`{n}`" for n in list(label_names)[:8])
    more = f", ... ({len(label_names)} in total; all in `config.json`'s `id2label`)" if len(label_names) > 8 else ""
    lines = [
        "---", front.rstrip(), "---", "",
        f"# {name}", "",
        f"A Vision Transformer (ViT) image classifier: {base_md} fine-tuned on {data_md} with "
        "vitfood's hand-written PyTorch training loop (no `Trainer`). "
        f"It sorts an image into one of {len(label_names)} classes: {shown}{more}.", "",
        "## Evaluation results", "",
        "Evaluated on " + (f"{results['eval_samples']} images of " if "eval_samples" in results else "")
        + f"{data_md} (split: {_eval_split(config, hub_dataset)})"
        + (f"; the model of epoch {results['epoch']} (optimizer step {results.get('step')}), the best of the run."
           if "epoch" in results else "."), "",
        "| metric | value |", "|---|---|",
    ]
    for key, label in (("eval_accuracy", "accuracy"), ("eval_top5_accuracy", "top-5 accuracy"),
                       ("eval_loss", "loss (cross-entropy)")):
        if isinstance(results.get(key), (int, float)):
            lines.append(f"| {label} | {results[key]:.4f} |")
    per_class = results.get("per_class_accuracy") or {}
    if per_class:
        worst = sorted(per_class.items(), key=lambda kv: (kv[1], kv[0]))[:10]
        lines += ["", f"The {len(worst)} classes with the lowest accuracy:", "", "| class | accuracy |", "|---|---|"]
        lines += [f"| {str(cls).replace('|', '/')} | {acc:.4f} |" for cls, acc in worst]
    if files:
        lines += ["", "Also in this repository: " + ", ".join(f"[{Path(f).name}]({Path(f).name})" for f in files) + "."]

    lines += ["", "## Training", "", "Hyper-parameters (`run.json` holds the full configuration and the versions):", "",
              "| setting | value |", "|---|---|"]
    for key, value in config.items():
        if key in ("dataset", "model") and isinstance(value, str) and not is_hub_id(value):
            value = Path(value).name  # a local folder: its name, not the trainer's disk layout
        if key not in _NOT_HYPERPARAMETERS:
            lines.append(f"| {key} | {_md(value)} |")
    if config.get("batch_size") and config.get("grad_accum_steps"):
        lines += ["", f"Each optimizer step sees {config['batch_size']} x {config['grad_accum_steps']} images per "
                  "device (batch size x gradient accumulation); AdamW, linear warmup then linear decay."]

    lines += ["", "## Usage", "", "With transformers:", "", "```python", "from transformers import pipeline", "",
              f'classifier = pipeline("image-classification", model="{where}")',
              'print(classifier("photo.jpg"))', "```", "",
              "With vitfood (no transformers needed at inference):", "", "```bash",
              f"python infer.py --model {where} photo.jpg", "```", "", "```python", "from vitfood import classify", "",
              f'print(classify("photo.jpg", model_dir="{where}"))', "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- run.json: what produced this model

_VERSIONED = ("torch", "torchvision", "transformers", "datasets", "numpy", "Pillow", "safetensors", "tqdm",
              "huggingface_hub", "matplotlib", "tensorboard", "vitfood")


def package_versions() -> dict:
    """Installed versions, read from package metadata: nothing is imported, None when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def git_state(path: Path | None = None) -> dict | None:
    """{"commit", "dirty"} of the git checkout holding vitfood's source, or None.

    None when git is missing, slow, or the source is not tracked by the repository around it (a
    site-packages copy inside some other project's virtualenv must not report that project's commit).
    """
    src = Path(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if commit is None:
        return None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def device_description(device) -> str:
    """'cuda:0 NVIDIA H100 80GB HBM3' or 'cpu (16 cores)': the hardware that produced the numbers."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    if device.type == "cpu":
        from vitfood.distributed import usable_cores

        return f"cpu ({usable_cores()} cores)"
    return str(device)


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def run_record(config: dict, started: float, ended: float | None, device: str) -> dict:
    """run.json: enough to reproduce or audit a run. Written at the start (ended None) and at the end.

    `started`/`ended` are time.time() values; written as ISO 8601 UTC.
    """
    return {
        "command": list(sys.argv),
        "config": config,
        "started": _iso(started),
        "ended": _iso(ended),
        "duration_s": None if ended is None else round(ended - started, 1),
        "device": device,
        "platform": platform.platform(),
        "versions": package_versions(),
        "git": git_state(),
    }


# ---------------------------------------------------------------- TensorBoard (optional)


def summary_writer_class():
    """torch's SummaryWriter, or a one-line VitfoodError: call it before training to fail early."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise VitfoodError("--report-to tensorboard needs the tensorboard package: "
                           "pip install 'vitfood[tensorboard]'") from None
    except Exception as e:  # e.g. a protobuf that this tensorboard does not accept
        raise VitfoodError(f"--report-to tensorboard: cannot load tensorboard ({first_line(e)})") from None
    return SummaryWriter


class TensorBoardLog:
    """The scalars of metrics.jsonl, also as TensorBoard events in out_dir/runs/ (the Hub's metrics tab).

    Same interface as checkpoint.MetricsLog (write a record, close), so the loop hands each record to
    both. Construct it before training: without the tensorboard package this raises a one-line
    VitfoodError. On resume pass the checkpoint's step: TensorBoard then hides the killed run's events
    after it, as truncate_metrics does for metrics.jsonl.
    """

    def __init__(self, out_dir, resume_step: int = 0):
        SummaryWriter = summary_writer_class()
        self.log_dir = Path(out_dir) / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        """{"type": "eval", "step": 30, "eval_accuracy": 0.9} -> eval/accuracy = 0.9 at step 30."""
        kind, step = record.get("type", "train"), record["step"]
        for key, value in record.items():
            if key in ("type", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"{kind}/{key.removeprefix(kind + '_')}", value, step)
        if kind == "eval":
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
