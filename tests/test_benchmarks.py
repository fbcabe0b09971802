"""The benchmarks run (tiny configurations on the CPU): each prints its Markdown table and JSON lines."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import types

import pytest

from helpers import ROOT


def bench(script, *args, work, timeout=300, stderr=None):
    """The benchmark's result rows; its stderr is appended to the list `stderr`, when given."""
    jsonl = work / "results.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args), "--work", str(work),
                        "--jsonl", str(jsonl)], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    if stderr is not None:
        stderr.append(r.stderr)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows = [r for r in rows if r.get("mode") != "e2e-run"]  # each e2e job's own line, written as it ends
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)  # header, rule, one line per result: the table is printed last
    assert r.stdout.rstrip().endswith(table[-1])
    return rows


@pytest.mark.bench
def test_bench_data_compares_the_pipelines(tmp_path):
    rows = bench("bench_data.py", "--images", 12, "--epochs", 2, work=tmp_path)
    assert [r["pipeline"] for r in rows] == ["guide", "vitfood, cache off", "vitfood"]
    assert rows[0]["speed vs guide"] == 1.0
    assert all(r["images/s per core"] > 0 for r in rows)
    assert not (tmp_path / "decoded-images").exists()


@pytest.mark.bench
def test_bench_train_compute_smoke(tmp_path):
    rows = bench("bench_train.py", "compute", "--smoke", work=tmp_path)
    assert [r["job"] for r in rows] == ["compute vitfood", "compute hf"]
    for r in rows:
        assert r["images/s"] > 0 and r["MFU %"] > 0 and r["ms/step"] > 0
    # The timm peer row: measured where timm is installed (the GPU image), else one row that says why not.
    (tmp_path / "results.jsonl").unlink()
    rows = bench("bench_train.py", "compute", "--smoke", "--impls", "timm", work=tmp_path)
    assert [r["job"] for r in rows] == ["compute timm"]
    if importlib.util.find_spec("timm") is None:
        assert rows[0]["images/s"] is None and rows[0]["note"] == "skipped: timm is not installed (pip install timm)"
    else:
        assert rows[0]["images/s"] > 0


def bench_train_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    return bench_train


def test_bench_train_timm_peer_is_vit_b16_and_its_speed_column(monkeypatch):
    bt = bench_train_module()
    from vitfood.models.vit import ViTArch

    made = []
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(
        create_model=lambda name, **kwargs: made.append((name, kwargs)) or "model"))
    bt.timm_vit(ViTArch())  # ViT-B/16 at 224: timm's own, as the issue names it
    bt.timm_vit(ViTArch(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128))
    assert made[0] == ("vit_base_patch16_224", {"pretrained": False, "num_classes": 101})
    assert made[1] == ("vit_base_patch16_224", {"pretrained": False, "num_classes": 101, "img_size": 224,
                                                "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 4,
                                                "mlp_ratio": 2.0})
    key = {"precision": "bf16", "compile": "on", "batch": 256}
    rows = bt.with_speed_vs_timm([{"job": "compute vitfood", **key, "images/s": 4000.0},
                                  {"job": "compute timm", **key, "images/s": 3200.0},
                                  {"job": "compute vitfood", **key, "batch": 128, "images/s": 3000.0}])
    assert [r["speed vs timm"] for r in rows] == [1.25, 1.0, ""]
    assert "speed vs timm" not in bt.with_speed_vs_timm([{"job": "compute timm", "images/s": None, "note": "x"}])[0]


def test_bench_train_fixed_cost_from_the_timeline():
    bt = bench_train_module()
    timeline = [{"at_s": 3.0, "event": "imports done"}, {"at_s": 4.0, "event": "training started"},
                {"at_s": 9.0, "event": "first optimizer step done (with any compilation)"},  # with compilation
                {"at_s": 19.0, "event": "epoch 1 evaluated"}, {"at_s": 19.5, "event": "best model saved"},
                {"at_s": 20.0, "event": "checkpoint step-00000010 saved"},
                {"at_s": 30.0, "event": "epoch 2 evaluated"}, {"at_s": 31.0, "event": "checkpoint step-00000020 saved"},
                {"at_s": 33.0, "event": "report and model card written"}]
    cost = bt.fixed_cost(34.0, timeline)  # 34 s whole process, of which 10 + 10 s the two epochs
    assert cost == {"fixed cost s": 14.0, "start and exit s": 10.0, "saves s": 1.0, "after last evaluation s": 3.0}
    # Only differences count: a timeline whose zero is a second off gives the same figures.
    assert bt.fixed_cost(34.0, [{**e, "at_s": e["at_s"] + 1} for e in timeline]) == cost
    assert bt.fixed_cost(34.0, timeline[:3]) is None  # no epoch evaluated: no figure


