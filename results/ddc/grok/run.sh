#!/usr/bin/env bash
# Full-size `equiopt ddc-grok` (issue #15): a + b mod 97, 40% of the pairs for training,
# a residual ReLU MLP of depth 24 (width 64, 128 hidden), full batch, muon / ddc_muon /
# adamw / ddc_adam at their preset learning rates, 8 seeds, a budget of 1800 steps.
# Run from a clone after the set-up:   bash results/ddc/grok/run.sh
# Estimated wall time on 2 idle CPU cores: see results/ddc/README.md (measured from the pilot).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bash scripts/setup.sh
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/ddc-grok}
DEST=results/ddc/grok/full
mkdir -p "$DEST"
git rev-parse HEAD > "$DEST/commit.txt"
git status --porcelain --untracked-files=no | grep -q . && echo "+dirty" >> "$DEST/commit.txt" || true
START=$(date +%s)
PYTHONPATH=src "$PY" -m equiopt ddc-grok \
  --optimizers muon,ddc_muon,adamw,ddc_adam --seeds 8 --modulus 97 --train-fraction 0.4 \
  --depth 24 --width 64 --hidden 128 --steps 1800 --eval-every 50 --jobs 2 --out "$OUT" "$@"
echo "wall $(( $(date +%s) - START )) s; load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$DEST/wall.txt"
cp "$OUT"/summary.md "$OUT"/summary.json "$DEST"/
