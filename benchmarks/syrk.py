"""Is a half-cost symmetric product reachable beside torch on this CPU? (issue #16)

torch's CPU matmul has no symmetric routine (``benchmarks/symmetric_products.py``), but a
BLAS ``syrk`` (``C = alpha A A^T + beta C``, one triangle: half the FLOPs of a general
product) is reachable two ways: SciPy's BLAS (OpenBLAS in the wheel) on NumPy views of torch's
CPU tensors, and the MKL inside libtorch itself (its exported internal ``mkl_blas_ssyrk``,
Fortran BLAS arguments, 32-bit integers, called through ctypes: a measurement only, not an API
a library may rely on; skipped where the symbol is absent). This measures, per thread count
(one subprocess each: OpenBLAS fixes its thread count at load, ``OPENBLAS_NUM_THREADS``; a
crash stays in the child):

* the Gram ``X X^T`` alone: ``torch.bmm`` against each ``ssyrk`` (plus the symmetrization the
  callers need), and the error of the latter against the float64 product;
* five Polar Express steps ``A = Y Y^T; B = b A + c A^2; Y = a Y + B Y`` (the standard
  iteration of ``equiopt.fastpath``) with the two symmetric products by torch, or by each
  ``ssyrk`` between torch's other products, as a fast path would interleave them.

Medians of 11 calls after a warm-up; writes ``--out``.

    PYTHONPATH=src python benchmarks/syrk.py --out results/syrk.md
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy
import torch
from bench import _median_time  # the step benchmark's timer (same folder; puts src on the path)
from scipy.linalg import blas  # the measurement's dependency (scipy: the train extra)

from equiopt.fastpath import polar_coeffs

SHAPES = ((2, 512, 1536), (8, 128, 384), (4, 256, 768), (4, 1024, 3072))


def median_ms(fn, reps: int = 11) -> float:
    return 1e3 * _median_time(fn, reps)[0]


def _symmetric(upper: torch.Tensor) -> torch.Tensor:
    return torch.triu(upper) + torch.triu(upper, 1).mT


def gram_syrk(Y: torch.Tensor) -> torch.Tensor:
    """``Y Y^T`` [N, m, m] of ``Y`` [N, m, k] (float32, C-contiguous) by ``ssyrk``: the
    row-major ``Y[i]`` is the column-major ``k x m`` matrix ``Y[i].numpy().T``, whose
    ``a^T a`` (``trans=1``) is ``Y[i] Y[i]^T``."""
    out = torch.empty(Y.shape[0], Y.shape[1], Y.shape[1], dtype=Y.dtype)
    for i in range(Y.shape[0]):
        out[i] = torch.from_numpy(blas.ssyrk(1.0, Y[i].numpy().T, trans=1, lower=0))
    return _symmetric(out)


def poly_syrk(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """``b A + c A^2`` for symmetric ``A`` [N, m, m] by ``ssyrk`` (``A A^T = A^2``)."""
    out = torch.empty_like(A)
    for i in range(A.shape[0]):
        ci = np.array(A[i].numpy(), order="F")
        out[i] = torch.from_numpy(blas.ssyrk(c, A[i].numpy(), beta=b, c=ci, trans=0, lower=0, overwrite_c=1))
    return _symmetric(out)


def _mkl_ssyrk():
    """libtorch's internal MKL ``ssyrk`` (Fortran arguments by reference), or None."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    fn = getattr(lib, "mkl_blas_ssyrk", None)
    if fn is not None:
        fn.restype = None
    return fn


def gram_mkl(Y: torch.Tensor, fn) -> torch.Tensor:
    """``Y Y^T`` [N, m, m] by MKL's ``ssyrk`` (``trans = 'T'`` on the column-major ``k x m``
    view of each row-major ``Y[i]``; the column-major upper triangle is the row-major lower)."""
    N, m, k = Y.shape
    out = torch.empty(N, m, m, dtype=Y.dtype)
    ref = ctypes.byref
    args = (ctypes.c_char(b"U"), ctypes.c_char(b"T"), ctypes.c_int(m), ctypes.c_int(k), ctypes.c_float(1.0))
    lda, beta, ldc = ctypes.c_int(k), ctypes.c_float(0.0), ctypes.c_int(m)
    for i in range(N):
        Yi = Y[i].contiguous()
        fn(
            *map(ref, args),
            ctypes.c_void_p(Yi.data_ptr()),
            ref(lda),
            ref(beta),
            ctypes.c_void_p(out[i].data_ptr()),
            ref(ldc),
        )
    return _symmetric(out.mT)


