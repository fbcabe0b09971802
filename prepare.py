"""Download the model and the dataset for training without the Hub: `python prepare.py`, then copy the folder."""

from vitfood.cli import prepare_command

if __name__ == "__main__":
    prepare_command()
