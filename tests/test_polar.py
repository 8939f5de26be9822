"""Tests of equiopt.polar against float64 oracles.

Oracles: numpy SVD (independent of torch.linalg), matrices built from a known SVD
(U diag(s) V^T with Haar U, V, so the exact polar factor U V^T and nuclear norm sum(s) are
known by construction), and the scalar polynomial recursion of each iterative method
applied to the known singular values.

Tolerance vocabulary: float64 eps = 2.2e-16, float32 eps = 1.2e-7, bfloat16 eps = 2^-8
(relative rounding unit 3.9e-3).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from equiopt.polar import (
    DEFAULT_STEPS,
    NEWTON_SCHULZ_COEFFS,
    POLAR_EXPRESS_COEFFS,
    POLAR_EXPRESS_SAFETY,
    POLAR_METHODS,
    gram_polar,
    inv_sqrt_psd,
    newton_schulz,
    nuclear_norm,
    polar,
    polar_express,
    svd_polar,
)

F64 = torch.float64
SHAPES = [(12, 7), (7, 12), (9, 9)]  # tall, wide, square


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def haar(k: int, g: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal k x k (QR of a Gaussian, signs of diag(R) fixed)."""
    q, r = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def with_spectrum(m: int, n: int, s, g: torch.Generator):
    """X = U diag(s) V^T with orthonormal U (m x r), V (n x r); returns X, U V^T, sum(s)."""
    s = torch.as_tensor(s, dtype=F64)
    r = s.numel()
    U = haar(m, g)[:, :r]
    V = haar(n, g)[:, :r]
    return (U * s) @ V.T, U @ V.T, s.sum()


def logspace_spectrum(k: int, kappa: float):
    """k singular values log-spaced in [1/kappa, 1] (condition number kappa)."""
    return torch.logspace(0, -math.log10(kappa), k, dtype=F64)


def np_polar(x: torch.Tensor) -> torch.Tensor:
    """Independent oracle: numpy SVD in float64, pseudo-polar with the documented cutoff."""
    a = x.detach().to(F64).numpy()
    u, s, vh = np.linalg.svd(a, full_matrices=False)
    keep = s > (s[..., :1] * max(a.shape[-2:]) * np.finfo(np.float64).eps)
    return torch.from_numpy((u * keep[..., None, :]) @ vh)


def scalar_composition(coeffs, t: torch.Tensor) -> torch.Tensor:
    for a, b, c in coeffs:
        t = a * t + b * t**3 + c * t**5
    return t


def pe_coeffs(steps: int):
    return list(POLAR_EXPRESS_COEFFS[:steps]) + [POLAR_EXPRESS_COEFFS[-1]] * max(0, steps - len(POLAR_EXPRESS_COEFFS))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (
        (torch.linalg.matrix_norm(a.to(F64) - b.to(F64)) / torch.linalg.matrix_norm(b.to(F64)).clamp(min=1e-300))
        .max()
        .item()
    )


def spec_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(a.to(F64) - b.to(F64), ord=2).max().item()


# ----------------------------------------------------------------------------------------
# accuracy vs the exact polar factor
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_svd_polar_matches_numpy_and_construction(shape):
    m, n = shape
    x, uv, _ = with_spectrum(m, n, logspace_spectrum(min(m, n), 1e3), gen(1))
    p = svd_polar(x)
    # Two float64 SVDs of a kappa=1e3 matrix: the polar factor's perturbation bound is
    # ~eps * kappa (smallest singular gap to 0 is sigma_min) ~ 2e-13; 1e-11 leaves 50x margin.
    assert rel_err(p, np_polar(x)) < 1e-11
    assert rel_err(p, uv) < 1e-11


