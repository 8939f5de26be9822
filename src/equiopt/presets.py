"""Preset tables: role -> update map + hyperparameters. The only home of defaults.

A *spec* is the flat dict of hyperparameters one param_group carries (see ``DEFAULTS``
for every key). A preset gives a spec per role; :func:`resolve` applies a user's rules
and learning-rate changes on top.

Learning rates of the matrix maps are step lengths (per row for the row-wise maps, per
matrix for the polar maps), not AdamW-like rates: each role has its own. The values here
were tuned on the CPU-scale models of the harness (``equiopt sweep``); re-tune them at
other scales.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import cast

import torch

from .maps import MAP_SPECS
from .polar import POLAR_METHODS
from .roles import MATRIX_ROLES, ROLE_TABLE, ROLES

__all__ = [
    "ROLES",
    "MATRIX_ROLES",
    "DEFAULTS",
    "PRESETS",
    "MAP_OPTIONS",
    "resolve",
]

# roles whose map sees the neuron axis as columns: the map is applied to M^T
COLUMN_AWARE_ROLES = tuple(r.name for r in ROLE_TABLE.values() if r.column_aware)

# Every hyperparameter a param_group carries, with its default (reference conventions of
# the design note, section 3).
DEFAULTS: dict = {
    "map": "adamw",  # "adamw" or a name in equiopt.maps.MAPS
    "lr": 1e-3,
    "weight_decay": 0.0,  # decoupled: p <- p (1 - lr wd) before the update
    "momentum": 0.95,  # EMA: M <- beta M + (1 - beta) G
    "nesterov": False,  # use G.lerp(M, beta) instead of M (Muon-style)
    "column_aware": False,  # apply the map to M^T (neuron axis = columns)
    "per_head": False,  # attention: one logical matrix per head
    "scale": "none",  # "none" | "muon": times sqrt(max(1, rows/cols)) per logical matrix
    "alpha": 1.0,  # nuclear-norm exponent of the spectral / hybrid maps
    "order": "row_then_polar",  # hybrid: "row_then_polar" | "polar_then_row"
    "center": None,  # center input and output on the row shift: None = iff the block's group has it
    "eps": 1e-8,  # row/column-norm epsilon
    "polar_method": "polar_express",  # "newton_schulz" | "polar_express" | "svd" | "gram_eigh"
    "polar_steps": None,  # None = the method's default
    "polar_dtype": None,  # None = float32 on CPU (float64 for float64 params), bfloat16 on CUDA
    "compute_dtype": None,  # momentum/map dtype; None = float32, float64 for float64 params
    "betas": (0.9, 0.95),  # AdamW
    "adam_eps": 1e-8,  # AdamW
    "foreach": None,  # AdamW: torch's foreach (multi-tensor) kernels; None = torch's default
    "fused": None,  # AdamW: torch's fused kernel; None = on unless foreach is set (functional.use_fused_adamw)
    "on_nonfinite": "raise",  # "raise" | "skip" (skip the parameter's step and count it)
    "batched": True,  # matrix maps: shape-stacked fast path (False: the per-parameter reference path)
}

#: the dtype names ``compute_dtype`` / ``polar_dtype`` take
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}

# group key -> keyword of the map function, per map (from the maps' registry)
MAP_OPTIONS: dict[str, dict[str, str]] = {n: dict(m.options) for n, m in MAP_SPECS.items() if m.fn is not None}
MAP_NAMES = tuple(MAP_SPECS)

# -- building blocks of the presets ---------------------------------------------------
ADAMW_LR = 3e-3
MUON_LR = 2e-2
MATRIX_WD = 1e-3  # design note: 1e-3 for matrices, 0 for embedding, head, router
ADAMW_MATRIX_WD = 0.1  # common AdamW practice on 2-D weights

ADAMW_VECTOR = {"map": "adamw", "lr": ADAMW_LR, "weight_decay": 0.0}
ADAMW_MATRIX = {"map": "adamw", "lr": ADAMW_LR, "weight_decay": ADAMW_MATRIX_WD}
MUON = {  # torch.optim.Muon conventions: Nesterov, Newton-Schulz, sqrt(max(1, A/B))
    "map": "polar",
    "lr": MUON_LR,
    "weight_decay": MATRIX_WD,
    "nesterov": True,
    "polar_method": "newton_schulz",
    "scale": "muon",
}

_ADAMW = {r: dict(ADAMW_VECTOR if r == "vector" else ADAMW_MATRIX) for r in ROLES}

_MUON = {
    **_ADAMW,
    **{r: dict(MUON) for r in ("attention", "mlp_in", "mlp_out", "expert_in", "expert_out", "matrix")},
}

# Per-role step lengths, tuned on the harness's tiny Qwen3/OLMoE/Gemma-3 models (d=64,
# 150 steps of byte-level text; see README "Presets"): validation loss is flat within
# ~0.01 nats over 3e-4..1e-2 for the hybrid MLP maps (alpha = 1 makes the step scale with
# ||rn(M)||_*, and the RMSNorm'd SwiGLU is insensitive to the weight growth it causes), so
# the smallest flat value is kept; embedding and head prefer larger steps than the
# paper's 20-layer values (5e-1 and 5e-3).
_PAPER_MLP = {"map": "hybrid", "order": "row_then_polar", "lr": 1e-3, "weight_decay": MATRIX_WD}
_PAPER = {
    "embedding": {"map": "row_norm", "lr": 2e-1, "weight_decay": 0.0},
    "lm_head": {"map": "centered_row_norm", "lr": 2e-2, "weight_decay": 0.0},
    "tied_embedding": {"map": "row_norm", "lr": 2e-2, "weight_decay": 0.0},
    "attention": {**MUON, "polar_method": "polar_express", "per_head": True},
    "mlp_in": dict(_PAPER_MLP),
    "mlp_out": dict(_PAPER_MLP),
    "router": {"map": "centered_row_norm", "lr": 1e-2, "weight_decay": 0.0},
    "expert_in": dict(_PAPER_MLP),
    "expert_out": dict(_PAPER_MLP),
    "matrix": {**MUON, "polar_method": "polar_express"},
    "vector": dict(ADAMW_VECTOR),
}

PRESETS: dict[str, dict[str, dict]] = {"adamw": _ADAMW, "muon": _MUON, "paper": _PAPER}
#: presets of ``equiopt.build`` served by the Dead-Direction Conditioner (its base rule), not plans
DDC_PRESETS = {"ddc_adam": "adam", "ddc_muon": "muon"}


def _check_keys(where: str, spec: Mapping) -> None:
    unknown = set(spec) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"{where}: unknown hyperparameter(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    if "map" in spec and spec["map"] not in MAP_NAMES:
        raise ValueError(f"{where}: unknown map {spec['map']!r}; valid: {list(MAP_NAMES)}")


def _check_role(where: str, role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; valid roles: {list(ROLES)}")


def resolve(
    preset: str = "paper",
    rules: Mapping[str, str | Mapping] | None = None,
    lr: Mapping[str, float] | float | None = None,
    lr_scale: Mapping[str, float] | float | None = None,
    **overrides,
) -> dict[str, dict]:
    """Full spec (every key of ``DEFAULTS``) for every role.

    Args:
        preset: ``"paper"``, ``"muon"`` or ``"adamw"``.
        rules: ``{role: map_name}`` or ``{role: {hyperparameter: value}}``. Choosing
            ``"adamw"`` for a matrix role takes that role's AdamW spec from the ``adamw``
            preset (AdamW needs AdamW learning rates); choosing another map keeps the role's
            other hyperparameters.
        lr: absolute learning rate per role (``{role: lr}``) or one for every role.
        lr_scale: multiplier of the preset learning rates, per role or global.
        overrides: hyperparameters applied to every role (e.g. ``on_nonfinite="skip"``).
    """
    if preset not in PRESETS:
        hint = (
            f"; {preset!r} is a preset of equiopt.build (the Dead-Direction Conditioner), not of a plan"
            if preset in DDC_PRESETS
            else f"; equiopt.build also takes {sorted(DDC_PRESETS)}"
        )
        raise ValueError(f"preset: unknown preset {preset!r}; valid: {sorted(PRESETS)}{hint}")
    _check_keys("overrides", overrides)
    specs = {role: {**DEFAULTS, **PRESETS[preset][role]} for role in ROLES}
    if "column_aware" not in overrides:
        for role in COLUMN_AWARE_ROLES:
            specs[role]["column_aware"] = True
    for role, rule in (rules or {}).items():
        _check_role("rules", role)
        if isinstance(rule, str):
            rule = {"map": rule}
        _check_keys(f"rules[{role!r}]", rule)
        if rule.get("map") == "adamw" and specs[role]["map"] != "adamw":
            specs[role] = {**DEFAULTS, **PRESETS["adamw"][role], "column_aware": specs[role]["column_aware"]}
        specs[role].update(rule)
    for role in ROLES:
        specs[role].update(overrides)
    for name, table in (("lr", lr), ("lr_scale", lr_scale)):
        if table is None:
            continue
        if not isinstance(table, Mapping):
            if not _finite(table) or table < 0:
                raise ValueError(f"{name}: expected a finite number >= 0 or a {{role: value}} dict, got {table!r}")
            table = {role: table for role in ROLES}
        for role, value in table.items():
            _check_role(name, role)
            if not _finite(value) or value < 0:
                raise ValueError(f"{name}[{role!r}]: expected a finite non-negative number, got {value!r}")
            specs[role]["lr"] = float(value) if name == "lr" else specs[role]["lr"] * float(value)
    for role, spec in specs.items():
        validate_spec(spec, f"role {role!r}")
    return specs


def validate_spec(spec: Mapping, where: str) -> None:
    """Every hyperparameter of ``spec`` (all keys of :data:`DEFAULTS`) in its range and type;
    a ``ValueError`` starting with ``where`` and naming the first bad one."""
    if spec["scale"] not in ("none", "muon"):
        raise ValueError(f"{where}: scale must be 'none' or 'muon', got {spec['scale']!r}")
    if spec["order"] not in ("row_then_polar", "polar_then_row"):
        raise ValueError(f"{where}: order must be 'row_then_polar' or 'polar_then_row', got {spec['order']!r}")
    if spec["center"] not in (None, True, False):
        raise ValueError(
            f"{where}: center must be None (follow the block's group), True or False, got {spec['center']!r}"
        )
    if spec["fused"] not in (None, True, False) or (spec["fused"] and spec["foreach"]):
        raise ValueError(
            f"{where}: fused must be None (fused AdamW unless foreach is set), True or False, and not True "
            f"with foreach=True; got fused={spec['fused']!r}, foreach={spec['foreach']!r}"
        )
    check_common(where, {k: spec[k] for k in ("lr", "weight_decay", "eps", "adam_eps")}, spec)
    if not _finite(spec["alpha"]):
        raise ValueError(f"{where}: alpha must be a finite number, got {spec['alpha']!r}")
    steps = spec["polar_steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"{where}: polar_steps must be None (the method's default) or an int >= 0, got {steps!r}")
    for key in ("nesterov", "column_aware", "per_head", "batched"):
        if not isinstance(spec[key], bool):
            raise ValueError(f"{where}: {key} must be True or False, got {spec[key]!r}")
    if spec["polar_method"] not in POLAR_METHODS:
        raise ValueError(f"{where}: polar_method must be one of {POLAR_METHODS}, got {spec['polar_method']!r}")
    for key in ("compute_dtype", "polar_dtype"):
        if spec[key] is not None and spec[key] not in DTYPES:
            raise ValueError(f"{where}: {key} must be None or one of {sorted(DTYPES)}, got {spec[key]!r}")


def check_common(where: str, numbers: Mapping[str, object], spec: Mapping) -> None:
    """The checks every optimizer of equiopt makes (the presets' ``validate_spec``, DDC's
    options and groups), a ``ValueError`` starting with ``where``: ``numbers`` (rates, decays,
    eps; ``None`` = a default) finite and >= 0; ``spec``'s ``on_nonfinite`` "raise" or "skip",
    ``momentum`` in [0, 1) and ``betas`` two numbers in [0, 1)."""
    if spec["on_nonfinite"] not in ("raise", "skip"):
        raise ValueError(f"{where}: on_nonfinite must be 'raise' or 'skip', got {spec['on_nonfinite']!r}")
    for key, value in numbers.items():
        if value is not None and (not _finite(value) or cast(float, value) < 0):
            raise ValueError(f"{where}: {key} must be a finite number >= 0, got {value!r}")
    if not (_finite(spec["momentum"]) and 0.0 <= spec["momentum"] < 1.0):
        raise ValueError(f"{where}: momentum must be in [0, 1), got {spec['momentum']!r}")
    betas = spec["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}")


def _finite(x: object) -> bool:
    """A finite real number (not a bool), or a one-element tensor holding one (torch's
    optimizers take a tensor ``lr``)."""
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.is_complex() and bool(torch.isfinite(x))
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
