"""Fast local execution of :class:`~equiopt.optimizer.EquiOptimizer`'s matrix maps.

:meth:`EquiOptimizer._reference_update` is the simple path: per parameter, view ->
map -> Muon scale -> inverse view. This module computes the same updates faster, and
every route here is tested equal to that path (``tests/test_fastpath.py``):

* **batched** -- the logical matrices of a param_group (heads, experts, fused parts and
  whole parameters alike) are grouped by their shape ``[m, n]`` (as the map sees it, i.e.
  after the column-aware transpose), stacked into one ``[N, m, n]`` batch and mapped by one
  call per shape: no Python loop over parameters of equal shape, experts, heads or rows.
* **fused scales** -- the Muon factor sqrt(max(1, rows/cols)) and the nuclear-norm factor
  ``||X||_*^alpha`` are folded into the small ``m x m`` matrix of the last polynomial step
  (or into the eigenvalue weights), not applied as extra passes over ``[N, m, n]``; the
  nuclear norm of the hybrid / scaled polar maps reuses the Gram matrix the first
  iteration already forms instead of building it a second time.
* **Gram route** ("spectral evaluation") -- Polar Express and Newton-Schulz apply a fixed
  odd polynomial ``P`` to the singular values: ``P(X) = U diag(P(s)) V^T``. With the
  eigendecomposition ``X X^T = W diag(lam) W^T`` of the *smaller* Gram matrix this is
  ``W diag(P(s)/s) W^T X``, where ``P(s)/s`` is evaluated exactly on ``lam = s^2`` by the
  same recursion as the iterations (``q = a + b y + c y^2; r <- r q; y <- y q^2``). So one
  ``m x m`` eigh (float64: fp32 would square the condition number, see the tests) replaces
  ``steps`` rounds of ``[m, n]`` products and yields the exact nuclear norm for free. It is
  the SAME map as the iterations (not the exact polar factor), more accurate than the
  float32 iterations, and its cost does not depend on the number of steps (8 steps, a
  converged U V^T, cost what 5 do). Opt-in (``polar_route="gram"``): on this CPU it is
  at best a few percent faster than Gram Newton-Schulz (512 x 1536 with the nuclear norm) and
  up to 2x slower on square and small matrices.
* **Gram Newton-Schulz** (the default for wide float32/float64 matrices on CPU) -- the same
  iterations run on
  the small ``m x m`` Gram ``A = X X^T`` instead of on ``X``: every iterate is ``R_t X`` with
  ``R_t`` a polynomial in ``A``, so ``Q_t = a I + b A_t + c A_t^2``, ``R <- R Q_t``,
  ``A_{t+1} = A_t Q_t^2`` cost ``O(m^3)`` per step and ``X`` is touched by products only at
  the start, at the restarts and at the end (:func:`_gram_iterate`). Fewer FLOPs when
  ``n`` is about 2 ``m`` or more (512 x 1536, 5 steps: 0.74x of the standard iteration with
  the restart); float32 rounding of the Gram is amplified by the polynomial's slope at 0, so
  the iterate is re-formed (``X <- R X``, ``A <- X X^T``) before steps 2, 5, 8, ...
* **cache-sized batches** -- a shape bucket is cut at parameter boundaries beyond 1 MiB
  (stacking large matrices only costs a copy and streams the batch through memory);
  one parameter's experts / heads / parts are never split.
* **in place / no copies** -- the centered row norm runs on one fresh buffer instead of
  three; the row norms read the momentum views directly; the iterate is written contiguous
  in the wide orientation by the normalization and the last step writes the result in the
  input's orientation.
* no ``torch.compile``: an opt-in compiled path of the per-shape kernels measured x0.98 of
  the eager step (qwen3/tiny ``paper``, ``results/bench.md`` of 2026-11-22), so it was removed
  (issue #16: machinery stays only with a measured gain).
* no thread pool: small eigvalsh batches used to be split over Python threads; on this CPU
  (MKL) any LAPACK call from another thread left later eigvalsh calls in the process 3-10x
  slower, and the OLMoE tiny `muon` step ran 1.4x faster without the pool
  (``results/eigvalsh_pool.md``), so it was removed.

Options: the param_group key ``"batched"`` (default True: this module; False: the reference
path) when the group has it; the optimizer-level :class:`FastPathOptions` set with
:func:`configure` (explicit settings win).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from . import maps
from .functional import compute_dtype, map_kwargs, muon_scale
from .polar import DEFAULT_STEPS, NEWTON_SCHULZ_COEFFS, POLAR_EXPRESS_COEFFS, POLAR_EXPRESS_SAFETY

__all__ = [
    "FastPathOptions",
    "configure",
    "options_of",
    "fast_updates",
    "polar_coeffs",
    "choose_polar_route",
    "spectral_polar",
    "iterative_polar",
    "plan_buckets",
    "Bucket",
]

_ITER_EPS = 1e-7  # the normalization epsilon of equiopt.polar's iterations
_ITERATIVE = ("newton_schulz", "polar_express")
POLAR_ROUTES = ("auto", "iterative", "gram", "gram_ns")


@dataclass(frozen=True)
class FastPathOptions:
    """Optimizer-level fast-path options.

    batched: use this module (False: :meth:`EquiOptimizer._reference_update` per parameter).
    stack: stack equal shapes of several parameters into one batch (False: one call per
        parameter, each already batched over its heads / experts / parts).
    stack_bytes: stacked batches are cut at parameter boundaries beyond this many bytes
        (1 MiB: about the L2 cache of this machine's two cores; measured in
        ``benchmarks/calibrate_routes.py --chunks``).
    polar_route: "auto" (fewest product flops: "gram_ns" or "iterative",
        :func:`choose_polar_route`), "iterative", "gram" (float64 eigh) or "gram_ns"
        (the iterations on the small Gram matrix, :func:`_gram_iterate`) for Polar
        Express / Newton-Schulz.
    """

    batched: bool = True
    stack: bool = True
    stack_bytes: int = 1 << 20
    polar_route: str = "auto"

    def __post_init__(self):
        if self.polar_route not in POLAR_ROUTES:
            raise ValueError(f"polar_route must be one of {POLAR_ROUTES}, got {self.polar_route!r}")


DEFAULT_OPTIONS = FastPathOptions()


def configure(opt, **options) -> FastPathOptions:
    """Set fast-path options of optimizer ``opt`` (its ``context``, see :class:`FastPathOptions`).
    Options set here win over the param_groups' ``batched`` key (a programmatic
    override, e.g. for benchmarks and tests)."""
    ctx = opt.context
    ctx.fastpath_options = dataclasses.replace(ctx.fastpath_options, **options)
    ctx.fastpath_forced = frozenset(ctx.fastpath_forced) | set(options)
    return ctx.fastpath_options


def options_of(opt, group=None) -> FastPathOptions:
    """Effective options for ``group``: defaults, then the group's ``batched`` key when it
    carries it, then what :func:`configure` set explicitly. ``opt``: an
    optimizer or its :class:`~equiopt.execution.UpdateContext`."""
    ctx = getattr(opt, "context", opt)
    o = ctx.fastpath_options
    if group is not None:
        forced = ctx.fastpath_forced
        over = {k: bool(group[k]) for k in ("batched",) if k in group and k not in forced}
        if over:
            o = dataclasses.replace(o, **over)
    return o


# ----------------------------------------------------------------------------------------
# polynomial schedules
# ----------------------------------------------------------------------------------------


def polar_coeffs(method: str, steps: int | None) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) per iteration that :func:`equiopt.polar.polar` uses for ``method``."""
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if method == "newton_schulz":
        return (NEWTON_SCHULZ_COEFFS,) * steps
    if method == "polar_express":
        tab = POLAR_EXPRESS_COEFFS
        return tab[:steps] + (tab[-1],) * max(0, steps - len(tab))
    raise ValueError(f"no polynomial schedule for method {method!r}")


