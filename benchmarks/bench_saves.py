"""What a save costs the training thread: the whole save, as train.py made it before the background
writer, against the snapshot the training thread still takes (the writer thread writes and fsyncs).

A ViT with 101 labels and its AdamW state (after one step), on the device train.py would use; each save
goes to --work on this machine's disk. Medians of --repeats saves.

    python benchmarks/bench_saves.py --model-size base --repeats 4
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import make_vit_checkpoint, table, versions, write_jsonl

from vitfood import checkpoint
from vitfood.models import hf_files, load_model
from vitfood.optim import build_optimizer


def seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", choices=["tiny", "base"], default="base")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--work", help="folder for the model and the saves (default: a temp folder)")
    p.add_argument("--jsonl", help="append the results to this JSON-lines file")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="vitfood-bench-"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, base_config = load_model(make_vit_checkpoint(work / f"vit-{args.model_size}-cls", size=args.model_size,
                                                        labels=101))
    model.to(device)
    optimizer = build_optimizer(model, 1e-4, 0.0, device)
    model(torch.randn(2, 3, model.arch.image_size, model.arch.image_size, device=device)).sum().backward()
    optimizer.step()
    prep, results, state = {"image_mean": [0.5] * 3}, {"eval_accuracy": 0.5}, {"run": {"step": 1}}
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    step = iter(range(1, 10**6))
    files = lambda: hf_files(model, base_config, prep)  # noqa: E731
    whole = seconds(lambda: checkpoint.save_training_state(out, next(step), model, base_config, prep,
                                                            optimizer.state_dict(), {}, state, 1), args.repeats)
    snapshot = seconds(lambda: checkpoint.training_state_files(files(), optimizer.state_dict(), {}, state),
                       args.repeats)
    best_whole = seconds(lambda: checkpoint.write_best(out, checkpoint.best_model_files(files(), results)),
                         args.repeats)
    best_snapshot = seconds(lambda: checkpoint.best_model_files(files(), results), args.repeats)
    size = sum(len(v) for v in checkpoint.training_state_files(files(), optimizer.state_dict(), {}, state).values())
    rows = [{"save": f"checkpoint, {size / 1e6:,.0f} MB", "whole save s": statistics.median(whole),
             "snapshot s": statistics.median(snapshot)},
            {"save": "best model", "whole save s": statistics.median(best_whole),
             "snapshot s": statistics.median(best_snapshot)}]
    for r in rows:
        r["training thread's share"] = r["snapshot s"] / r["whole save s"]
    write_jsonl(args.jsonl, [{**r, "model_size": args.model_size, "device": str(device)} for r in rows])
    print(versions(), f"ViT-{args.model_size}, {device}, {args.repeats} saves each")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
