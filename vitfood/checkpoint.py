"""The output folder: checked before training, the best model and resumable checkpoints written atomically."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from vitfood import fileio
from vitfood.errors import VitfoodError, first_line
from vitfood.fileio import fsync_dir, human_bytes, json_bytes, read_json
from vitfood.model import CONFIG_NAME, SAFETENSORS_NAME, ViT, ViTArch, from_hf_classifier_state_dict, hf_files

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


def best_model_files(model_files: dict[str, bytes], results: dict) -> dict[str, bytes]:
    """The best model's files: the model in Hugging Face format (`model.hf_files`), then the results that
    describe it."""
    return {**model_files, EVAL_RESULTS: json_bytes(results)}


def write_best(out_dir: Path, files: dict[str, bytes]) -> None:
    """`best_model_files` into the output folder, each file replaced atomically, in their order."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            fileio.atomic_write_bytes(out_dir / name, data)
    except OSError as e:
        raise VitfoodError(f"cannot save the model to {out_dir}: {e.strerror or e} "
                           "(the previously saved files are intact)") from None


# ---------------------------------------------------------------- training state, for exact resumption

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"
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


def save_training_state(out_dir: Path, step: int, model: ViT, base_config: dict, preprocessor: dict,
                        optimizer_state: dict, rng_state: dict, state: dict, keep: int) -> Path:
    """Everything needed to continue the run exactly, written whole or not at all (see write_training_state)."""
    files = training_state_files(hf_files(model, base_config, preprocessor), optimizer_state, rng_state, state)
    return write_training_state(out_dir, step, files, keep)


def training_state_files(model_files: dict[str, bytes], optimizer_state: dict, rng_state: dict,
                         state: dict) -> dict[str, bytes]:
    """A checkpoint's files, by name, in the order to write them: a snapshot, copied off the device.

    The folder is also a complete Hugging Face model (`model_files`, the same files as the best model at
    the top of the output folder), so any step can be evaluated, served or shared without first being
    converted. The optimizer and RNG states go to `torch.save` files made only of tensors and plain
    containers, so that `torch.load(weights_only=True)` reads them back.
    """
    files = dict(model_files)
    for name, obj in ((OPTIMIZER_FILE, optimizer_state), (RNG_FILE, rng_state)):
        buf = io.BytesIO()
        torch.save(obj, buf)
        files[name] = buf.getbuffer()  # a view, not a copy: a snapshot of AdamW's state is large enough once
    files[STATE_FILE] = json_bytes(state, indent=1)
    return files


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINTS / f"{_CKPT_PREFIX}{step:08d}"


def write_training_state(out_dir: Path, step: int, files: dict, keep: int) -> Path:
    """`training_state_files` as checkpoints/step-N, whole or not at all; then older ones beyond `keep` go.

    Files go into a temporary folder, each fsynced, and the folder is renamed to `step-N` last: a crash
    at any moment leaves either the complete new checkpoint or none, and the older ones untouched.
    """
    final = checkpoint_dir(out_dir, step)
    root = final.parent
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, data in files.items():
            fileio.fsync_write(tmp / name, data)
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
    prune_checkpoints(out_dir, keep, step)
    return final