def _normalizer(method: str, fro: Tensor) -> Tensor:
    """The divisor of the iterations' input: Newton-Schulz max(||X||_F, eps), Polar
    Express 1.01 ||X||_F + eps (as in :mod:`equiopt.polar`)."""
    if method == "newton_schulz":
        return fro.clamp(min=_ITER_EPS)
    return fro * POLAR_EXPRESS_SAFETY + _ITER_EPS


# ----------------------------------------------------------------------------------------
# the two routes of a polynomial polar map, on wide batches [N, m, n] with m <= n
# ----------------------------------------------------------------------------------------


def _nuclear_from_eigs(lam: Tensor, size: int, dtype: torch.dtype, rcond: float | None = None) -> Tensor:
    """sum sqrt(lam) over eigenvalues above the cutoff of :func:`equiopt.polar.gram_nuclear_norm`
    (lam_max * size * finfo(dtype).eps, dtype = the matrices' dtype)."""
    lam = lam.clamp(min=0)
    tol = size * torch.finfo(dtype).eps if rcond is None else float(rcond)
    keep = lam > lam[..., -1:] * tol
    return torch.where(keep, lam.sqrt(), torch.zeros_like(lam)).sum(-1)


def _nuclear_scale(nuc: Tensor, alpha: float) -> Tensor:
    """nuc^alpha, 0 where nuc == 0 (as :func:`equiopt.maps.scale_by_nuclear`)."""
    safe = torch.where(nuc > 0, nuc, torch.ones_like(nuc))
    return torch.where(nuc > 0, safe.pow(alpha), torch.zeros_like(nuc))


