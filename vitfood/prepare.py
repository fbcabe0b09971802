"""prepare.py: on a machine that reaches the Hugging Face Hub, download the model and the dataset into plain
folders that train.py reads on a machine that does not (`--model DIR/model --dataset DIR/dataset`).

Each folder is written under a hidden temporary name beside its final one, loaded back as train.py loads it,
and only then renamed: an interrupted or failed run never leaves a folder that looks complete.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from vitfood import hub
from vitfood.config import GUIDE_TRAIN_SAMPLES, TrainConfig
from vitfood.errors import EXIT_USAGE, OneLineParser, VitfoodError, command_name, first_line

DEFAULT_OUTPUT_DIR = "vitfood-offline"
MODEL_DIR, DATASET_DIR = "model", "dataset"
_PARTIAL = "-partial-"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=command_name("prepare.py"),
        description="Download a pretrained ViT and a dataset from the Hugging Face Hub into plain folders, check "
                    "that they load, and print the train.py command that uses them without the Hub. Copy the "
                    "output folder to a machine without the Hub and run that command there.")
    parser.add_argument("--model", default=TrainConfig.model, metavar="ID",
                        help="Hub model id (default: %(default)s)")
    parser.add_argument("--dataset", default=TrainConfig.dataset, metavar="ID",
                        help="Hub dataset id, with parquet files (default: %(default)s)")
    parser.add_argument("--split", default="train", help="the split to train on (default: %(default)s)")
    parser.add_argument("--eval-split", metavar="SPLIT",
                        help="also this split, for train.py --eval-split (e.g. validation); default: none, "
                             "train.py then holds out part of --split")
    parser.add_argument("--max-samples", type=int, default=GUIDE_TRAIN_SAMPLES, metavar="N",
                        help="the first N rows of each split, 0 = all; only the parquet shards that hold them are "
                             "downloaded (default: %(default)s, the guide's train[:5000])")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                        help=f"writes DIR/{MODEL_DIR} and DIR/{DATASET_DIR} (default: %(default)s)")
    parser.add_argument("--skip-model", action="store_true", help="do not download the model")
    parser.add_argument("--skip-dataset", action="store_true", help="do not download the dataset")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a model or dataset folder already in DIR (default: refuse)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    prog = parser.prog
    args = parser.parse_args(argv)
    if args.skip_model and args.skip_dataset:
        parser.error("--skip-model and --skip-dataset: nothing to prepare")
    if args.max_samples < 0:
        parser.error("--max-samples must be 0 (all) or more")
    if args.eval_split == args.split:
        parser.error("--eval-split must differ from --split")
    try:
        print(_prepare(args, prog), flush=True)
    except VitfoodError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # the output folder: not writable, a full disk (a partial folder is never left)
        print(f"{prog}: error: --output-dir {args.output_dir}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-written was left in {args.output_dir}", file=sys.stderr)
        return 130
    return 0


def _prepare(args: argparse.Namespace, prog: str) -> str:
    """Write the folders that `args` ask for, check every folder the command will name, and return the command."""
    out = Path(args.output_dir)
    model_dir, dataset_dir = out / MODEL_DIR, out / DATASET_DIR
    wanted = [(flag, getattr(args, flag), folder) for flag, folder in (("model", model_dir), ("dataset", dataset_dir))
              if not getattr(args, "skip_" + flag)]
    for flag, name, folder in wanted:
        if not hub.looks_like_hub_id(name):
            raise VitfoodError(f"--{flag} {name}: a local path, not a Hub id; a local folder needs no preparing, "
                               f"pass it to train.py as it is")
        if folder.expanduser().exists() and not args.overwrite:
            raise VitfoodError(f"{folder} already exists: pass --skip-{flag} to keep it, or --overwrite to replace it")
    if not hub.hub_reachable():
        raise VitfoodError("the Hugging Face Hub cannot be reached (no network, a proxy in the way, or HF_HUB_OFFLINE "
                           "is set): run prepare.py on a machine that reaches it, then copy its output folder here")
    out.expanduser().mkdir(parents=True, exist_ok=True)
    _remove_partials(out.expanduser())
    splits = [args.split] + ([args.eval_split] if args.eval_split else [])
    rows = f"first {args.max_samples:,} rows" if args.max_samples else "all rows"
    pieces = ((model_dir, args.skip_model, f"model {args.model}",
               lambda tmp: _fetch_model(args.model, tmp), _check_model),
              (dataset_dir, args.skip_dataset, f"dataset {args.dataset} [{', '.join(splits)}: {rows}]",
               lambda tmp: _fetch_dataset(args.dataset, splits, args.max_samples, tmp),
               lambda folder: _check_dataset(folder, splits)))
    for folder, skip, what, fetch, check in pieces:
        if not skip:
            _say(f"{prog}: downloading {what} ...")
            _say(f"{prog}: {what} -> {folder}: {_place(folder, fetch, check)}")
        elif folder.expanduser().is_dir():  # prepared before: the command will name it, so it must load too
            _say(f"{prog}: keeping {folder}: {check(folder.expanduser())}")
    return _train_line(args, model_dir, dataset_dir, splits)


def _say(line: str) -> None:
    print(line, flush=True)


def _train_line(args: argparse.Namespace, model_dir: Path, dataset_dir: Path, splits: list[str]) -> str:
    """What to run on the offline machine. A piece not prepared here is named by its Hub id (or left to train.py's
    default), which that machine must then find in its HF cache."""
    words = ["python", "train.py"]
    for flag, folder, name, default in (("--model", model_dir, args.model, TrainConfig.model),
                                        ("--dataset", dataset_dir, args.dataset, TrainConfig.dataset)):
        if folder.expanduser().is_dir():
            words += [flag, str(folder)]
        elif name != default:
            words += [flag, name]
    words += (["--train-split", splits[0]] if splits[0] != "train" else []) + \
             (["--eval-split", splits[1]] if len(splits) > 1 else []) + ["--epochs", str(TrainConfig.epochs)]
    return f"\nCopy {str(args.output_dir).rstrip('/')}/ to the machine without the Hub (at the same relative path) " \
           f"and train there with:\n  {shlex.join(words)}"


# ---------------------------------------------------------------- writing a folder that is complete or absent

def _place(final: Path, fetch, check) -> str:
    """fetch(tmp) then check(tmp) in a hidden sibling folder, renamed to `final` only when both succeed;
    returns what check says."""
    final = final.expanduser()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_PARTIAL}", dir=final.parent))
    try:
        fetch(tmp)
        checked = check(tmp)
        if final.exists():  # --overwrite: the old folder leaves only once the new one is whole
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}{_PARTIAL}old-", dir=final.parent))
            final.rename(old / final.name)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except OSError as e:  # a full disk, a read-only folder: one line, not a traceback
        raise VitfoodError(f"{final}: {first_line(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed
    return checked


def _remove_partials(out: Path) -> None:
    """A run killed outright (SIGKILL, power cut) cannot clean up: its hidden folder would be copied with the rest."""
    for name in (MODEL_DIR, DATASET_DIR):
        for leftover in out.glob(f".{name}{_PARTIAL}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _fetch_model(repo_id: str, folder: Path) -> None:
    hub.download_model(repo_id, local_dir=folder)
    shutil.rmtree(folder / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping, of no use offline


def _fetch_dataset(repo_id: str, splits: list[str], max_rows: int, folder: Path) -> None:
    """A DatasetDict keyed by split, so train.py's --train-split and --eval-split pick them out of save_to_disk."""
    import datasets

    from vitfood.data import load_arrow_split

    parts = {}
    for split in splits:
        ds = load_arrow_split(repo_id, split, max_rows)
        parts[split] = ds.select(range(max_rows)) if max_rows and max_rows < len(ds) else ds
    datasets.DatasetDict(parts).save_to_disk(str(folder))


def _check_model(folder: Path) -> str:
    """Loaded as train.py does, with a placeholder head: train.py puts a fresh one on it for the dataset's labels."""
    from vitfood.model import load_model
    from vitfood.preprocess import load_preprocessing

    model, _ = load_model(folder, labels=["0", "1"])
    load_preprocessing(folder, model.arch.image_size)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    size = sum((folder / f).stat().st_size for f in files) / 1e6
    a = model.arch
    return f"{', '.join(files)} ({size:,.1f} MB), a ViT of {a.num_hidden_layers} layers at {a.image_size}x{a.image_size}"


def _check_dataset(folder: Path, splits: list[str]) -> str:
    from vitfood.data import load_splits

    loaded = load_splits(str(folder), splits[0], splits[1] if len(splits) > 1 else None, 0, 0,
                         TrainConfig.test_size, TrainConfig.seed)
    images = len(loaded.train) + (0 if len(splits) > 1 else len(loaded.eval))
    counts = f"{images:,} images of {splits[0]}" + (f", {len(loaded.eval):,} of {splits[1]}" if len(splits) > 1 else "")
    return f"{counts}; {len(loaded.label_names)} classes"
