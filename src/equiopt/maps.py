"""Symmetry-compatible update maps Phi on logical matrices [..., m, n].

Rows are output neurons / vocabulary tokens / experts (PyTorch ``Linear`` layout
[out, in]). A map is *compatible* with a block when it is equivariant under that block's
symmetry group: Phi(g . X) = g . Phi(X) (design note §1-2). The group actions used below:

* Perm(m) / O(m) acting on rows:      X -> P X,  X -> Q X
* Perm(n) / O(n) acting on columns:   X -> X P,  X -> X Q
* shift (translation along rows):     X -> X + 1 c^T. A shift-symmetric block's gradient
  always has zero column sums (1^T G = 0); a compatible map is *invariant* under the shift
  and keeps 1^T Phi(X) = 0 (it never moves along the orbit).

All maps are pure: they never modify their input in place, are batched over leading
dimensions (no Python loops over the batch; stacked MoE experts [E, m, n] are just a
batch), and return the input dtype. ``MAPS[name](x, **options)`` is how the optimizer calls
them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .groups import Factor, Group
from .polar import POLAR_METHODS, gram_polar, nuclear_norm, polar

__all__ = [
    "EPS",
    "DEFAULT_POLAR_METHOD",
    "HYBRID_ORDERS",
    "row_norm",
    "col_norm",
    "center_rows",
    "centered_row_norm",
    "scaled_polar",
    "right_spectral",
    "left_spectral",
    "hybrid",
    "column_aware",
    "identity",
    "polar",
    "nuclear_norm",
    "POLAR_METHODS",
    "MAPS",
    "MAP_SPECS",
    "MapSpec",
    "get_map",
    "map_spec",
    "needs_centering",
]

#: Denominator epsilon of the row/column normalizations (design note §3: eps = 1e-8).
EPS: float = 1e-8

#: Polar-factor method used by the maps unless told otherwise (the reference code's).
DEFAULT_POLAR_METHOD: str = "polar_express"

#: Orders accepted by :func:`hybrid`.
HYBRID_ORDERS: tuple[str, ...] = ("row_then_polar", "polar_then_row")


def _check(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions [..., m, n], got shape {tuple(x.shape)}")


def scale_by_nuclear(p: Tensor, nuc: Tensor, alpha: float) -> Tensor:
    """p * nuc^alpha per matrix; a zero nuclear norm gives scale 0 (p is zero there anyway),
    so negative alpha cannot produce inf * 0 = NaN."""
    nuc = nuc.to(p.dtype)
    safe = torch.where(nuc > 0, nuc, torch.ones_like(nuc))
    scale = torch.where(nuc > 0, safe.pow(alpha), torch.zeros_like(nuc))
    return p * scale[..., None, None]


# ----------------------------------------------------------------------------------------
# row / column normalizations and centering
# ----------------------------------------------------------------------------------------


#: A reduction: the sum of ``v`` over one axis of each logical matrix, kept as a size-1 axis.
#: The maps take the local one by default; the sharded path passes one that also sums over
#: the shards of that axis (an all-reduce), so a shard computes the map of the whole matrix.
Reduction = Callable[[Tensor], Tensor]


def row_norm(x: Tensor, eps: float = EPS, *, sum_cols: Reduction | None = None) -> Tensor:
    """rn(X): each row divided by (its l2 norm + eps).

    Formula: rn(X)_i = X_i / (||X_i||_2 + eps). Zero rows stay zero.
    Group: Perm(m) x O(n): rn(P X Q) = P rn(X) Q (row norms are invariant under right
    rotations, and rows are treated independently).
    Blocks: embeddings and LM heads [vocab, d] (also tied), SwiGLU gate/up [hidden, d]
    ("row-aware").
    ``sum_cols``: the sum over a row's columns of ``X*X`` (default: local, via vector_norm).
    """
    _check(x)
    if sum_cols is None:
        return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)
    return x / (sum_cols(x * x).sqrt() + eps)


def col_norm(x: Tensor, eps: float = EPS, *, sum_rows: Reduction | None = None) -> Tensor:
    """cn(X) = rn(X^T)^T: each column divided by (its l2 norm + eps).

    Group: O(m) x Perm(n). Blocks: SwiGLU down [d, hidden] (column-aware row-norm).
    ``sum_rows``: the sum over a column's rows (default: local).
    """
    _check(x)
    over = None if sum_rows is None else (lambda v: sum_rows(v.mT).mT)
    return row_norm(x.mT, eps, sum_cols=over).mT


def center_rows(x: Tensor, *, sum_rows: Reduction | None = None, count: int | None = None) -> Tensor:
    """C(X) = X - 1 mean_rows(X)^T: subtract the column-mean vector from every row.

    Output satisfies 1^T C(X) = 0 and C(X + 1 c^T) = C(X).
    Group: commutes with row permutations (in fact with every orthogonal Q with Q 1 = 1) and
    with right rotations: C(P X Q) = P C(X) Q; invariant under the shift X -> X + 1 c^T.
    Building block of the centered maps (untied LM heads, MoE routers).
    ``sum_rows`` / ``count``: the column sums and the number of rows of the whole matrix
    (default: local).
    """
    _check(x)
    rows = x.shape[-2] if count is None else count
    if rows == 0:
        return x.clone()
    if sum_rows is None:
        return x - x.mean(dim=-2, keepdim=True)
    return x - sum_rows(x) / rows


def centered_row_norm(
    x: Tensor,
    eps: float = EPS,
    *,
    sum_rows: Reduction | None = None,
    sum_cols: Reduction | None = None,
    count: int | None = None,
) -> Tensor:
    """C(rn(C(X))): center, row-normalize, re-center.

    The outer centering makes 1^T Phi(X) = 0; the inner one makes Phi(X + 1 c^T) = Phi(X).
    Group: Perm(m) x O(n) x shift.
    Blocks: untied LM heads [vocab, d] (*ref* centering) and MoE routers [experts, d].
    Reductions: see :func:`row_norm` and :func:`center_rows`.
    """
    centered = center_rows(x, sum_rows=sum_rows, count=count)
    return center_rows(row_norm(centered, eps, sum_cols=sum_cols), sum_rows=sum_rows, count=count)


# ----------------------------------------------------------------------------------------
# spectral maps
# ----------------------------------------------------------------------------------------


def scaled_polar(
    x: Tensor,
    alpha: float = 1.0,
    method: str = DEFAULT_POLAR_METHOD,
    steps: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """||X||_*^alpha polar(X).

    alpha = 1: PolarGrad / steepest descent in the spectral norm; alpha = 0: the pure Muon
    direction (no nuclear norm is computed then). For alpha != 0 the nuclear norm is exact:
    the by-product of :func:`~equiopt.polar.gram_polar` when method == "gram_eigh", else
    :func:`~equiopt.polar.nuclear_norm` (eigh of the smaller Gram). ``method``, ``steps``,
    ``compute_dtype``: see :func:`~equiopt.polar.polar`.
    Group: O(m) x O(n): Phi(Q1 X Q2) = Q1 Phi(X) Q2 (the nuclear norm is invariant).
    Blocks: general matrices, attention projections (per head), MoE expert matrices.
    """
    _check(x)
    alpha = float(alpha)
    if method == "gram_eigh":
        p, nuc = gram_polar(x)
        return p if alpha == 0.0 else scale_by_nuclear(p, nuc, alpha)
    p = polar(x, method=method, steps=steps, compute_dtype=compute_dtype)
    if alpha == 0.0:
        return p
    return scale_by_nuclear(p, nuclear_norm(x), alpha)


def right_spectral(x: Tensor, alpha: float = 1.0, rcond: float | None = None) -> Tensor:
    """One-sided (right) spectral map ||X||_*^alpha X (X^T X)^{+1/2}, via the n x n Gram.

    X (X^T X)^{+1/2} = U_r V_r^T (pseudo-polar: rank-deficient directions dropped, see
    :func:`~equiopt.polar.inv_sqrt_psd`, ``rcond``); the nuclear norm comes from the same
    eigendecomposition. Cheap for [vocab, d] with d << vocab: one d x d eigh plus one
    [vocab, d] x [d, d] product. float64 in -> float64 arithmetic; otherwise float32.
    Group: Perm(m) x O(n), in fact O(m) x O(n).
    Blocks: embeddings and LM heads [vocab, d] (tied or untied).
    """
    _check(x)
    p, nuc = gram_polar(x, rcond=rcond, side="right")
    return p if float(alpha) == 0.0 else scale_by_nuclear(p, nuc, float(alpha))


def left_spectral(x: Tensor, alpha: float = 1.0, center: bool = True, rcond: float | None = None) -> Tensor:
    """Left spectral map ||C||_*^alpha (C C^T)^{+1/2} C, via the m x m Gram, re-centered.

    C = C(X) (rows centered) when ``center`` else X. After centering, C C^T is EXACTLY
    singular (1 is in its null space), so the inverse square root is the pseudo-inverse
    (:func:`~equiopt.polar.inv_sqrt_psd` cutoff, ``rcond``): the null direction is dropped,
    not amplified by ~eps^{-1/2}. The result equals ||C||_*^alpha U_r V_r^T (thin SVD of C,
    zero singular directions dropped); with center=True it is re-centered, so 1^T Phi = 0
    holds to rounding. float64 in -> float64 arithmetic; otherwise float32.
    Group: center=True: Perm(m) x O(n) x shift (in fact every Q in O(m) with Q 1 = 1);
    center=False: O(m) x O(n).
    Blocks: MoE routers [experts, d] (experts small: the E x E eigh is cheap and exact).
    """
    _check(x)
    c = center_rows(x) if center else x
    p, nuc = gram_polar(c, rcond=rcond, side="left")
    out = p if float(alpha) == 0.0 else scale_by_nuclear(p, nuc, float(alpha))
    return center_rows(out) if center else out


def hybrid(
    x: Tensor,
    order: str = "row_then_polar",
    alpha: float = 1.0,
    eps: float = EPS,
    method: str = DEFAULT_POLAR_METHOD,
    steps: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Hybrid of row normalization and polar factor.

    order="row_then_polar" (*ref* default): R = rn(X); ||R||_*^alpha polar(R).
    order="polar_then_row": rn(polar(X)). ``alpha`` has no effect there: rn is scale
    invariant (rn(s Y) = rn(Y) for s > 0, up to eps), so any nuclear-norm factor would be
    normalized away.
    Group: Perm(m) x O(n) for both orders (rn needs the row permutation, polar commutes with
    both sides).
    Blocks: embeddings / LM heads (hybrid), SwiGLU gate and up (row-aware hybrid); with
    :func:`column_aware`, SwiGLU down.
    """
    _check(x)
    if order == "row_then_polar":
        return scaled_polar(row_norm(x, eps), alpha=alpha, method=method, steps=steps, compute_dtype=compute_dtype)
    if order == "polar_then_row":
        return row_norm(polar(x, method=method, steps=steps, compute_dtype=compute_dtype), eps)
    raise ValueError(f"unknown order={order!r} for hybrid(); allowed values: {', '.join(HYBRID_ORDERS)}")