@pytest.mark.bench
def test_bench_train_end_to_end_smoke(tmp_path):
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (pip install -e '.[bench]')")
    # The Trainer as written is the guide job's smoke row: left out here for time.
    rows = bench("bench_train.py", "e2e", "--smoke", "--jobs", "vitfood", "tuned", work=tmp_path)
    assert [r["job"] for r in rows] == ["vitfood train.py", "Trainer, tuned"]
    for r in rows:
        assert r["whole process s"] > 0 and 0 <= r["eval accuracy"] <= 1
    assert rows[0]["steady images/s"] > 0 and rows[1]["steady images/s"] > 0  # several steps of 4 images each
    assert 0 < rows[0]["fixed cost s"] < rows[0]["whole process s"]  # from run.json's timeline


@pytest.mark.bench
def test_bench_train_guide_job_smoke(tmp_path):
    """The guide's job: train.py with nothing but --model, --dataset and --epochs, against the Trainer as
    written (the tuned Trainer's rows are the e2e smoke's command with other flags: left out for time)."""
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (pip install -e '.[bench]')")
    rows = bench("bench_train.py", "guide-job", "--smoke", "--epochs", 2, "--jobs", "vitfood", "guide",
                 "--data-backend", "torch", work=tmp_path)
    assert [r["job"] for r in rows] == ["vitfood train.py, its defaults", "Trainer, guide as written"]
    ours, guide = rows
    assert 0 < ours["fixed cost s"] < ours["whole process s"] and ours["steady images/s"] > 0
    assert ours["settings"].startswith("fp32, 16 x 4, 16 per pass, compile off")  # the CPU's resolved defaults
    assert guide["whole process s"] > 0 and guide["vitfood speed-up (whole process)"] > 0
    assert "fixed cost s" not in guide  # the Trainer has no timeline
    run = json.loads((tmp_path / "run-guide-job-0-0" / "vitfood-output" / "run.json").read_text())
    assert run["command"][1:] == ["--model", str(tmp_path / "vit-tiny"), "--dataset", str(tmp_path / "jpegs-40-4"),
                                  "--epochs", "2"]  # no other flag: the defaults
    run = next(json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()
               if '"e2e-run"' in line and "guide as written" in line)
    timings = run["guide timings"]  # what a projection needs: the images, each evaluation's and save's seconds
    assert timings["train_images"] == 32 and len(timings["eval_s"]) == len(timings["save_s"]) == 2
    assert all(0 < t < guide["whole process s"] for t in timings["eval_s"] + timings["save_s"])


def test_the_trainer_as_written_run_in_part_is_projected_whole(tmp_path, monkeypatch):
    """--guide-part: a quarter of the first of 3 epochs measured (20 s, 134 images/s, one evaluation of 5 s and
    one save of 3 s): 2.75 epochs of 4,000 images more, and 2 more evaluations and saves."""
    bt = bench_train_module()
    part = {"steady_images_per_s": 134.0, "eval_accuracy": 0.5, "train_images": 4000, "eval_s": [5.0], "save_s": [3.0]}
    monkeypatch.setattr(bt.os, "sync", lambda: None)  # nothing of this test's to write back
    monkeypatch.setattr(sys.modules["common"], "versions", dict)  # the rows' versions: importing transformers, 7 s
    monkeypatch.setattr(bt, "run_job", lambda cmd, log, cwd=None, cache_dir=None:
                        (20.0, "GUIDE_RESULT " + json.dumps(part) + "\n"))
    args = types.SimpleNamespace(repeats=1, mode="guide-job", jsonl=str(tmp_path / "rows.jsonl"), images=5000, epochs=3)
    job = bt.Job("Trainer, guide as written", "guide", ["guide_trainer.py"], "guide", part_epochs=0.25)
    [row] = bt.run_jobs([job], args, tmp_path)
    assert row["whole process s"] == pytest.approx(20 + 2.75 * 4000 / 134 + 2 * (5 + 3))
    assert row["projection"] == ("20.0 s measured (0.25 of 3 epochs) + 11,000 images / 134.0 images/s + 2 x 8.0 s "
                                 "(evaluation and save) = 118.1 s")
    assert json.loads((tmp_path / "rows.jsonl").read_text())["measured s"] == 20.0
    # A part without a steady rate projects nothing, and claims no whole-process figure.
    part["steady_images_per_s"] = None
    [row] = bt.run_jobs([job], args, tmp_path)
    assert row["whole process s"] is None and row["projection"].startswith("none")


