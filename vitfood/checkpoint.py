"""The output folder: checked before training, the best model and resumable checkpoints written atomically."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from vitfood import fileio
from vitfood.errors import VitfoodError, first_line
from vitfood.fileio import atomic_write_bytes, fsync_dir, write_json
from vitfood.model import SAFETENSORS_NAME, ViT, save_model

EVAL_RESULTS = "eval_results.json"
METRICS = "metrics.jsonl"
BAD_IMAGES = "bad_images.txt"


def prepare_output_dir(out_dir: Path, overwrite: bool, resuming: bool = False) -> None:
    """Fail before the first step, not at the first save, when the folder is unusable.

    A folder that already holds a trained model is left alone unless --overwrite-output-dir:
    a second run must not silently replace the first one's result.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise VitfoodError(f"--output-dir {out_dir}: exists and is not a folder")
    if (out_dir / SAFETENSORS_NAME).exists() and not (overwrite or resuming):
        raise VitfoodError(f"--output-dir {out_dir}: already holds a trained model; "
                           "choose another folder or pass --overwrite-output-dir")
    if list_checkpoints(out_dir) and not resuming:
        if not overwrite:
            raise VitfoodError(f"--output-dir {out_dir}: holds checkpoints of an earlier run; continue it with "
                               "--resume-from-checkpoint, or start over with --overwrite-output-dir")
        # Starting over: the earlier run's checkpoints must not be mixed with this run's, nor resumed later.
        try:
            shutil.rmtree(out_dir / CHECKPOINTS)
        except OSError as e:
            raise VitfoodError(f"--output-dir {out_dir}: cannot remove the earlier run's checkpoints "
                               f"({e.strerror or e})") from None
    _make_writable_dir(out_dir)


def prepare_report_dir(out_dir: Path) -> None:
    """--eval-only's folder: its report must not replace a training run's own record and results."""
    if out_dir.exists() and not out_dir.is_dir():
        raise VitfoodError(f"--output-dir {out_dir}: exists and is not a folder")
    if (out_dir / SAFETENSORS_NAME).exists() or list_checkpoints(out_dir):
        raise VitfoodError(f"--output-dir {out_dir}: holds a training run (its model, results and run.json); "
                           "--eval-only writes its report to another folder: pass a new --output-dir")
    _make_writable_dir(out_dir)


def _make_writable_dir(out_dir: Path) -> None:
    """Prove the folder can be written, leaving no trace: folders made for the test are removed again
    (a run that then fails on its dataset or model leaves nothing behind); the run makes them anew."""
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise VitfoodError(f"--output-dir {out_dir}: cannot write there ({e.strerror or e})") from None
    for path in made:  # deepest first
        with contextlib.suppress(OSError):
            path.rmdir()


def save_best(out_dir: Path, model: ViT, base_config: dict, preprocessor: dict, results: dict) -> None:
    """The model in Hugging Face format, then the results that describe it."""
    try:
        save_model(model, out_dir, base_config, preprocessor)
        write_json(out_dir / EVAL_RESULTS, results)
    except OSError as e:
        raise VitfoodError(f"cannot save the model to {out_dir}: {e.strerror or e} "
                           "(the previously saved files are intact)") from None


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed at once so a killed run keeps its history."""

    def __init__(self, path: Path, append: bool = False):
        self.file = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------- training state, for exact resumption

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_CKPT_PREFIX = "step-"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(_CKPT_PREFIX):])


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A save in progress lives under a dot-name until it is renamed."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_CKPT_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=checkpoint_step)


def save_training_state(out_dir: Path, step: int, model_state: dict, optimizer_state: dict, rng_state: dict,
                        state: dict, keep: int, protect: set[int]) -> Path:
    """Everything needed to continue the run exactly, written whole or not at all.

    Files go into a temporary folder, each fsynced, and the folder is renamed to `step-N` last: a crash
    at any moment leaves either the complete new checkpoint or none, and the older ones untouched.
    Tensors go to safetensors, the optimizer and RNG states to `torch.save` files made only of tensors
    and plain containers, so that `torch.load(weights_only=True)` reads them back.
    """
    root = out_dir / CHECKPOINTS
    final = root / f"{_CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        fileio.fsync_write(tmp / "model.safetensors", save({k: v.detach().cpu().contiguous() for k, v in model_state.items()}))
        for name, obj in (("optimizer.pt", optimizer_state), ("rng_state.pt", rng_state)):
            buf = io.BytesIO()
            torch.save(obj, buf)
            fileio.fsync_write(tmp / name, buf.getvalue())
        fileio.fsync_write(tmp / STATE_FILE, (json.dumps(state, indent=1) + "\n").encode())
        fsync_dir(tmp)
        old = None
        if final.exists():  # the same step saved again (an epoch-end save after a --save-steps one)
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise VitfoodError(f"cannot save a checkpoint to {root}: {e.strerror or e} "
                           "(the previous checkpoints are intact)") from None
    prune_checkpoints(out_dir, keep, protect | {step})
    return final


def prune_checkpoints(out_dir: Path, keep: int, protect: set[int]) -> None:
    """Keep the `keep` newest checkpoints (0 = all); never remove the newest or a protected (best) one."""
    if keep <= 0:
        return
    ckpts = list_checkpoints(out_dir)
    removable = [p for p in ckpts[:-1] if checkpoint_step(p) not in protect]
    excess = len(ckpts) - keep
    for p in removable[:max(0, excess)]:
        shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(out_dir: Path, requested: str) -> Path:
    """`latest` -> the newest complete checkpoint in the output folder; otherwise the given folder."""
    if requested == "latest":
        ckpts = list_checkpoints(out_dir)
        if not ckpts:
            raise VitfoodError(f"--resume-from-checkpoint: no complete checkpoint in {out_dir / CHECKPOINTS}")
        return ckpts[-1]
    path = Path(requested).expanduser()
    if not (path / STATE_FILE).is_file():
        raise VitfoodError(f"--resume-from-checkpoint {path}: not a vitfood checkpoint (no {STATE_FILE})")
    return path


def load_training_state(path: Path) -> tuple[dict, dict, dict, dict]:
    """(model state, optimizer state, RNG state, trainer state). Pickled code is refused, not run."""
    try:
        model_state = load_file(str(path / "model.safetensors"))
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng_state = torch.load(path / "rng_state.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError as e:
        raise VitfoodError(f"checkpoint {path}: incomplete ({Path(e.filename).name} is missing)") from None
    except Exception as e:  # weights_only refusals, corrupt files
        raise VitfoodError(f"checkpoint {path}: refused to load ({first_line(e, 200)})") from None
    return model_state, optimizer_state, rng_state, state


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop the log lines a killed run wrote after its checkpoint, so none is doubled."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_bytes(path, "".join(kept).encode())
