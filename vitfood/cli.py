"""The two command lines. Errors a user can fix are one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from vitfood.errors import EXIT_USAGE, OneLineParser, VitfoodError, command_name, first_line


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown: about 1 s once torch and torch._dynamo (which
    every torch optimizer imports) are loaded, a sixth of a small training run.

    Safe after train_main and infer_main return: every file they write is closed by then (the model and
    checkpoints also fsynced), the process group is destroyed, and the standard streams are flushed
    here. DataLoader workers notice that their parent is gone and exit by themselves.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said anyway
            pass
    os._exit(code)


def train_command() -> None:
    """`python train.py` and `vitfood-train`."""
    exit_now(train_main())


def infer_command() -> None:
    """`python infer.py` and `vitfood-infer`."""
    exit_now(infer_main())


_prog = command_name  # the command's name in its messages: train.py, or vitfood-train as a console script

EXIT_BAD_INPUT = 1  # infer.py: some images could not be classified (the others were)


def train_main(argv: list[str] | None = None) -> int:
    from vitfood.config import parse_config
    from vitfood.hub import check_local_paths

    cfg = parse_config(argv)
    try:  # the values, and local folders that are not there, said at once: before torch is even imported
        cfg.validate()
        check_local_paths(cfg.model, cfg.dataset)
    except VitfoodError as e:
        print(f"{_prog('train.py')}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from vitfood.distributed import shutdown_distributed
    from vitfood.resume import TrainingInterrupted
    from vitfood.run import evaluate_only
    from vitfood.train_loop import train

    try:
        evaluate_only(cfg) if cfg.eval_only else train(cfg)
    except VitfoodError as e:
        print(f"{_prog('train.py')}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:  # out of GPU memory where no retry is possible: one line, not a traceback
        if "out of memory" not in str(e).lower():
            raise
        print(f"{_prog('train.py')}: error: out of GPU memory ({first_line(e, 120)}); use a smaller "
              "--micro-batch-size, --batch-size or --eval-batch-size", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as e:
        print(f"{_prog('train.py')}: {e} after saving {e.checkpoint_dir}; to continue exactly where it stopped, run: "
              f"{resume_command(sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return 128 + e.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    finally:
        shutdown_distributed()
    return 0


_RESUME_FLAG = "--resume-from-checkpoint"


def resume_command(argv: list[str], argv0: str | None = None) -> str:
    """The command line that continues an interrupted run, quoted for the shell: the command as it was typed
    (`python train.py` or `python path/to/train.py`; `vitfood-train`), its flags with any --resume-from-checkpoint
    (and its PATH) taken out, and a bare --resume-from-checkpoint added: the newest checkpoint in --output-dir,
    which is the one this run just saved. Under torchrun only the part after torchrun's own options is known."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    name = os.path.basename(argv0)
    if name.startswith("vitfood-"):
        head = [name]  # a console script: found on the PATH, as it was typed
    else:
        head = ["python", argv0 if name == "train.py" else "train.py"]
    kept, i = [], 0
    while i < len(argv):
        word = argv[i]
        flag = word.split("=", 1)[0]
        # argparse accepts any unambiguous prefix (--res is the shortest); the PATH, when given, is the next word.
        if len(flag) >= len("--res") and _RESUME_FLAG.startswith(flag):
            if "=" not in word and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
        else:
            kept.append(word)
        i += 1
    line = shlex.join(head + kept + [_RESUME_FLAG])
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # under torchrun: its options are not in our argv
        line = "torchrun [the same torchrun options] " + shlex.join(head[1:] + kept + [_RESUME_FLAG])
    return line


SUMMARY_MIN_IMAGES = 20  # infer.py prints its summary line from this many inputs on
PROGRESS_MIN_IMAGES = 50  # and shows a progress bar above this many, when stderr is a terminal


def infer_parser() -> argparse.ArgumentParser:
    """infer.py's command line. Imports no torch: --help and flag errors are instant."""
    from vitfood.config import HelpWithDefaults
    from vitfood.paths import DEFAULT_OUTPUT_DIR

    parser = OneLineParser(
        prog=_prog("infer.py"),
        description="Classify images with a model saved by train.py.",
        epilog="Each IMAGE may be an image file, a folder (searched recursively; hidden files skipped), a glob\n"
               "pattern, quoted or not ('photos/**/*.jpg'), or an http(s) URL. Results come in argument order.\n"
               "An input that cannot be classified is one 'infer.py: error:' line on stderr and exit status 1;\n"
               "the others are still classified.\n\n"
               "examples:\n"
               "  python infer.py photo.jpg                          top-5 labels from ./vitfood-output\n"
               "  python infer.py --model ./my_model photos/ --top-k 3\n"
               "  python infer.py photos/ --json > labels.jsonl      one JSON object per image\n",
        formatter_class=HelpWithDefaults)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders, glob patterns or URLs")
    parser.add_argument("--model", default=DEFAULT_OUTPUT_DIR, metavar="DIR|HUB_ID",
                        help="folder written by train.py, or a Hub model id")
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="labels shown per image")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help='one JSON object per line: {"image", "predictions"}')
    fmt.add_argument("--csv", action="store_true",
                     help="CSV with the header image,rank,label,score: one row per prediction, rank 1 the best")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: half-precision autocast on a CUDA GPU (bf16 where the GPU supports it), fp32 "
                             "on the CPU")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="give up on a URL after this long (connecting, waiting for data, or downloading)")
    parser.add_argument("--decoder", choices=("auto", "gpu", "cpu"), default="auto",
                        help="where images are decoded and resized. gpu: JPEGs in batches by the GPU's JPEG decoder "
                             "(other images, and JPEGs it cannot take, by PIL on the CPU); cpu: all by PIL, as "
                             "transformers' pipeline does; auto: gpu when the model runs on a CUDA GPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model's blocks (one compilation serves all of them): some seconds "
                             "up front, then faster batches on a GPU (for large folders)")
    return parser


