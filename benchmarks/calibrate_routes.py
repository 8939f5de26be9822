"""Measure the two routes of the polynomial polar maps (iterations vs Gram eigh) per shape
and fit the cost model of :mod:`equiopt.fastpath` (``COST``).

    python benchmarks/calibrate_routes.py [--threads N] [--quick]

Prints, per wide shape [m, n] and batch N, the best-of-repeats time of each route (with and
without the nuclear-norm factor of the hybrid / scaled polar maps), the faster route, the
route the current cost model picks, and least-squares constants for ``fastpath.COST``.
Best-of-repeats (not the median) is used: it estimates the unloaded cost on a shared machine.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from equiopt import fastpath  # noqa: E402


def best(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument(
        "--chunks",
        action="store_true",
        help="instead: time one stacked batch vs chunks of it (the stack_bytes cut of fastpath)",
    )
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.chunks:
        return chunks(a)
    shapes = []
    for m in (8, 16, 32, 64, 128, 256, 512):
        for r in (1, 2, 4, 8, 32):
            n = m * r
            if m * n > 512 * 2048 or (a.quick and m > 128):
                continue
            N = max(1, min(64, int(2e6 // (m * n))))
            shapes.append((N, m, n))
    rows = []
    print(f"threads {torch.get_num_threads()}")
    print(
        f"{'N':>4} {'m':>4} {'n':>5} | {'iter':>9} {'gram':>9} | {'iter+nuc':>9} {'gram+nuc':>9} | "
        "best  model | best+nuc model"
    )
    for N, m, n in shapes:
        x = torch.randn(N, m, n)
        t = {}
        for nuc in (False, True):
            alpha = 1.0 if nuc else None
            t["iter", nuc] = best(
                lambda x=x, alpha=alpha: fastpath.iterative_polar(x, "polar_express", None, alpha=alpha), a.reps
            )
            t["gram", nuc] = best(
                lambda x=x, alpha=alpha: fastpath.spectral_polar(x, "polar_express", None, alpha=alpha), a.reps
            )
        pick = [fastpath.choose_polar_route(m, n, 5, nuc, device=x.device, cdt=x.dtype) for nuc in (False, True)]
        fast = ["gram" if t["gram", nuc] < t["iter", nuc] else "iterative" for nuc in (False, True)]
        print(
            f"{N:4d} {m:4d} {n:5d} | {t['iter', False] * 1e3:8.3f}m {t['gram', False] * 1e3:8.3f}m | "
            f"{t['iter', True] * 1e3:8.3f}m {t['gram', True] * 1e3:8.3f}m | {fast[0][:4]} {pick[0][:4]} | "
            f"{fast[1][:4]} {pick[1][:4]}",
            flush=True,
        )
        rows.append((N, m, n, t))
    fit(rows)


def fit(rows):
    """Non-negative least squares on relative errors for the constants of ``fastpath.COST``:
    iter = mm32 F_it + steps iter_step [+ eigvalsh_a m^3 + eigvalsh_b];
    gram = mm64 F_gr + eigh_a m^3 + eigh_q m^2 + eigh_b (per matrix). Prints the constants and
    how often the fitted model picks the measured faster route."""
    import numpy as np
    from scipy.optimize import nnls

    names = ["mm32", "iter_step", "eigvalsh_a", "eigvalsh_b", "mm64", "eigh_a", "eigh_q", "eigh_b"]
    A, cases = [], []
    for N, m, n, t in rows:
        f_it = fastpath.polar_flops("iterative", m, n, 5, False)["mm32"]
        f_gr = fastpath.polar_flops("gram", m, n, 5, False)["mm64"]
        it = [f_it, 5, 0, 0, 0, 0, 0, 0]
        it_nuc = [f_it, 5, m**3, 1, 0, 0, 0, 0]
        gr = [0, 0, 0, 0, f_gr, m**3, m**2, 1]
        for feat, key in ((it, ("iter", False)), (it_nuc, ("iter", True)), (gr, ("gram", False)), (gr, ("gram", True))):
            A.append(np.array(feat, dtype=float) / (t[key] / N))  # relative error of the per-matrix time
        cases.append((m, n, t, N, it, it_nuc, gr))
    A = np.array(A)
    col = A.max(axis=0)
    col[col == 0] = 1
    sol, _ = nnls(A / col, np.ones(len(A)))
    sol = sol / col
    print("fitted COST:")
    for k, v in zip(names, sol):
        print(f"  {k}: {v:.4g}" + (f"  (= {1 / v / 1e9:.1f} GFLOP/s)" if k.startswith("mm") and v > 0 else ""))
    agree = total = 0
    for _m, _n, t, _N, it, it_nuc, gr in cases:
        for nuc, feat in ((False, it), (True, it_nuc)):
            pred_iter, pred_gram = float(np.dot(feat, sol)), float(np.dot(gr, sol))
            total += 1
            agree += (pred_iter < pred_gram) == (t["iter", nuc] < t["gram", nuc])
    print(f"fitted model picks the faster route in {agree} of {total} cases")


def chunks(a):
    """Hybrid map's polar (iterations + nuclear norm) on a stacked batch, whole or in chunks."""
    print(f"threads {torch.get_num_threads()}; best-of-{a.reps} ms per chunk size c (matrices per call)")
    for N, m, n in [(48, 32, 128), (64, 96, 128), (12, 128, 384), (16, 128, 512), (8, 512, 1536)]:
        x = torch.randn(N, m, n)
        res = []
        for c in sorted({N, 16, 8, 4, 2, 1}, reverse=True):
            if c > N:
                continue
            t = best(
                lambda x=x, c=c, N=N: [
                    fastpath.iterative_polar(x[i : i + c], "polar_express", None, alpha=1.0) for i in range(0, N, c)
                ],
                a.reps,
            )
            res.append(f"c{c}:{t * 1e3:.1f}")
        print(f"[{N}, {m}, {n}] ({m * n * 4 / 2**10:.0f} KiB each): " + " ".join(res), flush=True)


if __name__ == "__main__":
    main()
