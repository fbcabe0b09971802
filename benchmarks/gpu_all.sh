#!/usr/bin/env bash
# The whole GPU benchmark in one go (about 8 minutes on one H100), for a lent GPU machine:
# compute-only training (vitfood and transformers' model), end to end from JPEGs against the Trainer
# (as written and tuned), inference throughput. Results: the tables on stdout and $OUT/gpu.jsonl.
#
# The device has no `datasets` (the guide's script reads the folder with --data-backend torch) and no
# accelerate (the Trainer needs it): carry its wheel in .whl/ as the device README shows, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl accelerate psutil
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/vitfood-gpu}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
J="--jsonl $OUT/gpu.jsonl --work /tmp/vitfood-bench"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"

# Compute only: bf16 with and without compile for both models, fp32 eager as the reference.
python3 benchmarks/bench_train.py compute --impls vitfood hf --precisions bf16 --compile off on --batch-sizes 256 $J
python3 benchmarks/bench_train.py compute --impls vitfood hf --precisions fp32 --compile off --batch-sizes 128 --steps 10 $J
# Inference, compute only.
python3 benchmarks/bench_infer.py gpu --batch-size 256 $J
python3 benchmarks/bench_infer.py gpu --batch-size 256 --compile $J
# End to end: 5,000 JPEGs (4,000 train / 1,000 eval), 3 epochs, 128 images per optimizer step.
python3 benchmarks/bench_train.py e2e --images 5000 --epochs 3 --batch-size 128 --grad-accum-steps 1 --compile \
  --data-backend torch $J
# Several GPUs, where the machine has them: the multi-GPU row.
n=$(nvidia-smi -L | wc -l)
if [ "$n" -gt 1 ]; then
  python3 benchmarks/bench_train.py e2e --images 5000 --epochs 3 --batch-size 128 --grad-accum-steps 1 --compile \
    --data-backend torch --nproc-per-node "$n" $J
fi
