"""Top labels for photos from a model that train.py saved: `python infer.py photo.jpg`."""

from vitfood.cli import infer_main

if __name__ == "__main__":
    raise SystemExit(infer_main())
