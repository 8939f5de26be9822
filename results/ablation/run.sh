#!/usr/bin/env bash
# Block ablations of the paper stack (issue #3, part 6), same settings as results/compare/.
# Run from the repository root after `bash scripts/setup.sh`; ~13 min on 2 idle CPU cores (21 runs).
set -euo pipefail
.venv/bin/equiopt compare --archs qwen3,olmoe \
  --optimizers paper,paper-muon-mlp,paper-adamw-embed-head,paper-adamw-router --seeds 3 \
  --steps 120 --batch-size 8 --eval-tokens 8192 --jobs 2 --no-progress --eval-every 20 \
  --out runs/ablation
