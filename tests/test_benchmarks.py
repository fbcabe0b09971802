"""The benchmarks run (tiny configurations on the CPU): each prints its Markdown table and JSON lines."""

import json
import os
import subprocess
import sys

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


def test_bench_data_compares_the_pipelines(tmp_path):
    rows = bench("bench_data.py", "--images", 12, "--epochs", 2, work=tmp_path)
    assert [r["pipeline"] for r in rows] == ["guide", "vitfood, cache off", "vitfood"]
    assert rows[0]["speed vs guide"] == 1.0
    assert all(r["images/s per core"] > 0 for r in rows)
    assert not (tmp_path / "decoded-images").exists()


def test_bench_train_compute_smoke(tmp_path):
    rows = bench("bench_train.py", "compute", "--smoke", work=tmp_path)
    assert [r["job"] for r in rows] == ["compute vitfood", "compute hf"]
    for r in rows:
        assert r["images/s"] > 0 and r["MFU %"] > 0 and r["ms/step"] > 0


def test_bench_train_end_to_end_smoke(tmp_path):
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate (pip install -e '.[bench]')")
    rows = bench("bench_train.py", "e2e", "--smoke", work=tmp_path)
    assert [r["job"] for r in rows] == ["vitfood train.py", "Trainer, guide as written", "Trainer, tuned"]
    for r in rows:
        assert r["whole process s"] > 0 and 0 <= r["eval accuracy"] <= 1
    assert rows[0]["steady images/s"] > 0 and rows[2]["steady images/s"] > 0  # several steps of 4 images each


def test_bench_infer_cold_smoke_is_the_default_without_a_gpu(tmp_path):
    err = []
    rows = bench("bench_infer.py", "--model-size", "tiny", "--repeats", 1, work=tmp_path, stderr=err)  # no mode
    assert "bench_infer.py: no mode given; no GPU here, so running: bench_infer.py cold" in err[0]
    assert rows[0]["vitfood infer.py s"] > 0 and rows[0]["transformers.pipeline s"] > 0


def test_vit_base_flops_match_the_published_figure():
    # ViT-B/16 at 224: 17.6 GMAC forward = 35.2 GFLOP (the performance issue's figure).
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import count_flops_per_image

    from vitfood.model import ViTArch

    assert count_flops_per_image(ViTArch(), 101) == pytest.approx(35.2e9, rel=0.01)
