"""Per-param_group pieces of the step, as pure functions of a group's hyperparameters and
tensors: compute dtypes, the map call (with centering and the column-aware transpose), the
Muon shape factor, the finite screen, and the reference update every execution path is
tested against. The optimizer, the fast path and the sharded paths all use these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch.optim.adam import adam as _torch_adam

from . import maps
from .presets import DTYPES, MAP_OPTIONS

if TYPE_CHECKING:  # the type checker sees the class; at run time it may be missing (below)
    from torch.distributed.tensor import DTensor
else:
    try:  # public since torch 2.5; torch 2.4 has it under _tensor; absent without distributed
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - depends on the torch build
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            DTensor = ()  # isinstance(x, ()) is always False

__all__ = [
    "DTensor",
    "apply_map",
    "compute_dtype",
    "finite_flags",
    "map_kwargs",
    "muon_scale",
    "polar_dtype",
    "reference_update",
    "use_foreach",
    "use_fused_adamw",
    "same_dense_layout",
]


def _dtype(name: str | None, where: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"{where}: unknown dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def compute_dtype(p: torch.Tensor, group: Mapping) -> torch.dtype:
    """Dtype of the momentum and the maps: float64 for float64 parameters, else float32
    (bf16 matmuls are ~100x slower on CPU, and fp32 state avoids bf16 drift on GPU)."""
    chosen = _dtype(group["compute_dtype"], "compute_dtype")
    if chosen is not None:
        return chosen
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def polar_dtype(p: torch.Tensor, group: Mapping) -> torch.dtype | None:
    """Dtype of the polar iterations: bf16 on CUDA (tensor cores), the compute dtype on CPU."""
    chosen = _dtype(group["polar_dtype"], "polar_dtype")
    if chosen is not None:
        return chosen
    return torch.bfloat16 if p.is_cuda else None


def map_kwargs(group: Mapping, p: torch.Tensor) -> dict:
    """Keyword arguments of the group's map function, from the group's hyperparameters."""
    kwargs = {}
    for key, kw in MAP_OPTIONS[group["map"]].items():
        value = polar_dtype(p, group) if key == "polar_dtype" else group[key]
        if value is not None:
            kwargs[kw] = value
    return kwargs


def apply_map(group: Mapping, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The group's map on logical matrices ``x`` ``[B, m, n]`` (column-aware: on ``x^T``;
    on a shift-symmetric block (``center``) as ``C(map(C(x)))``, see :func:`maps.map_spec`)."""
    fn = maps.get_map(group["map"])
    kwargs = map_kwargs(group, p)
    y = x.mT if group["column_aware"] else x
    if maps.needs_centering(group["map"], group.get("center")):
        u = maps.center_rows(fn(maps.center_rows(y), **kwargs))
    else:
        u = fn(y, **kwargs)
    return u.mT if group["column_aware"] else u


def finite_flags(grads: list[torch.Tensor]) -> list[bool]:
    """Per-tensor "usable" flags with one sync: a gradient passes when its float32 2-norm is
    finite. NaN and Inf fail, and so does a finite gradient whose squares overflow (entries
    beyond ~1.8e19): AdamW's second moment would become inf and freeze the parameter, and
    the matrix maps would return a silent zero; such steps are non-finite work too."""
    return torch.stack([n.float() for n in torch._foreach_norm(grads)]).isfinite().tolist() if grads else []


def use_foreach(group: Mapping, params: list[torch.Tensor]) -> bool:
    """Multi-tensor kernels unless the group sets ``foreach=False`` (then the per-parameter
    loop, the same arithmetic) or a parameter is a DTensor."""
    return group["foreach"] is not False and not any(isinstance(p, DTensor) for p in params)


def same_dense_layout(*ts: torch.Tensor) -> bool:
    """Whether ``ts`` share dtype, shape and strides and are dense (no gaps between elements,
    any dimension order): the condition for torch's fused Adam kernels, which walk raw memory
    (checked on the CPU: a parameter whose gradient has other strides, or a row slice of a
    stack, gets silently wrong elements)."""
    t0 = ts[0]
    if any(t.layout != torch.strided for t in ts):  # sparse: no strides, no fused kernel
        return False
    if any(t.dtype != t0.dtype or t.shape != t0.shape or t.stride() != t0.stride() for t in ts):
        return False
    expected = 1
    for d in sorted(range(t0.ndim), key=t0.stride):
        if t0.shape[d] != 1 and t0.stride(d) != expected:
            return False
        expected *= t0.shape[d]
    return True


def use_fused_adamw(group: Mapping, params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW kernel for an ``adamw`` group: as ``fused`` says when set; by
    default (``None``) unless the group sets ``foreach`` or a parameter is a DTensor or not on
    the CPU / a CUDA device. One kernel per tensor: on the 2-core CPU of results/ddc_bench
    3-5x faster than the multi-tensor kernels, which make a pass per operation (and torch's
    own default on the CPU is the per-tensor loop). The caller also checks each tensor's
    layout against its gradient's and state's (:func:`same_dense_layout`)."""
    if group["fused"] is not None:
        return bool(group["fused"])
    return group["foreach"] is None and all(
        p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for p in params
    )


def torch_adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    group: Mapping,
    *,
    fused: bool,
    foreach: bool | None = None,
    eps_key: str = "eps",
) -> None:
    """One step of ``torch.optim.AdamW`` on ``params`` with ``grads`` and each parameter's state
    (``exp_avg``, ``exp_avg_sq``, ``step``), through torch's own functional ``adam``, so the
    arithmetic is torch's bit for bit: the fused kernel when ``fused`` (the caller checked
    :func:`same_dense_layout`; a step count is moved, in the state, to its parameter's device,
    where the kernel reads and increments it, as ``AdamW(fused=True)`` keeps it), else the
    multi-tensor (``foreach``) or per-tensor loop. ``group`` gives ``lr``, ``betas``,
    ``weight_decay`` and the epsilon under ``eps_key`` (the presets' AdamW roles: ``adam_eps``)."""
    if fused:
        for p, st in zip(params, states):
            if st["step"].device != p.device:
                st["step"] = st["step"].to(p.device)
    beta1, beta2 = group["betas"]
    _torch_adam(
        params,
        grads,
        [st["exp_avg"] for st in states],
        [st["exp_avg_sq"] for st in states],
        [],
        [st["step"] for st in states],
        foreach=None if fused else foreach,
        amsgrad=False,
        has_complex=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group[eps_key],
        maximize=False,
        capturable=False,
        differentiable=False,
        fused=fused or None,
        grad_scale=None,
        found_inf=None,
        decoupled_weight_decay=True,
    )


def muon_scale(rows: int, cols: int) -> float:
    """Muon's shape factor sqrt(max(1, rows/cols)) (torch.optim.Muon ``adjust_lr_fn="original"``)."""
    return math.sqrt(max(1.0, rows / cols)) if cols else 1.0


def reference_update(group: Mapping, layout, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The simple path every fast path is tested against: view -> map -> scale -> inverse view.
    ``layout``: the parameter's layout as the group sees it (heads dropped unless per_head)."""
    u = apply_map(group, layout.to_logical(x), p)
    if group["scale"] == "muon":
        u = u * muon_scale(u.shape[-2], u.shape[-1])
    return layout.from_logical(u, p.shape)
