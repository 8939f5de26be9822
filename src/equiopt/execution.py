"""Execution paths of the matrix updates, behind one small interface.

An *executor* computes the update direction of every parameter of a param_group (before
``-lr``) from the maps' inputs::

    executor.updates(ctx, group, params, momenta) -> list[Tensor]   # stored shapes

``ctx`` is an :class:`UpdateContext`: the layouts and names of the parameters and the
fast-path options, passed explicitly (an executor never reaches into the optimizer). The
paths:

* :class:`ReferenceExecutor`: per parameter, view -> map -> scale -> inverse view
  (:func:`equiopt.functional.reference_update`): the ground truth the others are tested
  against;
* :class:`LocalExecutor`: the batched fast path (:mod:`equiopt.fastpath`) or the reference
  path, per the group's ``batched`` option;
* :class:`equiopt.sharding.ShardedExecutor` (FSDP2 DTensor parameters) and
  :class:`equiopt.sharding.SpreadExecutor` (DDP: maps spread over ranks) compose a local one.

The optimizer picks its executor when it is built (``EquiOptimizer(executor=...)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from . import fastpath
from .functional import reference_update
from .layouts import MATRIX, Layout

__all__ = ["UpdateContext", "ReferenceExecutor", "LocalExecutor"]


@dataclasses.dataclass
class UpdateContext:
    """What an execution path needs to know about the parameters: layouts, names, options."""

    layouts: dict = dataclasses.field(default_factory=dict)  # {parameter: Layout}
    names: dict = dataclasses.field(default_factory=dict)  # {parameter: name}
    fastpath_options: fastpath.FastPathOptions = fastpath.DEFAULT_OPTIONS
    fastpath_forced: frozenset = frozenset()  # options set by configure(): they win over groups' keys

    def layout(self, group: Mapping, p: torch.Tensor) -> Layout:
        """``p``'s layout as ``group``'s map sees it (the head split only with ``per_head``)."""
        layout = self.layouts.get(p, MATRIX)
        return layout if group["per_head"] else layout.without_heads()

    def name_of(self, p: torch.Tensor) -> str:
        return self.names.get(p, "<unnamed parameter>")

    def with_layouts(self, extra: Mapping[torch.Tensor, Layout]) -> UpdateContext:
        """A context that also knows ``extra`` (stand-in tensors of the sharded paths)."""
        return dataclasses.replace(self, layouts={**self.layouts, **extra})


class ReferenceExecutor:
    """The simple per-parameter path."""

    def updates(self, ctx: UpdateContext, group, params, momenta) -> list[torch.Tensor]:
        return [reference_update(group, ctx.layout(group, p), p, x) for p, x in zip(params, momenta)]


class LocalExecutor:
    """Batched fast path when the group's options say so, else the reference path."""

    reference = ReferenceExecutor()

    def updates(self, ctx: UpdateContext, group, params, momenta) -> list[torch.Tensor]:
        if fastpath.options_of(ctx, group).batched:
            return fastpath.fast_updates(ctx, group, params, momenta)
        return self.reference.updates(ctx, group, params, momenta)
