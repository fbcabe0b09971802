"""Top labels for photos from a model that train.py saved: `python infer.py photo.jpg`."""

from vitfood.cli import infer_command

if __name__ == "__main__":
    infer_command()