@pytest.mark.bench
def test_bench_train_steady_smoke(tmp_path):
    """The steady job's best-flags rows, cold and with the compiler cache the first left (its defaults row
    is the guide job's command with more images)."""
    rows = bench("bench_train.py", "steady", "--smoke", "--jobs", "best", "best-warm", work=tmp_path)
    assert [r["job"] for r in rows] == ["train.py, best flags", "train.py, best flags, warm compiler cache"]
    for r in rows:
        assert r["flags"].startswith("--batch-size 8 --grad-accum-steps 1")
        assert r["steady images/s"] > 0 and 0 < r["fixed cost s"] < r["whole process s"]
    runs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    caches = [r["compiler cache"] for r in runs if r["mode"] == "e2e-run"]
    assert len(caches) == 2 and caches[0] == caches[1]  # the warm run reuses the cold run's compiler cache


@pytest.mark.bench
def test_bench_infer_cold_smoke_is_the_default_without_a_gpu(tmp_path):
    err = []
    rows = bench("bench_infer.py", "--model-size", "tiny", "--repeats", 1, work=tmp_path, stderr=err)  # no mode
    assert "bench_infer.py: no mode given; no GPU here, so running: bench_infer.py cold" in err[0]
    assert rows[0]["vitfood infer.py s"] > 0 and rows[0]["transformers.pipeline s"] > 0


def test_vit_base_flops_match_the_published_figure():
    # ViT-B/16 at 224: 17.6 GMAC forward = 35.2 GFLOP (the performance issue's figure).
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import count_flops_per_image

    from vitfood.models.vit import ViTArch

    assert count_flops_per_image(ViTArch(), 101) == pytest.approx(35.2e9, rel=0.01)


@pytest.mark.bench
def test_bench_saves_smoke(tmp_path):
    rows = bench("bench_saves.py", "--model-size", "tiny", "--repeats", 1, work=tmp_path)
    assert [r["save"].split(",")[0] for r in rows] == ["checkpoint", "best model"]
    assert all(r["whole save s"] > 0 and r["snapshot s"] > 0 for r in rows)


# ---------------------------------------------------------------- gpu_all.sh: the one GPU command


def gpu_all_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_all

    return gpu_all


def test_gpu_all_default_plan_fits_8_minutes_its_header_says_so_and_every_command_parses():
    ga, bt = gpu_all_module(), bench_train_module()
    import bench_infer

    plans = ga.plans()
    default = plans["default"]
    assert [p.name for p in default] == ["env", "data", "tests", "guide", "compute", "infer", "compute-hf-compiled"]
    assert sum(p.estimate_s for p in default if not p.optional) <= ga.DEFAULT_BUDGET_S == 480 < ga.GUARD_S <= 540
    header = (ROOT / "benchmarks" / "gpu_all.sh").read_text()
    for p in default:  # the script's header shows each part's estimate, as the plan has it
        assert re.search(rf"^#\s+{re.escape(p.name)}\s+{p.estimate_s} s\b", header, re.M), p.name
    assert re.search(r"^#\s+total\s+480 s\s+= 8.0 minutes", header, re.M)
    parsers = {"bench_train.py": bt.parse_args, "bench_infer.py": bench_infer.parse_args}
    for plan in plans.values():
        for part in plan:
            cmd = [a.replace("{jsonl}", "rows.jsonl").replace("{work}", "work") for a in part.cmd]
            script = os.path.basename(cmd[1])
            if script in parsers:
                args = parsers[script](cmd[2:])  # exits on a flag the script does not take
                assert args.jsonl == "rows.jsonl" and args.work == "work"
            elif script == "gpu_all.py":
                assert cmd[2] in ("env", "make-data")
            elif script == "bench_saves.py":
                assert cmd[2:4] == ["--model-size", "base"]
            else:
                assert cmd[1:5] == ["-m", "pytest", "-m", "gpu"], cmd