def infer_main(argv: list[str] | None = None) -> int:
    from vitfood.paths import DEFAULT_OUTPUT_DIR  # not vitfood.inference: --help and flag errors need no torch

    parser = infer_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if not 0 < args.timeout < float("inf"):
        parser.error("--timeout must be a number of seconds, more than 0")
    if os.path.normpath(args.model) == DEFAULT_OUTPUT_DIR and not os.path.exists(args.model):
        from vitfood.hub import no_trained_model  # before torch is imported: not trained yet is said at once

        print(f"{_prog('infer.py')}: error: {no_trained_model()}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _infer(args)
    except KeyboardInterrupt:
        print(f"{_prog('infer.py')}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `infer.py photos/ | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141  # the shell's 128 + SIGPIPE


def _infer(args: argparse.Namespace) -> int:
    import time

    import torch

    from vitfood.distributed import resolve_device, resolve_precision
    from vitfood.gpu_decode import decoder_kind, make_decoder
    from vitfood.inference import classify_stream, compile_model, expand_inputs, load_classifier

    try:
        device = resolve_device(args.device)
        decoder_kind(args.decoder, device)  # a --decoder this machine cannot do fails before the model loads
        clf = load_classifier(args.model, str(device))
        decoder, note = make_decoder(args.decoder, clf.prep, device)
    except VitfoodError as e:
        print(f"{_prog('infer.py')}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if note:
        print(f"{_prog('infer.py')}: {note}", file=sys.stderr)
    if args.compile:
        compile_model(clf)
    start = time.perf_counter()
    inputs = expand_inputs(args.images)
    bar = None
    if len(inputs) > PROGRESS_MIN_IMAGES and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(inputs), unit="img", file=sys.stderr, dynamic_ncols=True, leave=False)
    emit = _emitter(args, bar)
    classified = failed = 0
    try:
        for r in classify_stream(clf, inputs, top_k=args.top_k, batch_size=args.batch_size, timeout=args.timeout,
                                 precision=resolve_precision(args.precision, device), decoder=decoder):
            if r.error is not None:
                failed += 1
                if bar is not None:
                    bar.write(f"{_prog('infer.py')}: error: {r.error}", file=sys.stderr)
                else:
                    print(f"{_prog('infer.py')}: error: {r.error}", file=sys.stderr)
            else:
                classified += 1
                emit(r.image, r.predictions)
            if bar is not None:
                bar.update()
    except torch.cuda.OutOfMemoryError:
        print(f"{_prog('infer.py')}: error: out of GPU memory with --batch-size {args.batch_size}; use a smaller one "
              f"(the {classified} images printed above were classified)", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if bar is not None:
            bar.close()
    if len(inputs) >= SUMMARY_MIN_IMAGES:
        seconds = time.perf_counter() - start
        print(f"{_prog('infer.py')}: classified {classified} images in {seconds:.1f} s ({classified / seconds:.1f} images/s), "
              f"{failed} failed", file=sys.stderr)
    return EXIT_BAD_INPUT if failed else 0


def _emitter(args: argparse.Namespace, bar):
    """The writer of one classified image to stdout, in the chosen format, flushed at once."""
    out = sys.stdout
    if args.csv:
        import csv

        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["image", "rank", "label", "score"])

        def write(image: str, predictions: list[dict]) -> None:
            writer.writerows([image, rank, p["label"], p["score"]] for rank, p in enumerate(predictions, 1))
    elif args.json:
        def write(image: str, predictions: list[dict]) -> None:
            out.write(json.dumps({"image": image, "predictions": predictions}) + "\n")
    else:
        def write(image: str, predictions: list[dict]) -> None:
            out.write(image + "\n" + "".join(f"  {p['score']:.4f}  {p['label']}\n" for p in predictions))

    def emit(image: str, predictions: list[dict]) -> None:
        if bar is not None and out.isatty():  # both on the terminal: take the bar away while writing
            with bar.external_write_mode(file=out):
                write(image, predictions)
                out.flush()
        else:
            write(image, predictions)
            out.flush()

    return emit


def prepare_command() -> None:
    """`python prepare.py` and `vitfood-prepare`."""
    from vitfood.prepare import main

    exit_now(main())
