"""Tests of equiopt.maps: equivariance under each map's symmetry group (float64), independent
float64 oracles written out here (loops over rows, numpy SVD), edge cases and the registry.

Group actions on X [..., m, n] (the same group element for every matrix of a batch):
  perm_rows X -> P X,   orth_rows X -> Q X,   perm_cols X -> X P,   orth_cols X -> X Q,
  shift X -> X + 1 c^T (a translation: a compatible map is invariant and has 1^T Phi = 0).
Equivariance: Phi(g.X) == g.Phi(X). For a product group it suffices to test each factor
(they generate it); one test also applies a joint element.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch

from equiopt import maps as M
from equiopt.maps import (
    EPS,
    MAPS,
    center_rows,
    centered_row_norm,
    col_norm,
    column_aware,
    get_map,
    hybrid,
    identity,
    left_spectral,
    right_spectral,
    row_norm,
    scaled_polar,
)

F64 = torch.float64

# Equivariance tolerance, relative to max(1, ||Phi(X)||_F): float64 eps is 2.2e-16; a map
# does O(10) matmuls / one eigh / one SVD, and the polynomial iterations amplify rounding
# on tiny (e.g. numerically-zero) singular values by at most their slope at 0, the product
# of the a_t (~1e3 for 5 Polar Express steps, 3.4445^5 = 490 for Newton-Schulz). Observed
# worst case over 15 seeds x 4 shapes x 3 input kinds: 1.4e-13 (hybrid / Polar Express);
# 1e-11 leaves a 70x margin, while a genuine violation gives O(1) errors
# (see test_harness_detects_violation).
EQUI_TOL = 1e-11

# Oracle tolerance for maps vs explicit float64 formulas on the inputs below (condition
# number of the random Gaussian blocks <= ~20, rank-deficient ones with kept singular
# values of ratio <= ~3): SVD and Gram routes are accurate to ~eps * kappa^2 ~ 1e-13;
# converged Polar Express (10 steps) amplifies the ~1e-16 null-space singular values of a
# rank-deficient input by prod(a_t) ~ 2e4 (observed 1e-12). 1e-10 leaves a 100x margin.
ORACLE_TOL = 1e-10


# ----------------------------------------------------------------------------------------
# group elements and inputs
# ----------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def haar(k: int, g: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal k x k (QR of a Gaussian, with the sign fix on diag(R))."""
    q, r = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def perm_matrix(k: int, g: torch.Generator) -> torch.Tensor:
    return torch.eye(k, dtype=F64)[torch.randperm(k, generator=g)]


def make_input(kind: str, shape, seed: int) -> torch.Tensor:
    b, m, n = shape
    g = gen(seed)
    if kind == "random":
        return torch.randn(b, m, n, generator=g, dtype=F64)
    if kind == "rank_deficient":  # rank 2 < min(m, n)
        return torch.randn(b, m, 2, generator=g, dtype=F64) @ torch.randn(b, 2, n, generator=g, dtype=F64)
    if kind == "zero_rows":
        x = torch.randn(b, m, n, generator=g, dtype=F64)
        x[:, 1] = 0
        x[:, -1] = 0
        return x
    raise AssertionError(kind)


KINDS = ("random", "rank_deficient", "zero_rows")
SHAPES = ((2, 9, 5), (2, 5, 8))  # batched tall (vocab-like) and wide (router-like)


def apply_group(group: str, x: torch.Tensor, seed: int):
    """Returns (g.X, act) where act(Y) = g.Y for the same group element."""
    m, n = x.shape[-2:]
    g = gen(seed)
    if group == "perm_rows":
        P = perm_matrix(m, g)
        act = lambda y: P @ y  # noqa: E731
    elif group == "orth_rows":
        Q = haar(m, g)
        act = lambda y: Q @ y  # noqa: E731
    elif group == "perm_cols":
        P = perm_matrix(n, g)
        act = lambda y: y @ P  # noqa: E731
    elif group == "orth_cols":
        Q = haar(n, g)
        act = lambda y: y @ Q  # noqa: E731
    elif group == "shift":
        c = torch.randn(n, generator=g, dtype=F64)
        return x + c, lambda y: y  # invariance: Phi(X + 1 c^T) = Phi(X)
    else:
        raise AssertionError(group)
    return act(x), act


