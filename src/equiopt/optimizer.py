"""The optimizer: one ``torch.optim.Optimizer`` for every role.

One step, per matrix parameter (the per-role differences live in the param_group's
hyperparameters, see :mod:`equiopt.presets`, and in the map functions of
:mod:`equiopt.maps`)::

    M <- beta M + (1 - beta) G                     # EMA momentum, compute dtype
    X <- G.lerp(M, beta) if nesterov else M
    U <- from_logical(map(to_logical(X)))          # per logical matrix: head, expert, fused part
    U <- U * sqrt(max(1, rows/cols))               # scale == "muon" only
    W <- W (1 - lr wd) - lr U                      # decoupled weight decay

Vectors (and any role set to ``"adamw"``) take torch's own AdamW step (the functional
``torch.optim.adam.adam`` with decoupled weight decay), so the ``adamw`` preset equals
``torch.optim.AdamW`` exactly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch
from torch.optim.adam import adam as _torch_adam

try:  # public since torch 2.5; torch 2.4 has it under _tensor; absent without distributed
    from torch.distributed.tensor import DTensor
except ImportError:
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = ()  # isinstance(x, ()) is always False

from . import maps
from .layouts import MATRIX, Layout
from .presets import DEFAULTS, MAP_OPTIONS

__all__ = ["EquiOptimizer", "NonFiniteGradientError"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf (``on_nonfinite="raise"``, the default)."""


def _dtype(name: str | None, where: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"{where}: unknown dtype {name!r}; valid: {sorted(_DTYPES)}")
    return _DTYPES[name]


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


def _finite_flags(grads: list[torch.Tensor]) -> list[bool]:
    """Exact per-tensor "all finite" flags with one sync: a foreach 2-norm screens every
    tensor (NaN/Inf propagate into it); a non-finite norm can also come from squares that
    overflow, so only those tensors are checked elementwise."""
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)]).isfinite().tolist()
    return [ok or bool(torch.isfinite(g).all()) for ok, g in zip(norms, grads)]


def _use_foreach(group: Mapping, params: list[torch.Tensor]) -> bool:
    """Multi-tensor kernels unless the group sets ``foreach=False`` (then the per-parameter
    loop, the same arithmetic) or a parameter is a DTensor."""
    return group["foreach"] is not False and not any(isinstance(p, DTensor) for p in params)


def muon_scale(rows: int, cols: int) -> float:
    """Muon's shape factor sqrt(max(1, rows/cols)) (torch.optim.Muon ``adjust_lr_fn="original"``)."""
    return math.sqrt(max(1.0, rows / cols)) if cols else 1.0


