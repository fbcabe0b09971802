"""Writing files that survive a crash: fsync, temporary name then rename, JSON; and sizes for people.

Every file vitfood leaves (the model, checkpoints, reports, run.json) goes through here, so "a crash
never leaves half a file" is one mechanism, not a habit repeated per module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vitfood.errors import VitfoodError


def fsync_write(path: Path, data: bytes) -> None:
    """Write and fsync: the bytes are on the disk, not only in the page cache, when this returns."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable: the folder's entry list is itself data on the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fsync_write(tmp, data)
    os.replace(tmp, path)


def json_bytes(data, indent: int = 2) -> bytes:
    return (json.dumps(data, indent=indent) + "\n").encode()


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json_bytes(data))


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a missing or malformed file is one VitfoodError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise VitfoodError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitfoodError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise VitfoodError(f"{path}: expected a JSON object")
    return data


def human_bytes(n: int) -> str:
    """987 MB, 1.4 GB, 12 KB, 512 B: decimal units, as disk sizes are sold; a decimal only below 10."""
    value, unit = float(n), "B"
    for bigger in ("KB", "MB", "GB"):
        if round(value) < 1000:
            break
        value, unit = value / 1000, bigger
    if unit == "B":
        return f"{n} B"
    return f"{value:.1f} {unit}" if value < 9.95 else f"{value:.0f} {unit}"
