"""Symmetry groups as values: the one vocabulary of the project.

A *factor* is one kind of transformation acting on one axis of a batch of logical matrices
``X [B, m, n]`` (rows = output units, see :mod:`equiopt.layouts`); each of the ``B``
matrices gets its own element. A :class:`Group` is a product of factors. The actions, with
``g`` an element and ``X`` one logical matrix::

    kind            rows                          cols (index action X -> X g^T)
    perm            (P X)[j] = X[p[j]]            X[:, p]
    orth            Q X        (Haar Q in O(m))   X Q^T
    rope_rotation   R X  (R: 2x2 rotations in the RoPE planes, a subgroup of O(m))
    shift           X + 1 c^T  (c in R^n)         X + c 1^T
    scale           diag(s) X  (s > 0)            X diag(s)

A network symmetry acting on W by ``g`` acts on the gradient by the *contragredient*
(:meth:`Factor.act_gradient`): the same for perm / orth / rope_rotation (orthogonal), the
identity for shift (a translation), ``1/s`` for scale. The continuous factors have an orbit
through W whose tangent space (Frobenius metric) is::

    orth (rows)    { A W : A skew }        rope_rotation { sum_k t_k J_k W }  (J_k: plane k)
    shift (rows)   { 1 c^T }               scale (rows)  { diag(a) W }

:meth:`Factor.project_out` removes an update's component along that tangent space; the
centering C(X) of the centered maps is ``Factor("shift", "rows").project_out``.

Subgroups: perm <= orth and rope_rotation <= orth on the same axis; each kind contains
itself; ``Group <= Group`` holds when every factor of the left lies in a factor of the right.
A map is *compatible* with a block when the block's group is a subgroup of the group the map
is equivariant under (:mod:`equiopt.maps` declares those).

:func:`haar`, :func:`permutation` and :func:`rope_rotations` are the project's only samplers
of random group elements (tests, audit and diagnostics use them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AXES",
    "KINDS",
    "Factor",
    "Group",
    "haar",
    "inverse_permutation",
    "permutation",
    "rope_rotations",
    "TRIVIAL",
]

KINDS = ("perm", "orth", "rope_rotation", "shift", "scale")
AXES = ("rows", "cols")
ROPE_PAIRINGS = ("half", "adjacent")
# kind -> the kinds whose group (on the same axis) contains it
_CONTAINED_IN = {
    "perm": ("perm", "orth"),
    "rope_rotation": ("rope_rotation", "orth"),
    "orth": ("orth",),
    "shift": ("shift",),
    "scale": ("scale",),
}
_SYMBOL = {"perm": "Perm", "orth": "O", "rope_rotation": "RoPE-SO", "shift": "Shift", "scale": "Scale"}
# scale elements are sampled log-uniform in [1/SCALE_RANGE, SCALE_RANGE]
SCALE_RANGE = 2.0


# ----------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------
def haar(batch: int, n: int, gen: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """``[batch, n, n]`` Haar-distributed orthogonal matrices (QR of a Gaussian with the signs
    of R's diagonal folded into Q; computed in float64, returned in ``dtype``)."""
    a = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)).to(dtype)


def permutation(n: int, gen: torch.Generator | None = None, fixed: int | None = None) -> Tensor:
    """A random permutation ``p`` of ``range(n)`` (new index j takes old index ``p[j]``) that
    keeps ``fixed`` in place; never the identity when another permutation exists."""
    rest = torch.tensor([i for i in range(n) if i != fixed], dtype=torch.long) if fixed is not None else torch.arange(n)
    p = torch.arange(n)
    for _ in range(100):
        p[rest] = rest[torch.randperm(rest.numel(), generator=gen)]
        if rest.numel() < 2 or not torch.equal(p, torch.arange(n)):
            break
    return p


def inverse_permutation(p: Tensor) -> Tensor:
    """``q`` with ``q[p[j]] = j`` (works batched over leading dims)."""
    inv = torch.empty_like(p)
    inv.scatter_(-1, p, torch.arange(p.shape[-1], device=p.device).expand_as(p).contiguous())
    return inv