class EquiOptimizer(torch.optim.Optimizer):
    """Symmetry-compatible optimizer: each param_group applies its role's update map.

    Build it with :func:`equiopt.build` (which plans roles, layouts and hyperparameters
    from a model), or directly from param_groups whose keys are those of
    :data:`equiopt.presets.DEFAULTS`.

    Args:
        params: parameters or param_groups (dicts with ``params`` and hyperparameters).
        layouts: ``{parameter: Layout}`` for parameters that are not plain 2-D matrices
            (stacked experts, fused, per-head). A >2-D matrix parameter without one is an error.
        names: ``{parameter: name}`` used in error messages and :meth:`describe`.
        **defaults: hyperparameters for groups that do not set them (see ``DEFAULTS``).
    """

    def __init__(
        self,
        params: Iterable,
        *,
        layouts: Mapping[torch.Tensor, Layout] | None = None,
        names: Mapping[torch.Tensor, str] | None = None,
        **defaults,
    ):
        unknown = set(defaults) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"EquiOptimizer: unknown hyperparameter(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
        super().__init__(params, {**DEFAULTS, **defaults})
        self._layouts = dict(layouts or {})
        self._names = dict(names or {})
        for gi, group in enumerate(self.param_groups):
            unknown = set(group) - set(DEFAULTS) - {"params", "role"}
            if unknown:
                raise ValueError(f"param_groups[{gi}]: unknown hyperparameter(s) {sorted(unknown)}")
            if group["map"] != "adamw":
                maps.get_map(group["map"])  # raises on an unknown map name
            for pi, p in enumerate(group["params"]):
                self._names.setdefault(p, f"param_groups[{gi}].params[{pi}]")
                if torch.is_complex(p):
                    raise ValueError(f"{self._names[p]}: complex parameters are not supported")
                if group["map"] == "adamw":
                    continue
                layout = self._layouts.setdefault(p, MATRIX)
                layout.check(p.shape, self._names[p])

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in DEFAULTS.items():
                group.setdefault(key, value)

    # -- public helpers -----------------------------------------------------------------
    @property
    def nonfinite_skips(self) -> int:
        """Number of parameter steps skipped for non-finite gradients (``on_nonfinite="skip"``)."""
        return sum(int(s.get("nonfinite_skips", 0)) for s in self.state.values())

    def name_of(self, p: torch.Tensor) -> str:
        return self._names.get(p, "<unnamed parameter>")

    def layout_of(self, p: torch.Tensor) -> Layout:
        return self._layouts.get(p, MATRIX)

    # -- the step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = self._params_with_finite_grads()
        for group, params in zip(self.param_groups, stepped):
            if not params:
                continue
            if group["map"] == "adamw":
                self._adamw_step(group, params)
                continue
            momenta = self._momenta(group, params)
            updates = self._updates(group, params, momenta)
            self._apply(group, params, updates)
        return loss

    def _params_with_finite_grads(self) -> list[list[torch.Tensor]]:
        """Per param_group, the parameters that step: those with a gradient, less those whose
        gradient is non-finite when ``on_nonfinite="skip"`` (``"raise"``: an error naming them).
        One device sync for the whole step."""
        per_group = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        flat = [p for ps in per_group for p in ps]
        for p in flat:
            if p.grad.is_sparse:
                raise RuntimeError(f"{self.name_of(p)}: sparse gradients are not supported (use a dense embedding)")
        if not flat:
            return per_group
        if any(isinstance(p.grad, DTensor) for p in flat):  # FSDP2: every rank skips the same
            from .distributed import finite_flags

            finite = finite_flags(flat)
        else:
            finite = _finite_flags([p.grad for p in flat])
        if all(finite):
            return per_group
        ok = {id(p) for p, f in zip(flat, finite) if f}
        bad = [[p for p in ps if id(p) not in ok] for ps in per_group]
        raising = [p for group, b in zip(self.param_groups, bad) if group["on_nonfinite"] == "raise" for p in b]
        if raising:  # before anything changes: no group steps, no skip is counted
            names = ", ".join(self.name_of(p) for p in raising)
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN or Inf) in {names}; pass on_nonfinite='skip' to skip such steps"
            )
        for p in (p for b in bad for p in b):
            state = self.state[p]
            state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
        return [[p for p in ps if id(p) in ok] for ps in per_group]

    def _momenta(self, group, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """EMA momentum in the compute dtype, buf <- buf + (1 - beta) (g - buf); returns the
        maps' inputs: g + beta (buf - g) with Nesterov, else the buffers themselves."""
        grads, bufs = [], []
        for p in params:
            state = self.state[p]
            cdt = compute_dtype(p, group)
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=cdt, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
            grads.append(p.grad.to(cdt))
        beta = group["momentum"]
        if _use_foreach(group, params):
            torch._foreach_lerp_(bufs, grads, 1 - beta)
            return list(torch._foreach_lerp(grads, bufs, beta)) if group["nesterov"] else bufs
        for buf, grad in zip(bufs, grads):
            buf.lerp_(grad, 1 - beta)
        return [g.lerp(b, beta) for g, b in zip(grads, bufs)] if group["nesterov"] else bufs

    def _apply(self, group, params: list[torch.Tensor], updates: list[torch.Tensor]) -> None:
        """p <- p (1 - lr wd) - lr u (decoupled weight decay)."""
        lr, wd = group["lr"], group["weight_decay"]
        updates = [u if u.dtype == p.dtype else u.to(p.dtype) for p, u in zip(params, updates)]
        if _use_foreach(group, params):
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, updates, alpha=-lr)
            return
        for p, u in zip(params, updates):
            if wd != 0:
                p.mul_(1 - lr * wd)
            p.add_(u, alpha=-lr)

    def _layout(self, group, p: torch.Tensor) -> Layout:
        layout = self.layout_of(p)
        return layout if group["per_head"] else layout.without_heads()

    def _updates(self, group, params: list[torch.Tensor], momenta: list[torch.Tensor]) -> list[torch.Tensor]:
        """Update direction of each parameter, in its stored shape (before -lr)."""
        if any(isinstance(p, DTensor) for p in params):
            from .distributed import sharded_updates  # FSDP2 / DTensor parameters

            return sharded_updates(self, group, params, momenta)
        from . import fastpath  # local fast path: shape-stacked batches, fused scales, Gram route

        if fastpath.options_of(self, group).batched:
            return fastpath.fast_updates(self, group, params, momenta)
        return [self._reference_update(group, p, x) for p, x in zip(params, momenta)]

    def _reference_update(self, group, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The simple path every fast path is tested against: view -> map -> scale -> inverse view."""
        layout = self._layout(group, p)
        u = apply_map(group, layout.to_logical(x), p)
        if group["scale"] == "muon":
            u = u * muon_scale(u.shape[-2], u.shape[-1])
        return layout.from_logical(u, p.shape)

    def _adamw_step(self, group, params: list[torch.Tensor]) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            by_dtype[compute_dtype(p, group)].append(p)
        beta1, beta2 = group["betas"]
        for cdt, ps in by_dtype.items():
            for p in ps:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=cdt, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=cdt, memory_format=torch.preserve_format)
            # params in another dtype than their state (bf16/fp16) step on fp32 copies
            work = [p if p.dtype == cdt else p.to(cdt) for p in ps]
            _torch_adam(
                work,
                [p.grad if p.grad.dtype == cdt else p.grad.to(cdt) for p in ps],
                [self.state[p]["exp_avg"] for p in ps],
                [self.state[p]["exp_avg_sq"] for p in ps],
                [],
                [self.state[p]["step"] for p in ps],
                foreach=group["foreach"],
                amsgrad=False,
                has_complex=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["adam_eps"],
                maximize=False,
                capturable=False,
                differentiable=False,
                fused=None,
                grad_scale=None,
                found_inf=None,
                decoupled_weight_decay=True,
            )
            for p, w in zip(ps, work):
                if w is not p:
                    p.copy_(w)
