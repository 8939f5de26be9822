"""Column sums of a freshly written matrix: torch's ``sum(-2)`` against row-block partial sums.

torch's CPU kernels split an elementwise op over a contiguous tensor into one flat range per
thread (row blocks of a matrix), but split a reduction over ``dim=-2`` over the kept columns.
When the reduction reads what the op just wrote, each thread then reads the rows its partner
wrote, from the other core's cache. The alternative measured here sums ``T`` row blocks
(``T`` threads: ``view(T, m / T, n).sum(1).sum(0)``), split like the writer. This times
``(A * B).sum(-2)`` (the DDC fast path's ``<U_j, W_j>``) both ways on the shapes of its column
units (the tiny and the 59M models' LM heads, a row chunk of the latter), in two orders: back
to back (each variant's calls in a row) and interleaved (a seeded shuffled order), and writes
the medians and their ratio. Not adopted (docs/ddc.md): the order decides which one wins.

    PYTHONPATH=src python benchmarks/row_blocks.py --out results/ddc_bench/row_blocks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench import shuffled_rounds  # the step benchmark's interleaving (same folder)

SHAPES = ((4096, 128), (1024, 512), (8192, 512))


def _commit() -> str:
    here = Path(__file__).resolve().parent
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def row_block_sum(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(-2)`` of a matrix as partial sums over one row block per thread."""
    k = torch.get_num_threads()
    if k < 2 or t.shape[0] % k:
        return t.sum(-2)
    return t.view(k, t.shape[0] // k, t.shape[1]).sum(1).sum(0)


def measure(shape: tuple[int, int], rounds: int, interleaved: bool) -> dict[str, float]:
    """Median microseconds of ``(A * B).sum(-2)`` and ``row_block_sum(A * B)`` for float32
    ``A, B`` of ``shape``, interleaved or back to back."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    variants = {"sum(-2)": lambda: (A * B).sum(-2), "row blocks": lambda: row_block_sum(A * B)}
    orders = shuffled_rounds(variants, rounds) if interleaved else [[k] * rounds for k in variants]
    times: dict[str, list[float]] = {k: [] for k in variants}
    for order in orders:
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: 1e6 * statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    parser.add_argument("--rounds", type=int, default=300, help="calls per variant, shape and order")
    parser.add_argument("--out", type=Path, default=None, help="markdown results file (default: print only)")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape in SHAPES:
            for order, interleaved in (("back to back", False), ("interleaved", True)):
                r = measure(shape, args.rounds, interleaved)
                a, b = r["sum(-2)"], r["row blocks"]
                rows.append((threads, shape, order, a, b))
                print(f"{threads} threads {shape} {order}: sum(-2) {a:.1f} us, row blocks {b:.1f} us")
    head = (
        f"# Column sums of a fresh product: `sum(-2)` vs row blocks\n\n"
        f"`{' '.join(['python benchmarks/row_blocks.py'] + (argv if argv is not None else sys.argv[1:]))}` at commit "
        f"{_commit()}, torch {torch.__version__}, {platform.processor() or platform.machine()}; load average before "
        f"{[round(x, 2) for x in load]}, after {[round(x, 2) for x in os.getloadavg()]}. Median of "
        f"{args.rounds} calls of `(A * B).sum(-2)` and of the row-block sum (float32), each variant's in a row or "
        "interleaved in a seeded shuffled order; ratio = sum(-2) / row blocks.\n\n"
        "| threads | shape | order | sum(-2) | row blocks | ratio |\n|---|---|---|---|---|---|\n"
    )
    table = "".join(f"| {t} | {list(s)} | {o} | {a:.1f} us | {b:.1f} us | x{a / b:.2f} |\n" for t, s, o, a, b in rows)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(head + table)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
