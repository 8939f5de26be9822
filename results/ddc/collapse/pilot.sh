#!/usr/bin/env bash
# The pilot whose numbers are in results/ddc/collapse/pilot/ (no LR sweep: preset rates, lr_scale 1;
# 2 seeds; 50k-token slice; 400 steps = 8.2 epochs). Run from the repository root.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PYTHONPATH=src ${PYTHON:-.venv/bin/python} -m equiopt ddc-collapse --optimizers adamw,muon,ddc_adam,ddc_muon \
  --seeds 2 --train-tokens 50000 --steps 400 --eval-every 40 --eval-tokens 4096 --train-eval-tokens 4096 \
  --lr-scales 1 --ckpt-every 0 --jobs 2 --out runs/ddc-collapse-pilot "$@"
