"""vitfood: fine-tune a pretrained Vision Transformer for image classification, without the Trainer.

`predict` and `classify` are loaded on first use, so `import vitfood` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["predict", "classify", "train", "TrainConfig"]


def __getattr__(name):
    if name in ("predict", "classify"):
        from vitfood import inference

        return getattr(inference, name)
    if name == "train":
        from vitfood.train_loop import train

        return train
    if name == "TrainConfig":
        from vitfood.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'vitfood' has no attribute {name!r}")
