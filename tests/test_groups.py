"""equiopt.groups against explicit matrices (float64): actions, contragredient, orbit
tangents and projections, subgroup order, samplers."""

import pytest
import torch

from equiopt.groups import (
    KINDS,
    Factor,
    Group,
    haar,
    inverse_permutation,
    permutation,
    rope_planes,
    rope_rotations,
)

DT = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def perm_matrix(p):
    """Explicit P with (P X)[j] = X[p[j]]."""
    n = p.numel()
    P = torch.zeros(n, n, dtype=DT)
    P[torch.arange(n), p] = 1.0
    return P


def explicit(f, g, m, n):
    """(left, right, add) such that the factor acts as left @ X @ right + add, per batch entry."""
    B = g.shape[0]
    eye_m, eye_n = torch.eye(m, dtype=DT).expand(B, m, m), torch.eye(n, dtype=DT).expand(B, n, n)
    if f.kind == "perm":
        M = torch.stack([perm_matrix(p) for p in g])
    elif f.kind in ("orth", "rope_rotation"):
        M = g
    elif f.kind == "scale":
        M = torch.diag_embed(g)
    else:
        M = None
    if f.kind == "shift":
        add = g[:, None, :].expand(B, m, n) if f.axis == "rows" else g[:, :, None].expand(B, m, n)
        return eye_m, eye_n, add
    zero = torch.zeros(B, m, n, dtype=DT)
    return (M, eye_n, zero) if f.axis == "rows" else (eye_m, M.mT, zero)


FACTORS = [Factor(k, a) for k in KINDS for a in ("rows", "cols")] + [Factor("rope_rotation", "rows", "adjacent")]


@pytest.mark.parametrize("f", FACTORS, ids=lambda f: f.describe() + f.pairing)
def test_action_equals_explicit_matrix(f):
    m, n = 6, 4
    x = torch.randn(3, m, n, dtype=DT, generator=gen(1))
    g = f.sample(x.shape, gen(2))
    left, right, add = explicit(f, g, m, n)
    torch.testing.assert_close(f.act(x, g), left @ x @ right + add, rtol=0, atol=1e-13)
    # inverse undoes the action; the action is not the identity
    torch.testing.assert_close(f.act(f.act(x, g), f.inverse(g)), x, rtol=0, atol=1e-12)
    assert (f.act(x, g) - x).abs().max() > 1e-3


@pytest.mark.parametrize("f", FACTORS, ids=lambda f: f.describe() + f.pairing)
def test_gradient_action_is_contragredient(f):
    """grad of W -> L(g^-1 . W) at g . W equals act_gradient(grad L(W), g)."""
    m, n = 6, 4
    C = torch.randn(2, m, n, dtype=DT, generator=gen(3))

    def loss(w):
        return (torch.sin(w) * C).sum() + (w**2).sum() * 0.1

    w = torch.randn(2, m, n, dtype=DT, generator=gen(4), requires_grad=True)
    (gw,) = torch.autograd.grad(loss(w), w)
    g = f.sample(w.shape, gen(5))
    w2 = f.act(w.detach(), g).requires_grad_(True)
    (g2,) = torch.autograd.grad(loss(f.act(w2, f.inverse(g))), w2)
    torch.testing.assert_close(g2, f.act_gradient(gw, g), rtol=1e-12, atol=1e-12)


