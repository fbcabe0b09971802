"""What exact resumption needs besides the checkpoint's files.

- `TrainState`: where the run stands (step, best result, the log window), saved in every checkpoint.
- The random-number states of Python, NumPy and torch, saved and restored with it.
- `check_resume`: a resumed run must be the same run (same data order, crops, labels, batches);
  what may differ is read from each TrainConfig field's `resume` metadata.
- `StopSignals`: SIGTERM/SIGINT end the run at an optimizer-step boundary, after a checkpoint.
"""

from __future__ import annotations

import json
import random
import signal
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from vitfood.config import FREE, MATCH, TrainConfig, fields_where
from vitfood.errors import VitfoodError


@dataclass
class TrainState:
    """Where the run stands: what a checkpoint restores besides the weights, the optimizer and the RNGs."""

    step: int = 0  # optimizer steps taken
    epochs_evaluated: int = 0
    best: dict | None = None  # the best evaluation so far, as in eval_results.json
    best_step: int | None = None
    loss_sum: float = 0.0  # training loss summed over the images since the last log line
    samples_since_log: int = 0
    nonfinite_skipped: int = 0  # optimizer steps skipped under --skip-nonfinite
    bad_images: dict[str, str] = field(default_factory=dict)  # image name -> why it could not be read

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainState:
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


def run_facts(cfg: TrainConfig, labels: list[str], image_size: int, world: int) -> dict:
    """What a resumed run must share with the interrupted one: the MATCH flags and what they led to."""
    facts = {name: getattr(cfg, name) for name in fields_where("resume", MATCH)}
    facts.update(max_train_samples=cfg.train_samples(), labels=labels, image_size=image_size, world_size=world)
    return _as_saved(facts)


def _as_saved(values: dict) -> dict:
    """As JSON gives them back (tuples become lists), so that saved and current values compare equal."""
    return json.loads(json.dumps(values))


def check_resume(saved: dict, facts: dict, cfg: TrainConfig, say, ckpt: Path) -> None:
    """Refuse a resume that would not continue the same run; warn when it continues a changed one."""
    setup, config = _as_saved_then(saved)
    differ = [f"{k}: {setup.get(k)!r} then, {v!r} now" for k, v in facts.items() if setup.get(k) != v]
    if differ:
        raise VitfoodError(f"cannot resume from {ckpt}: the run differs in " + "; ".join(differ))
    free = set(fields_where("resume", FREE))
    changed = [k for k, v in _as_saved(asdict(cfg)).items()
               if k not in facts and k not in free and config.get(k) != v]
    if changed:
        say(f"vitfood: warning: resuming with changed settings ({', '.join(changed)}): the run continues, "
            "but will not match an uninterrupted one exactly")


OLD_EVAL_BATCH_DEFAULT = 16  # --eval-batch-size before auto


def _as_saved_then(saved: dict) -> tuple[dict, dict]:
    """(setup, config) of a checkpoint, completed for settings added since the version that wrote it:
    the same command line resumes an earlier vitfood's run without a refusal or a warning for every new setting.
    A missing setting, must-match ones included, reads as its field's default: before the setting existed, the
    run did what the default does now (a new setting's default must keep the old behaviour; crop_scale's is
    torchvision's range, fixed before --crop-scale)."""
    defaults = _as_saved(asdict(TrainConfig()))
    config = {**defaults, **saved["config"]}
    if isinstance(config.get("compile"), bool):  # once a switch: no --compile is today's default
        config["compile"] = "on" if config["compile"] else defaults["compile"]
    if isinstance(config["eval_batch_size"], int):  # once a number, 16 by default: no flag is today's auto
        n = config["eval_batch_size"]
        config["eval_batch_size"] = defaults["eval_batch_size"] if n == OLD_EVAL_BATCH_DEFAULT else str(n)
    # Before the stratified split (not a flag, so not among the defaults): the random one (data.held_out).
    setup = {**{name: defaults[name] for name in fields_where("resume", MATCH)}, "split": "random", **saved["setup"]}
    return setup, config


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """The checkpoint's AdamW moments and step counts, under this run's group options.

    optimizer.load_state_dict would bring back the options each group had when it was saved: `fused` as on the
    device the checkpoint came from (a CPU checkpoint would run unfused AdamW on a GPU, where the skip of a
    non-finite step needs the fused kernel), and the weight decay of the earlier command (a resume with another
    --weight-decay would keep the old one while its warning says the new one applies). Loading under this
    run's options also puts each state where this run's kernel wants it (fused: the step counts on the device).
    The learning rate is the schedule's, set at every step.
    """
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    groups = [{**options, "params": group["params"]}
              for options, group in zip(configured, saved["param_groups"], strict=True)]
    optimizer.load_state_dict({**saved, "param_groups": groups})


def load_scaler_state(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """An fp16 run's loss scale. A checkpoint of another precision (bf16, fp32, the CPU) saved none: an fp16
    run resumed from it starts with a fresh scale, which finds its level in a few steps; an fp16 checkpoint
    resumed in another precision has no use for its scale."""
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)


def host_rng_state() -> dict:
    """Python's and NumPy's global RNG states as plain JSON (restored on resume, whoever uses them)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def tensor_rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(tensors: dict, host: dict, device: torch.device) -> None:
    version, internal, gauss = host["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = host["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived: the step in flight was finished and a checkpoint saved."""

    def __init__(self, signum: int, checkpoint_dir: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.checkpoint_dir = signum, checkpoint_dir


class StopSignals:
    """SIGTERM/SIGINT ask the loop to stop after the optimizer step in flight (under torchrun: at the loop's next
    check, within train_loop.HOST_CHECK_STEPS steps, where all ranks agree to stop); a second SIGINT stops now."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