def polar_steps(Y: torch.Tensor, coeffs, route: str, fn=None) -> torch.Tensor:
    """Five steps with the symmetric products by ``route``: torch, scipy or mkl."""
    for a, b, c in coeffs:
        if route == "torch":
            A = torch.bmm(Y, Y.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        elif route == "scipy":
            A = gram_syrk(Y)
            B = poly_syrk(A, b, c)
        else:
            A = gram_mkl(Y, fn)
            B = gram_mkl(A, fn).mul_(c).add_(A, alpha=b)
        Y = torch.baddbmm(Y, B, Y, beta=a)
    return Y


def rows(threads: int) -> list[str]:
    torch.set_num_threads(threads)
    coeffs, fn = polar_coeffs("polar_express", 5), _mkl_ssyrk()
    routes = ["scipy"] + (["mkl"] if fn is not None else [])
    out = []
    for shape in SHAPES:
        Y = torch.randn(shape)
        Y = Y / torch.linalg.matrix_norm(Y, keepdim=True)
        ref = (Y.double() @ Y.double().mT).float()
        grams = {"scipy": lambda Y=Y: gram_syrk(Y), "mkl": lambda Y=Y: gram_mkl(Y, fn)}
        t_gram = {"torch": median_ms(lambda Y=Y: torch.bmm(Y, Y.mT))} | {r: median_ms(grams[r]) for r in routes}
        err = {r: float((grams[r]() - ref).abs().max() / ref.abs().max()) for r in routes}
        base = polar_steps(Y, coeffs, "torch")
        diff = {r: float((polar_steps(Y, coeffs, r, fn) - base).abs().max() / base.abs().max()) for r in routes}
        t_pol = {r: median_ms(lambda Y=Y, r=r: polar_steps(Y, coeffs, r, fn)) for r in ["torch", *routes]}
        cells = [f"{t_gram['torch']:.2f} ms", f"{t_pol['torch']:.2f} ms"]
        for r in ("scipy", "mkl"):
            if r in routes:
                cells += [
                    f"{t_gram[r]:.2f} ms (x{t_gram['torch'] / t_gram[r]:.2f}, err {err[r]:.0e})",
                    f"{t_pol[r]:.2f} ms (x{t_pol['torch'] / t_pol[r]:.2f}, diff {diff[r]:.0e})",
                ]
            else:
                cells += ["-", "-"]
        out.append(f"| {threads} | {list(shape)} | " + " | ".join(cells) + " |")
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default="results/syrk.md")
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
    head = [
        "# A half-cost symmetric product beside torch: BLAS syrk through SciPy and libtorch's MKL (issue #16)",
        "",
        f"`python benchmarks/syrk.py`, torch {torch.__version__} (MKL), SciPy {scipy.__version__} "
        f"(OpenBLAS in its wheel); medians of 11 calls; load average {load0[0]:.2f} at start, "
        f"{load1[0]:.2f} at end. Gram: `X X^T` alone (ssyrk with the symmetrization; x: gain over "
        "torch's bmm; err: against float64). Polar: five Polar Express steps with the Gram and "
        "`b A + c A^2` by torch, or by ssyrk between torch's other products (x: gain; diff: the "
        "result against torch's, relative). MKL ssyrk: libtorch's internal `mkl_blas_ssyrk` "
        "through ctypes (a measurement, not an API).",
        "",
        "| threads | [N, m, n] | Gram, torch bmm | polar, torch | Gram, SciPy ssyrk | polar, SciPy ssyrk "
        "| Gram, MKL ssyrk | polar, MKL ssyrk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    Path(args.out).write_text("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