def rel_dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / max(1.0, torch.linalg.vector_norm(b).item())).item()


# ----------------------------------------------------------------------------------------
# maps under test and their groups
# ----------------------------------------------------------------------------------------

ROW_GROUP = ("perm_rows", "orth_cols")  # Perm(m) x O(n)
COL_GROUP = ("orth_rows", "perm_cols")  # O(m) x Perm(n)
ORTH_GROUP = ("orth_rows", "orth_cols")  # O(m) x O(n)
SHIFT_GROUP = ("perm_rows", "orth_cols", "shift")  # Perm(m) x O(n) x shift

P = functools.partial
CASES = {
    "row_norm": (row_norm, ROW_GROUP),
    "col_norm": (col_norm, COL_GROUP),
    "center_rows": (center_rows, SHIFT_GROUP),
    "centered_row_norm": (centered_row_norm, SHIFT_GROUP),
    "polar[polar_express]": (P(M.polar, method="polar_express"), ORTH_GROUP),
    "polar[newton_schulz]": (P(M.polar, method="newton_schulz"), ORTH_GROUP),
    "polar[svd]": (P(M.polar, method="svd"), ORTH_GROUP),
    "polar[gram_eigh]": (P(M.polar, method="gram_eigh"), ORTH_GROUP),
    "scaled_polar[a=1,pe]": (scaled_polar, ORTH_GROUP),
    "scaled_polar[a=0,ns]": (P(scaled_polar, alpha=0.0, method="newton_schulz"), ORTH_GROUP),
    "scaled_polar[a=1,gram]": (P(scaled_polar, method="gram_eigh"), ORTH_GROUP),
    "scaled_polar[a=0.5,svd]": (P(scaled_polar, alpha=0.5, method="svd"), ORTH_GROUP),
    "right_spectral[a=1]": (right_spectral, ORTH_GROUP + ("perm_rows",)),
    "right_spectral[a=0]": (P(right_spectral, alpha=0.0), ORTH_GROUP),
    "left_spectral[centered]": (left_spectral, SHIFT_GROUP),
    "left_spectral[a=0,centered]": (P(left_spectral, alpha=0.0), SHIFT_GROUP),
    "left_spectral[uncentered]": (P(left_spectral, center=False), ORTH_GROUP),
    "hybrid[row_then_polar]": (hybrid, ROW_GROUP),
    "hybrid[row_then_polar,a=0,gram]": (P(hybrid, alpha=0.0, method="gram_eigh"), ROW_GROUP),
    "hybrid[polar_then_row]": (P(hybrid, order="polar_then_row"), ROW_GROUP),
    "column_aware(row_norm)": (column_aware(row_norm), COL_GROUP),
    "column_aware(hybrid)": (column_aware(hybrid), COL_GROUP),
    "column_aware(hybrid,polar_then_row)": (P(column_aware(hybrid), order="polar_then_row"), COL_GROUP),
    "identity": (identity, ORTH_GROUP + ("perm_rows", "perm_cols")),
}

