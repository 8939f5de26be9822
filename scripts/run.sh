#!/usr/bin/env bash
# The main job of the README: set-up (idempotent), then the default comparison on the
# embedded corpus (AdamW vs Muon vs the symmetry-compatible stack), printing its table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/equiopt compare "$@"