class BackgroundWriter:
    """Writes the best model and the checkpoints off the training's critical path, one save at a time.

    Training hands over each save as bytes (a snapshot, copied off the device and serialised while it
    waits); a thread writes, fsyncs and renames the files while the next steps run. A new save first
    waits for the one in flight, so two never run at once and they land in order. A failed save is
    raised in the training thread at the next `wait` (the next save, the end of the run, a signal):
    the same one-line error it would have been in the foreground. The end of the run waits, so a
    stopped run exits only once its checkpoint is whole.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done: tuple[str, float] | None = None  # the last save's description and seconds, once written

    def submit(self, what: str, jobs: list[Callable[[], object]]) -> None:
        """Run `jobs` in order on the writer's thread, once the save in flight, if any, has landed."""
        self.wait()
        # Not a daemon: an interpreter that exits by an unforeseen path still finishes the write.
        self._thread = threading.Thread(target=self._run, args=(what, jobs), name="vitfood-writer")
        self._thread.start()

    def _run(self, what: str, jobs: list[Callable[[], object]]) -> None:
        started = time.perf_counter()
        try:
            for job in jobs:
                job()
            self._done = (what, time.perf_counter() - started)
        except BaseException as e:  # raised in the training thread by wait()
            self._error = e

    def raise_if_failed(self) -> None:
        """A save that has failed already, raised now rather than at the next save (cheap: once a step)."""
        if self._error is not None:
            self.wait()

    def wait(self) -> tuple[str, float] | None:
        """Until the save in flight has landed: (what it wrote, seconds it took), or None if there was none.
        Raises its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        done, self._done = self._done, None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return done


def prune_checkpoints(out_dir: Path, keep: int, saved_step: int) -> None:
    """After saving `saved_step`, keep it and the `keep - 1` newest before it (keep 0 = all).

    The best model needs no checkpoint of its own: it is already saved at the top of the output folder.
    Checkpoints past `saved_step` (a run resumed from an earlier one) are left alone: the run replaces
    each as it reaches that step, and until then they are not this run's to remove.
    """
    if keep <= 0:
        return
    older = [p for p in list_checkpoints(out_dir) if checkpoint_step(p) < saved_step]
    for p in older[:max(0, len(older) - (keep - 1))]:
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
    """(model state under vitfood's own names, optimizer state, RNG state, trainer state).

    Pickled code is refused, not run. Checkpoints written before they became Hugging Face models hold
    vitfood's own names (a fused `qkv`, no config.json); they are told apart by their keys and still resume.
    """
    weights = _read_part(path, SAFETENSORS_NAME, lambda f: load_file(str(f)))
    optimizer_state = _read_part(path, OPTIMIZER_FILE, _torch_load)
    rng_state = _read_part(path, RNG_FILE, _torch_load)
    state = _read_part(path, STATE_FILE, lambda f: json.loads(f.read_text()))
    if "cls_token" in weights:  # the old format: already what ViT.load_state_dict takes
        return weights, optimizer_state, rng_state, state
    config = read_json(path / CONFIG_NAME)
    arch = ViTArch.from_hf_config(config, str(path / CONFIG_NAME))
    model_state = from_hf_classifier_state_dict(weights, arch, str(path / SAFETENSORS_NAME))
    return model_state, optimizer_state, rng_state, state


def _torch_load(file: Path):
    return torch.load(file, map_location="cpu", weights_only=True)


def _read_part(path: Path, name: str, reader):
    """One file of a checkpoint; a missing or unreadable one is one error that names it."""
    try:
        return reader(path / name)
    except FileNotFoundError:
        raise VitfoodError(f"checkpoint {path}: incomplete ({name} is missing)") from None
    except Exception as e:  # weights_only refusals, corrupt files
        raise VitfoodError(f"{path / name}: refused to load ({first_line(e, 200)})") from None


def checkpoints_summary(out_dir: Path) -> str | None:
    """The run's last word on its checkpoints: how many, the room they take, and what they are for."""
    ckpts = list_checkpoints(out_dir)
    if not ckpts:
        return None
    root = out_dir / CHECKPOINTS
    # The whole folder, leftovers of interrupted saves included: that is what deleting it frees.
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
    n = len(ckpts)
    # Resuming a finished run with the same flags does nothing: say what would do something (optim.Schedule is
    # built from --epochs, so the warmup and the decay are recomputed for the new total).
    return (f"{n} checkpoint{'' if n == 1 else 's'} ({human_bytes(size)}) in {root}: delete the folder to free the "
            "space, or keep it to train longer: the same command with a higher --epochs and --resume-from-checkpoint "
            "continues from the last step, with the learning-rate schedule recomputed for the new total (the rate, "
            "decayed to 0, goes back up to the new schedule's value at this step and decays to 0 by the new end)")
