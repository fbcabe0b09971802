"""The GPU benchmark's parts, run one after another under a time guard (benchmarks/gpu_all.sh calls this).

    python benchmarks/gpu_all.py [PLAN]     # PLAN: default (the 8-minute plan), or one of the named parts
    python benchmarks/gpu_all.py --plan     # the plan's parts, commands and estimates; runs nothing

Each part is a command run as its own process group. A part that fails or runs out of time is a row with its
error, and the next part runs. Before a part starts, the time left under the guard is its limit; a part marked
optional runs only when the plan's budget still has room for its estimate. Every result row of a part is
copied to $OUT/gpu.jsonl with "part" added; every part also gets a row of its own (status, seconds, estimate);
the parts' output goes to $OUT/gpu.log; $OUT/summary.txt (also printed) is one screen of the results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
WORK = os.environ.get("VITFOOD_BENCH_WORK", "/tmp/vitfood-bench")
IMAGES = 5000  # the guide's job: Food-101's train[:5000], 4,000 to train and 1,000 to evaluate, 3 epochs


@dataclass
class Part:
    name: str
    estimate_s: int
    cmd: list[str]  # "{jsonl}": the part's own rows file; "{work}": the shared folder of data and checkpoints
    why: str = ""  # the estimate's arithmetic
    optional: bool = False  # runs only when the plan's budget has room for its estimate after the parts before it
    limit_s: int | None = None  # at most this long (default: 1.5 x the estimate, at least 30 s more), within the guard


def bench(script: str, *args: str) -> list[str]:
    return [PY, str(HERE / script), *args, "--work", "{work}", "--jsonl", "{jsonl}"]


def data_backend() -> str:
    """How the guide's script reads the folder: `datasets`, as the guide does, where it is installed."""
    import importlib.util

    return "datasets" if importlib.util.find_spec("datasets") else "torch"