EQUI_PARAMS = [
    pytest.param(name, group, id=f"{name}-{group}") for name, (_, groups) in CASES.items() for group in groups
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,group", EQUI_PARAMS)
def test_equivariance(name, group, kind):
    fn, _ = CASES[name]
    for si, shape in enumerate(SHAPES):
        x = make_input(kind, shape, seed=100 + si)
        gx, act = apply_group(group, x, seed=200 + si)
        out = fn(x)
        assert torch.isfinite(out).all()
        err = rel_dist(fn(gx), act(out))
        assert err < EQUI_TOL, (shape, err)


def test_joint_group_element():
    """One element of the full product group at once: (P, Q, c) for the router maps,
    (Q1, Q2) for the spectral ones."""
    x = make_input("random", (3, 6, 10), 1)
    g = gen(2)
    Pm, Qn, Qm = perm_matrix(6, g), haar(10, g), haar(6, g)
    c = torch.randn(10, generator=g, dtype=F64)
    for fn in (centered_row_norm, left_spectral, P(left_spectral, alpha=0.0)):
        assert rel_dist(fn(Pm @ (x + c) @ Qn), Pm @ fn(x) @ Qn) < EQUI_TOL
    for fn in (row_norm, hybrid, right_spectral):
        assert rel_dist(fn(Pm @ x @ Qn), Pm @ fn(x) @ Qn) < EQUI_TOL
    for fn in (scaled_polar, M.polar, right_spectral, P(left_spectral, center=False)):
        assert rel_dist(fn(Qm @ x @ Qn), Qm @ fn(x) @ Qn) < EQUI_TOL


def test_harness_detects_violation():
    """The equivariance check is not vacuous: maps outside their group fail by O(1)."""
    x = make_input("random", (2, 9, 5), 3)
    gx, act = apply_group("orth_rows", x, 4)
    assert rel_dist(row_norm(gx), act(row_norm(x))) > 1e-2  # rn is not O(m)-equivariant
    gx, act = apply_group("perm_cols", x, 5)
    gx2, act2 = apply_group("orth_cols", x, 5)
    assert rel_dist(col_norm(gx2), act2(col_norm(x))) > 1e-2  # cn is not O(n)-equivariant
    gx, act = apply_group("shift", x, 6)
    assert rel_dist(row_norm(gx), row_norm(x)) > 1e-2  # rn is not shift invariant
    assert rel_dist(left_spectral(gx, center=False), left_spectral(x, center=False)) > 1e-2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "fn",
    [centered_row_norm, left_spectral, P(left_spectral, alpha=0.0), center_rows],
    ids=lambda f: getattr(f, "__name__", "partial"),
)
def test_centered_maps_have_zero_column_sums(fn, kind):
    for si, shape in enumerate(SHAPES):
        x = make_input(kind, shape, 300 + si)
        out = fn(x)
        # 1^T Phi = 0 up to the rounding of one mean subtraction: m * eps * max|entry|.
        col_sums = out.sum(-2)
        assert col_sums.abs().max() < 1e-12 * max(1.0, out.abs().max().item()), kind


# ----------------------------------------------------------------------------------------
# independent float64 oracles
# ----------------------------------------------------------------------------------------


def rn_oracle(x: np.ndarray, eps: float = EPS) -> np.ndarray:
    out = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[:-2]):
        for i in range(x.shape[-2]):
            row = x[idx + (i,)]
            out[idx + (i,)] = row / (np.sqrt(np.sum(row * row)) + eps)
    return out


def cn_oracle(x: np.ndarray, eps: float = EPS) -> np.ndarray:
    out = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[:-2]):
        for j in range(x.shape[-1]):
            col = x[idx + (slice(None), j)]
            out[idx + (slice(None), j)] = col / (np.sqrt(np.sum(col * col)) + eps)
    return out


def center_oracle(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    m = x.shape[-2]
    for idx in np.ndindex(*x.shape[:-2]):
        for j in range(x.shape[-1]):
            col = x[idx + (slice(None), j)]
            out[idx + (slice(None), j)] = col - sum(col) / m
    return out


def svd_oracle(x: np.ndarray, alpha: float = 0.0):
    """||x||_*^alpha U_r V_r^T, numpy SVD, singular values <= s_max * max(m,n) * eps dropped."""
    out = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[:-2]):
        u, s, vh = np.linalg.svd(x[idx], full_matrices=False)
        if s.size == 0 or s[0] == 0:
            continue
        r = int(np.sum(s > s[0] * max(x.shape[-2:]) * np.finfo(np.float64).eps))
        out[idx] = (s.sum() ** alpha) * (u[:, :r] @ vh[:r])
        # exact math: a zero row of x is a zero row of U_r (numpy leaves ~1e-17 there, which
        # a following row normalization would blow up to ~1e-9)
        out[idx][np.all(x[idx] == 0, axis=-1)] = 0
    return out