def iterative_polar(
    X: Tensor,
    method: str,
    steps: int | None,
    *,
    alpha: float | None = None,
    scale: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    inplace: bool = False,
    gram_ns: bool = False,
) -> Tensor:
    """``scale * ||X||_*^alpha * P(X)`` (``alpha=None``: no nuclear factor) by the iterations
    (``gram_ns``: the iterations on the Gram matrix, :func:`_gram_iterate`).

    ``X`` [N, m, n], any orientation (the work is on the wide one, m <= n, as in
    :mod:`equiopt.polar`); the result has X's shape and dtype and is contiguous. ``X`` is not
    modified unless ``inplace`` (then a contiguous wide X may serve as the first iterate's
    buffer). The normalization writes the contiguous wide iterate in one pass (transposing
    on the fly); the nuclear norm comes from the Gram matrix of the first iteration
    (eigenvalues of X0 X0^T times the normalizer squared) instead of a second Gram product;
    the scalar factors are folded into the last polynomial's m x m matrix, and the last step
    writes the result directly in X's orientation (Y^T C instead of C Y, C symmetric).
    """
    coeffs = polar_coeffs(method, steps)
    out_dtype = X.dtype
    cdt = out_dtype if compute_dtype is None else compute_dtype
    N, m0, n0 = X.shape
    flip = m0 > n0
    wide = X.mT if flip else X
    m = wide.shape[-2]
    fro = torch.linalg.matrix_norm(X, keepdim=True)
    nu = _normalizer(method, fro)
    if inplace and not flip and cdt == out_dtype and wide.is_contiguous() and coeffs:
        Y = wide.div_(nu)
    else:
        Y = torch.empty(wide.shape, dtype=cdt, device=X.device)
        torch.div(wide, nu, out=Y) if cdt == out_dtype else Y.copy_(wide).div_(nu.to(cdt))
    factor = None  # per-matrix scalar [N, 1, 1]
    A = None
    if alpha is not None and coeffs:
        A = torch.bmm(Y, Y.mT)
        lam = torch.linalg.eigvalsh(A.to(_lin_dtype(out_dtype)))
        nuc = _nuclear_from_eigs(lam, m, out_dtype) * nu.reshape(N).to(lam.dtype)
        factor = _nuclear_scale(nuc.to(out_dtype), float(alpha)).reshape(N, 1, 1)
    elif alpha is not None:
        factor = _nuclear_scale(maps.nuclear_norm(X), float(alpha)).reshape(N, 1, 1)
    if scale != 1.0:
        factor = torch.full((N, 1, 1), scale, dtype=out_dtype, device=X.device) if factor is None else factor * scale
    if not coeffs:
        Y = Y.to(out_dtype)
        Y = Y * factor if factor is not None else Y
        return Y.mT.contiguous() if flip else Y
    f = None if factor is None else factor.to(cdt)
    Y = (_gram_iterate if gram_ns else _iterate)(Y, A, coeffs, f, flip)
    return Y.to(out_dtype)


