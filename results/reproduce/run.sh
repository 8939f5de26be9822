#!/usr/bin/env bash
# The paper's block-wise comparisons at CPU scale (results/reproduce, issue #13): the Qwen3
# figure-3 grid (embedding/head rule x MLP rule, 6 variants) and the OLMoE figure-5 router grid
# (4 variants). Per variant: an LR sweep of the recipe's per-role learning rates (global
# multiplier 0.5 / 1 / 2, seed 1000, the full horizon; a winning edge is extended by one more
# factor of 2, up to twice), then 3 seeds at the chosen multiplier.
# CPU scale (equiopt.train.recipes): d 128, 4 layers, the figure's experts/top-k and role
# structure, 640 steps x 32 x 128 tokens = 2.62M tokens per run (21x the 123k of results/compare),
# per-role schedules of the paper (matrix roles: constant then linear decay to 0 over the last
# 40%; AdamW vectors: warm-up + cosine to 0), data shakespeare+kjv (BPE 4096).
# Runs from any clone: `bash results/reproduce/run.sh` (set-up via scripts/setup.sh; PYTHON=...
# to use another interpreter). Restartable: finished runs are reused, interrupted ones resume.
# The code is this clone's src/ (PYTHONPATH); each start appends "date commit" to $OUT/commit.txt
# (a restart from a newer commit keeps the older line; every run's env.json has its own commit).
# Knobs: SEEDS, STEPS, LR_SCALES, JOBS, OUT, FIGURES, AUTOCAST (auto = bf16 on CUDA only, float32
# on the CPU; bf16 = bf16 autocast on the CPU too, ~1.9x faster forward+backward for fig3 there,
# see results/autocast_cpu.md; one setting per figure, so its comparisons are at equal precision),
# LR_FROM_SWEEP (no sweep: the seeds at the multipliers of a previous sweep's best.json, "{FIG}"
# replaced by the figure, e.g. a longer horizon:
#   OUT=runs/reproduce-long STEPS=2560 LR_FROM_SWEEP=runs/reproduce/{FIG}-cpu/sweep/best.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PYTHON:-}" ]; then bash scripts/setup.sh; fi
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/reproduce}
SEEDS=${SEEDS:-3}
STEPS=${STEPS:-640}
LR_SCALES=${LR_SCALES:-0.5,1,2}
JOBS=${JOBS:-2}
FIGURES=${FIGURES:-fig3 fig5}
AUTOCAST=${AUTOCAST:-auto}
mkdir -p "$OUT"
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo "unknown (not a git checkout)")
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then COMMIT="$COMMIT+dirty"; fi
echo "$(date -u +%FT%TZ) $COMMIT" >> "$OUT/commit.txt"
for FIG in $FIGURES; do
  date
  if [ -n "${LR_FROM_SWEEP:-}" ]; then LR_ARGS=(--lr-from-sweep "${LR_FROM_SWEEP//\{FIG\}/$FIG}"); else LR_ARGS=(--lr-scales "$LR_SCALES"); fi
  time "$PY" -m equiopt reproduce "$FIG" --scale cpu --seeds "$SEEDS" --steps "$STEPS" "${LR_ARGS[@]}" \
    --jobs "$JOBS" --autocast "$AUTOCAST" --no-progress --out "$OUT/$FIG-cpu"
done
date