def check(got: torch.Tensor, want: np.ndarray, tol: float = ORACLE_TOL):
    want_t = torch.from_numpy(want)
    assert got.shape == want_t.shape
    assert rel_dist(got, want_t) < tol, rel_dist(got, want_t)


@pytest.fixture(params=KINDS)
def x_np(request):
    return make_input(request.param, (2, 7, 5), 400).numpy(), make_input(request.param, (2, 5, 8), 401).numpy()


def test_row_col_center_oracles(x_np):
    for x in x_np:
        t = torch.from_numpy(x)
        # row/col norms and centering: a few flops per entry, rounding only: 1e-14.
        check(row_norm(t), rn_oracle(x), 1e-14)
        check(row_norm(t, eps=0.5), rn_oracle(x, 0.5), 1e-14)
        check(col_norm(t), cn_oracle(x), 1e-14)
        check(column_aware(row_norm)(t), cn_oracle(x), 1e-14)
        check(center_rows(t), center_oracle(x), 1e-14)
        check(centered_row_norm(t), center_oracle(rn_oracle(center_oracle(x))), 1e-14)
        assert torch.equal(column_aware(row_norm)(t), col_norm(t))
        assert torch.equal(column_aware(row_norm)(t, eps=0.5), col_norm(t, eps=0.5))


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5])
def test_spectral_oracles(x_np, alpha):
    for x in x_np:
        t = torch.from_numpy(x)
        want = svd_oracle(x, alpha)
        for method, steps in (("svd", None), ("gram_eigh", None), ("polar_express", 10)):
            check(scaled_polar(t, alpha=alpha, method=method, steps=steps), want)
        check(right_spectral(t, alpha=alpha), want)
        check(left_spectral(t, alpha=alpha, center=False), want)
        c = center_oracle(x)
        check(left_spectral(t, alpha=alpha), svd_oracle(c, alpha))
        r = rn_oracle(x)
        check(hybrid(t, alpha=alpha, method="svd"), svd_oracle(r, alpha))
        check(hybrid(t, alpha=alpha, method="polar_express", steps=10), svd_oracle(r, alpha))
        check(hybrid(t, order="polar_then_row", alpha=alpha, method="gram_eigh"), rn_oracle(svd_oracle(x)))
        xt = np.swapaxes(x, -1, -2)
        check(column_aware(hybrid)(t, alpha=alpha, method="svd"), np.swapaxes(svd_oracle(rn_oracle(xt), alpha), -1, -2))


def test_left_spectral_pseudo_inverse_on_singular_gram():
    """After centering, C C^T is exactly singular (1 is in its null space). The map must be
    finite, have zero column sums and equal ||C||_*^a U V^T of C with the null direction
    dropped (float64 SVD oracle)."""
    x = make_input("random", (4, 6, 16), 500)  # E = 6 experts, d = 16: C has rank 5
    c = center_oracle(x.numpy())
    for alpha in (0.0, 1.0):
        out = left_spectral(x, alpha=alpha)
        assert torch.isfinite(out).all()
        assert out.sum(-2).abs().max() < 1e-12 * max(1.0, out.abs().max().item())  # see above
        check(out, svd_oracle(c, alpha))
        # the null direction really is dropped: rank 5 (= E - 1) singular values of out
        s = torch.linalg.svdvals(out)
        assert (s[..., -1] < 1e-12 * s[..., 0]).all() and (s[..., -2] > 1e-3 * s[..., 0]).all()


def test_scaled_polar_newton_schulz_is_nuclear_times_ns():
    x = make_input("random", (2, 7, 5), 600)
    nuc = torch.linalg.svdvals(x).sum(-1)
    want = nuc[..., None, None] * M.polar(x, method="newton_schulz")
    # nuclear norm by eigh of the Gram vs svdvals: relative ~eps * kappa^2 ~ 1e-14.
    assert rel_dist(scaled_polar(x, method="newton_schulz"), want) < 1e-12