def plans() -> dict[str, list[Part]]:
    """The default plan and the named parts. Estimates from the H200 figures of 2026-11-27
    (../shared/measurements/gpu-h200-2026-11-27.md, benchmarks/RESULTS.md); compile times are unmeasured."""
    env = Part("env", 10, [PY, __file__, "env"], "nvidia-smi and the versions")
    data = Part("data", 40, [PY, __file__, "make-data", "--work", "{work}", "--images", str(IMAGES)],
                "5,000 JPEGs at about 40 ms each on 16 cores (12.5 s), two ViT-B checkpoints (about 10 s), the Arrow "
                "conversion where `datasets` is installed (about 15 s, unmeasured)")
    tests = Part("tests", 180, [PY, "-m", "pytest", "-m", "gpu", "tests/", "-q", "-rA", "--durations=0",
                                "-p", "no:cacheprovider"],
                 "the issue's 3 minutes for the GPU tests: test_gpu_training.py about 2 minutes by its own estimate, "
                 "test_gpu_infer.py about 40 s (both unmeasured)",
                 limit_s=200)
    guide = Part("guide", 95, bench("bench_train.py", "guide-job", "--images", str(IMAGES), "--epochs", "3",
                                    "--jobs", "vitfood", "tuned", "guide", "--guide-part", "0.25",
                                    "--data-backend", data_backend()),
                 "train.py at its defaults: 12,000 images at about 1,900 images/s (6 s) + about 15 s fixed; the "
                 "tuned Trainer, eager: 12,000 images at 1,912 images/s (6 s) + about 30 s fixed; the Trainer as "
                 "written for a quarter epoch: 1,000 images at 134 images/s (7.5 s) + one evaluation and save + "
                 "about 20 s start, the rest projected")
    compute = Part("compute", 110, bench("bench_train.py", "compute", "--impls", "vitfood", "hf", "timm",
                                         "--precisions", "bf16", "--compile", "off", "on",
                                         "--compiled-impls", "vitfood", "timm", "--batch-sizes", "256",
                                         "--steps", "10"),
                   "15 s start and matmul peak; eager rows 3 x 5 s (13 steps of about 95 ms, the model built); "
                   "compiled rows 2 x 40 s (the compilation, unmeasured)")
    infer = Part("infer", 45, bench("bench_infer.py", "folder", "--images", str(IMAGES), "--batch-size", "256"),
                 "three processes of about 7 s to start; 5,000 JPEGs through the GPU path (about 4 s at 1,323 "
                 "images/s), the CPU path (about 4 s) and the pipeline (about 15 s, unmeasured)")
    hf_compiled = Part("compute-hf-compiled", 45, bench("bench_train.py", "compute", "--impls", "hf",
                                                        "--precisions", "bf16", "--compile", "on",
                                                        "--batch-sizes", "256", "--steps", "10"),
                       "transformers' ViT compiled: 5 s start + 40 s compilation (unmeasured)", optional=True)
    backend = data_backend()
    return {
        "default": [env, data, tests, guide, compute, infer, hf_compiled],
        "tests": [env, tests],
        "compute": [env, Part("compute", 150, bench("bench_train.py", "compute", "--impls", "vitfood", "hf", "timm",
                                                    "--precisions", "bf16", "--compile", "off", "on",
                                                    "--batch-sizes", "256", "--steps", "10"),
                                    "as the default's compute part, with transformers compiled too"),
                    Part("compute-fp32", 40, bench("bench_train.py", "compute", "--impls", "vitfood", "hf",
                                                   "--precisions", "fp32", "--compile", "off", "--batch-sizes", "128",
                                                   "--steps", "10")),
                    Part("infer-gpu", 20, bench("bench_infer.py", "gpu", "--batch-size", "256")),
                    Part("infer-gpu-compiled", 45, bench("bench_infer.py", "gpu", "--batch-size", "256", "--compile")),
                    Part("infer", 60, infer.cmd, "the default's infer part, making its JPEGs first")],
        "infer": [env, infer],
        "e2e": [env, Part("e2e", 330, bench("bench_train.py", "e2e", "--images", "5120", "--epochs", "2",
                                            "--batch-size", "128", "--grad-accum-steps", "1", "--compile",
                                            "--data-backend", backend))],
        "guide": [env, Part("guide", 400, bench("bench_train.py", "guide-job", "--images", str(IMAGES), "--epochs",
                                                "3", "--data-backend", backend),
                                "the JPEGs (~40 s); train.py (~20 s); the Trainer as written whole (12,000 images at "
                                "134 images/s = 90 s, 3 evaluations and saves, start: ~140 s); tuned compiled (~85 s) "
                                "and eager (~35 s)"),
                  Part("saves", 60, bench("bench_saves.py", "--model-size", "base", "--repeats", "4"))],
        "steady": [env, Part("steady", 270, bench("bench_train.py", "steady", "--images", "6400", "--epochs", "4"))],
    }


DEFAULT_BUDGET_S = 480  # the default plan's 8 minutes
GUARD_S = 540  # no part of the default plan runs past 9 minutes from the start (gpu_all.sh's clock, when it gives one)
NAMED_GUARD_S = 580  # a named part: within one 10-minute device command


# ---------------------------------------------------------------- running the parts


