"""equiopt: symmetry-compatible optimizers for language models.

Each weight block gets the update map its symmetry group calls for::

    import equiopt
    plan = equiopt.plan(model)                  # role + layout per parameter
    print(plan)
    opt = equiopt.build(model, preset="paper")  # one torch.optim.Optimizer
"""

from __future__ import annotations

from torch import nn

from . import audit, ddc, diagnostics  # equiopt.audit(model, batch) calls audit.audit
from .layouts import Layout, parse_layout
from .optimizer import EquiOptimizer, NonFiniteGradientError
from .planner import Plan, PlanEntry, PlanError, detect_roles, plan
from .presets import DDC_PRESETS, DEFAULTS, PRESETS, ROLES, resolve

__all__ = [
    "DDC_PRESETS",
    "DEFAULTS",
    "PRESETS",
    "ROLES",
    "EquiOptimizer",
    "Layout",
    "NonFiniteGradientError",
    "Plan",
    "PlanEntry",
    "PlanError",
    "audit",
    "build",
    "diagnostics",
    "detect_roles",
    "parse_layout",
    "plan",
    "resolve",
]

__version__ = "0.1.0"


def build(model: nn.Module | Plan, preset: str | None = None, **kwargs) -> EquiOptimizer | ddc.DDCOptimizer:
    """One optimizer for the whole model.

    ``model`` may be an ``nn.Module`` (planned with :func:`plan` and ``kwargs``: ``rules``,
    ``lr``, ``lr_scale``, ``roles``, ``layouts`` and hyperparameter overrides) or a
    :class:`Plan` already made (then ``preset`` and ``kwargs`` must be left out).
    ``preset`` defaults to ``"paper"``; ``"ddc_adam"`` / ``"ddc_muon"`` build the
    Dead-Direction Conditioner (:func:`equiopt.ddc.ddc_optimizer`, ``kwargs`` go there).
    """
    if preset in DDC_PRESETS:  # the Dead-Direction Conditioner: its own optimizer class
        return ddc.ddc_optimizer(model, base=DDC_PRESETS[preset], **kwargs)
    if isinstance(model, Plan):
        if preset is not None or kwargs:
            given = sorted(kwargs) + (["preset"] if preset is not None else [])
            raise TypeError(f"build(plan): options {given} belong to equiopt.plan(), not to build(plan)")
        the_plan = model
    else:
        the_plan = plan(model, preset or "paper", **kwargs)
    return EquiOptimizer(the_plan.param_groups(), layouts=the_plan.layouts(), names=the_plan.names())
