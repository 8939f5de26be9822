#!/usr/bin/env bash
# The larger comparison (results/compare): an LR sweep per (arch, optimizer), then 3 seeds at
# the chosen learning rates; two runs at a time (--jobs 2: one process per core, one thread each).
# Runs from any clone: `bash results/compare/run.sh` (set-up via scripts/setup.sh; PYTHON=... to
# use another interpreter). The code is this clone's src/ (PYTHONPATH), its commit is written to
# runs/big/commit.txt (and every run's env.json records it too).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PYTHON:-}" ]; then bash scripts/setup.sh; fi
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=runs/big
mkdir -p "$OUT"
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo "unknown (not a git checkout)")
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then COMMIT="$COMMIT+dirty"; fi
echo "$COMMIT" > "$OUT/commit.txt"
ARCHS=qwen3,gemma3,olmoe,gptoss
OPTS=adamw,muon,paper
COMMON=(--steps 120 --batch-size 8 --eval-tokens 8192 --jobs 2 --no-progress)
date
time "$PY" -m equiopt sweep --archs "$ARCHS" --optimizers "$OPTS" --lr-scales 0.5,1,2 --extend-edges 1 "${COMMON[@]}" \
  --eval-every 60 --out "$OUT/sweep"
date
time "$PY" -m equiopt compare --archs "$ARCHS" --optimizers "$OPTS" --seeds 3 "${COMMON[@]}" --eval-every 20 \
  --lr-from "$OUT/sweep/best.json" --out "$OUT/compare"
date
