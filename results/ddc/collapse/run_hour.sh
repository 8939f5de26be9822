#!/usr/bin/env bash
# `equiopt ddc-collapse` sized to fit an hour on 2 idle CPU cores (issue #15): collapse/run.sh's
# design (its options; the later ones below override them) on a 150k-token slice for 1200 steps
# (8.2 epochs, as the full run), eval + readout every 75 steps (16 points, as the full run), the
# LR sweep widened to 0.25 / 0.5 / 1 / 2 (the full run's sweep put 4 of 5 optimizers at its lower
# edge 0.5). Results in collapse/hour/ (commit, wall appended). Measured: 2454 s on 2 idle cores.
# Run from a clone, after the set-up:   bash results/ddc/collapse/run_hour.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
OUT=${OUT:-runs/ddc-collapse-hour} DEST=results/ddc/collapse/hour exec bash results/ddc/collapse/run.sh \
  --train-tokens 150000 --steps 1200 --eval-every 75 --lr-scales 0.25,0.5,1,2 "$@"
