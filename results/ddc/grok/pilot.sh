#!/usr/bin/env bash
# The pilot whose numbers are in results/ddc/grok/pilot/ (2 seeds, a 150-step budget). Run from the repository root.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PYTHONPATH=src ${PYTHON:-.venv/bin/python} -m equiopt ddc-grok --optimizers muon,ddc_muon,adamw,ddc_adam \
  --seeds 2 --modulus 97 --train-fraction 0.4 --depth 24 --width 64 --hidden 128 --steps 150 --eval-every 25 \
  --jobs 2 --out runs/ddc-grok-pilot "$@"