def orbit_directions(f, w):
    """Explicit tangent directions d/dt (exp(tA) . W) at t=0 for a basis of the Lie algebra."""
    B, m, n = w.shape
    size = m if f.axis == "rows" else n
    dirs = []
    if f.kind == "orth" or f.kind == "rope_rotation":
        if f.kind == "orth":
            gens = []
            for i in range(size):
                for j in range(i + 1, size):
                    A = torch.zeros(size, size, dtype=DT)
                    A[i, j], A[j, i] = -1.0, 1.0
                    gens.append(A)
        else:
            a, b = rope_planes(size, f.pairing)
            gens = []
            for k in range(size // 2):
                A = torch.zeros(size, size, dtype=DT)
                A[a[k], b[k]], A[b[k], a[k]] = -1.0, 1.0
                gens.append(A)
        for A in gens:
            dirs.append(A @ w if f.axis == "rows" else w @ A.mT)
    elif f.kind == "scale":
        for i in range(size):
            E = torch.zeros(size, dtype=DT)
            E[i] = 1
            dirs.append(E[:, None] * w if f.axis == "rows" else w * E[None, :])
    elif f.kind == "shift":
        other = n if f.axis == "rows" else m
        for j in range(other):
            d = torch.zeros(B, m, n, dtype=DT)
            if f.axis == "rows":
                d[:, :, j] = 1
            else:
                d[:, j, :] = 1
            dirs.append(d)
    return dirs


@pytest.mark.parametrize("f", [f for f in FACTORS if f.continuous], ids=lambda f: f.describe() + f.pairing)
def test_project_out_is_the_orthogonal_projection_off_the_orbit(f):
    B, m, n = 2, 6, 4
    w = torch.randn(B, m, n, dtype=DT, generator=gen(6))
    u = torch.randn(B, m, n, dtype=DT, generator=gen(7))
    r = f.project_out(u, w)
    t = f.tangent_component(u, w)
    torch.testing.assert_close(r + t, u, rtol=0, atol=1e-12)
    dirs = orbit_directions(f, w)
    for d in dirs:  # residual orthogonal to every orbit direction (per batch entry)
        assert (r * d).sum((-2, -1)).abs().max() < 1e-10
    # the tangent component lies in the span of the directions: least squares reproduces it
    D = torch.stack([d.reshape(B, -1) for d in dirs], -1)  # [B, mn, k]
    coef = torch.linalg.lstsq(D, t.reshape(B, -1, 1)).solution
    torch.testing.assert_close((D @ coef).reshape(B, m, n), t, rtol=0, atol=1e-10)
    torch.testing.assert_close(f.project_out(r, w), r, rtol=0, atol=1e-12)  # idempotent
    assert t.abs().max() > 1e-3  # the check can fail: u has a real orbit component


def test_centering_is_the_shift_projection():
    x = torch.randn(3, 5, 4, dtype=DT, generator=gen(8))
    torch.testing.assert_close(Factor("shift", "rows").project_out(x), x - x.mean(-2, keepdim=True), rtol=0, atol=0)


def test_scale_tangent_skips_zero_rows():
    w = torch.randn(1, 4, 3, dtype=DT, generator=gen(9))
    w[0, 1] = 0
    u = torch.randn(1, 4, 3, dtype=DT, generator=gen(10))
    r = Factor("scale", "rows").project_out(u, w)
    torch.testing.assert_close(r[0, 1], u[0, 1], rtol=0, atol=0)
    assert torch.isfinite(r).all()


def test_orth_tangent_of_rank_deficient_w_is_finite():
    w = torch.randn(1, 6, 2, dtype=DT, generator=gen(11))  # W W^T has rank 2 of 6
    u = torch.randn(1, 6, 2, dtype=DT, generator=gen(12))
    r = Factor("orth", "rows").project_out(u, w)
    assert torch.isfinite(r).all()
    for d in orbit_directions(Factor("orth", "rows"), w):
        assert (r * d).sum().abs() < 1e-10


def test_subgroup_order():
    rows = lambda k: Factor(k, "rows")  # noqa: E731
    assert rows("perm") <= rows("orth") and rows("rope_rotation") <= rows("orth")
    assert not rows("orth") <= rows("perm") and not rows("shift") <= rows("orth")
    assert not rows("perm") <= Factor("perm", "cols")
    assert not Factor("rope_rotation", "rows", "half") <= Factor("rope_rotation", "rows", "adjacent")
    emb = Group.of("perm:rows", "orth:cols")
    head = Group.of("perm:rows", "orth:cols", "shift:rows")
    muon = Group.of("orth:rows", "orth:cols")
    assert emb <= head and not head <= emb
    assert emb <= muon and not head <= muon
    assert head.missing_from(muon) == (Factor("shift", "rows"),)
    assert Group() <= emb and head.without("shift") == emb
    assert head.describe() == "Perm(rows) x O(cols) x Shift(rows)"


def test_group_act_composes_factors():
    G = Group.of("perm:rows", "orth:cols", "shift:rows")
    x = torch.randn(2, 5, 3, dtype=DT, generator=gen(13))
    els = G.sample(x.shape, gen(14))
    want = x
    for f, g in zip(G.factors, els):
        want = f.act(want, g)
    torch.testing.assert_close(G.act(x, els), want, rtol=0, atol=0)


def test_haar_is_orthogonal_and_unbiased():
    q = haar(2000, 3, gen(15))
    torch.testing.assert_close(q @ q.mT, torch.eye(3, dtype=DT).expand(2000, 3, 3), rtol=0, atol=1e-12)
    # Haar: E[Q] = 0 and both determinant signs occur about equally
    assert q.mean(0).abs().max() < 0.06
    frac = (torch.linalg.det(q) > 0).double().mean()
    assert 0.45 < frac < 0.55


def test_permutation_fixes_and_is_not_identity():
    for seed in range(20):
        p = permutation(7, gen(seed), fixed=3)
        assert sorted(p.tolist()) == list(range(7)) and p[3] == 3 and not torch.equal(p, torch.arange(7))
    p = torch.stack([permutation(6, gen(s)) for s in range(4)])
    q = inverse_permutation(p)
    torch.testing.assert_close(torch.gather(p, 1, q), torch.arange(6).expand(4, 6))


@pytest.mark.parametrize("pairing", ["half", "adjacent"])
def test_rope_rotations_commute_with_rope(pairing):
    n = 8
    R = rope_rotations(3, n, gen(16), pairing=pairing)
    a, b = rope_planes(n, pairing)
    pos = torch.zeros(n, n, dtype=DT)  # a RoPE position rotation with frequencies per plane
    ang = torch.tensor([0.3 * 1.7**k for k in range(n // 2)], dtype=DT)
    pos[a, a], pos[a, b], pos[b, a], pos[b, b] = ang.cos(), -ang.sin(), ang.sin(), ang.cos()
    torch.testing.assert_close(R @ pos, pos @ R, rtol=0, atol=1e-13)
    torch.testing.assert_close(R @ R.mT, torch.eye(n, dtype=DT).expand(3, n, n), rtol=0, atol=1e-13)
    # a Haar rotation does not commute with it: the restriction matters
    Q = haar(1, n, gen(17))[0]
    assert (Q @ pos - pos @ Q).abs().max() > 1e-2


def test_bad_factor_is_an_error():
    with pytest.raises(ValueError, match="unknown kind"):
        Factor("rotate")
    with pytest.raises(ValueError, match="unknown axis"):
        Factor("perm", "depth")
    with pytest.raises(ValueError, match="even size"):
        rope_planes(5, "half")
