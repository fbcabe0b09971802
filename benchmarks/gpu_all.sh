#!/usr/bin/env bash
# The GPU benchmark for one lent machine, in parts that each fit one 10-minute device command
# (estimates for one H100 or H200 with 16 cores, from the H200 figures in benchmarks/RESULTS.md:
# JPEGs made at about 40 ms each per core, ~3,000 images/s compiled training, the Trainer as written
# ~134 images/s; a part on a fresh machine also makes its JPEGs and the ViT-B checkpoint):
#   benchmarks/gpu_all.sh compute   training and inference, compute only: vitfood, transformers and timm
#                                   in bf16, eager and compiled, batch 256; fp32; inference (about 5-6 minutes)
#   benchmarks/gpu_all.sh e2e       end to end from 5,120 JPEGs against the Trainer (about 5-6 minutes)
#   benchmarks/gpu_all.sh guide     the guide's job: 5,000 JPEGs, 3 epochs, `train.py --model M --dataset F
#                                   --epochs 3` (about 0.5-1 minute) against the Trainer as written
#                                   (12,000/134 = 90 s of steps, plus evaluations and saves: about 2.5
#                                   minutes) and tuned, compiled (it compiles again for the short last
#                                   batches: about 2 minutes) and eager (about 0.5-1 minute); with the JPEGs,
#                                   the checkpoint and the Arrow conversion (about 1 minute), and a
#                                   save's cost to the training thread (bench_saves.py, about 1 minute):
#                                   about 7.5 minutes, 9 at worst
#   benchmarks/gpu_all.sh steady    6,400 JPEGs x 4 epochs = 20,480 training images: train.py at its defaults,
#                                   (eager at 64 images a pass: about 1 minute), with the best flags (256 a
#                                   step, compiled: about 1.5 minutes) and those again with a warm compiler
#                                   cache (about 0.5 minute); with the JPEGs: about 4 minutes, 5 at worst
#   benchmarks/gpu_all.sh           every part, one after the other (about 22 minutes: more than one command)
# Results: the tables on stdout, every row also in $OUT/gpu.jsonl (each whole-process run written as it ends).
# The guide's script reads the folder with `datasets` where it is installed (as the guide does), else
# with --data-backend torch (same transforms and split sizes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/vitfood-gpu}"
mkdir -p "$OUT"
J="--jsonl $OUT/gpu.jsonl --work /tmp/vitfood-bench"
part="${1:-all}"
BACKEND=$(python3 -c "import datasets" 2>/dev/null && echo datasets || echo torch)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "import timm; print('timm', timm.__version__)" 2>/dev/null || echo "timm not installed"
  echo "the guide's data backend: $BACKEND"
  nproc; df -h /dev/shm; } | tee -a "$OUT/gpu.txt"

if [ "$part" = compute ] || [ "$part" = all ]; then
  # bf16 with and without compile for the three models (the 4,000 images/s and 1.15x timm compiled goals),
  # fp32 eager for reference.
  python3 benchmarks/bench_train.py compute --impls vitfood hf timm --precisions bf16 --compile off on \
    --batch-sizes 256 --steps 10 $J
  python3 benchmarks/bench_train.py compute --impls vitfood hf --precisions fp32 --compile off --batch-sizes 128 \
    --steps 10 $J
  python3 benchmarks/bench_infer.py gpu --batch-size 256 $J
  python3 benchmarks/bench_infer.py gpu --batch-size 256 --compile $J
  python3 benchmarks/bench_infer.py folder --images 5120 --batch-size 256 $J  # infer.py FOLDER: GPU path, CPU path, pipeline
fi

if [ "$part" = e2e ] || [ "$part" = all ]; then
  # 5,120 JPEGs: 4,096 train and 1,024 eval, whole batches of 128 and 16, so no compiled job recompiles
  # for a short last batch. 2 epochs, 128 images per optimizer step (the guide as written: 16 x 4).
  python3 benchmarks/bench_train.py e2e --images 5120 --epochs 2 --batch-size 128 --grad-accum-steps 1 --compile \
    --data-backend "$BACKEND" $J
  n=$(nvidia-smi -L | wc -l)
  if [ "$n" -gt 1 ]; then  # the multi-GPU row, where the machine has several GPUs
    python3 benchmarks/bench_train.py e2e --images 5120 --epochs 2 --batch-size 128 --grad-accum-steps 1 --compile \
      --data-backend "$BACKEND" --nproc-per-node "$n" $J
  fi
fi

if [ "$part" = guide ] || [ "$part" = all ]; then
  # The goals: train.py at its defaults >= 8x the Trainer as written and >= 4x the faster tuned Trainer,
  # whole process; its fixed cost <= 15 s.
  python3 benchmarks/bench_train.py guide-job --images 5000 --epochs 3 --data-backend "$BACKEND" $J
  python3 benchmarks/bench_saves.py --model-size base --repeats 4 $J  # a save's cost to the training thread (~1 min)
fi

if [ "$part" = steady ] || [ "$part" = all ]; then
  # The goals: >= 3,000 images/s steady at the defaults, >= 4,000 with the best flags; fixed cost <= 15 s
  # cold, <= 8 s with a warm compiler cache.
  python3 benchmarks/bench_train.py steady --images 6400 --epochs 4 $J
fi
