"""The evaluation report: confusion_matrix.json and the pictures (training_curves.png, confusion_matrix.png).

Everything here reads what the run already wrote (metrics.jsonl, the confusion matrix) and is called
by rank 0 only. matplotlib is an optional extra: without it the pictures are skipped with one line
on stderr, and a finished run never fails for it.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

from vitfood.checkpoint import METRICS
from vitfood.fileio import atomic_write_bytes

TRAINING_CURVES = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_JSON = "confusion_matrix.json"

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
