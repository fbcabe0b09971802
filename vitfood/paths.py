"""Where things are on disk: the default model folder, which files are images, and the walk that finds them.

Shared by training (a dataset folder of class folders) and inference (folders given to infer.py), so
both see the same images in the same order. Imports nothing heavy: infer.py's cold start needs it.
"""

from __future__ import annotations

import os

DEFAULT_OUTPUT_DIR = "vitfood-output"  # train.py writes its model here; infer.py reads it from here

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                              ".pgm", ".pbm"})


def is_image_name(name: str) -> bool:
    """A visible file whose extension is an image format's (hidden files are editor and OS litter)."""
    return not os.path.basename(name).startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def extensions_text() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def images_under(folder: str | os.PathLike) -> list[str]:
    """Image files in `folder` and below: sorted per folder, hidden names skipped.

    Symbolic links are followed, each real folder visited once, so a link loop ends.
    """
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:  # gone since it was listed
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_name(f)]
    return out
