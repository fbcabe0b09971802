"""run.json: what produced a model: the resolved settings, the versions, the device, the git commit, the times,
and the timeline of the run's phases (where a short run's time goes)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RUN_JSON = "run.json"

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


def process_start_time() -> float:
    """When this process started (time.time() scale): Linux's /proc, else when this module was imported.

    A timeline from the process's start includes the interpreter and the imports, which are part of
    what a user waits for. (/proc/uptime, not /proc/stat's boot time, which is whole seconds.)
    """
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command's name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


class Timeline:
    """Seconds since the process started at each phase of a run: [{"at_s": 1.2, "event": "model loaded"}, ...]."""

    def __init__(self):
        self.start = process_start_time()
        self.events: list[dict] = []

    def mark(self, event: str) -> None:
        self.events.append({"at_s": round(time.time() - self.start, 3), "event": event})


def environment() -> dict:
    """What a run's machine and software are: the same at every write of its run.json, so read once."""
    return {"platform": platform.platform(), "versions": package_versions(), "git": git_state()}


def run_record(config: dict, started: float, ended: float | None, device: str,
               timeline: list[dict] | None = None, env: dict | None = None) -> dict:
    """run.json: enough to reproduce or audit a run. Written at the start (ended None) and at the end.

    `started`/`ended` are time.time() values; written as ISO 8601 UTC. `env`: environment(), if read already.
    """
    return {
        "command": list(sys.argv),
        "config": config,
        "started": _iso(started),
        "ended": _iso(ended),
        "duration_s": None if ended is None else round(ended - started, 1),
        "device": device,
        **(env or environment()),
        "timeline": timeline or [],
    }