@dataclass
class Runner:
    out: Path
    work: str
    started: float
    guard_s: float
    budget_s: float | None  # for optional parts; None: they always run
    versions: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.started + self.guard_s - time.time()

    def run(self, parts: list[Part]) -> None:
        """Every part, then the summary; a SIGTERM (gpu_all.sh's outer `timeout`) ends the part running, and the
        summary is still written."""
        def stop(signum, frame):
            raise Stopped

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            for k, part in enumerate(parts):
                if str(self.versions.get("device", "")).startswith("CPU"):  # the env part found no CUDA GPU
                    self.not_run(parts[k:], "skipped", "no CUDA GPU here: the parts would take hours on the CPU")
                    break
                try:
                    self.run_part(part)
                except Stopped:
                    self.not_run(parts[k:], "stopped", "stopped by SIGTERM")
                    break
        finally:
            signal.signal(signal.SIGTERM, previous)
        summary = summarise(read_rows(self.out / "gpu.jsonl"), time.time() - self.started)
        (self.out / "summary.txt").write_text(summary + "\n")
        print(summary, flush=True)

    def run_part(self, part: Part) -> None:
        status, rc, error, seconds, output = "ok", 0, "", 0.0, ""
        elapsed = time.time() - self.started
        limit = min(part.limit_s or max(part.estimate_s * 1.5, part.estimate_s + 30), self.left())
        if part.optional and self.budget_s is not None and elapsed + part.estimate_s > self.budget_s:
            status = "skipped"
            error = f"optional: {self.budget_s - elapsed:.0f} s of the budget left, it needs {part.estimate_s}"
        elif limit < min(5, part.estimate_s / 2):  # too little time left to be worth starting
            status, error = "skipped", f"past the {self.guard_s:.0f} s guard"
        else:
            with tempfile.TemporaryDirectory() as tmp:
                jsonl = Path(tmp) / "rows.jsonl"
                cmd = [a.replace("{jsonl}", str(jsonl)).replace("{work}", self.work) for a in part.cmd]
                t = time.time()
                header = f"===== {part.name}: {' '.join(cmd)}"
                rc, output, timed_out = run_group(cmd, limit, self.out / "gpu.log", header)
                seconds = time.time() - t
                rows = read_rows(jsonl)
                if part.name == "tests":
                    rows = pytest_rows(output)
                self.append([{**r, "part": part.name} for r in rows])
            if part.name == "env":
                self.versions = versions_from(output)
            if timed_out:
                status, error = "timed out", f"stopped after {limit:.0f} s; " + last_lines(output)
            elif rc != 0:
                status, error = "failed", f"exit {rc}: " + last_lines(output)
        row = {"job": f"part {part.name}", "part": part.name, "status": status, "seconds": round(seconds, 1),
               "estimate s": part.estimate_s, "rc": rc, "error": error}
        self.append([row])
        at = time.time() - self.started
        print(f"[{at // 60:.0f}:{at % 60:04.1f}] {part.name}: {status} in {seconds:.0f} s "
              f"(estimate {part.estimate_s} s)" + (f": {error}" if error else ""), flush=True)

    def not_run(self, parts: list[Part], status: str, why: str) -> None:
        print(f"gpu_all: {why}", flush=True)
        self.append([{"job": f"part {p.name}", "part": p.name, "status": status, "seconds": 0.0,
                      "estimate s": p.estimate_s, "rc": None, "error": why} for p in parts])

    def append(self, rows: list[dict]) -> None:
        with open(self.out / "gpu.jsonl", "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({**self.versions, **r}) + "\n")



class Stopped(Exception):
    """SIGTERM arrived while the parts ran."""


def run_group(cmd: list[str], limit: float, log: Path, header: str) -> tuple[int, str, bool]:
    """(exit code, stdout and stderr, timed out) of `cmd` in a process group of its own, killed whole at `limit`
    (DataLoader workers and torchrun's processes too). Its output goes straight to the end of `log`, after
    `header`: whatever stops this process, what the part printed is there."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        out.write(f"\n{header}\n".encode())
        out.flush()
        start = out.tell()
        # A process group, not a session: the device machine's own clean-up still reaches it.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, process_group=0)
        try:
            rc, timed_out = proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        finally:  # the part's group, and whatever it left running (a DataLoader worker, a torchrun child)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rc = proc.wait() if rc is None else rc
    with open(log, "rb") as f:
        f.seek(start)
        return rc, f.read().decode("utf-8", errors="replace"), timed_out


def last_lines(output: str, n: int = 3) -> str:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-600:]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed part
            pass
    return rows


# -rA's lines: "PASSED test", "FAILED test - message", "SKIPPED [1] file:line: reason"
_PYTEST = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(?:\[\d+\]\s+)?(\S+?):?(?:\s+-\s+|\s+|$)(.*)$")
_DURATION = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)$")


def pytest_rows(output: str) -> list[dict]:
    """A row per test from pytest's -rA summary and --durations lines."""
    seconds: dict[str, float] = {}
    for line in output.splitlines():
        if m := _DURATION.match(line.strip()):
            seconds[m[3]] = seconds.get(m[3], 0.0) + float(m[1])
    rows = []
    for line in output.splitlines():
        if m := _PYTEST.match(line.strip()):
            rows.append({"job": "gpu test", "test": m[2], "outcome": m[1].lower(), "seconds": seconds.get(m[2]),
                         "message": m[3][:300]})
    return rows


def versions_from(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith("VERSIONS "):
            return json.loads(line[len("VERSIONS "):])
    return {"versions": "unknown (the env part gave none)"}


# ---------------------------------------------------------------- the summary


def summarise(rows: list[dict], elapsed: float) -> str:
    """One screen: the parts, the tests, and each measurement's headline figure."""
    first = next((r for r in rows if "torch" in r), {})
    lines = [f"gpu_all: {first.get('device', '?')}; torch {first.get('torch', '?')}, transformers "
             f"{first.get('transformers', '?')}; {elapsed / 60:.1f} min"]
    parts = [r for r in rows if r.get("job", "").startswith("part ")]
    lines.append("parts: " + ", ".join(f"{r['part']} {r['status']} {r['seconds']:.0f}/{r['estimate s']} s"
                                       for r in parts))
    lines += [f"  {r['part']}: {r['error']}"[:160] for r in parts if r["status"] != "ok"]
    tests = [r for r in rows if r.get("job") == "gpu test"]
    if tests:
        counts = {o: sum(r["outcome"] == o for r in tests) for o in dict.fromkeys(r["outcome"] for r in tests)}
        lines.append("gpu tests: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
        lines += [f"  {r['outcome']}: {r['test']} {r['message']}"[:160] for r in tests
                  if r["outcome"] in ("failed", "error")]

    def fmt(v, spec=",.0f") -> str:
        return format(v, spec) if isinstance(v, (int, float)) else str(v if v is not None else "-")

    for r in rows:
        job, part = r.get("job", ""), r.get("part")
        if r.get("mode") == "e2e-run" or job.startswith("part ") or job == "gpu test":
            continue
        if job.startswith("compute "):
            lines.append(f"{part}: {job[8:]} {r.get('precision', '')} compile {r.get('compile', '')} batch "
                         f"{r.get('batch', '')}: {fmt(r.get('images/s'))} images/s, MFU {fmt(r.get('MFU %'), '.1f')}%"
                         + (f", {fmt(r['speed vs timm'], '.2f')}x timm" if r.get("speed vs timm") else "")
                         + (f" ({r['note']})" if r.get("note") else ""))
        elif "whole process s" in r:
            lines.append(f"{part}: {job}: {fmt(r.get('whole process s'), '.1f')} s whole, "
                         f"{fmt(r.get('steady images/s'))} images/s steady"
                         + (f", vitfood {fmt(r['vitfood speed-up (whole process)'], '.2f')}x"
                            if r.get("vitfood speed-up (whole process)") not in (None, "") else ""))
            if r.get("projection"):
                lines.append(f"  projected: {r['projection']}")
        elif "images/s" in r:
            lines.append(f"{part}: {job}: {fmt(r.get('images/s'))} images/s"
                         + (f", {fmt(r['vs pipeline'], '.2f')}x the pipeline" if "vs pipeline" in r else ""))
        elif "whole save s" in r:
            lines.append(f"{part}: {r.get('save')}: {fmt(r['whole save s'], '.2f')} s whole, snapshot "
                         f"{fmt(r.get('snapshot s'), '.2f')} s")
    return "\n".join(lines)


# ---------------------------------------------------------------- the parts run in this file


def env_part() -> None:
    """The machine and the versions; the VERSIONS line goes into every row of the run."""
    sys.path.insert(0, str(HERE))
    from common import versions

    for cmd in (["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"],
                ["df", "-h", "/dev/shm"]):
        try:
            print(subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout, flush=True)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"{cmd[0]}: {e}")
    v = versions()
    for name in ("timm", "datasets", "accelerate"):
        try:
            v[name] = __import__(name).__version__
        except ImportError:
            v[name] = "absent"
    from vitfood.distributed import usable_cores

    v["cpu cores"] = usable_cores()
    print("VERSIONS " + json.dumps(v), flush=True)


def make_data(work: Path, images: int) -> None:
    """The JPEGs and checkpoints the parts share, made once: bench_train's and bench_infer's own names for them."""
    sys.path.insert(0, str(HERE))
    from common import make_jpeg_folder, make_vit_checkpoint

    from vitfood.distributed import usable_cores  # this process's cores, not the host's

    t = time.time()
    folder = make_jpeg_folder(work / f"jpegs-{images}-101", images, classes=101, processes=usable_cores())
    print(f"{images:,} JPEGs in {time.time() - t:.1f} s", flush=True)
    t = time.time()
    make_vit_checkpoint(work / "vit-base", size="base")
    make_vit_checkpoint(work / "vit-base-cls", size="base", labels=101)
    print(f"two ViT-B checkpoints in {time.time() - t:.1f} s", flush=True)
    if data_backend() == "datasets":  # the guide's script converts the folder to Arrow once: not part of its time
        t = time.time()
        from datasets import load_dataset

        load_dataset("imagefolder", data_dir=str(folder), split="train")
        print(f"Arrow conversion in {time.time() - t:.1f} s", flush=True)


def print_plan(name: str, parts: list[Part]) -> None:
    total = sum(p.estimate_s for p in parts if not p.optional)
    print(f"{name}: {total} s ({total / 60:.1f} min) estimated, optional parts not counted")
    for p in parts:
        print(f"  {p.name:20} {p.estimate_s:4d} s{' (optional)' if p.optional else ''}  {p.why}")
        print(f"  {'':20}         {' '.join(p.cmd)}")


def main(argv: list[str] | None = None) -> int:
    names = list(plans())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", nargs="?", default="default", choices=[*names, "all", "env", "make-data"])
    p.add_argument("--plan", dest="show", action="store_true", help="print the plan and its estimates; run nothing")
    p.add_argument("--work", default=WORK, help="the shared folder of JPEGs and checkpoints")
    p.add_argument("--images", type=int, default=IMAGES, help="make-data: JPEGs")
    args = p.parse_args(argv)
    if args.plan == "env":
        env_part()
        return 0
    if args.plan == "make-data":
        make_data(Path(args.work), args.images)
        return 0
    chosen = {n: ps for n, ps in plans().items() if n != "default"} if args.plan == "all" else \
        {args.plan: plans()[args.plan]}
    if args.show:
        for name, parts in chosen.items():
            print_plan(name, parts)
        return 0
    out = Path(os.environ.get("OUT") or "/tmp/vitfood-gpu")
    out.mkdir(parents=True, exist_ok=True)
    started = float(os.environ.get("GPU_ALL_STARTED") or time.time())  # gpu_all.sh's start: the wheels count too
    parts = [p for ps in chosen.values() for p in ps]
    parts = [p for i, p in enumerate(parts) if p.name != "env" or i == 0]  # "all": the machine described once
    default = args.plan == "default"
    guard = GUARD_S if default else float("inf") if args.plan == "all" else NAMED_GUARD_S
    Runner(out, args.work, started, guard, DEFAULT_BUDGET_S if default else None).run(parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
