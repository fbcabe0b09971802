"""The two command lines. Errors a user can fix are one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys

from vitfood.errors import VitfoodError

EXIT_USAGE = 2  # bad flags, an unusable model, dataset or output folder
EXIT_BAD_INPUT = 1  # infer.py: some images could not be classified (the others were)


def train_main(argv: list[str] | None = None) -> int:
    from vitfood.config import parse_config

    cfg = parse_config(argv)
    from vitfood.train_loop import TrainingInterrupted, train

    try:
        train(cfg)
    except VitfoodError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as e:
        print(f"train.py: {e} after saving {e.checkpoint_dir}; to continue exactly where it stopped, run the "
              f"same command with --resume-from-checkpoint", file=sys.stderr)
        return 128 + e.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    return 0


def infer_main(argv: list[str] | None = None) -> int:
    from vitfood.inference import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(description="Classify images with a model saved by train.py.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--model", default=DEFAULT_MODEL_DIR, help="folder written by train.py, or a Hub model id")
    parser.add_argument("--top-k", type=int, default=5, help="labels shown per image")
    parser.add_argument("--json", action="store_true", help='one JSON object per line: {"image", "predictions"}')
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")

    from vitfood.inference import load_classifier, topk_predictions
    from vitfood.preprocess import BadImageError

    try:
        clf = load_classifier(args.model)
    except VitfoodError as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    failed = 0
    for path in args.images:
        # One image at a time: a bad file costs only its own line, never its neighbours' results.
        try:
            predictions = topk_predictions(clf.logits([path]), clf.labels, args.top_k)[0]
        except BadImageError as e:
            print(f"infer.py: error: {e}", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            print(json.dumps({"image": path, "predictions": predictions}), flush=True)
        else:
            print(path)
            for p in predictions:
                print(f"  {p['score']:.4f}  {p['label']}")
            sys.stdout.flush()
    return EXIT_BAD_INPUT if failed else 0
