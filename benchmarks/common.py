"""Shared by the benchmarks: realistic JPEGs, random-init checkpoints, versions, a Markdown table."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def count_flops_per_image(arch, num_labels: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one image of a ViT (`vitfood.models.vit.ViTArch`): the matmuls,
    which are >99% of the work. The benchmarks' MFU figures divide by it."""
    n, d, m = arch.num_patches + 1, arch.hidden_size, arch.intermediate_size
    per_block = 2 * n * (3 * d * d + d * d + 2 * d * m) + 2 * 2 * n * n * d
    patch = 2 * arch.num_patches * d * arch.num_channels * arch.patch_size**2
    return arch.num_hidden_layers * per_block + patch + 2 * d * num_labels


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Natural-image statistics without a download: smooth colour fields, edges, texture and noise.

    Flat colour or pure noise decode at very different speeds from photos; this sits between, with a
    1/f-like spectrum (blurred noise at several scales) plus a few hard-edged shapes.
    """
    w, h = size
    img = np.zeros((h, w, 3), np.float32)
    for scale, weight in ((64, 90.0), (16, 45.0), (4, 20.0), (1, 8.0)):
        small = rng.normal(0, 1, (max(1, h // scale), max(1, w // scale), 3)).astype(np.float32)
        layer = Image.fromarray(np.uint8(np.clip(small * 40 + 128, 0, 255))).resize((w, h), Image.BICUBIC)
        img += (np.asarray(layer, np.float32) - 128) * weight / 40
    img += rng.uniform(60, 190, 3)
    pil = Image.fromarray(np.uint8(np.clip(img, 0, 255)))
    from PIL import ImageDraw

    d = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 9))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(10, max(11, min(w, h) // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x - r, y - r, x + r, y + r], fill=colour)
    return pil.filter(ImageFilter.GaussianBlur(0.6))


def _save_photo(job) -> None:
    path, size, seed = job
    photo_like(np.random.default_rng(seed), size).save(path, quality=90)


def make_jpeg_folder(root: Path, n: int, classes: int = 4, seed: int = 0, processes: int = 1) -> Path:
    """Food-101-like JPEGs: at most 512 px a side (most 512 x 384..512), quality 90, one folder per class."""
    if root.exists() and sum(1 for _ in root.rglob("*.jpg")) == n:
        return root
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        cls = root / f"class_{i % classes:03d}"
        cls.mkdir(parents=True, exist_ok=True)
        size = (512, int(rng.integers(384, 513))) if rng.random() < 0.7 else (int(rng.integers(300, 513)), 512)
        jobs.append((cls / f"{i:05d}.jpg", size, int(rng.integers(2**31))))
    if processes > 1:
        from multiprocessing import Pool

        with Pool(processes) as pool:
            pool.map(_save_photo, jobs, chunksize=16)
    else:
        for job in jobs:
            _save_photo(job)
    return root


def make_vit_checkpoint(path: Path, *, size: str = "tiny", labels: int = 0, image_size: int = 224) -> Path:
    """Random-init ViT saved by transformers (no download): 'tiny' for CPU smoke runs, 'base' = ViT-B/16."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    dims = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16) \
        if size == "base" else dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, patch_size=16)
    if labels:
        cfg = ViTConfig(image_size=image_size, **dims, id2label={i: f"class_{i}" for i in range(labels)},
                        label2id={f"class_{i}": i for i in range(labels)})
        ViTForImageClassification(cfg).save_pretrained(path)
    else:
        ViTModel(ViTConfig(image_size=image_size, **dims)).save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def choose_mode(args, script: str, gpu: str, cpu: str, cpu_settings: dict | None = None) -> None:
    """With no mode on the command line, the run that suits this machine, said on stderr before it starts.

    On a GPU the GPU measurement; on a CPU the comparison that CPU can make in a few minutes
    (`cpu_settings` replaces defaults that would take hours there, e.g. ViT-B's model size).
    """
    if args.mode is not None:
        return
    import torch

    if torch.cuda.is_available():
        args.mode, settings = gpu, {}
    else:
        args.mode, settings = cpu, cpu_settings or {}
    for name, value in settings.items():
        setattr(args, name, value)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
    where = "a GPU" if args.mode == gpu else "no GPU"
    print(f"{script}: no mode given; {where} here, so running: {script} {args.mode} {flags}".rstrip(), file=sys.stderr,
          flush=True)


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    for name in ("torchvision", "transformers", "PIL"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "absent"
    from vitfood.distributed import usable_cores

    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({usable_cores()} cores)"
    return out


def timed_run(cmd: list[str], log: Path | None = None, env: dict | None = None,
              cwd: Path | None = None) -> tuple[float, str]:
    """(wall seconds, stdout) of a command run as a new process from `cwd` (default: the repository root);
    a failure exits."""
    import subprocess
    import time

    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd or ROOT)
    seconds = time.perf_counter() - t
    if log is not None:
        log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return seconds, r.stdout


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:,.2f}" if isinstance(v, float) else str(v)


def write_jsonl(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({**r, **versions()}) + "\n")
