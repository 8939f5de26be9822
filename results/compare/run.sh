#!/bin/bash
# The larger comparison (results/compare). Code from a fixed checkout (/tmp/bigtree, the commit
# recorded in each run's env.json); two runs at a time (--jobs 2: one process per core, one thread each).
set -e
cd /work/main
source /tmp/venv/bin/activate
export PYTHONPATH=/tmp/bigtree/src
ARCHS=qwen3,gemma3,olmoe,gptoss
OPTS=adamw,muon,paper
COMMON="--steps 120 --batch-size 8 --eval-tokens 8192 --jobs 2 --no-progress"
date
time python -m equiopt sweep --archs $ARCHS --optimizers $OPTS --lr-scales 0.5,1,2 --extend-edges 1 $COMMON \
  --eval-every 60 --out runs/big/sweep
date
time python -m equiopt compare --archs $ARCHS --optimizers $OPTS --seeds 3 $COMMON --eval-every 20 \
  --lr-from runs/big/sweep/best.json --out runs/big/compare
date