@pytest.mark.parametrize("shape", SHAPES)
def test_gram_eigh_float64_tight(shape):
    m, n = shape
    kappa = 100.0
    x, uv, nuc = with_spectrum(m, n, logspace_spectrum(min(m, n), kappa), gen(2))
    p, nn = gram_polar(x)
    # Forming the Gram squares the condition number: worst-case error ~ eps * kappa^2 =
    # 2.2e-12 for kappa = 100 (observed 3e-14 to 6e-14); 1e-11 allows dimension factors.
    assert rel_err(p, uv) < 1e-11
    assert rel_err(polar(x, "gram_eigh"), uv) < 1e-11
    # Nuclear norm: sum of sqrt(eigenvalues), each relatively accurate to ~eps * kappa^2 / 2.
    assert abs(nn.item() - nuc.item()) / nuc.item() < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
def test_gram_eigh_float32(shape):
    m, n = shape
    kappa = 10.0
    x, uv, nuc = with_spectrum(m, n, logspace_spectrum(min(m, n), kappa), gen(3))
    p, nn = gram_polar(x.float())
    assert p.dtype == torch.float32 and nn.dtype == torch.float32
    # float32 Gram: worst-case error ~ eps32 * kappa^2 = 1.2e-5 for kappa = 10 (plus the
    # input rounding, 6e-8; observed ~1e-6); 1e-4 is that bound with ~8x margin.
    assert rel_err(p, uv) < 1e-4
    assert abs(nn.item() - nuc.item()) / nuc.item() < 1e-5  # eigenvalues of the Gram: ~eps32 * kappa^2 / 2 each


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("steps", [8, 10])
def test_polar_express_converged_tight(shape, steps):
    """Well-conditioned input, kappa = 100: after the 1.01 ||X||_F normalization the smallest
    singular value is >= 0.01 / (1.01 * sqrt(9)) = 3.3e-3, inside the schedule's design
    interval [1e-3, 1], where 8 steps converge to 1 to machine precision (scalar recursion:
    max |P - 1| = 3e-15)."""
    m, n = shape
    x, uv, _ = with_spectrum(m, n, logspace_spectrum(min(m, n), 100.0), gen(4))
    p = polar_express(x, steps=steps)
    # Rounding in the matmuls, propagated through the iteration (the final polynomials are
    # flat at 1, so earlier errors on the singular values are damped): observed ~2e-15;
    # 1e-12 leaves a 500x margin for other BLAS builds.
    assert rel_err(p, uv) < 1e-12
    assert rel_err(polar(x, "polar_express", steps=steps), uv) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_express_default_steps_band(shape):
    """5 steps (the default, what Muon uses): every singular value is mapped within 0.16 of 1
    on the normalized interval [1e-3, 1] (max of |P - 1| over the scalar recursion: 0.160),
    so ||PE(X) - U V^T||_2 <= 0.16 for kappa = 100, and the singular vectors are exact."""
    m, n = shape
    x, uv, _ = with_spectrum(m, n, logspace_spectrum(min(m, n), 100.0), gen(5))
    p = polar_express(x)
    assert spec_err(p, uv) < 0.161
    s = torch.linalg.svdvals(p)
    assert s.min() > 1 - 0.161 and s.max() < 1 + 0.161
    # singular vectors: polar factor of the output = polar factor of the input
    # (output singular values >= 0.84, so the SVD of the output is well conditioned).
    assert rel_err(svd_polar(p), uv) < 1e-10


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("steps", [0, 1, 3, 5, 9, 12])
def test_iterations_follow_scalar_recursion(shape, steps):
    """Algorithm oracle: an odd polynomial iteration acts on singular values only, so
    NS(X) = U diag(q(s / ||X||_F)) V^T and PE(X) = U diag(P(s / (1.01 ||X||_F + 1e-7))) V^T
    with the scalar recursions q, P. steps > 8 checks the repetition of the last entry."""
    m, n = shape
    s = logspace_spectrum(min(m, n), 100.0)
    g = gen(6)
    U = haar(m, g)[:, : s.numel()]
    V = haar(n, g)[:, : s.numel()]
    x = (U * s) @ V.T
    fro = s.norm()
    q = scalar_composition([NEWTON_SCHULZ_COEFFS] * steps, s / fro)
    P = scalar_composition(pe_coeffs(steps), s / (POLAR_EXPRESS_SAFETY * fro + 1e-7))
    # Rounding only (the recursion itself is exact); the largest slope of the composed
    # polynomials over the spectrum is ~1e3, so errors ~1e-13; 1e-10 leaves margin.
    assert rel_err(newton_schulz(x, steps=steps), (U * q) @ V.T) < 1e-10
    assert rel_err(polar_express(x, steps=steps), (U * P) @ V.T) < 1e-10


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_band_and_singular_vectors(shape):
    """Muon's NS does NOT converge to U V^T: with 5 steps its singular values lie in
    [0.68, 1.21] for normalized input singular values in [2e-3, 1] (documented band
    [0.5, 1.5]); the singular vectors are those of the input."""
    m, n = shape
    x, uv, _ = with_spectrum(m, n, logspace_spectrum(min(m, n), 100.0), gen(7))
    y = newton_schulz(x)
    s = torch.linalg.svdvals(y)
    assert s.min() >= 0.5 and s.max() <= 1.5
    assert rel_err(y, uv) > 1e-3  # genuinely not the polar factor
    # polar factor of the output equals that of the input (output is well conditioned:
    # singular values >= 0.68), up to float64 rounding: 1e-10.
    assert rel_err(svd_polar(y), uv) < 1e-10
    assert rel_err(polar(x, "newton_schulz"), y) == 0.0


