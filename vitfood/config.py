"""The training configuration: one dataclass, and the command line derived from it.

Each field's `help` is its documentation; its default is the Hugging Face image-classification
guide's choice (the Trainer's, where the guide leaves it to the Trainer). `--help` groups the
flags by the `group` of each field. Two more facts live beside each field, so that a new flag is
added in one place:
- `resume`: whether a resumed run must use the same value (MATCH: the data order, the crops or the
  labels depend on it), may change it with a warning (WARN: the run goes on, but will not equal an
  uninterrupted one), or may change it freely (FREE: where or how results are kept or shown).
- `card`: whether the model card's hyper-parameter table shows it (run.json keeps every field).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import get_type_hints

from vitfood.errors import OneLineParser, VitfoodError, command_name
from vitfood.paths import DEFAULT_OUTPUT_DIR

MATCH, WARN, FREE = "match", "warn", "free"

GUIDE_DATASET = "ethz/food101"
GUIDE_TRAIN_SAMPLES = 5000  # the guide's `split="train[:5000]"`
# --metric-for-best-model: each metric and whether a higher value is better (the Trainer's greater_is_better).
BEST_MODEL_METRICS = {"accuracy": True, "loss": False, "top5_accuracy": True}


def _opt(default, help: str, group: str, *, resume: str, card: bool, **extra):
    return field(default=default, metadata={"help": help, "group": group, "resume": resume, "card": card, **extra})


@dataclass
class TrainConfig:
    # ---- data
    dataset: str = _opt(GUIDE_DATASET, "Hub dataset id, a folder with one subfolder per class, "
                        "or a folder written by datasets' save_to_disk", "data", resume=MATCH, card=True)
    train_split: str = _opt("train", "split of --dataset to train on (Hub and save_to_disk datasets)", "data",
                            resume=MATCH, card=True)
    eval_split: str | None = _opt(None, "evaluate on this split of the dataset (e.g. 'validation') "
                                  "instead of holding out --test-size of the training images", "data",
                                  resume=MATCH, card=True)
    # The guide's meaning: N images of --train-split, and --test-size of them then held out (5000 -> 4000 + 1000).
    max_train_samples: int | None = _opt(None, "take this many images of --train-split; 0 = all. Without "
                                         "--eval-split, --test-size of them are then held out for evaluation, as "
                                         f"in the guide ({GUIDE_TRAIN_SAMPLES} -> 4000 training + 1000 evaluation "
                                         "images; 3 -> 2 + 1). Default: the guide's "
                                         f"{GUIDE_TRAIN_SAMPLES} (train[:{GUIDE_TRAIN_SAMPLES}]) for {GUIDE_DATASET}, "
                                         "every image of any other dataset. Hub and save_to_disk datasets take the "
                                         "first N rows, folders a seeded random N", "data", resume=MATCH, card=True)
    max_eval_samples: int = _opt(0, "cap the evaluation images (the first N of --eval-split); 0 = all", "data",
                                 resume=MATCH, card=True)
    test_size: float = _opt(0.2, "fraction held out for evaluation when no --eval-split is given", "data",
                            resume=MATCH, card=True)
    crop_scale: tuple[float, float] = _opt((0.08, 1.0), "RandomResizedCrop's range for the share of the image's "
                                           "area each training crop covers (torchvision's and the guide's 0.08 1.0); "
                                           "raise MIN for small or centred subjects; 1 1 keeps the whole image",
                                           "data", resume=MATCH, card=True, nargs=2, metavar=("MIN", "MAX"))
    flip: bool = _opt(True, "random horizontal flip during training", "data", resume=MATCH, card=True)
    rotation: float = _opt(0.0, "random rotation of each training crop by up to this many degrees either way "
                           "(the guide's TensorFlow path uses about 7); 0 = off", "data", resume=MATCH, card=True)
    zoom: float = _opt(0.0, "random zoom of each training crop in or out by up to this fraction (the guide's "
                       "TensorFlow path uses 0.2); 0 = off", "data", resume=MATCH, card=True)
    num_workers: int | None = _opt(None, "DataLoader worker processes; default: on a GPU the CPU cores - 1 (at most "
                                   "16), on the CPU 0 (decoding in the training process leaves the cores to the "
                                   "model's math threads, which need them more)", "data", resume=WARN, card=False)
    decode_cache: str = _opt("auto", "keep each image's decoded pixels in --output-dir/decoded-images after its first "
                             "use, so later epochs skip the decoding (removed when training ends). auto: on when "
                             "training several epochs in one process and the cache fits in half the free disk",
                             "data", resume=FREE, card=False, choices=("auto", "on", "off"))
    max_bad_fraction: float = _opt(0.01, "stop when more than this fraction of images is unreadable "
                                   "(they are skipped and listed in bad_images.txt up to then); every image's "
                                   "header is opened before training, so most are found before the first step",
                                   "data", resume=WARN, card=False)

    # ---- model
    model: str = _opt("google/vit-base-patch16-224-in21k", "pretrained model to fine-tune: Hub id or local checkpoint "
                      "folder, of any type transformers' AutoModelForImageClassification maps (ViT, DeiT, BEiT, DINOv2, "
                      "SigLIP, CLIP, ConvNeXt, Swin, ResNet, EfficientNet, MobileViT, ...; docs/models.md), with or "
                      "without a classification head", "model", resume=MATCH, card=True)
    image_size: int | None = _opt(None, "fine-tune at this resolution (e.g. 384): learned position embeddings are "
                                  "resized once at load (bicubic); the saved config and processor carry the size. "
                                  "Default: the checkpoint's own", "model", resume=MATCH, card=True, metavar="N")
    trust_remote_code: bool = _opt(False, "allow a checkpoint that ships its own Python code (auto_map in its "
                                   "config.json) to run it; read that code first", "model", resume=FREE, card=False)
    compile: str = _opt("auto", "torch.compile each transformer block (one compilation serves them all): a slower "
                        "start for faster steps on a GPU. auto: on a GPU for runs of at least "
                        "100,000 training images, where the steps saved repay the compilation; off on the CPU. "
                        "--compile alone means on", "model", resume=WARN, card=True, choices=("auto", "on", "off"),
                        nargs="?", const="on")
    eval_only: bool = _opt(False, "no training: evaluate the trained model --model on the evaluation images of "
                           "--dataset and write the report (eval_results.json, confusion matrix) to --output-dir",
                           "model", resume=WARN, card=False)

    # ---- optimisation
    epochs: int = _opt(3, "training epochs", "optimisation", resume=WARN, card=True)
    batch_size: int = _opt(16, "training images per batch (per device); x --grad-accum-steps = the optimizer step",
                           "optimisation", resume=MATCH, card=True)
    eval_batch_size: str = _opt("auto", "evaluation images per batch (per device). auto: on a GPU up to 256, fewer "
                                "when a small evaluation set would leave DataLoader workers without a batch to "
                                "decode, never fewer than a training pass; on the CPU --batch-size. On a GPU an "
                                "out-of-memory halves the passes (the run goes on). N: N images",
                                "optimisation", resume=WARN, card=True, metavar="auto|N")
    grad_accum_steps: int = _opt(4, "batches per optimizer step (gradient accumulation)", "optimisation",
                                 resume=MATCH, card=True)
    micro_batch_size: str = _opt("auto", "images per forward and backward pass. Each optimizer step still averages "
                                 "over --batch-size x --grad-accum-steps images; this only says how many of them "
                                 "the device computes at once. auto: on one GPU the whole step, halved whenever "
                                 "memory runs out (the run goes on); elsewhere --batch-size. N: at most N",
                                 "optimisation", resume=WARN, card=False, metavar="auto|N")
    learning_rate: float = _opt(5e-5, "peak AdamW learning rate (0 allowed: the backbone is saved unchanged)",
                                "optimisation", resume=WARN, card=True)
    weight_decay: float = _opt(0.0, "AdamW weight decay; never applied to biases, LayerNorm weights, "
                               "position and CLS embeddings", "optimisation", resume=WARN, card=True)
    warmup_ratio: float = _opt(0.1, "fraction of optimizer steps with linear warmup, then linear decay to 0",
                               "optimisation", resume=WARN, card=True)
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this; 0 = no clipping", "optimisation",
                                resume=WARN, card=True)
    precision: str = _opt("auto", "auto: bf16 on GPUs that have it, fp16 with loss scaling on older GPUs, fp32 on CPU",
                          "optimisation", resume=WARN, card=True, choices=("auto", "bf16", "fp16", "fp32"))
    # WARN: the epochs chosen before a change were chosen by the other metric; the run goes on with the new one.
    metric_for_best_model: str = _opt("accuracy", "which evaluation chooses the model saved at the top of "
                                      "--output-dir: the epoch with the highest accuracy or top5_accuracy, or the "
                                      "lowest loss (the Trainer's eval_accuracy, eval_loss, eval_top5_accuracy are "
                                      "accepted too). A tie keeps the earlier epoch, as the Trainer",
                                      "optimisation", resume=WARN, card=True, metavar="accuracy|loss|top5_accuracy")
    seed: int = _opt(42, "seed for the split, the head, the data order and the augmentations", "optimisation",
                     resume=MATCH, card=True)
    device: str = _opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N", "optimisation",
                       resume=WARN, card=False)
    # WARN, not FREE: deterministic kernels compute differently from the default ones on a GPU, so a resume that
    # changes the setting continues the run, but no longer to the bit.
    deterministic: bool = _opt(False, "PyTorch's deterministic algorithms, cuBLAS's fixed workspace and no cuDNN "
                               "benchmarking, so that a run on a GPU, and a resumed one, can repeat to the bit: where "
                               "every kernel has a deterministic version (else one error names the operation); may "
                               "be slower. On the CPU runs repeat without it", "optimisation", resume=WARN, card=False)

    # ---- output
    output_dir: str = _opt(DEFAULT_OUTPUT_DIR, "where the best model, eval_results.json and metrics.jsonl go",
                           "output", resume=FREE, card=False)
    logging_steps: int = _opt(10, "a log line every N optimizer steps", "output", resume=WARN, card=False)
    overwrite_output_dir: bool = _opt(False, "allow training into a folder that already holds a trained model",
                                      "output", resume=FREE, card=False)
    report_to: str = _opt("none", "also log the metrics.jsonl scalars to TensorBoard (in --output-dir/runs; "
                          "pip install 'vitfood[tensorboard]')", "output", resume=FREE, card=False,
                          choices=("none", "tensorboard"))
    push_to_hub: bool = _opt(False, "after training, upload the model, its card and report to the Hugging Face Hub "
                             "(token from `hf auth login` or HF_TOKEN; checked before training starts)", "output",
                             resume=FREE, card=False)
    hub_model_id: str | None = _opt(None, "Hub repository for --push-to-hub: 'user/name' or 'name'; "
                                    "default: the --output-dir folder's name", "output", resume=FREE, card=False)

    # ---- checkpoints and faults
    save_steps: int = _opt(0, "also save a resumable checkpoint every N optimizer steps (one is always saved at "
                           "each epoch's end and on SIGTERM/SIGINT); 0 = epoch ends only", "checkpoints",
                           resume=WARN, card=False)
    save_total_limit: int = _opt(1, "keep the N newest checkpoints (each a complete model with its resume state; "
                                 "the best model is at the top of --output-dir anyway); 0 = all", "checkpoints",
                                 resume=WARN, card=False)
    resume_from_checkpoint: str | None = _opt(None, "continue a run exactly where it stopped: from PATH, or with "
                                              "no PATH from the newest checkpoint in --output-dir", "checkpoints",
                                              resume=FREE, card=False, nargs="?", const="latest")
    skip_nonfinite: int = _opt(0, "skip up to N optimizer steps whose loss or gradient is NaN/inf instead of "
                               "stopping at the first", "checkpoints", resume=WARN, card=False, metavar="N")

    def __post_init__(self):
        self.crop_scale = tuple(self.crop_scale)  # argparse and JSON give a list
        self.micro_batch_size = str(self.micro_batch_size)  # auto, or a number given from Python as an int
        self.eval_batch_size = str(self.eval_batch_size)
        if isinstance(self.compile, bool):  # compile=True from Python, as the flag once was
            self.compile = "on" if self.compile else "off"
        self.metric_for_best_model = str(self.metric_for_best_model).removeprefix("eval_")  # the Trainer's names

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # argparse checks choices; TrainConfig(...) from Python must too
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value not in choices:
                raise VitfoodError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")
        positive = ("epochs", "batch_size", "grad_accum_steps", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise VitfoodError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.image_size is not None and self.image_size < 1:
            raise VitfoodError(f"--image-size must be at least 1, got {self.image_size}")
        for name in ("max_train_samples", "max_eval_samples", "num_workers", "save_steps", "save_total_limit",
                     "skip_nonfinite", "seed"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise VitfoodError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if not 0 < self.test_size < 1:
            raise VitfoodError(f"--test-size must be between 0 and 1, got {self.test_size}")
        if not 0 <= self.warmup_ratio <= 1:
            raise VitfoodError(f"--warmup-ratio must be between 0 and 1, got {self.warmup_ratio}")
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise VitfoodError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.hub_model_id is not None and not self.push_to_hub:
            raise VitfoodError("--hub-model-id names the repository for --push-to-hub: pass both, or neither")
        if not 0 <= self.rotation <= 180:
            raise VitfoodError(f"--rotation must be between 0 and 180 degrees, got {self.rotation}")
        if not 0 <= self.zoom < 1:
            raise VitfoodError(f"--zoom must be at least 0 and below 1, got {self.zoom}")
        for name in ("micro_batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if value != "auto" and not (value.isdigit() and int(value) > 0):
                raise VitfoodError(f"--{name.replace('_', '-')} must be auto or a whole number of images, at least 1, "
                                   f"got {value!r}")
        if self.metric_for_best_model not in BEST_MODEL_METRICS:
            raise VitfoodError(f"--metric-for-best-model must be one of {', '.join(BEST_MODEL_METRICS)} (or the "
                               f"Trainer's eval_ names), got {self.metric_for_best_model!r}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise VitfoodError(f"--crop-scale {low:g} {high:g}: needs 0 < MIN <= MAX <= 1")
        if not 0 <= self.max_bad_fraction <= 1:
            raise VitfoodError(f"--max-bad-fraction must be between 0 and 1, got {self.max_bad_fraction}")

    def train_samples(self) -> int:
        """--max-train-samples as the run uses it (0 = all): the guide's subset only for the guide's dataset."""
        if self.max_train_samples is not None:
            return self.max_train_samples
        return GUIDE_TRAIN_SAMPLES if self.dataset == GUIDE_DATASET else 0


def fields_where(key: str, value) -> list[str]:
    """The names of the TrainConfig fields whose metadata `key` is `value`: fields_where("resume", MATCH)."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.metadata[key] == value]