def test_polar_then_row_ignores_alpha():
    x = make_input("random", (2, 7, 5), 601)
    a = hybrid(x, order="polar_then_row", alpha=0.0)
    assert torch.equal(a, hybrid(x, order="polar_then_row", alpha=1.0))
    assert torch.equal(a, hybrid(x, order="polar_then_row", alpha=3.0))


# ----------------------------------------------------------------------------------------
# edge cases, purity, dtypes, registry
# ----------------------------------------------------------------------------------------

ALL_MAPS = {name: fn for name, (fn, _) in CASES.items()} | {f"MAPS[{k}]": v for k, v in MAPS.items()}


@pytest.mark.parametrize("name", list(ALL_MAPS))
def test_zero_input_gives_zero_output(name):
    fn = ALL_MAPS[name]
    for shape in ((4, 6), (6, 4), (2, 3, 3), (1, 5), (5, 1)):
        z = torch.zeros(shape, dtype=F64)
        out = fn(z)
        assert out.shape == z.shape
        assert torch.equal(out, torch.zeros_like(z)), shape  # exact zeros, hence no NaN


@pytest.mark.parametrize("name", list(ALL_MAPS))
def test_empty_inputs(name):
    fn = ALL_MAPS[name]
    for shape in ((0, 4), (4, 0), (0, 3, 4), (2, 0, 3)):
        x = torch.zeros(shape, dtype=F64)
        assert fn(x).shape == x.shape


@pytest.mark.parametrize("name", list(ALL_MAPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_input_not_modified_and_dtype(name, dtype):
    fn = ALL_MAPS[name]
    x = make_input("zero_rows", (2, 6, 4), 700).to(dtype)
    before = x.clone()
    out = fn(x)
    assert torch.equal(x, before)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    if fn is not identity and name != "MAPS[identity]":
        out.add_(1.0)  # the output never aliases the input
        assert torch.equal(x, before)


def test_negative_alpha_on_zero_is_zero():
    z = torch.zeros(2, 4, 3, dtype=F64)
    for fn in (
        P(scaled_polar, alpha=-1.0),
        P(scaled_polar, alpha=-1.0, method="gram_eigh"),
        P(right_spectral, alpha=-1.0),
        P(left_spectral, alpha=-1.0),
    ):
        assert torch.equal(fn(z), z)


def test_batched_equals_looped():
    x = make_input("random", (3, 6, 4), 800)
    for name, fn in ALL_MAPS.items():
        y = fn(x)
        looped = torch.stack([fn(x[i]) for i in range(3)])
        # batched BLAS/LAPACK may differ from the 2-D call in the last bits: 1e-13
        assert rel_dist(y, looped) < 1e-13, name


def test_registry():
    assert set(MAPS) == {
        "row_norm",
        "col_norm",
        "centered_row_norm",
        "polar",
        "scaled_polar",
        "right_spectral",
        "left_spectral",
        "hybrid",
        "identity",
    }
    for name, fn in MAPS.items():
        assert get_map(name) is fn
    x = make_input("random", (1, 5, 3), 900)[0]
    assert get_map("identity")(x) is x
    assert M.polar is __import__("equiopt.polar", fromlist=["polar"]).polar
    assert M.nuclear_norm is __import__("equiopt.polar", fromlist=["nuclear_norm"]).nuclear_norm
    # the optimizer's calling convention: MAPS[name](x, **options)
    assert torch.equal(
        MAPS["hybrid"](x, order="polar_then_row", method="svd"), hybrid(x, "polar_then_row", method="svd")
    )


@pytest.mark.parametrize("bad", ["nope", "Row_Norm", "adamw", ""])
def test_unknown_names_raise(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))) as e:
        get_map(bad)
    assert "row_norm" in str(e.value)  # lists the valid names


def test_bad_options_raise():
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="order.*'sideways'"):
        hybrid(x, order="sideways")
    with pytest.raises(ValueError, match="method.*'qr'"):
        scaled_polar(x, method="qr")
    with pytest.raises(ValueError, match="method.*'qr'"):
        hybrid(x, method="qr")
    with pytest.raises(ValueError):
        row_norm(torch.randn(4))
