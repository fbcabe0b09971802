"""Fine-tune a pretrained ViT on Food-101 (or any image folder): `python train.py --epochs 3`."""

from vitfood.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
