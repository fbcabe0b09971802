"""Where a run's records go: metrics.jsonl, TensorBoard and the console, three sinks of the same records.

A record is a flat dict, one per log line (`"type": "train"`) or evaluation (`"type": "eval"`).
Every sink has `write(record)` and `close()`; `RunLog` hands each record to all of them. Only rank 0
writes anything: the other ranks get a RunLog without sinks and a silent console.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from vitfood.errors import VitfoodError, first_line
from vitfood.fileio import atomic_write_bytes

TENSORBOARD_DIR = "runs"


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed at once so a killed run keeps its history."""

    def __init__(self, path: Path, append: bool = False):
        self.file = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop the log lines a killed run wrote after its checkpoint, so none is doubled."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run, cut short: after the checkpoint anyway
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_bytes(path, "".join(kept).encode())


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

    Construct it before training: without the tensorboard package this raises a one-line
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


def duration(seconds: float) -> str:
    """3725 -> '1:02:05', 75 -> '1:15'."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Console:
    """What a person watching the run sees on stderr.

    On a terminal: a progress bar, with the records and messages printed above it. Redirected to a
    file, bar frames would fill it (a carriage return per update): there each record is one plain
    line carrying the progress and the ETA, and a progress line comes at least every `every_s`
    seconds between records.
    """

    def __init__(self, enabled: bool, stream=None, every_s: float = 30.0):
        self.enabled, self.every_s = enabled, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.total = self.done = self.first = 0
        self.t0 = self.last_line = time.perf_counter()

    def start_progress(self, total_steps: int, done_steps: int) -> None:
        self.total, self.done, self.first = total_steps, done_steps, done_steps
        self.t0 = self.last_line = time.perf_counter()
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=done_steps, desc="train", unit="step", file=self.stream,
                            dynamic_ncols=True)

    def progress(self) -> str:
        """'step 40/500 (8%), 3.1 steps/s, ETA 2:28' (the rate over this process's steps so far)."""
        elapsed = time.perf_counter() - self.t0
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        return f"step {self.done}/{self.total} ({self.done / max(1, self.total):.0%}), {rate:.2f} steps/s{eta}"

    def advance(self) -> None:
        """One optimizer step done."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and time.perf_counter() - self.last_line >= self.every_s:
            self.say(self.progress())

    def write(self, record: dict) -> None:
        shown = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items() if k != "type"}
        line = str(shown)
        if self.bar is None and record.get("type") == "train" and self.total:
            line += f"  [{self.progress()}]"
        self.say(line)

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)
        self.last_line = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunLog:
    """Hands each record to every sink, in order."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def write(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
