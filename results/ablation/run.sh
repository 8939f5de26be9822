#!/usr/bin/env bash
# Block ablations of the paper stack (issue #3, part 6), same settings as results/compare/.
# Runs from any clone: `bash results/ablation/run.sh` (set-up via scripts/setup.sh; PYTHON=... to
# use another interpreter); ~13 min on 2 idle CPU cores (21 runs). The code is this clone's src/
# (PYTHONPATH); its commit is written to runs/ablation/commit.txt (every run's env.json has it too).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PYTHON:-}" ]; then bash scripts/setup.sh; fi
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=runs/ablation
mkdir -p "$OUT"
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo "unknown (not a git checkout)")
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then COMMIT="$COMMIT+dirty"; fi
echo "$COMMIT" > "$OUT/commit.txt"
"$PY" -m equiopt compare --archs qwen3,olmoe \
  --optimizers paper,paper-muon-mlp,paper-adamw-embed-head,paper-adamw-router --seeds 3 \
  --steps 120 --batch-size 8 --eval-tokens 8192 --jobs 2 --no-progress --eval-every 20 \
  --out "$OUT"
