"""Time the routes of the polynomial polar maps per shape: the standard iterations, Gram
Newton-Schulz and the float64 Gram-eigh route (:mod:`equiopt.fastpath`).

    python benchmarks/calibrate_routes.py [--threads N] [--quick]

Prints, per wide shape [m, n] and batch N, the best-of-repeats time of each route (with and
without the nuclear-norm factor of the hybrid / scaled polar maps), the fastest route and the
route ``choose_polar_route`` picks ("auto": fewest product flops), and how often the pick is
within 10% of the fastest. Best-of-repeats (not the median) estimates the unloaded cost on a
shared machine.
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
    print(f"threads {torch.get_num_threads()}; best-of-{a.reps} ms per batch; pick = choose_polar_route")
    print(
        f"{'N':>4} {'m':>4} {'n':>5} nuc | {'iterative':>9} {'gram_ns':>9} {'gram':>9} | "
        "fastest   pick      pick/fastest"
    )
    near = total = 0
    for N, m, n in shapes:
        x = torch.randn(N, m, n)
        for nuc in (False, True):
            t = route_times(x, 1.0 if nuc else None, a.reps)
            pick = fastpath.choose_polar_route(m, n, 5, nuc, device=x.device, cdt=x.dtype)
            fastest = min(t, key=t.__getitem__)
            near, total = near + (t[pick] <= 1.1 * t[fastest]), total + 1
            print(
                f"{N:4d} {m:4d} {n:5d} {'yes' if nuc else 'no ':>3} | "
                + " ".join(f"{t[r] * 1e3:8.3f}m" for r in ROUTES)
                + f" | {fastest:9s} {pick:9s} {t[pick] / t[fastest]:.2f}",
                flush=True,
            )
    print(f"the pick is within 10% of the fastest route in {near} of {total} cases")


ROUTES = ("iterative", "gram_ns", "gram")


def route_times(x, alpha, reps) -> dict:
    """Best-of-``reps`` seconds of each route on the batch ``x`` (``alpha``: nuclear factor)."""
    return {
        "iterative": best(lambda: fastpath.iterative_polar(x, "polar_express", None, alpha=alpha), reps),
        "gram_ns": best(lambda: fastpath.iterative_polar(x, "polar_express", None, alpha=alpha, gram_ns=True), reps),
        "gram": best(lambda: fastpath.spectral_polar(x, "polar_express", None, alpha=alpha), reps),
    }


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
