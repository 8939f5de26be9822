#!/usr/bin/env bash
# Creates .venv (once) and installs equiopt with its harness and test extras.
# torch: the CPU build 2.13.0 on machines without CUDA (a bare `torch` requirement would
# pull a multi-GB CUDA build); on a CUDA machine, install the torch you want first and set
# EQUIOPT_KEEP_TORCH=1. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if [ "${EQUIOPT_KEEP_TORCH:-0}" = "1" ]; then
    echo "EQUIOPT_KEEP_TORCH=1 but torch is not importable in .venv" >&2; exit 1
  fi
  "$VPY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
if ! "$VPY" -c "import equiopt, transformers, tokenizers, matplotlib, tqdm, scipy, tensorboard, pytest" 2>/dev/null; then
  "$VPY" -m pip install -q --disable-pip-version-check -e ".[train,test]"
fi
