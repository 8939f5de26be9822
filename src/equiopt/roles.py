"""Roles: what kind of block a parameter belongs to, and the symmetry group of that block.

A role's group acts on the parameter's logical matrices ``[out, in]`` (see
:mod:`equiopt.layouts`; per head for attention, per expert for stacked experts, per part
for fused gate/up). It is what the network's function is invariant under, restricted to
this block, and it decides which maps are allowed (:func:`equiopt.maps.map_spec`):

================ ===================================== ===========================================
role             block (PyTorch layout)                group on the logical [out, in] matrix
================ ===================================== ===========================================
embedding        ``nn.Embedding`` [vocab, d]           Perm(vocab) x O(d)
lm_head          untied head [vocab, d]                Perm(vocab) x O(d) x Shift (softmax CE)
tied_embedding   embedding = head                      Perm(vocab) x O(d) (the shift moves inputs)
attention        q/k/v [H*hd, d] per head, o per head  O(rows) x O(cols) (head basis, residual)
mlp_in           gate/up [h, d]                        Perm(h) x O(d)
mlp_out          down [d, h]                           O(d) x Perm(h)
router           softmax router [E, d]                 Perm(E) x O(d) x Shift
expert_in/out    stacked experts, per expert           as mlp_in / mlp_out
matrix           any other 2-D weight                  O(out) x O(in)
vector           gains, biases                         trivial (AdamW)
================ ===================================== ===========================================

The residual-stream rotation O(d) is a symmetry of the whole network only where norm gains
do not break it; the audit (:mod:`equiopt.audit`) measures each claim on the real model, and
a plan built with ``audit=`` drops the factors found broken. For q/k under RoPE the true
group is the RoPE-plane rotations, a subgroup of the O(rows) claimed here: claiming the
larger group only makes the compatibility check stricter.
"""

from __future__ import annotations

from dataclasses import dataclass

from .groups import Group

__all__ = ["Role", "ROLE_TABLE", "ROLES", "MATRIX_ROLES", "role_group"]


@dataclass(frozen=True)
class Role:
    """A block kind: its name, its group, and whether its neuron axis is the column axis
    (maps are then applied to ``M^T``)."""

    name: str
    group: Group
    column_aware: bool = False
    doc: str = ""


_ROW = Group.of("perm:rows", "orth:cols")
_COL = Group.of("orth:rows", "perm:cols")
_SHIFT = Group.of("perm:rows", "orth:cols", "shift:rows")
_ORTH = Group.of("orth:rows", "orth:cols")

ROLE_TABLE: dict[str, Role] = {
    r.name: r
    for r in (
        Role("embedding", _ROW, doc="token embedding [vocab, d]"),
        Role("lm_head", _SHIFT, doc="untied LM head [vocab, d] under softmax cross-entropy"),
        Role("tied_embedding", _ROW, doc="embedding tied to the LM head"),
        Role("attention", _ORTH, doc="q/k/v/o projections, per head"),
        Role("mlp_in", _ROW, doc="gated-MLP gate/up or MLP in-projection [h, d]"),
        Role("mlp_out", _COL, column_aware=True, doc="MLP out-projection [d, h]"),
        Role("router", _SHIFT, doc="softmax MoE router [E, d]"),
        Role("expert_in", _ROW, doc="stacked expert in-projections"),
        Role("expert_out", _COL, column_aware=True, doc="stacked expert out-projections"),
        Role("matrix", _ORTH, doc="any other 2-D weight"),
        Role("vector", Group(), doc="gains, biases, other <2-D parameters"),
    )
}

ROLES: tuple[str, ...] = tuple(ROLE_TABLE)
MATRIX_ROLES: tuple[str, ...] = tuple(r for r in ROLES if r != "vector")


def role_group(role: str) -> Group:
    if role not in ROLE_TABLE:
        raise ValueError(f"unknown role {role!r}; valid roles: {list(ROLES)}")
    return ROLE_TABLE[role].group