@pytest.mark.parametrize("shape", [(8, 12), (12, 8), (16, 16), (1, 5), (5, 1)])
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_newton_schulz_bf16_matches_torch_muon(shape, steps):
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

    x = torch.randn(*shape, generator=gen(8))
    ref = torch_ns(x, NEWTON_SCHULZ_COEFFS, steps, 1e-7).float()
    ours = newton_schulz(x, steps=steps, compute_dtype=torch.bfloat16)
    assert ours.dtype == torch.float32  # cast back to the input dtype
    # Same algorithm, both in bfloat16: a difference in kernel choice (bmm vs mm) may change
    # the last bit of an intermediate, so allow 2 bf16 ulps (2^-7 relative) of the output
    # scale (max |ref|) per entry. (On CPU the results are in fact bitwise equal.)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2**-7 * ref.abs().max().item())


def test_bfloat16_compute_of_polar_express_is_close():
    x, uv, _ = with_spectrum(32, 16, logspace_spectrum(16, 10.0), gen(9))
    x = x.float()
    y = polar_express(x, compute_dtype=torch.bfloat16)
    assert y.dtype == torch.float32
    # The 5-step schedule itself is up to 0.13 off on this spectrum (float64: 0.124) and bf16
    # rounding adds ~2^-8 * sqrt(n) per step, mostly damped by the next polynomial (observed
    # 0.127): 0.25 is a sanity bound; the accuracy tests are in float64 above.
    assert spec_err(y, uv) < 0.25


# ----------------------------------------------------------------------------------------
# batching, dtypes, purity
# ----------------------------------------------------------------------------------------

METHOD_FNS = {
    "newton_schulz": lambda x: newton_schulz(x),
    "polar_express": lambda x: polar_express(x),
    "svd": svd_polar,
    "gram_eigh": lambda x: gram_polar(x)[0],
    "gram_nuclear": lambda x: gram_polar(x)[1],
    "nuclear_gram": lambda x: nuclear_norm(x, "gram"),
    "nuclear_svd": lambda x: nuclear_norm(x, "svd"),
}


