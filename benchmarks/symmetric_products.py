"""Does torch reach a symmetric (half-cost) product on this CPU? (issue #16)

Times, per shape [N, m, n] and thread count, the Gram ``X X^T`` against a general ``X Y^T`` of
the same shape (a symmetric BLAS routine such as syrk would need half the FLOPs), batched
(``torch.bmm``) and as a loop of 2-D ``torch.mm`` calls, and ``A A`` for symmetric ``A``
against a general ``A B``. Medians of 15 calls after a warm-up; writes ``--out``.

    PYTHONPATH=src python benchmarks/symmetric_products.py --out results/symmetric_products.md
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from bench import _median_time  # the step benchmark's timer (same folder)

SHAPES = ((2, 512, 1536), (8, 128, 512), (16, 64, 512), (64, 32, 128), (4, 256, 512))


def median_ms(fn, reps: int = 15) -> float:
    return 1e3 * _median_time(fn, reps)[0]


def row(N: int, m: int, n: int) -> list[float]:
    X, Y = torch.randn(N, m, n), torch.randn(N, m, n)
    out = torch.empty(N, m, m)
    A = X[:, :, :m].contiguous()
    A = A + A.mT  # symmetric
    B = torch.randn(N, m, m)
    return [
        median_ms(lambda: torch.bmm(X, X.mT)),
        median_ms(lambda: torch.bmm(X, Y.mT)),
        median_ms(lambda: [torch.mm(X[i], X[i].T, out=out[i]) for i in range(N)]),
        median_ms(lambda: [torch.mm(X[i], Y[i].T, out=out[i]) for i in range(N)]),
        median_ms(lambda: torch.bmm(A, A)),
        median_ms(lambda: torch.bmm(A, B)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default="results/symmetric_products.md")
    args = ap.parse_args()
    load0 = os.getloadavg()
    lines = [
        "| threads | [N, m, n] | bmm X X^T | bmm X Y^T | mm loop X X^T | mm loop X Y^T | bmm A A (sym.) | bmm A B |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in (int(x) for x in args.threads.split(",")):
        torch.set_num_threads(t)
        for shape in SHAPES:
            cells = " | ".join(f"{v:.2f} ms" for v in row(*shape))
            lines.append(f"| {t} | {list(shape)} | {cells} |")
            print(lines[-1], flush=True)
    load1 = os.getloadavg()
    head = [
        "# Symmetric products on CPU: X X^T against X Y^T",
        "",
        f"`python benchmarks/symmetric_products.py`, torch {torch.__version__}; medians of 15 calls; "
        f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end.",
        "",
        "Equal times for the symmetric and the general product: torch's CPU matmul does not take a "
        "half-cost symmetric routine here, so the fast path gains nothing from writing products as "
        "`X X^T`; the FLOP floors of `benchmarks/peers.py` count symmetric results at half cost "
        "anyway (the floor a syrk would allow) and also show the general-product floor.",
        "",
    ]
    Path(args.out).write_text("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
