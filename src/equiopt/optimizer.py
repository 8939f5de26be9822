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
``torch.optim.AdamW`` exactly: ``AdamW(fused=True)`` by default, torch's multi-tensor or
per-tensor AdamW with ``foreach=True`` / ``False``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch

from . import maps, sharding
from .execution import UpdateContext
from .functional import (  # apply_map, map_kwargs, muon_scale, polar_dtype: re-exported for existing callers
    apply_map,
    compute_dtype,
    map_kwargs,
    muon_scale,
    polar_dtype,
    reference_update,
    same_dense_layout,
    torch_adamw,
    use_foreach,
    use_fused_adamw,
)
from .layouts import MATRIX, Layout
from .presets import DEFAULTS, validate_spec

__all__ = [
    "EquiOptimizer",
    "NonFiniteGradientError",
    "apply_map",
    "compute_dtype",
    "map_kwargs",
    "muon_scale",
    "polar_dtype",
]


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf (``on_nonfinite="raise"``, the default)."""


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
        executor=None,
        **defaults,
    ):
        unknown = set(defaults) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"EquiOptimizer: unknown hyperparameter(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
        # set before super().__init__: it calls add_param_group, which checks against them
        self.context = UpdateContext(dict(layouts or {}), dict(names or {}))
        #: the execution path of the matrix updates (:mod:`equiopt.execution`); the default
        #: runs one process, DDP and FSDP2 (DTensor) groups alike
        self.executor = executor if executor is not None else sharding.ShardedExecutor()
        super().__init__(params, {**DEFAULTS, **defaults})

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, refusing what would only fail at ``step()`` or run wrong:
        unknown hyperparameters, a value out of its range (:func:`~equiopt.presets.validate_spec`),
        an unknown map, a parameter whose shape does not fit its layout."""
        gi = len(self.param_groups)
        unknown = set(param_group) - set(DEFAULTS) - {"params", "role"}
        if unknown:
            raise ValueError(
                f"param_groups[{gi}]: unknown hyperparameter(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}"
            )
        super().add_param_group(param_group)  # fills the defaults and normalizes "params"
        try:
            self._check_group(self.param_groups[-1], gi)
        except ValueError:
            self.param_groups.pop()  # refused: not half-added
            raise

    def _check_group(self, group: dict, gi: int) -> None:
        """:meth:`add_param_group`'s checks of the filled group ``gi``."""
        validate_spec(group, f"param_groups[{gi}]")
        if group["map"] != "adamw":
            maps.get_map(group["map"])  # raises on an unknown map name
        names = self.context.names
        for pi, p in enumerate(group["params"]):
            names.setdefault(p, f"param_groups[{gi}].params[{pi}]")
            if torch.is_complex(p):
                raise ValueError(f"{names[p]}: complex parameters are not supported")
            if group["map"] != "adamw":
                self.context.layouts.setdefault(p, MATRIX).check(p.shape, names[p])

    def __getstate__(self):
        # torch's Optimizer pickles only defaults, state and param_groups; the layouts, names
        # and the execution path are part of what this optimizer computes
        return {**super().__getstate__(), "context": self.context, "executor": self.executor}

    def __setstate__(self, state):
        # unpickling brings context and executor; load_state_dict (which also lands here)
        # brings only state and param_groups: keep this optimizer's own then
        state = dict(state)
        self.context = state.pop("context", None) or getattr(self, "context", None) or UpdateContext()
        self.executor = state.pop("executor", None) or getattr(self, "executor", None) or sharding.ShardedExecutor()
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in DEFAULTS.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``, refusing a state saved by another configuration: a
        group whose role or map differs, or a parameter whose state has another shape."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved, self.param_groups)
        ):
            return super().load_state_dict(state_dict)  # torch's own error for other group sizes
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, saved)):
            where = f"param_groups[{gi}]" + (f" (role {mine['role']!r})" if "role" in mine else "")
            for key in ("role", "map"):
                if key in theirs and theirs[key] != mine.get(key, theirs[key]):
                    raise ValueError(
                        f"load_state_dict: {where}: saved {key} {theirs[key]!r}, this optimizer has "
                        f"{mine.get(key)!r}; build the optimizer with the preset/rules that saved it"
                    )
            for idx, p in zip(theirs["params"], mine["params"]):
                for key, value in state_dict["state"].get(idx, {}).items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                        raise ValueError(
                            f"load_state_dict: {self.name_of(p)}: saved {key} has shape "
                            f"{tuple(value.shape)}, the parameter {tuple(p.shape)}"
                        )
        super().load_state_dict(state_dict)

    # -- public helpers -----------------------------------------------------------------
    @property
    def nonfinite_skips(self) -> int:
        """Number of parameter steps skipped for non-finite gradients (``on_nonfinite="skip"``)."""
        return sum(int(s.get("nonfinite_skips", 0)) for s in self.state.values())

    @property
    def _layouts(self) -> dict:  # read-only view kept for existing callers
        return self.context.layouts

    def name_of(self, p: torch.Tensor) -> str:
        return self.context.name_of(p)

    def layout_of(self, p: torch.Tensor) -> Layout:
        return self.context.layouts.get(p, MATRIX)

    def _layout(self, group, p: torch.Tensor) -> Layout:
        return self.context.layout(group, p)

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
        finite = sharding.gradient_flags(flat)  # FSDP2: every rank skips the same
        if all(finite):
            return per_group
        ok = {id(p) for p, f in zip(flat, finite) if f}
        bad = [[p for p in ps if id(p) not in ok] for ps in per_group]
        raising = [p for group, b in zip(self.param_groups, bad) if group["on_nonfinite"] == "raise" for p in b]
        if raising:  # before anything changes: no group steps, no skip is counted
            names = ", ".join(self.name_of(p) for p in raising)
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN, Inf, or a 2-norm that overflows float32) in {names}; "
                "pass on_nonfinite='skip' to skip such steps"
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
            assert p.grad is not None  # step() passes the parameters that have a gradient
            grads.append(p.grad.to(cdt))
        beta = group["momentum"]
        if use_foreach(group, params):
            torch._foreach_lerp_(bufs, grads, 1 - beta)
            return list(torch._foreach_lerp(grads, bufs, beta)) if group["nesterov"] else bufs
        for buf, grad in zip(bufs, grads):
            buf.lerp_(grad, 1 - beta)
        return [g.lerp(b, beta) for g, b in zip(grads, bufs)] if group["nesterov"] else bufs

    def _apply(self, group, params: list[torch.Tensor], updates: list[torch.Tensor]) -> None:
        """p <- p (1 - lr wd) - lr u (decoupled weight decay)."""
        lr, wd = group["lr"], group["weight_decay"]
        updates = [u if u.dtype == p.dtype else u.to(p.dtype) for p, u in zip(params, updates)]
        if use_foreach(group, params):
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, updates, alpha=-lr)
            return
        for p, u in zip(params, updates):
            if wd != 0:
                p.mul_(1 - lr * wd)
            p.add_(u, alpha=-lr)

    def _updates(self, group, params: list[torch.Tensor], momenta: list[torch.Tensor]) -> list[torch.Tensor]:
        """Update direction of each parameter, in its stored shape (before -lr)."""
        return self.executor.updates(self.context, group, params, momenta)

    def _reference_update(self, group, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The simple path every fast path is tested against: view -> map -> scale -> inverse view."""
        return reference_update(group, self.context.layout(group, p), p, x)

    def _adamw_step(self, group, params: list[torch.Tensor]) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            by_dtype[compute_dtype(p, group)].append(p)
        for cdt, ps in by_dtype.items():
            for p in ps:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=cdt, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=cdt, memory_format=torch.preserve_format)
            # params in another dtype than their state (bf16/fp16) step on fp32 copies
            work = [p if p.dtype == cdt else p.to(cdt) for p in ps]
            grads: list[torch.Tensor] = []
            for p in ps:
                assert p.grad is not None  # step() passes the parameters that have a gradient
                grads.append(p.grad if p.grad.dtype == cdt else p.grad.to(cdt))
            fused = use_fused_adamw(group, ps) and all(
                same_dense_layout(w, g, self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"])
                for p, w, g in zip(ps, work, grads)
            )
            torch_adamw(
                work,
                grads,
                [self.state[p] for p in ps],
                group,
                fused=fused,
                foreach=group["foreach"],
                eps_key="adam_eps",
            )
            for p, w in zip(ps, work):
                if w is not p:
                    p.copy_(w)