def column_aware(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Turn a row-aware map into a column-aware one: x -> fn(x^T, **kw)^T.

    Keyword arguments are passed through to ``fn``. If fn is equivariant under
    Perm(m) x O(n), the result is equivariant under O(m) x Perm(n).
    Blocks: SwiGLU down [d, hidden], whose hidden (neuron) axis is the column axis:
    ``column_aware(row_norm)`` (== :func:`col_norm`) or ``column_aware(hybrid)``.
    """

    @functools.wraps(fn)
    def wrapped(x: Tensor, **kw) -> Tensor:
        _check(x)
        return fn(x.mT, **kw).mT

    wrapped.__name__ = f"column_aware_{getattr(fn, '__name__', 'fn')}"
    wrapped.__qualname__ = wrapped.__name__
    wrapped.__doc__ = f"Column-aware version of {getattr(fn, '__name__', 'fn')}: x -> fn(x^T, **kw)^T.\n\n" + (
        fn.__doc__ or ""
    )
    return wrapped


def identity(x: Tensor) -> Tensor:
    """Phi(X) = X (returns its argument itself, no copy). Equivariant under every group; the
    plain-momentum baseline."""
    return x


# ----------------------------------------------------------------------------------------
# the registry: each map with its options and the group it is equivariant under
# ----------------------------------------------------------------------------------------
ROW_GROUP = Group.of("perm:rows", "orth:cols")  # Perm(m) x O(n)
BI_ORTH_GROUP = Group.of("orth:rows", "orth:cols", "shift:rows", "shift:cols")  # O(m) x O(n), zero sums kept
CENTERED_GROUP = Group.of("perm:rows", "orth:cols", "shift:rows")  # Perm(m) x O(n) x shift
COORDINATE_GROUP = Group.of("perm:rows", "perm:cols")  # what a per-coordinate rule (AdamW) respects
SHIFT_ROWS = Factor("shift", "rows")

_POLAR_OPTIONS = {"polar_method": "method", "polar_steps": "steps", "polar_dtype": "compute_dtype"}


@dataclass(frozen=True)
class MapSpec:
    """One update map as the optimizer uses it.

    Attributes:
        name: the ``map`` hyperparameter's value.
        fn: ``fn(x [..., m, n], **kwargs)``; ``None`` for ``adamw`` (run by the optimizer).
        options: param_group key -> keyword of ``fn``.
        group: the group ``fn`` is equivariant under, on the matrix it is applied to. A
            ``shift:rows`` factor means: inputs with zero column sums give outputs with zero
            column sums (the map never moves along the shift orbit by itself).
        projects_out: factors whose orbit direction the map *removes* from every update
            (the centered maps): only right when the block's loss is invariant along it.
        baseline: a reference rule that ignores the block's group by design (AdamW): the
            plan reports it as not equivariant instead of refusing it.
    """

    name: str
    fn: Callable[..., Tensor] | None
    options: Mapping[str, str]
    group: Group
    projects_out: tuple[Factor, ...] = ()
    baseline: bool = False

    def centered(self) -> MapSpec:
        """The map as ``C(fn(C(X)))`` (what ``center=True`` runs on a shift-symmetric block):
        centering commutes with row permutations (not every row rotation), removes the shift."""
        factors = tuple(Factor("perm", "rows") if f == Factor("orth", "rows") else f for f in self.group.factors)
        group = Group(tuple(f for f in factors if f != SHIFT_ROWS) + (SHIFT_ROWS,))
        return dataclasses.replace(self, group=group, projects_out=(SHIFT_ROWS,))


MAP_SPECS: dict[str, MapSpec] = {
    s.name: s
    for s in (
        MapSpec("adamw", None, {}, COORDINATE_GROUP, baseline=True),
        MapSpec("identity", identity, {}, BI_ORTH_GROUP),
        MapSpec("row_norm", row_norm, {"eps": "eps"}, ROW_GROUP),
        MapSpec("col_norm", col_norm, {"eps": "eps"}, Group.of("orth:rows", "perm:cols")),
        MapSpec("centered_row_norm", centered_row_norm, {"eps": "eps"}, CENTERED_GROUP, projects_out=(SHIFT_ROWS,)),
        MapSpec("polar", polar, dict(_POLAR_OPTIONS), BI_ORTH_GROUP),
        MapSpec("scaled_polar", scaled_polar, {"alpha": "alpha", **_POLAR_OPTIONS}, BI_ORTH_GROUP),
        MapSpec("right_spectral", right_spectral, {"alpha": "alpha"}, BI_ORTH_GROUP),
        MapSpec("left_spectral", left_spectral, {"alpha": "alpha", "center": "center"}, BI_ORTH_GROUP),
        MapSpec("hybrid", hybrid, {"order": "order", "alpha": "alpha", "eps": "eps", **_POLAR_OPTIONS}, ROW_GROUP),
    )
}

#: ``MAPS[name](x, **options)``: the functions of the registry (``adamw`` excluded).
MAPS: dict[str, Callable[..., Tensor]] = {n: s.fn for n, s in MAP_SPECS.items() if s.fn is not None}


def get_map(name: str) -> Callable[..., Tensor]:
    """``MAPS[name]``; raises ValueError naming the bad name and the valid ones."""
    try:
        return MAPS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown map name {name!r}; valid names: {', '.join(MAPS)}") from None


def map_spec(name: str, center: bool | None = None, column_aware: bool = False) -> MapSpec:
    """The spec of map ``name`` as a param_group applies it: ``center`` (True: wrapped in
    centering unless the map centers by itself; ``left_spectral`` takes it as its own option)
    and ``column_aware`` (applied to ``X^T``: the group's axes swap)."""
    if name not in MAP_SPECS:
        raise ValueError(f"unknown map name {name!r}; valid names: {', '.join(MAP_SPECS)}")
    spec = MAP_SPECS[name]
    # left_spectral centers by default (its own option); any other map only when asked and
    # when it does not already center / remove the shift by itself
    own_centering = name == "left_spectral" and center is not False
    wrapped = center and not spec.baseline and SHIFT_ROWS not in spec.projects_out and not spec.group.has("shift")
    if own_centering or wrapped:
        spec = spec.centered()
    if column_aware:
        swap = {"rows": "cols", "cols": "rows"}
        spec = dataclasses.replace(
            spec,
            group=Group(tuple(dataclasses.replace(f, axis=swap[f.axis]) for f in spec.group.factors)),
            projects_out=tuple(dataclasses.replace(f, axis=swap[f.axis]) for f in spec.projects_out),
        )
    return spec


def needs_centering(name: str, center: bool | None) -> bool:
    """Whether the optimizer wraps map ``name`` as ``C(fn(C(X)))`` for this ``center`` value."""
    spec = MAP_SPECS[name]
    return (
        bool(center)
        and name != "left_spectral"
        and not spec.baseline
        and not spec.group.has("shift")
        and not spec.projects_out
    )