@pytest.mark.parametrize("name", list(METHOD_FNS))
@pytest.mark.parametrize("shape", [(9, 5), (5, 9)])
def test_batched_equals_looped(name, shape):
    fn = METHOD_FNS[name]
    x = torch.randn(2, 3, *shape, generator=gen(10), dtype=F64)
    y = fn(x)
    looped = torch.stack([torch.stack([fn(x[i, j]) for j in range(3)]) for i in range(2)])
    assert y.shape == looped.shape
    # Batched BLAS/LAPACK may pick a different kernel than the 2-D call; allow a few ulps
    # of O(1) outputs (the nuclear norm is O(10): same 1e-13 is ~50 ulps).
    torch.testing.assert_close(y, looped, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", list(METHOD_FNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_preserved_and_input_untouched(name, dtype):
    fn = METHOD_FNS[name]
    x = torch.randn(2, 6, 4, generator=gen(11)).to(dtype)
    before = x.clone()
    y = fn(x)
    assert y.dtype == dtype
    assert torch.equal(x, before)
    assert torch.isfinite(y.float()).all()


def test_inputs_not_modified_all_functions():
    x = torch.randn(3, 7, 5, generator=gen(12), dtype=F64)
    gram = x.mT @ x
    xs, gs = x.clone(), gram.clone()
    for method in POLAR_METHODS:
        polar(x, method)
    newton_schulz(x, compute_dtype=torch.float32)
    polar_express(x, steps=9)
    gram_polar(x, side="left")
    nuclear_norm(x, "svd")
    inv_sqrt_psd(gram)
    assert torch.equal(x, xs) and torch.equal(gram, gs)


# ----------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------

ALL_POLAR = {
    "newton_schulz": newton_schulz,
    "polar_express": polar_express,
    "svd": svd_polar,
    "gram_eigh": lambda x: gram_polar(x)[0],
}


@pytest.mark.parametrize("name", list(ALL_POLAR))
@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (1, 5), (5, 1), (2, 3, 3), (1, 1)])
def test_zero_matrix_maps_to_zero(name, shape):
    z = torch.zeros(shape, dtype=F64)
    y = ALL_POLAR[name](z)
    assert y.shape == z.shape and torch.equal(y, z)
    assert torch.equal(nuclear_norm(z), torch.zeros(shape[:-2], dtype=F64))
    assert torch.equal(nuclear_norm(z, "svd"), torch.zeros(shape[:-2], dtype=F64))


@pytest.mark.parametrize("name", list(ALL_POLAR))
@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 0), (0, 3, 4), (2, 0, 3)])
def test_empty_inputs(name, shape):
    x = torch.zeros(shape)
    y = ALL_POLAR[name](x)
    assert y.shape == x.shape
    assert gram_polar(x)[1].shape == shape[:-2]
    assert nuclear_norm(x).shape == shape[:-2] and nuclear_norm(x, "svd").shape == shape[:-2]
    assert (nuclear_norm(x) == 0).all()


