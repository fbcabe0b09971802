"""Fine-tune a pretrained ViT on Food-101 (or any image folder): `python train.py --epochs 3`."""

from vitfood.cli import train_command

if __name__ == "__main__":
    train_command()
