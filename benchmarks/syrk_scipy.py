"""Is a half-cost symmetric product reachable beside torch on this CPU? (issue #16)

torch's CPU matmul has no symmetric routine (``benchmarks/symmetric_products.py``), but SciPy
exposes its BLAS's ``syrk`` (``C = alpha A A^T + beta C``, upper triangle only: half the
FLOPs of a general product) on NumPy views of torch's CPU tensors, without a copy. This
measures, per thread count (one subprocess each: OpenBLAS fixes its thread count at load,
``OPENBLAS_NUM_THREADS``), in one process per count:

* the Gram ``X X^T`` alone: ``torch.mm`` against SciPy's ``ssyrk`` (plus the symmetrization
  the callers need), and the error of the latter against the float64 product;
* five Polar Express steps ``A = Y Y^T; B = b A + c A^2; Y = a Y + B Y`` (the standard
  iteration of ``equiopt.fastpath``) with the two symmetric products by torch, or by ``ssyrk``
  between torch's other products, as a fast path would interleave them.

Medians of 11 calls after a warm-up; writes ``--out``.

    PYTHONPATH=src python benchmarks/syrk_scipy.py --out results/syrk_scipy.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = ((2, 512, 1536), (8, 128, 384), (4, 256, 768), (4, 1024, 3072))


def median_ms(fn, reps: int = 11) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def _symmetric(upper: torch.Tensor) -> torch.Tensor:
    return torch.triu(upper) + torch.triu(upper, 1).mT


def gram_syrk(Y: torch.Tensor) -> torch.Tensor:
    """``Y Y^T`` [N, m, m] of ``Y`` [N, m, k] (float32, C-contiguous) by ``ssyrk``: the
    row-major ``Y[i]`` is the column-major ``k x m`` matrix ``Y[i].numpy().T``, whose
    ``a^T a`` (``trans=1``) is ``Y[i] Y[i]^T``."""
    from scipy.linalg import blas  # the optional measurement's dependency (scipy: the train extra)

    out = torch.empty(Y.shape[0], Y.shape[1], Y.shape[1], dtype=Y.dtype)
    for i in range(Y.shape[0]):
        out[i] = torch.from_numpy(blas.ssyrk(1.0, Y[i].numpy().T, trans=1, lower=0))
    return _symmetric(out)


def poly_syrk(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """``b A + c A^2`` for symmetric ``A`` [N, m, m] by ``ssyrk`` (``A A^T = A^2``)."""
    from scipy.linalg import blas

    out = torch.empty_like(A)
    for i in range(A.shape[0]):
        ci = np.array(A[i].numpy(), order="F")
        out[i] = torch.from_numpy(blas.ssyrk(c, A[i].numpy(), beta=b, c=ci, trans=0, lower=0, overwrite_c=1))
    return _symmetric(out)


def polar_steps(Y: torch.Tensor, coeffs, syrk: bool) -> torch.Tensor:
    for a, b, c in coeffs:
        A = gram_syrk(Y) if syrk else torch.bmm(Y, Y.mT)
        B = poly_syrk(A, b, c) if syrk else torch.baddbmm(A, A, A, beta=b, alpha=c)
        Y = torch.baddbmm(Y, B, Y, beta=a)
    return Y


def rows(threads: int) -> list[str]:
    from equiopt.fastpath import polar_coeffs

    torch.set_num_threads(threads)
    coeffs = polar_coeffs("polar_express", 5)
    out = []
    for shape in SHAPES:
        Y = torch.randn(shape)
        Y = Y / torch.linalg.matrix_norm(Y, keepdim=True)
        ref = (Y.double() @ Y.double().mT).float()
        err = float((gram_syrk(Y) - ref).abs().max() / ref.abs().max())
        t_mm, t_syrk = median_ms(lambda Y=Y: torch.bmm(Y, Y.mT)), median_ms(lambda Y=Y: gram_syrk(Y))
        p_torch, p_syrk = polar_steps(Y, coeffs, False), polar_steps(Y, coeffs, True)
        diff = float((p_syrk - p_torch).abs().max() / p_torch.abs().max())
        n_torch = median_ms(lambda Y=Y: polar_steps(Y, coeffs, False))
        n_syrk = median_ms(lambda Y=Y: polar_steps(Y, coeffs, True))
        out.append(
            f"| {threads} | {list(shape)} | {t_mm:.2f} ms | {t_syrk:.2f} ms | x{t_mm / t_syrk:.2f} | {err:.1e} "
            f"| {n_torch:.2f} ms | {n_syrk:.2f} ms | x{n_torch / n_syrk:.2f} | {diff:.1e} |"
        )
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default="results/syrk_scipy.md")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:  # one thread count, OpenBLAS fixed to it by the parent's environment
        print("\n".join(rows(args.child)))
        return
    load0 = os.getloadavg()
    lines = []
    for t in (int(x) for x in args.threads.split(",")):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(t))
        res = subprocess.run(
            [sys.executable, __file__, "--child", str(t)], env=env, capture_output=True, text=True, check=True
        )
        lines += [ln for ln in res.stdout.splitlines() if ln.startswith("|")]
        print("\n".join(lines[-len(SHAPES) :]), flush=True)
    load1 = os.getloadavg()
    from scipy.linalg import blas

    head = [
        "# A half-cost symmetric product beside torch: SciPy's BLAS syrk (issue #16)",
        "",
        f"`python benchmarks/syrk_scipy.py`, torch {torch.__version__} (MKL), SciPy's BLAS "
        f"{getattr(blas, '__name__', 'scipy.linalg.blas')} (OpenBLAS in the SciPy wheel); medians of 11 calls; "
        f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end. Gram: `X X^T` alone "
        "(ssyrk with the symmetrization; error against float64). Polar: five Polar Express "
        "steps with the Gram and `b A + c A^2` by torch or by ssyrk between torch's products "
        "(difference of the results, relative).",
        "",
        "| threads | [N, m, n] | Gram, torch bmm | Gram, ssyrk | gain | ssyrk error "
        "| polar, torch | polar, ssyrk | gain | difference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    Path(args.out).write_text("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
