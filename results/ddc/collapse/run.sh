#!/usr/bin/env bash
# Full-size `equiopt ddc-collapse` (issue #15): over-training collapse + the dead-direction
# readout, adamw / muon / paper / ddc_adam / ddc_muon, 3 seeds, each at the lr_scale its own
# 300-step sweep (0.5, 1, 2) picks. Run from a clone, after the set-up (scripts/run.sh makes
# .venv and fetches the corpus; run.sh calls it):   bash results/ddc/collapse/run.sh
# Estimated wall time on 2 idle CPU cores: see results/ddc/README.md (measured from the pilot).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bash scripts/setup.sh
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/ddc-collapse}
DEST=${DEST:-results/ddc/collapse/full}
mkdir -p "$DEST"
git rev-parse HEAD > "$DEST/commit.txt"
git status --porcelain --untracked-files=no | grep -q . && echo "+dirty" >> "$DEST/commit.txt" || true
START=$(date +%s)
PYTHONPATH=src "$PY" -m equiopt ddc-collapse \
  --optimizers adamw,muon,paper,ddc_adam,ddc_muon --seeds 3 \
  --train-tokens 300000 --steps 2400 --batch-size 8 --seq-len 128 --schedule constant \
  --eval-every 150 --eval-tokens 8192 --train-eval-tokens 8192 --ckpt-every 600 \
  --probe-seqs 16 --probe-len 64 --lr-scales 0.5,1,2 --sweep-steps 300 --jobs 2 \
  --out "$OUT" "$@"
echo "$(git rev-parse --short HEAD): wall $(( $(date +%s) - START )) s; load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$DEST/wall.txt"
cp "$OUT"/summary.md "$OUT"/summary.json "$OUT"/fits.json "$OUT"/lr.json "$OUT"/*.png "$DEST"/