@pytest.mark.parametrize("shape", [(1, 6), (6, 1)])
def test_vectors(shape):
    """A 1 x n (or n x 1) matrix has one singular value ||x||: polar(x) = x / ||x||."""
    x = torch.randn(shape, generator=gen(13), dtype=F64)
    unit = x / x.norm()
    for p in (svd_polar(x), gram_polar(x)[0], polar_express(x, steps=8)):
        # exact methods / converged PE: rounding only
        torch.testing.assert_close(p, unit, rtol=0, atol=1e-14)
    # PE 5 steps: P(|x| / (1.01 |x| + 1e-7)) (the normalized singular value), NS: q(1);
    # both scalar oracles
    t = x.norm() / (POLAR_EXPRESS_SAFETY * x.norm() + 1e-7)
    torch.testing.assert_close(polar_express(x), unit * scalar_composition(pe_coeffs(5), t), rtol=0, atol=1e-13)
    torch.testing.assert_close(
        newton_schulz(x),
        unit * scalar_composition([NEWTON_SCHULZ_COEFFS] * 5, torch.tensor(1.0, dtype=F64)),
        rtol=0,
        atol=1e-13,
    )
    torch.testing.assert_close(nuclear_norm(x), x.norm(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
def test_rank_deficient(shape):
    """X = U_r diag(s) V_r^T with r = 2 < min(m, n): exact methods give U_r V_r^T (null
    directions dropped by the relative cutoff), the nuclear norm is sum(s)."""
    m, n = shape
    x, uvr, nuc = with_spectrum(m, n, [2.0, 0.5], gen(14))
    # Null singular values come out at ~1e-16 * sigma_max, far below the cutoffs
    # (max(m,n) eps sigma_max for SVD; size eps lambda_max for the Gram); the kept part is
    # perfectly conditioned (kappa = 4), so rounding-level agreement: 1e-12.
    assert rel_err(svd_polar(x), uvr) < 1e-12
    assert rel_err(gram_polar(x)[0], uvr) < 1e-12
    assert rel_err(np_polar(x), uvr) < 1e-12
    # PE: zero singular values stay (numerically) zero under an odd polynomial; 10 steps
    # converge on the kept ones (normalized 0.5/(1.01*2.06) = 0.24); noise ~1e-16 amplified
    # by prod(a_t) ~ 2e4 stays ~1e-12.
    assert rel_err(polar_express(x, steps=10), uvr) < 1e-10
    for method in ("gram", "svd"):
        assert abs(nuclear_norm(x, method).item() - nuc.item()) < 1e-13 * nuc.item() * 10
    # gram_polar's by-product drops the null directions exactly like nuclear_norm("gram")
    assert gram_polar(x)[1].item() == nuclear_norm(x).item()


@pytest.mark.parametrize("name", list(ALL_POLAR))
@pytest.mark.parametrize("shape", [(7, 5), (5, 7)])
def test_zero_rows_and_columns_stay_exactly_zero(name, shape):
    x = torch.randn(shape, generator=gen(15), dtype=F64)
    x[1] = 0
    x[3] = 0
    x[:, 2] = 0  # and a zero column
    y = ALL_POLAR[name](x)
    # iterations: a zero row of X gives a zero row/column of X X^T and stays zero exactly;
    # SVD / Gram: the exact (pseudo-)polar factor has zero rows there and the
    # implementation zeroes the rounding noise, so exact zeros too.
    assert torch.isfinite(y).all()
    assert (y[1] == 0).all() and (y[3] == 0).all() and (y[:, 2] == 0).all()
    if name in ("svd", "gram_eigh"):
        # numpy oracle keeps ~1e-17 noise in those lines; rank-4 x with kappa ~ 10: 1e-11
        assert rel_err(y, np_polar(x)) < 1e-11


# ----------------------------------------------------------------------------------------
# inverse square root
# ----------------------------------------------------------------------------------------


def _psd_with_spectrum(lam, g):
    lam = torch.as_tensor(lam, dtype=F64)
    V = haar(lam.numel(), g)
    return (V * lam) @ V.T, V, lam


def test_inv_sqrt_psd_singular_vs_eig_oracle():
    G, V, lam = _psd_with_spectrum([0.0, 0.0, 0.5, 1.0, 2.0, 4.0], gen(16))
    inv = torch.where(lam > 0, lam.clamp(min=1e-300).rsqrt(), torch.zeros_like(lam))
    oracle = (V * inv) @ V.T  # explicit float64 pseudo-inverse square root
    got = inv_sqrt_psd(G)
    # The exact zeros come out of eigh at ~1e-16 * 4, below the cutoff 6 * eps * 4 = 5e-15;
    # kept eigenvalues >= 0.5 are perturbed by ~1e-15 -> error ~1e-15 * 0.5^-1.5; 1e-12.
    torch.testing.assert_close(got, oracle, rtol=0, atol=1e-12)
    # It is a pseudo-inverse square root: (G^{+1/2})^2 G = projector onto the range.
    proj = V[:, 2:] @ V[:, 2:].T
    torch.testing.assert_close(got @ got @ G, proj, rtol=0, atol=1e-12)
    # The trap it avoids: inverting the null eigenvalues (noise ~1e-16) would blow up.
    lam_num, V_num = torch.linalg.eigh(G)
    naive = (V_num * lam_num.abs().clamp(min=1e-300).rsqrt()) @ V_num.T
    assert naive.abs().max() > 1e5


def test_inv_sqrt_psd_batched_rcond_float32_zero_empty():
    g = gen(17)
    Gs, oracles = [], []
    for lam in ([0.0, 0.1, 1.0, 3.0], [0.0, 0.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]):
        G, V, lam = _psd_with_spectrum(lam, g)
        Gs.append(G)
        inv = torch.where(lam > 0, lam.clamp(min=1e-300).rsqrt(), torch.zeros_like(lam))
        oracles.append((V * inv) @ V.T)
    G = torch.stack(Gs)
    oracle = torch.stack(oracles)
    torch.testing.assert_close(inv_sqrt_psd(G), oracle, rtol=0, atol=1e-12)  # see previous test
    # rcond = 0.05 drops 0.1 < 0.05 * 3 = 0.15 in the first matrix and nothing else
    G0, V0, lam0 = _psd_with_spectrum([0.0, 0.1, 1.0, 3.0], gen(18))
    inv0 = torch.tensor([0.0, 0.0, 1.0, 3.0**-0.5], dtype=F64)
    torch.testing.assert_close(inv_sqrt_psd(G0, rcond=0.05), (V0 * inv0) @ V0.T, rtol=0, atol=1e-12)
    # float32 in -> float32 out, computed in float32: eigenvalue error ~eps32 * 3 = 4e-7,
    # relative error of 0.1^-1/2 ~ 2e-6, times |V|... 1e-5 absolute.
    got32 = inv_sqrt_psd(G.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), oracle, rtol=0, atol=1e-5)
    assert torch.equal(inv_sqrt_psd(torch.zeros(2, 3, 3)), torch.zeros(2, 3, 3))
    assert inv_sqrt_psd(torch.zeros(0, 0)).shape == (0, 0)
    assert inv_sqrt_psd(torch.zeros(5, 0, 0)).shape == (5, 0, 0)
    with pytest.raises(ValueError):
        inv_sqrt_psd(torch.zeros(3, 4))


# ----------------------------------------------------------------------------------------
# nuclear norm, dispatcher
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 9, 5), (2, 5, 9), (6, 6)])
def test_nuclear_norm_vs_svdvals(shape):
    x = torch.randn(shape, generator=gen(19), dtype=F64)
    ref = torch.as_tensor(np.asarray(np.linalg.svd(x.numpy(), compute_uv=False).sum(-1)))
    # float64: Gaussian matrices have kappa ~ 10-100; sqrt of Gram eigenvalues is relatively
    # accurate to ~eps * kappa^2 per value -> 1e-11 relative.
    torch.testing.assert_close(nuclear_norm(x), ref, rtol=1e-11, atol=0)
    torch.testing.assert_close(nuclear_norm(x, "svd"), ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(gram_polar(x)[1], ref, rtol=1e-11, atol=0)
    # float32: same argument with eps32 -> well within 1e-4 relative for these kappas.
    torch.testing.assert_close(nuclear_norm(x.float()).double(), ref, rtol=1e-4, atol=0)


def test_dispatcher():
    x = torch.randn(6, 4, generator=gen(20), dtype=F64)
    assert POLAR_METHODS == ("newton_schulz", "polar_express", "svd", "gram_eigh")
    assert torch.equal(polar(x), polar_express(x, steps=DEFAULT_STEPS))
    assert torch.equal(polar(x, "newton_schulz", steps=3), newton_schulz(x, steps=3))
    assert torch.equal(polar(x, "polar_express", steps=7), polar_express(x, steps=7))
    assert torch.equal(polar(x, "svd"), svd_polar(x))
    assert torch.equal(polar(x, "gram_eigh"), gram_polar(x)[0])
    assert polar(x, "newton_schulz", compute_dtype=torch.float32).dtype == F64
    with pytest.raises(ValueError, match=r"method.*'bogus'.*newton_schulz.*polar_express.*svd.*gram_eigh"):
        polar(x, "bogus")
    with pytest.raises(ValueError, match="method"):
        nuclear_norm(x, "bogus")
    with pytest.raises(ValueError, match="side"):
        gram_polar(x, side="top")


def test_gram_polar_sides_agree():
    x = torch.randn(3, 8, 5, generator=gen(21), dtype=F64)
    ref = np_polar(x)
    for side in ("auto", "right", "left"):
        p, nn = gram_polar(x, side=side)
        # side="left" on a tall matrix uses the rank-deficient 8 x 8 Gram: the pseudo-inverse
        # drops its 3 null directions; still float64 rounding level (kappa of x ~ 10).
        assert rel_err(p, ref) < 1e-10, side
        torch.testing.assert_close(nn, nuclear_norm(x, "svd"), rtol=1e-11, atol=0)