def rope_planes(n: int, pairing: str) -> tuple[Tensor, Tensor]:
    """Index pairs ``(a_k, b_k)`` of the RoPE 2-planes of a head of size ``n``:
    ``(k, k + n/2)`` for ``pairing="half"`` (Hugging Face's rotate_half), ``(2k, 2k+1)`` for
    ``"adjacent"`` (the interleaved convention)."""
    if n % 2:
        raise ValueError(f"RoPE planes need an even size, got {n}")
    if pairing not in ROPE_PAIRINGS:
        raise ValueError(f"pairing must be one of {ROPE_PAIRINGS}, got {pairing!r}")
    k = torch.arange(n // 2)
    return (k, k + n // 2) if pairing == "half" else (2 * k, 2 * k + 1)


def rope_rotations(
    batch: int, n: int, gen: torch.Generator | None = None, dtype: torch.dtype = torch.float64, pairing: str = "half"
) -> Tensor:
    """``[batch, n, n]`` random rotations acting inside the RoPE planes (they commute with
    every RoPE position rotation): angle ``theta_k`` uniform in [0, 2 pi) on plane ``k``."""
    a, b = rope_planes(n, pairing)
    theta = torch.rand(batch, n // 2, generator=gen, dtype=torch.float64) * (2 * math.pi)
    R = torch.zeros(batch, n, n, dtype=torch.float64)
    R[:, a, a] = theta.cos()
    R[:, a, b] = -theta.sin()
    R[:, b, a] = theta.sin()
    R[:, b, b] = theta.cos()
    return R.to(dtype)


# ----------------------------------------------------------------------------------------
# factors
# ----------------------------------------------------------------------------------------
def _rows_first(transpose_args: bool):
    """Run a rows-axis implementation on the transposes for the cols axis (a cols action is
    the rows action of X^T: ``X g^T = (g X^T)^T``); group elements are not transposed,
    matrix arguments (``W``) are when ``transpose_args``."""

    def deco(fn):
        def wrapped(self, x: Tensor, arg: Tensor) -> Tensor:
            if self.axis == "rows":
                return fn(self, x, arg)
            return fn(self, x.mT, arg.mT if transpose_args else arg).mT

        wrapped.__doc__ = fn.__doc__
        wrapped.__name__ = fn.__name__
        return wrapped

    return deco


@dataclass(frozen=True)
class Factor:
    """One kind of transformation on one axis of logical matrices ``[B, m, n]``.

    Attributes:
        kind: one of ``KINDS``.
        axis: ``"rows"`` or ``"cols"``.
        pairing: RoPE plane convention of a ``rope_rotation`` factor (see :func:`rope_planes`).
    """

    kind: str
    axis: str = "rows"
    pairing: str = "half"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Factor: unknown kind {self.kind!r}; valid: {KINDS}")
        if self.axis not in AXES:
            raise ValueError(f"Factor: unknown axis {self.axis!r}; valid: {AXES}")
        if self.pairing not in ROPE_PAIRINGS:
            raise ValueError(f"Factor: unknown RoPE pairing {self.pairing!r}; valid: {ROPE_PAIRINGS}")

    @property
    def continuous(self) -> bool:
        return self.kind != "perm"

    def describe(self) -> str:
        return f"{_SYMBOL[self.kind]}({self.axis})"

    def __le__(self, other: Factor) -> bool:
        if self.axis != other.axis or other.kind not in _CONTAINED_IN[self.kind]:
            return False
        return not (self.kind == other.kind == "rope_rotation" and self.pairing != other.pairing)

    # -- elements ---------------------------------------------------------------------
    def sample(
        self, shape: tuple[int, ...], gen: torch.Generator | None = None, dtype: torch.dtype = torch.float64
    ) -> Tensor:
        """A random element for each of the ``B`` logical matrices of shape ``[B, m, n]``."""
        B, m, n = shape
        size, other = (m, n) if self.axis == "rows" else (n, m)
        if self.kind == "perm":
            return (
                torch.stack([permutation(size, gen) for _ in range(B)]) if B else torch.zeros(0, size, dtype=torch.long)
            )
        if self.kind == "orth":
            return haar(B, size, gen, dtype)
        if self.kind == "rope_rotation":
            return rope_rotations(B, size, gen, dtype, self.pairing)
        if self.kind == "shift":
            return torch.randn(B, other, generator=gen, dtype=torch.float64).to(dtype)
        u = torch.rand(B, size, generator=gen, dtype=torch.float64) * 2 - 1
        return torch.exp(u * math.log(SCALE_RANGE)).to(dtype)

    def inverse(self, g: Tensor) -> Tensor:
        if self.kind == "perm":
            return inverse_permutation(g)
        if self.kind in ("orth", "rope_rotation"):
            return g.mT
        return -g if self.kind == "shift" else 1.0 / g

    # -- actions ----------------------------------------------------------------------
    @_rows_first(transpose_args=False)
    def act(self, x: Tensor, g: Tensor) -> Tensor:
        """``g . X`` for a batch ``X [B, m, n]`` and elements ``g`` from :meth:`sample`."""
        if self.kind == "perm":
            return torch.gather(x, -2, g[..., :, None].expand(*g.shape, x.shape[-1]))
        if self.kind in ("orth", "rope_rotation"):
            return g.to(x.dtype) @ x
        if self.kind == "shift":
            return x + g.to(x.dtype)[..., None, :]
        return x * g.to(x.dtype)[..., :, None]

    def act_gradient(self, x: Tensor, g: Tensor) -> Tensor:
        """The action on gradients (the contragredient): the gradient of ``L(g^{-1} . W)``
        at ``g . W`` is ``act_gradient(G, g)`` when ``G`` is the gradient of ``L`` at ``W``."""
        if self.kind == "shift":
            return x
        if self.kind == "scale":
            return self.act(x, 1.0 / g)
        return self.act(x, g)

    # -- orbit geometry ---------------------------------------------------------------
    @_rows_first(transpose_args=True)
    def tangent_component(self, u: Tensor, w: Tensor) -> Tensor:
        """Orthogonal (Frobenius) projection of ``U`` on the tangent space of the orbit through
        ``W`` (both ``[B, m, n]``); zero for the discrete ``perm``. Directions the orbit does
        not span at ``W`` (a zero row under ``scale``) are left out."""
        if self.kind == "perm":
            return torch.zeros_like(u)
        if self.kind == "shift":
            return u.mean(dim=-2, keepdim=True).expand_as(u).clone() if u.shape[-2] else u.clone()
        if self.kind == "scale":
            nrm2 = (w * w).sum(-1, keepdim=True)
            coef = torch.where(nrm2 > 0, (u * w).sum(-1, keepdim=True) / torch.where(nrm2 > 0, nrm2, 1), 0)
            return coef * w
        if self.kind == "rope_rotation":
            return _rope_tangent(u, w, self.pairing)
        return _orth_tangent(u, w)

    def project_out(self, u: Tensor, w: Tensor | None = None) -> Tensor:
        """``U`` minus its component along the orbit through ``W`` (``W`` unused for shift)."""
        if self.kind == "perm":
            return u
        return u - self.tangent_component(u, u if w is None else w)


def _orth_tangent(u: Tensor, w: Tensor) -> Tensor:
    """``A W`` with skew ``A`` minimizing ``||U - A W||_F``: ``A S + S A = U W^T - W U^T`` with
    ``S = W W^T``, solved in S's eigenbasis (pairs with ``l_i + l_j`` ~ 0 carry no direction)."""
    s = w @ w.mT
    k = u @ w.mT - w @ u.mT
    lam, v = torch.linalg.eigh(s)
    denom = lam[..., :, None] + lam[..., None, :]
    cutoff = lam.abs().amax(-1, keepdim=True)[..., None].clamp_min(torch.finfo(lam.dtype).tiny) * (
        s.shape[-1] * torch.finfo(lam.dtype).eps
    )
    kt = v.mT @ k @ v
    at = torch.where(denom > cutoff, kt / torch.where(denom > cutoff, denom, 1), 0)
    return (v @ at @ v.mT) @ w


def _rope_tangent(u: Tensor, w: Tensor, pairing: str) -> Tensor:
    """Component of ``U`` along ``J_k W`` for each RoPE plane k; the directions of distinct
    planes touch disjoint rows, so they are orthogonal and project one by one."""
    a, b = rope_planes(w.shape[-2], pairing)
    da, db = -w[..., b, :], w[..., a, :]  # J_k W restricted to rows a_k, b_k
    nrm2 = (da * da).sum(-1) + (db * db).sum(-1)
    coef = (u[..., a, :] * da).sum(-1) + (u[..., b, :] * db).sum(-1)
    coef = torch.where(nrm2 > 0, coef / torch.where(nrm2 > 0, nrm2, 1), 0)[..., None]
    out = torch.zeros_like(u)
    out[..., a, :] = coef * da
    out[..., b, :] = coef * db
    return out


# ----------------------------------------------------------------------------------------
# groups
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """A product of factors acting on logical matrices; ``Group(())`` is the trivial group."""

    factors: tuple[Factor, ...] = ()

    @classmethod
    def of(cls, *specs: str) -> Group:
        """``Group.of("perm:rows", "orth:cols", "shift:rows")``."""
        return cls(tuple(Factor(*s.split(":")) for s in specs))

    def __le__(self, other: Group) -> bool:
        return all(any(f <= h for h in other.factors) for f in self.factors)

    def __mul__(self, other: Group) -> Group:
        return Group(self.factors + tuple(f for f in other.factors if f not in self.factors))

    def has(self, kind: str, axis: str = "rows") -> bool:
        return any(f.kind == kind and f.axis == axis for f in self.factors)

    def without(self, kind: str, axis: str | None = None) -> Group:
        return Group(tuple(f for f in self.factors if not (f.kind == kind and (axis is None or f.axis == axis))))

    def missing_from(self, other: Group) -> tuple[Factor, ...]:
        """The factors of ``self`` that ``other`` does not contain."""
        return tuple(f for f in self.factors if not any(f <= h for h in other.factors))

    def describe(self) -> str:
        return " x ".join(f.describe() for f in self.factors) or "trivial"

    def __str__(self) -> str:
        return self.describe()

    def sample(
        self, shape: tuple[int, ...], gen: torch.Generator | None = None, dtype: torch.dtype = torch.float64
    ) -> tuple[Tensor, ...]:
        return tuple(f.sample(shape, gen, dtype) for f in self.factors)

    def act(self, x: Tensor, elements: tuple[Tensor, ...]) -> Tensor:
        """Apply the factors in order (first factor first)."""
        for f, g in zip(self.factors, elements, strict=True):
            x = f.act(x, g)
        return x

    def act_gradient(self, x: Tensor, elements: tuple[Tensor, ...]) -> Tensor:
        for f, g in zip(self.factors, elements, strict=True):
            x = f.act_gradient(x, g)
        return x


TRIVIAL = Group()