def test_gpu_all_runs_every_part_through_failures_and_the_guard(tmp_path, capsys):
    """Fake parts: each part's rows land in gpu.jsonl with the versions, a failed part is a row with its error and
    the next still runs, the guard stops a part that runs too long and skips the rest, an optional part runs only
    within the budget; the summary is one screen."""
    ga = gpu_all_module()
    py = [sys.executable, "-c"]
    row = ("import json, sys; open(sys.argv[1], 'a').write(json.dumps({'job': 'compute vitfood', 'precision': "
           "'bf16', 'compile': 'off', 'batch': 256, 'images/s': 2706.0, 'MFU %': 38.9}) + '\\n')")
    parts = [ga.Part("env", 1, [*py, "print('VERSIONS ' + '{\"torch\": \"2.11\", \"device\": \"H200\"}')"]),
             ga.Part("compute", 1, [*py, row, "{jsonl}"]),
             ga.Part("broken", 1, [*py, "import sys; print('about to fail'); sys.exit('ValueError: no such model')"]),
             ga.Part("late-optional", 100, [*py, "print('runs')"], optional=True),
             ga.Part("slow", 1, [*py, "import time; print('started', flush=True); time.sleep(60)"], limit_s=60),
             ga.Part("after", 1, [*py, "print('never')"])]
    start = time.time()
    ga.Runner(tmp_path, str(tmp_path / "work"), started=start, guard_s=2.5, budget_s=50).run(parts)
    assert time.time() - start < 15
    rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    status = {r["part"]: r["status"] for r in rows if r["job"].startswith("part ")}
    assert status == {"env": "ok", "compute": "ok", "broken": "failed", "late-optional": "skipped",
                      "slow": "timed out", "after": "skipped"}
    assert all(r["torch"] == "2.11" for r in rows[1:])  # the versions in every row after the env part's
    measured = [r for r in rows if r["job"] == "compute vitfood"]
    assert len(measured) == 1 and measured[0]["part"] == "compute" and measured[0]["images/s"] == 2706.0
    broken = next(r for r in rows if r["job"] == "part broken")
    assert broken["rc"] == 1 and broken["error"] == "exit 1: about to fail | ValueError: no such model"
    assert next(r for r in rows if r["job"] == "part slow")["error"].endswith("started")
    log = (tmp_path / "gpu.log").read_text()
    assert "===== broken:" in log and "started" in log and "never" not in log  # even a killed part's output
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.startswith("gpu_all: H200; torch 2.11")
    assert "compute: vitfood bf16 compile off batch 256: 2,706 images/s, MFU 38.9%" in summary
    assert "  broken: exit 1: about to fail | ValueError: no such model" in summary
    assert len(summary.splitlines()) <= 40 and summary in capsys.readouterr().out
    # Without a CUDA GPU the env part says so and nothing else runs.
    (tmp_path / "gpu.jsonl").unlink()
    cpu = [ga.Part("env", 1, [*py, "print('VERSIONS ' + '{\"device\": \"CPU (2 cores)\"}')"]), parts[1]]
    ga.Runner(tmp_path, "work", started=time.time(), guard_s=60, budget_s=50).run(cpu)
    rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert [(r["part"], r["status"]) for r in rows] == [("env", "ok"), ("compute", "skipped")]
    assert rows[1]["error"] == "no CUDA GPU here: the parts would take hours on the CPU"


def test_gpu_all_reads_pytests_outcomes():
    ga = gpu_all_module()
    output = ("12.50s call     tests/test_gpu_infer.py::test_a\n0.50s setup    tests/test_gpu_infer.py::test_a\n"
              "PASSED tests/test_gpu_infer.py::test_a\n"
              "FAILED tests/test_gpu_training.py::test_b - AssertionError: weights differ\n"
              "SKIPPED [1] tests/test_gpu_training.py:40: needs 2 GPUs\n")
    assert ga.pytest_rows(output) == [
        {"job": "gpu test", "test": "tests/test_gpu_infer.py::test_a", "outcome": "passed", "seconds": 13.0,
         "message": ""},
        {"job": "gpu test", "test": "tests/test_gpu_training.py::test_b", "outcome": "failed", "seconds": None,
         "message": "AssertionError: weights differ"},
        {"job": "gpu test", "test": "tests/test_gpu_training.py:40", "outcome": "skipped", "seconds": None,
         "message": "needs 2 GPUs"}]


def test_gpu_all_sh_shows_its_plan(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_all.sh"), "--plan"], capture_output=True, text=True,
                       env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
                            "OUT": str(tmp_path)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("default: 480 s (8.0 min) estimated")


def test_gpu_all_stopped_by_sigterm_ends_its_part_and_still_writes_the_summary(tmp_path):
    """gpu_all.sh's outer `timeout` sends SIGTERM: the part running is ended with its processes, the parts not
    run are rows saying so, and the summary is written."""
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
import gpu_all
py = [sys.executable, "-c"]
parts = [gpu_all.Part("sleeper", 1, [*py, "import subprocess, sys, time; "
                                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                                      "print('child started', flush=True); time.sleep(60)"]),
         gpu_all.Part("next", 1, [*py, "print('never')"])]
gpu_all.Runner(gpu_all.Path({str(tmp_path)!r}), "work", time.time(), 100, None).run(parts)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    deadline, log = time.time() + 30, tmp_path / "gpu.log"
    while not (log.exists() and "child started" in log.read_text()):
        assert time.time() < deadline
        time.sleep(0.1)
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert [(r["part"], r["status"]) for r in rows] == [("sleeper", "stopped"), ("next", "stopped")]
    assert (tmp_path / "summary.txt").read_text() in out
    leftover = subprocess.run(["pgrep", "-f", "import time; time.sleep(60)"], capture_output=True, text=True)
    assert leftover.stdout == ""  # the part's own child ended with it
