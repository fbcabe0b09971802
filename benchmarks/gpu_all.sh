#!/usr/bin/env bash
# The GPU benchmark for one lent machine, in two parts that each fit one 10-minute device command:
#   benchmarks/gpu_all.sh compute   training and inference, compute only (about 4 minutes on an H100)
#   benchmarks/gpu_all.sh e2e       end to end from JPEGs against the Trainer (about 5-6 minutes)
#   benchmarks/gpu_all.sh           both
# Results: the tables on stdout, every row also in $OUT/gpu.jsonl (written as each job ends).
# The device image has accelerate, matplotlib and tensorboard but no `datasets`: the guide's
# script reads the folder with --data-backend torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/vitfood-gpu}"
mkdir -p "$OUT"
J="--jsonl $OUT/gpu.jsonl --work /tmp/vitfood-bench"
part="${1:-all}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  nproc; df -h /dev/shm; } | tee -a "$OUT/gpu.txt"

if [ "$part" = compute ] || [ "$part" = all ]; then
  # bf16 with and without compile for both models (the 4,000 images/s goal), fp32 eager for reference.
  python3 benchmarks/bench_train.py compute --impls vitfood hf --precisions bf16 --compile off on --batch-sizes 256 \
    --steps 10 $J
  python3 benchmarks/bench_train.py compute --impls vitfood hf --precisions fp32 --compile off --batch-sizes 128 \
    --steps 10 $J
  python3 benchmarks/bench_infer.py gpu --batch-size 256 $J
  python3 benchmarks/bench_infer.py gpu --batch-size 256 --compile $J
fi

if [ "$part" = e2e ] || [ "$part" = all ]; then
  # 5,120 JPEGs: 4,096 train and 1,024 eval, whole batches of 128 and 16, so no compiled job recompiles
  # for a short last batch. 2 epochs, 128 images per optimizer step (the guide as written: 16 x 4).
  python3 benchmarks/bench_train.py e2e --images 5120 --epochs 2 --batch-size 128 --grad-accum-steps 1 --compile \
    --data-backend torch $J
  n=$(nvidia-smi -L | wc -l)
  if [ "$n" -gt 1 ]; then  # the multi-GPU row, where the machine has several GPUs
    python3 benchmarks/bench_train.py e2e --images 5120 --epochs 2 --batch-size 128 --grad-accum-steps 1 --compile \
      --data-backend torch --nproc-per-node "$n" $J
  fi
fi
