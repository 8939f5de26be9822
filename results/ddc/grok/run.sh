#!/usr/bin/env bash
# Full-size `equiopt ddc-grok` (issue #15): a + b mod 97, 50% of the pairs for training,
# a residual ReLU MLP of depth 12 (width 64, 128 hidden), full batch, muon / ddc_muon /
# adamw / ddc_adam at their preset learning rates and the same per-step weight shrink
# lr*wd = 5e-3 for every decaying group, 8 seeds, a budget of 3000 steps. The depth, train
# fraction and shrink come from the probes in results/ddc/README.md (with the presets' own decay
# nothing generalised in 500 steps at depth 24; depth 24 at 3000 steps does not fit in an hour).
# Run from a clone after the set-up:   bash results/ddc/grok/run.sh
# Measured wall time on 2 idle CPU cores: 2056 s (results/ddc/grok/full/wall.txt, commit 4a124f3).
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
  --optimizers muon,ddc_muon,adamw,ddc_adam --seeds 8 --modulus 97 --train-fraction 0.5 \
  --decay-rate 5e-3 --depth 12 --width 64 --hidden 128 --steps 3000 --eval-every 50 --jobs 2 --out "$OUT" "$@"
echo "$(git rev-parse --short HEAD): wall $(( $(date +%s) - START )) s; load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$DEST/wall.txt"
cp "$OUT"/summary.md "$OUT"/summary.json "$OUT"/val_acc.png "$DEST"/
