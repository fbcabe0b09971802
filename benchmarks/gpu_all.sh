#!/usr/bin/env bash
# The GPU benchmark in one command for one lent H100 or H200 with 16 cores: with no argument, the default plan
# below in at most 8 minutes by its estimate, making its own data; a guard stops it at 9 minutes whatever happens.
# Every row goes to $OUT/gpu.jsonl (one JSON object per measurement: job, settings, numbers, versions, "part");
# the parts' output to $OUT/gpu.log; a one-screen summary to $OUT/summary.txt and stdout. A part that fails or
# runs out of time is a row with its error, and the next part runs. Carried wheels in .whl/ (e.g. `datasets`,
# see the device README) are installed first; nothing needs the network (HF_HUB_OFFLINE=1, models from configs).
#
# The default plan (benchmarks/gpu_all.py --plan prints it with its commands), estimated from the H200 figures
# of 2026-11-27 (../shared/measurements/gpu-h200-2026-11-27.md, benchmarks/RESULTS.md); compile times unmeasured:
#   part       estimate  what, and the arithmetic
#   env          10 s    nvidia-smi, versions, /dev/shm (and the carried wheels' install before it)
#   data         40 s    5,000 JPEGs at ~40 ms each on 16 cores (12.5 s), two ViT-B checkpoints (~10 s), the
#                        Arrow conversion where `datasets` is installed (~15 s)
#   tests       180 s    pytest -m gpu tests/: the issue's 3 minutes (test_gpu_training.py ~2 min, test_gpu_infer ~40 s)
#   guide        95 s    the guide's job (5,000 JPEGs, 3 epochs): train.py at its defaults (12,000 images at
#                        ~1,900 images/s = 6 s, + ~15 s fixed), the tuned Trainer eager (12,000 at 1,912/s = 6 s,
#                        + ~30 s fixed), the Trainer as written for 0.25 epoch (1,000 images at 134/s = 7.5 s, one
#                        evaluation and save, ~20 s start; its whole process projected, the arithmetic printed)
#   compute     110 s    bf16, batch 256: vitfood, transformers, timm eager (3 x ~5 s: 13 steps of ~95 ms) and
#                        vitfood, timm compiled (2 x ~40 s of compilation), + 15 s start and matmul peak
#   infer        45 s    infer.py on the 5,000 JPEGs: GPU path (~4 s at 1,323 images/s), CPU path (~4 s),
#                        transformers.pipeline (~15 s), each a process of ~7 s start
#   total       480 s    = 8.0 minutes
#   compute-hf-compiled  45 s, optional: runs only when the parts before it left that much of the 8 minutes
#
# The longer parts, by name (each fits one 10-minute device command; `all` runs them all, about 25 minutes):
#   benchmarks/gpu_all.sh compute   bf16 eager and compiled for all three, fp32, inference compute and folder (~5.5 min)
#   benchmarks/gpu_all.sh guide     the guide's job whole: the Trainer as written all 3 epochs, tuned compiled and
#                                   eager; a save's cost to the training thread (~8 min)
#   benchmarks/gpu_all.sh e2e       5,120 JPEGs, 2 epochs, 128 x 1 compiled, against the Trainer (~5.5 min)
#   benchmarks/gpu_all.sh steady    6,400 JPEGs x 4 epochs: the defaults, the best flags cold and warm (~4.5 min)
#   benchmarks/gpu_all.sh tests     the GPU tests alone;   benchmarks/gpu_all.sh infer   the folder job alone
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-/tmp/vitfood-gpu}" GPU_ALL_STARTED="$(date +%s)" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels (the device README): installed, then on the path
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || echo "gpu_all.sh: the carried wheels did not install"
fi
guard=570  # the default plan's guard is 540 s inside gpu_all.py; this one also catches a hung gpu_all.py
case "${1:-default}" in default) ;; all) guard=3600 ;; *) guard=595 ;; esac
timeout -k 10 "$guard" python3 benchmarks/gpu_all.py "$@"
