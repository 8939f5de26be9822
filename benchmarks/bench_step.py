"""Optimizer-step benchmark (the script behind ``equiopt bench``).

    python benchmarks/bench_step.py            # full run (< ~10 min on 2 CPU cores), writes results/bench.{md,json}
    python benchmarks/bench_step.py --quick    # smoke test (seconds), prints only

See ``equiopt.bench`` for what is measured and how.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from equiopt.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
