"""Group actions on stored tensors: what one audit check does to the model.

A check acts with one element of a :class:`~equiopt.groups.Factor` on axes of several
parameters (a :class:`~equiopt.blocks.Symmetry`); here the element, sampled with the
samplers of :mod:`equiopt.groups`, is lifted from the logical matrices ``[B, m, n]`` of a
parameter's :class:`~equiopt.layouts.Layout` to the stored tensor. Biases (``Act.axis ==
"vector"``) are viewed as ``[..., out, 1]`` logical matrices with the fused parts and head
split of their weight; the ``"experts"`` axis permutes the leading (stacked) dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..blocks import Act, Symmetry
from ..groups import Factor
from ..layouts import Layout

__all__ = [
    "Edit",
    "Action",
    "Check",
    "lift",
    "vector_layout",
    "edit",
    "expert_edit",
    "sample",
    "identity_like",
    "symmetry_edits",
]


@dataclass
class Edit:
    """One tensor changed by a group action: ``new = fn(old)``; gradients map by ``grad_fn``."""

    name: str
    fn: Callable[[Tensor], Tensor]
    grad_fn: Callable[[Tensor], Tensor] | None  # None: a buffer (no gradient to compare)


@dataclass
class Action:
    """A group element applied to the model: tensor edits, relabelled inputs/targets and the
    expected change of the logits (``"same"``, ``"perm"`` by ``logit_perm``, ``"shift"``)."""

    edits: list[Edit]
    input_map: Tensor | None = None  # new id = input_map[old id]
    target_map: Tensor | None = None
    logits: str = "same"
    logit_perm: Tensor | None = None  # expected logits' = logits[..., logit_perm]
    notes: list[str] = field(default_factory=list)


@dataclass
class Check:
    """One audit check: a symmetry of a block and how to build a random element's action.

    ``acts``: ``(parameter, factor on the parameter's logical axis)`` for deciding which
    planned maps assume the symmetry (``None``: the stacked-expert batch axis)."""

    kind: str
    scope: str
    build: Callable[[torch.Generator], Action] | None
    params: tuple[str, ...]  # trainable tensors acted on (reported; gradients compared)
    acts: tuple[tuple[str, Factor | None], ...] = ()
    suspects: Callable[[], list[tuple[str, list[str]]]] = lambda: []
    hint: str = ""
    untested: str = ""
    part: str = ""  # neuron_rescale: the in-projection part rescaled


def lift(layout: Layout, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A map of logical matrices ``[B, m, n]`` as a map of the stored tensor."""
    return lambda t: layout.from_logical(fn(layout.to_logical(t)), t.shape)


def vector_layout(weight: Layout) -> Layout:
    """Layout of a weight's bias seen as ``[..., out, 1]`` (fused parts and row heads kept)."""
    heads = weight.heads if weight.head_axis == "out" else 1
    return Layout(stacked=weight.stacked, fused=weight.fused, interleaved=weight.interleaved, heads=heads)


def _lift_vector(layout: Layout, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    inner = lift(layout, fn)
    return lambda b: inner(b.unsqueeze(-1)).squeeze(-1)


def edit(name: str, layout: Layout, factor: Factor, g: Tensor, vector: bool = False) -> Edit:
    """The edit acting with ``g`` (one element per logical matrix, or one broadcast) on the
    ``factor.axis`` of ``name`` (a bias when ``vector``: its rows)."""
    up = _lift_vector if vector else lift
    if vector:
        factor = replace(factor, axis="rows")
    return Edit(
        name,
        up(layout, lambda x: factor.act(x, _batched(g, x))),
        up(layout, lambda x: factor.act_gradient(x, _batched(g, x))),
    )


def _batched(g: Tensor, x: Tensor) -> Tensor:
    """One element ``g [1, ...]`` broadcast over the logical batch of ``x [B, m, n]`` (a
    permutation's gather does not broadcast)."""
    return g.expand(x.shape[0], *g.shape[1:]) if g.shape[0] == 1 and x.shape[0] != 1 else g


def expert_edit(name: str, layout: Layout | None, p: Tensor, grads: bool = True) -> Edit:
    """Experts relabelled by the permutation ``p`` on the expert axis of ``name``: the leading
    dim of a stacked tensor (the ``E`` blocks of rows of a ``flat_experts`` one) or of a
    per-expert vector / buffer (``layout`` None)."""

    def fn(t: Tensor) -> Tensor:
        if layout is None or not layout.flat_experts:
            return t[p]
        return t.reshape(layout._stored_view(t.shape))[p].reshape(t.shape)

    return Edit(name, fn, fn if grads else None)


def sample(factor: Factor, batch: int, size: int, gen: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """``batch`` random elements of ``factor`` on an axis of ``size`` (the length of the shift
    vector for ``shift``), drawn by :meth:`equiopt.groups.Factor.sample`."""
    g = replace(factor, axis="rows").sample((batch, size, size), gen, dtype)
    return g.to(device) if g.dtype == torch.long else g.to(device, dtype)


def identity_like(factor: Factor, g: Tensor) -> Tensor:
    """The identity element shaped like ``g``."""
    if factor.kind == "perm":
        return torch.arange(g.shape[-1], device=g.device).expand_as(g).clone()
    if factor.kind in ("orth", "rope_rotation"):
        return torch.eye(g.shape[-1], dtype=g.dtype, device=g.device).expand_as(g).clone()
    return torch.ones_like(g) if factor.kind == "scale" else torch.zeros_like(g)


def _on_parts(factor: Factor, g: Tensor, fused: int, part: int | None) -> Tensor:
    """Per-block elements ``g [B, ...]`` for the ``B * fused`` logical matrices of a fused
    projection (logical index ``b * fused + j``): every part, or only ``part``."""
    if fused == 1 or g.shape[0] == 1 and part is None:
        return g
    full = g.repeat_interleave(fused, dim=0)
    if part is not None:
        keep = torch.arange(full.shape[0], device=g.device) % fused == part
        full = torch.where(keep.view(-1, *([1] * (g.ndim - 1))), full, identity_like(factor, full))
    return full


def _act_edit(act: Act, factor: Factor, g: Tensor, layouts: Mapping[str, tuple[Layout, bool]]) -> Edit:
    if act.axis == "experts":
        lay = layouts.get(act.param)
        return expert_edit(act.param, lay[0] if lay and not lay[1] else None, g.reshape(-1))
    layout, vector = layouts[act.param]
    h = factor.inverse(g) if act.inverse else g
    return edit(
        act.param,
        layout,
        replace(factor, axis=act.axis if not vector else "rows"),
        _on_parts(factor, h, layout.fused, act.part),
        vector=vector,
    )


def symmetry_edits(sym: Symmetry, g: Tensor, layouts: Mapping[str, tuple[Layout, bool]]) -> list[Edit]:
    """Edits of one element ``g`` of ``sym.factor`` (``[B, ...]``, one per block of the batch:
    per expert for stacked experts, ``B = 1`` broadcast) on every axis ``sym`` acts on.
    ``layouts``: parameter -> (its layout, whether it is a bias)."""
    return [_act_edit(a, sym.factor, g, layouts) for a in sym.acts]
