#!/usr/bin/env bash
# Lint, format check and type check (settings in pyproject.toml: [tool.ruff], [tool.mypy]).
# Needs the dev extra in .venv: .venv/bin/python -m pip install -e ".[dev]"
# Runs all three and fails if any of them failed. Never rewrites a file; to apply the
# automatic fixes run `.venv/bin/ruff check --fix` / `.venv/bin/ruff format` yourself.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"  # VENV=/path/to/venv to use another environment
for tool in ruff mypy; do
    if [[ ! -x "$BIN/$tool" ]]; then
        echo "lint.sh: $BIN/$tool not found; install the dev tools: $BIN/python -m pip install -e '.[dev]'" >&2
        exit 2
    fi
done
PATHS=(src tests benchmarks)
status=0
run() {
    echo "+ $*"
    "$@" || status=1
}
run "$BIN/ruff" check --output-format concise "${PATHS[@]}"
run "$BIN/ruff" format --check --output-format concise "${PATHS[@]}"
run "$BIN/mypy" src/equiopt
if [[ $status -ne 0 ]]; then
    echo "lint.sh: FAILED (see above)" >&2
fi
exit $status