def _iterate(Y: Tensor, A: Tensor | None, coeffs, factor: Tensor | None, flip: bool) -> Tensor:
    """The polynomial steps Y <- a Y + (b A + c A^2) Y, A = Y Y^T (``A`` given: the first
    step's Gram). The last step forms C = a I + b A + c A^2 (times ``factor`` [N, 1, 1]) and
    returns C Y, or (C Y)^T = Y^T C when ``flip`` (C is symmetric), contiguous either way."""
    last = len(coeffs) - 1
    for t, (a, b, c) in enumerate(coeffs):
        if A is None:
            A = torch.bmm(Y, Y.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        if t == last:
            B.diagonal(dim1=-2, dim2=-1).add_(a)  # C = a I + b A + c A^2
            if factor is not None:
                B = B * factor
            return torch.bmm(Y.mT, B) if flip else torch.bmm(B, Y)
        Y = torch.baddbmm(Y, B, Y, beta=a)  # a Y + B Y
        A = None
    return Y


#: Gram Newton-Schulz re-forms the iterate and its Gram before these steps (2, 5, 8, ...):
#: without it float32 rounding of A_t, amplified on the small singular directions by the
#: polynomial's slope at 0 (~prod a_t), left the result up to 3e-4 (Newton-Schulz) / 1e-3
#: (Polar Express) from the float64 iterations on spectra down to 1e-6; with it <= 7e-5 for 5
#: steps and <= 2e-4 for 8 (the float32 standard iterations: <= 1.4e-5 / 2.2e-4).
def gram_ns_restart(t: int) -> bool:
    return t >= 2 and (t - 2) % 3 == 0


def _gram_iterate(Y: Tensor, A: Tensor | None, coeffs, factor: Tensor | None, flip: bool) -> Tensor:
    """The same polynomial steps as :func:`_iterate`, on the m x m Gram (Gram Newton-Schulz).

    Every iterate is Y_t = R_t Y with R_t a polynomial in A = Y Y^T, so Y_{t+1} = Q_t Y_t with
    Q_t = a I + b A_t + c A_t^2, R_{t+1} = R_t Q_t and A_{t+1} = Y_{t+1} Y_{t+1}^T =
    A_t Q_t^2 (all polynomials in A commute): per step 3-4 m x m products instead of two
    [m, m] x [m, n] ones. At :func:`gram_ns_restart` steps Y <- R Y, A <- Y Y^T, R <- I. The
    result is (factor * R) Y, or Y^T (factor * R) when ``flip`` (R is symmetric)."""
    if A is None:
        A = torch.bmm(Y, Y.mT)
    R = None
    last = len(coeffs) - 1
    for t, (a, b, c) in enumerate(coeffs):
        if R is not None and gram_ns_restart(t):
            Y = torch.bmm(R, Y)
            A, R = torch.bmm(Y, Y.mT), None
        Q = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        Q.diagonal(dim1=-2, dim2=-1).add_(a)
        R = Q if R is None else torch.bmm(R, Q)
        if t < last and not gram_ns_restart(t + 1):
            A = torch.bmm(torch.bmm(A, Q), Q)
    assert R is not None  # coeffs is not empty (iterative_polar returns before)
    if factor is not None:
        R = R * factor
    return torch.bmm(Y.mT, R) if flip else torch.bmm(R, Y)


def _lin_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def spectral_polar(
    X: Tensor,
    method: str,
    steps: int | None,
    *,
    alpha: float | None = None,
    scale: float = 1.0,
) -> Tensor:
    """The same map as :func:`iterative_polar`, evaluated on the eigenvalues of the Gram.

    On the wide orientation (m <= n): X0 = X / nu; X0 X0^T = W diag(y) W^T (float64 eigh of
    the m x m Gram); the iterations give P(X0) = W diag(r(y)) W^T X0 with r = prod_t q_t,
    q_t = a_t + b_t y_t + c_t y_t^2, y_{t+1} = y_t q_t^2 (exact in exact arithmetic: every
    iterate is a polynomial in X0 X0^T times X0). Result = F X with
    F = W diag(scale * nuc^alpha * r(y) / nu) W^T, one [m, m] x [m, n] product, in float64
    like the Gram: F's entries are dominated by the large weights P(s)/s of the small singular
    directions, and rounding F to float32 would leak ~prod(a_t) * eps into the others. The
    result (X's shape, dtype, contiguous) is written in X's orientation (X^T F when m > n).
    Exactly zero rows/columns of X give exactly zero rows/columns, as the iterations do.
    """
    coeffs = polar_coeffs(method, steps)
    N, m0, n0 = X.shape
    flip = m0 > n0
    X64 = X.to(torch.float64)
    wide = X64.mT if flip else X64
    m = wide.shape[-2]
    G = torch.bmm(wide, wide.mT)
    fro = torch.linalg.matrix_norm(X, keepdim=True).reshape(N, 1)  # in X's dtype, as the iterations
    nu = _normalizer(method, fro).to(torch.float64)
    lam, W = torch.linalg.eigh(G)
    y = lam.clamp(min=0) / (nu * nu)
    r = torch.ones_like(y)
    for a, b, c in coeffs:
        q = a + y * (b + c * y)
        r = r * q
        y = y * q * q
    w = r / nu
    if alpha is not None:
        nuc = _nuclear_from_eigs(lam, m, X.dtype)
        w = w * _nuclear_scale(nuc, float(alpha)).unsqueeze(-1)
    if scale != 1.0:
        w = w * scale
    F = torch.bmm(W * w.unsqueeze(-2), W.mT)
    out = (torch.bmm(X64, F) if flip else torch.bmm(F, X64)).to(X.dtype)
    # the small side's zero lines: exact zeros (eigenvectors mix rounding noise into them)
    lines = (X != 0).any(dim=-2 if flip else -1, keepdim=True)
    if not bool(lines.all()):
        out = out * lines.to(out.dtype)
    return out


# ----------------------------------------------------------------------------------------
# route choice: fewest product flops
# ----------------------------------------------------------------------------------------


def polar_flops(route: str, m: int, n: int, steps: int, nuclear: bool) -> dict:
    """Analytic operation counts for one wide [m, n] (m <= n) matrix.

    iterative: per step A = X X^T (2 m^2 n), b A + c A^2 (2 m^3), B X (2 m^2 n);
    plus, with the nuclear factor, one eigvalsh(m) (counted as 4/3 m^3).
    gram: G = X X^T (2 m^2 n), eigh(m) (counted as 9 m^3), W diag W^T (2 m^3), F X (2 m^2 n),
    all float64.
    gram_ns: the products of :func:`_gram_iterate` (:func:`gram_ns_flops`), plus the eigvalsh.
    Returns {"mm32", "mm64", "eig"} flop counts.
    """
    eig = (4 * m**3) // 3 if nuclear else 0
    if route == "iterative":
        return {"mm32": steps * (4 * m * m * n + 2 * m**3), "mm64": 0, "eig": eig}
    if route == "gram_ns":
        return {"mm32": gram_ns_flops(m, n, steps), "mm64": 0, "eig": eig}
    return {"mm32": 0, "mm64": 4 * m * m * n + 2 * m**3, "eig": 9 * m**3}


def gram_ns_flops(m: int, n: int, steps: int) -> int:
    """Matrix-product flops of :func:`_gram_iterate` on one wide [m, n] matrix (general
    products, 2 flops per multiply-add): the Gram and the final R X (2 m^2 n each), per restart
    R Y and Y Y^T (4 m^2 n), per step A^2 and R Q (2 m^3 each; R Q not on a segment's first
    step) and A Q Q (4 m^3; not before a restart nor after the last step)."""
    if steps <= 0:
        return 0
    mn, m3 = 2 * m * m * n, 2 * m**3
    total, first = 2 * mn, True
    for t in range(steps):
        if not first and gram_ns_restart(t):
            total, first = total + 2 * mn, True
        total += m3 + (0 if first else m3)
        first = False
        if t < steps - 1 and not gram_ns_restart(t + 1):
            total += 2 * m3
    return total


def choose_polar_route(
    m: int, n: int, steps: int, nuclear: bool, *, device: torch.device, cdt: torch.dtype, route: str = "auto"
) -> str:
    """\"iterative", "gram" or "gram_ns" for wide [m, n] matrices (m <= n).

    "auto": on CPU with float32/float64 iterations, "gram_ns" where it needs fewer product
    flops than the standard iterations (:func:`gram_ns_flops`: n >~ 1.5-2 m; square matrices
    stay on the iterations), else "iterative". A flop count, not a machine fit: measured on the
    benchmark shapes at 1 and 2 threads (``results/route_check.md``) it is the fastest route
    or within a few percent of it, where the former fitted cost model (iterations vs the
    float64 eigh route) went stale on a CPU with a 4x faster fp32 product rate and picked the
    eigh route on square 512 matrices (x1.2-1.35 slower) and on whole models (the 59M Qwen3
    `muon` step at 2 threads x1.9 slower). Other
    devices and half precision iterate (unmeasured there). ``nuclear`` does not change the
    choice. "gram_ns" when asked for: only where it needs fewer flops; "gram" (the float64
    eigh route, the most accurate) and "iterative" when asked for."""
    del nuclear  # both candidates compute the nuclear factor from the same first Gram matrix
    fewer = gram_ns_flops(m, n, steps) < polar_flops("iterative", m, n, steps, False)["mm32"]
    if route == "iterative":
        return route
    if route == "gram_ns":
        return "gram_ns" if fewer else "iterative"
    gram_ok = cdt in (torch.float32, torch.float64) and m > 0
    if route == "gram":
        return "gram" if gram_ok else "iterative"
    return "gram_ns" if fewer and gram_ok and device.type == "cpu" else "iterative"


# ----------------------------------------------------------------------------------------
# maps on a stacked batch [N, m, n] (already in the map's orientation)
# ----------------------------------------------------------------------------------------


def _polar_batch(X: Tensor, method: str, steps, cdt, alpha, scale: float, route: str, fresh: bool) -> Tensor:
    """scale * [||X||_*^alpha] * polar_method(X) on [N, m, n]; any orientation."""
    N, m, n = X.shape
    if X.numel() == 0:
        return torch.zeros_like(X)
    if method not in _ITERATIVE:
        if method == "gram_eigh" or alpha is not None:
            if method == "gram_eigh":
                p, nuc = maps.gram_polar(X)
                out = p if alpha is None or float(alpha) == 0.0 else maps.scale_by_nuclear(p, nuc, float(alpha))
            else:
                out = maps.scaled_polar(X, alpha=alpha, method=method, steps=steps, compute_dtype=cdt)
        else:
            out = maps.polar(X, method=method, steps=steps, compute_dtype=cdt)
        return out * scale if scale != 1.0 else out
    if alpha is not None and float(alpha) == 0.0:
        alpha = None
    k = len(polar_coeffs(method, steps))
    work_dt = X.dtype if cdt is None else cdt
    which = choose_polar_route(min(m, n), max(m, n), k, alpha is not None, device=X.device, cdt=work_dt, route=route)
    if which == "gram" and cdt in (None, X.dtype):
        return spectral_polar(X, method, steps, alpha=alpha, scale=scale)
    gram_ns = which == "gram_ns"
    return iterative_polar(
        X, method, steps, alpha=alpha, scale=scale, compute_dtype=cdt, inplace=fresh, gram_ns=gram_ns
    )


def _row_norm_(Y: Tensor, eps: float) -> Tensor:
    return Y.div_(torch.linalg.vector_norm(Y, dim=-1, keepdim=True).add_(eps))


def _row_norm(X: Tensor, eps: float) -> Tensor:
    return X / (torch.linalg.vector_norm(X, dim=-1, keepdim=True) + eps)


def _centered_row_norm_(X: Tensor, eps: float) -> Tensor:
    """C(rn(C(X))) on one buffer: X - mean is the one fresh tensor."""
    Y = X - X.mean(dim=-2, keepdim=True)
    _row_norm_(Y, eps)
    return Y.sub_(Y.mean(dim=-2, keepdim=True))


def map_batch(group, X: Tensor, kwargs: dict, scale: float, route: str, fresh: bool) -> Tensor:
    """The group's map (times ``scale``) on a batch ``X [N, m, n]`` in the map's orientation;
    centered as ``C(map(C(X)))`` where the group asks for it (:func:`maps.needs_centering`)."""
    if maps.needs_centering(group["map"], group.get("center")):
        X = maps.center_rows(X)
        return maps.center_rows(_map_batch(group, X, kwargs, scale, route, True))
    return _map_batch(group, X, kwargs, scale, route, fresh)


def _map_batch(group, X: Tensor, kwargs: dict, scale: float, route: str, fresh: bool) -> Tensor:
    """The group's map (in its own orientation, column-aware already applied) times ``scale``
    on a batch ``X`` [N, m, n]. ``fresh``: X is a private buffer that may be overwritten."""
    name = group["map"]
    eps = kwargs.get("eps", maps.EPS)
    if name in ("polar", "scaled_polar"):
        alpha = kwargs.get("alpha", 1.0) if name == "scaled_polar" else None
        return _polar_batch(
            X,
            kwargs.get("method", maps.DEFAULT_POLAR_METHOD),
            kwargs.get("steps"),
            kwargs.get("compute_dtype"),
            alpha,
            scale,
            route,
            fresh,
        )
    if name == "hybrid":
        order = kwargs.get("order", "row_then_polar")
        method = kwargs.get("method", maps.DEFAULT_POLAR_METHOD)
        if order == "row_then_polar":
            # in place on a private stacked buffer, else one out-of-place pass (no clone)
            R = _row_norm_(X, eps) if fresh else _row_norm(X, eps)
            return _polar_batch(
                R,
                method,
                kwargs.get("steps"),
                kwargs.get("compute_dtype"),
                kwargs.get("alpha", 1.0),
                scale,
                route,
                True,
            )
        if order == "polar_then_row":
            P = _polar_batch(X, method, kwargs.get("steps"), kwargs.get("compute_dtype"), None, 1.0, route, fresh)
            P = maps.row_norm(P, eps)
            return P * scale if scale != 1.0 else P
        return maps.hybrid(X, **kwargs)  # raises on the unknown order
    if name in ("row_norm", "centered_row_norm") and X.numel():
        if name == "centered_row_norm":
            Y = _centered_row_norm_(X, eps)
        else:  # in place on a private buffer, else out of place
            Y = _row_norm_(X, eps) if fresh else _row_norm(X, eps)
        return Y.mul_(scale) if scale != 1.0 else Y
    out = maps.get_map(name)(X, **kwargs)
    return out * scale if scale != 1.0 else out


# ----------------------------------------------------------------------------------------
# buckets: logical matrices of one group grouped by shape
# ----------------------------------------------------------------------------------------


@dataclass
class Bucket:
    """Logical matrices of equal (map-orientation) shape in one param_group."""

    shape: tuple[int, int]  # [m, n] as the map sees it (after the column-aware transpose)
    dtype: torch.dtype
    device: torch.device
    members: list[tuple[int, int]]  # (index in params, batch size B)
    route: str = ""

    @property
    def count(self) -> int:
        return sum(b for _, b in self.members)


def _logical(ctx, group, p: Tensor, x: Tensor) -> Tensor:
    layout = ctx.layout(group, p)
    y = layout.to_logical(x)
    return y.mT if group["column_aware"] else y


def plan_buckets(ctx, group, params, momenta=None) -> list[Bucket]:
    """Shape buckets of a group (no data touched when ``momenta`` is None). ``ctx``: an
    :class:`~equiopt.execution.UpdateContext` or an optimizer holding one."""
    ctx = getattr(ctx, "context", ctx)
    buckets: dict[tuple, Bucket] = {}
    for i, p in enumerate(params):
        layout = ctx.layout(group, p)
        B, m, n = layout.logical_shape(p.shape)
        if group["column_aware"]:
            m, n = n, m
        dt = momenta[i].dtype if momenta is not None else compute_dtype(p, group)
        key = (m, n, dt, p.device)
        if key not in buckets:
            buckets[key] = Bucket((m, n), dt, p.device, [])
        buckets[key].members.append((i, B))
    return list(buckets.values())


def _scale_of(group, m: int, n: int) -> float:
    if group["scale"] != "muon":
        return 1.0
    rows, cols = (n, m) if group["column_aware"] else (m, n)  # the logical matrix's orientation
    return muon_scale(rows, cols)


def _chunks(bucket: Bucket, stack: bool, max_bytes: int) -> list[Bucket]:
    """Split a shape bucket into the batches that are actually run.

    Parameters are stacked (one ``torch.cat``) while the stacked batch stays within
    ``max_bytes`` (~ the caches: beyond it, one op streaming a big batch through memory is
    slower than several ops on cache-sized ones, and the copy of the stacking is pure cost);
    a parameter whose own logical batch (experts, heads, fused parts) is that large runs
    alone, as one call on a view (never split: no loop over experts or heads).
    """
    if not stack:
        return [Bucket(bucket.shape, bucket.dtype, bucket.device, [mem]) for mem in bucket.members]
    m, n = bucket.shape
    per = max(1, m * n * torch.finfo(bucket.dtype).bits // 8)
    cap = max(1, max_bytes // per)
    out: list[Bucket] = []
    cur: list[tuple[int, int]] = []
    cur_n = 0
    for i, B in bucket.members:
        if cur and cur_n + B > cap:
            out.append(Bucket(bucket.shape, bucket.dtype, bucket.device, cur))
            cur, cur_n = [], 0
        cur.append((i, B))
        cur_n += B
    if cur:
        out.append(Bucket(bucket.shape, bucket.dtype, bucket.device, cur))
    return out


def fast_updates(ctx, group, params: list[Tensor], momenta: list[Tensor]) -> list[Tensor]:
    """Update direction of each parameter (stored shape), equal to the reference path.
    ``ctx``: an :class:`~equiopt.execution.UpdateContext` (layouts, options) or an optimizer."""
    ctx = getattr(ctx, "context", ctx)
    o = options_of(ctx, group)
    out: list[Tensor | None] = [None] * len(params)
    buckets = []
    for b in plan_buckets(ctx, group, params, momenta):
        buckets += _chunks(b, o.stack, o.stack_bytes)
    for bucket in buckets:
        m, n = bucket.shape
        idx = [i for i, _ in bucket.members]
        kwargs = map_kwargs(group, params[idx[0]])
        scale = _scale_of(group, m, n)
        views = [_logical(ctx, group, params[i], momenta[i]) for i in idx]
        if len(views) == 1:
            X, fresh = views[0], False
        else:
            X, fresh = torch.cat(views, dim=0), True
        U = map_batch(group, X, kwargs, scale, o.polar_route, fresh)
        sizes = [v.shape[0] for v in views]
        for i, u in zip(idx, U.split(sizes, dim=0) if len(views) > 1 else (U,)):
            if group["column_aware"]:
                u = u.mT
            out[i] = ctx.layout(group, params[i]).from_logical(u, params[i].shape)
    return out  # type: ignore[return-value]