RUN_FACTS_ON_THE_CARD = ("train_images", "eval_images")  # run.json's config also holds e.g. compile_decision


def is_hyperparameter(name: str) -> bool:
    """For the model card's table: a field marked card=True, or the images the run actually used."""
    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    return meta[name]["card"] if name in meta else name in RUN_FACTS_ON_THE_CARD


class HelpWithDefaults(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every default shown, except None and the False of an off-by-default switch (its flag says it all); the
    description and the examples after the flags as written, line by line."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


TRAIN_EXAMPLES = """\
examples:
  python train.py --epochs 3
      the guide's job: google/vit-base-patch16-224-in21k on 5,000 Food-101 images (needs the Hub)
  python train.py --dataset ./my_photos --epochs 10 --grad-accum-steps 1
      your own photos: a folder with one subfolder per class (the folder names are the labels)
  python train.py --model ./vit-small --dataset ./my_photos --epochs 30 --learning-rate 1e-3
      a small or randomly initialised ViT from a local folder: a higher rate, many more epochs
  python train.py --dataset ./my_photos --epochs 10 --grad-accum-steps 1 --resume-from-checkpoint
      the same command plus --resume-from-checkpoint continues a stopped run exactly (with a
      higher --epochs, a finished one: the learning-rate schedule is recomputed for the new total)
  python train.py --eval-only --model ./vitfood-output --dataset ./other_photos --output-dir ./report
      evaluate a trained model on other images, without training
"""


def build_parser(cls=TrainConfig, description: str = "", epilog: str | None = None,
                 prog: str | None = None) -> argparse.ArgumentParser:
    """One flag per dataclass field: `--name-with-dashes`, type and default from the field.

    A switch that is off by default is only `--switch`; one that is on also has `--no-switch`. A bad flag or
    value is one line and exit status 2 (OneLineParser).
    """
    parser = OneLineParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpWithDefaults)
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        group_name = f.metadata.get("group", "other")
        group = groups.setdefault(group_name, parser.add_argument_group(group_name))
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"default": f.default, "help": f.metadata.get("help", "")}
        hint = hints[f.name]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        else:
            kwargs["type"] = {str | None: str, int | None: int, tuple[float, float]: float}.get(hint, hint)
            kwargs["metavar"] = f.metadata.get("metavar") or ("PATH" if f.metadata.get("nargs")
                                                               else f.name.split("_")[-1].upper())
        for key in ("nargs", "const"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
            kwargs.pop("metavar")
        group.add_argument(flag, **kwargs)
    return parser


def train_parser() -> argparse.ArgumentParser:
    """train.py's command line, with examples after the flags."""
    return build_parser(description="Fine-tune a pretrained ViT for image classification.", epilog=TRAIN_EXAMPLES,
                        prog=command_name("train.py"))


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(train_parser().parse_args(argv)))
