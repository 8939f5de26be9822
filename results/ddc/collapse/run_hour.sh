#!/usr/bin/env bash
# `equiopt ddc-collapse` sized to fit an hour on 2 idle CPU cores (issue #15): the full run's
# design (collapse/run.sh) on a 150k-token slice for 1200 steps (8.2 epochs, as the full run),
# eval + readout every 75 steps (16 points, as the full run), the LR sweep widened to
# 0.25 / 0.5 / 1 / 2 (the full run's sweep put 4 of 5 optimizers at its lower edge 0.5).
# Sizing: a one-seed pilot of this configuration took 683 s for the five runs (results/ddc/README.md).
# Run from a clone, after the set-up:   bash results/ddc/collapse/run_hour.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bash scripts/setup.sh
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/ddc-collapse-hour}
DEST=results/ddc/collapse/hour
mkdir -p "$DEST"
git rev-parse HEAD > "$DEST/commit.txt"
git status --porcelain --untracked-files=no | grep -q . && echo "+dirty" >> "$DEST/commit.txt" || true
START=$(date +%s)
PYTHONPATH=src "$PY" -m equiopt ddc-collapse \
  --optimizers adamw,muon,paper,ddc_adam,ddc_muon --seeds 3 \
  --train-tokens 150000 --steps 1200 --batch-size 8 --seq-len 128 --schedule constant \
  --eval-every 75 --eval-tokens 8192 --train-eval-tokens 8192 --ckpt-every 600 \
  --probe-seqs 16 --probe-len 64 --lr-scales 0.25,0.5,1,2 --sweep-steps 300 --jobs 2 \
  --out "$OUT" "$@"
echo "$(git rev-parse --short HEAD): wall $(( $(date +%s) - START )) s; load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$DEST/wall.txt"
cp "$OUT"/summary.md "$OUT"/summary.json "$OUT"/fits.json "$OUT"/lr.json "$OUT"/*.png "$DEST"/
