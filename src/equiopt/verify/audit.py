"""The audit driver: measure every check at the weights as given and at a generic point,
give verdicts, and name what breaks a broken symmetry by ablation."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..groups import Factor, Group
from ..layouts import Layout
from ..maps import map_spec
from ..planner import plan as make_plan
from .actions import Check
from .checks import PAIRINGS, CheckBuilder
from .report import INFORMATIONAL_KINDS, SHIFT_KINDS, STRUCTURE_KINDS, AuditError, AuditReport, CheckResult
from .runner import WorkModel, default_forward
from .structure import Structure

__all__ = ["audit", "relies_on", "Auditor"]


def relies_on(
    spec: Mapping,
    factor: Factor | None,
    kind: str | None = None,
    group: Group | None = None,
    layout: Layout | None = None,
) -> str:
    """Why the map of ``spec`` relies on the symmetry ``factor`` (acting on one axis of the
    parameter's logical matrices) being *exact*, or ``""`` when it does not.

    A broken symmetry harms a map in two ways only:

    * ``"projects out"``: the map removes the factor's orbit direction from the update (a
      centering map and the row shift): when the loss is not flat along it, the update loses
      a real descent direction;
    * ``"structure"``: the check (``kind`` in :data:`STRUCTURE_KINDS`) witnesses structure the
      planner read -- rows are tokens / hidden neurons / experts, ``v`` / ``o`` split into
      heads -- and holds in every network whose structure is read right; the map *uses* that
      structure: it is equivariant under the factor but not under the orthogonal group of the
      whole axis (a row-wise map, AdamW: the rows are its units), or it acts per head
      (``per_head``, the layout splits the axis) or per expert (``factor`` None: every map is
      batched over stacked experts). Broken, it says the structure was read wrong.

    Anything else is informational: a map equivariant under a group *larger* than the
    network's (a per-head polar map under RoPE, any map under the residual rotation that norm
    gains break) is still compatible, so no plan depends on it. ``group``: the block's group
    (:meth:`equiopt.Plan.group_of`); a factor it does not claim (the shift of a sigmoid
    router) is never relied on. ``kind`` None: any check kind."""
    if kind in INFORMATIONAL_KINDS:
        return ""
    if factor is None:
        return "structure" if kind in (None, *STRUCTURE_KINDS) else ""
    if group is not None and not any(factor <= f for f in group.factors):
        return ""
    m = map_spec(spec["map"], center=spec.get("center"), column_aware=spec.get("column_aware", False))
    if factor.kind == "shift":
        projected = any(factor <= f for f in m.projects_out)
        return "projects out" if projected and kind in (None, *SHIFT_KINDS) else ""
    if kind is not None and kind not in STRUCTURE_KINDS:
        return ""
    if not any(factor <= f for f in m.group.factors):
        return ""  # the map is not equivariant under it: nothing of it is used
    orth = Factor("orth", factor.axis)
    if factor.kind == "perm" and not any(orth <= f for f in m.group.factors):
        return "structure"  # the axis' basis is the map's units (row-wise maps, AdamW)
    split = layout is not None and layout.heads > 1 and spec.get("per_head", False)
    if (
        factor.kind in ("orth", "rope_rotation")
        and split
        and layout is not None
        and (layout.head_axis == "out") == (factor.axis == "rows")
    ):
        return "structure"  # one map per head: the head split is used
    return ""


class Auditor:
    """Runs the checks of one plan on a work copy of the model (see :func:`audit`)."""

    def __init__(
        self, work: WorkModel, plan, seed: int, tol: float, approx_tol: float, rope_pairing: str, generic_scale: float
    ):
        self.work, self.plan, self.seed = work, plan, seed
        self.tol, self.approx_tol = tol, approx_tol
        self.rope_pairing, self.generic_scale = rope_pairing, generic_scale
        for e in plan.entries:
            if e.name not in work.params or tuple(work.params[e.name].shape) != tuple(e.shape):
                got = tuple(work.params[e.name].shape) if e.name in work.params else "missing"
                raise AuditError(
                    f"{e.name}: planned as {tuple(e.shape)} but the model has {got} "
                    "(was the plan made for another model?)"
                )
        self.structure = Structure(plan, work)
        self.checks = CheckBuilder(self.structure, rope_pairing).checks()

    def assumed_by(self, check: Check) -> tuple[list[str], str]:
        """``"name: role/map"`` of the acted parameters whose planned map (the entry's own spec,
        :meth:`equiopt.Plan.spec`) relies on the check's symmetry (:func:`relies_on`, against
        the entry's block group :meth:`equiopt.Plan.group_of`), and why."""
        out, why = {}, ""
        for name, factor in check.acts:
            e = self.plan.entry(name)
            if e.role == "vector":
                continue
            spec = self.plan.spec(e)
            r = relies_on(spec, factor, check.kind, self.plan.group_of(name), e.layout)
            if r:
                out[name] = f"{name}: {e.role}/{self.plan.map_label(e.role, spec)}"
                why = why or r
        return list(out.values()), why

    # -- measuring -----------------------------------------------------------------------
    def _grad_names(self, check: Check) -> list[str]:
        return [n for n in check.params if n in self.work.params and self.work.params[n].requires_grad]

    def measure(self, check: Check, gen_seed: int, base=None) -> tuple[float, float, float, list[str]]:
        """(relative logits error, |delta loss|, relative gradient error, notes)."""
        names = self._grad_names(check)
        if base is None:
            base = self.work.run(self.work.x, self.work.labels, names)
        if check.build is None:  # untested checks are reported, never measured
            raise AuditError(f"{check.kind} on {check.scope}: no action to measure ({check.untested})")
        with torch.no_grad():
            action = check.build(torch.Generator().manual_seed(gen_seed))
        return (*self.work.measure(action, names, base), action.notes)

    @staticmethod
    def error(m, loss: float) -> float:
        logits_err, loss_err, grad_err, _ = m
        return max(logits_err, loss_err / max(1.0, abs(loss)), 0.0 if grad_err != grad_err else grad_err)

    def _restores(self, check: Check, gen_seed: int, loss: float, names: list[str]) -> float | None:
        """The check's error with ``names`` neutralised, when that is within ``approx_tol``."""
        restore = self.work.neutralise(names)
        try:
            err = self.error(self.measure(check, gen_seed), loss)
        finally:
            restore()
        return err if err <= self.approx_tol else None

    def _softcaps(self) -> list[tuple[str, list[str]]]:
        cfg = self.work.config
        if cfg is None:
            return []
        return [
            (f"config.{k}={v:g}", [f"config.{k}"])
            for k, v in sorted(vars(cfg).items())
            if "softcap" in k.lower() and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]

    def explain(self, check: Check, gen_seed: int, loss: float) -> str:
        """Name the suspects whose neutralisation brings the error down to ``approx_tol``.

        Order: each soft-capping entry of the config alone; each vector suspect alone (when
        there are at most 8); all vector suspects together; everything together."""
        configs, vectors = self._softcaps(), check.suspects()
        found = []
        for label, names in configs + (vectors if len(vectors) <= 8 else []):
            err = self._restores(check, gen_seed, loss, names)
            if err is not None:
                found.append(f"{label} (error {err:.1e} without it)")
        groups = ([vectors] if len(vectors) > 1 else []) + ([configs + vectors] if configs and vectors else [])
        for group in groups if not found else []:
            err = self._restores(check, gen_seed, loss, [n for _, names in group for n in names])
            if err is not None:
                labels = [label for label, _ in group]
                shown = ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
                found.append(f"{shown} jointly (error {err:.1e} without them)")
                break
        if found:
            return "broken by " + "; ".join(found) + " (vectors set uniform, soft-capping removed)"
        return check.hint or "not explained by any vector or soft-capping of the block"

    # -- driver ----------------------------------------------------------------------------
    def _verdict(self, check: Check, res: CheckResult, gen_seed: int, base) -> None:
        loss = float(base[1])
        m = self.measure(check, gen_seed, base)
        res.logits_err, res.loss_err, res.grad_err = m[:3]
        res.notes += [n for n in m[3] if n not in res.notes]
        res.error = self.error(m, loss)
        res.verdict = "exact" if res.error <= self.tol else "approximate" if res.error <= self.approx_tol else "broken"
        if res.verdict != "exact":
            why = self.explain(check, gen_seed, loss)
            res.reason = (
                f"exact at the weights as given, not for generic vectors: {why}"
                if res.as_given_error <= self.tol
                else why
            )

    def run(self) -> list[CheckResult]:
        results = []
        for c in self.checks:
            by, why = self.assumed_by(c)
            results.append(CheckResult(c.kind, c.scope, list(c.params), by, part=c.part, relied=why))
        seeds = [self.seed * 1_000_003 + 17 * i + 1 for i in range(len(self.checks))]
        names = [e.name for e in self.plan.entries]
        base = self.work.run(self.work.x, self.work.labels, names)  # point 1: the weights as given
        for check, res, s in zip(self.checks, results, seeds):
            if not check.untested:
                res.as_given_error = self.error(self.measure(check, s, base), float(base[1]))
        # point 2: generic vectors
        self.work.perturb(self.structure.vectors, self.seed + 7919, self.generic_scale)
        base = self.work.run(self.work.x, self.work.labels, names)
        for check, res, s in zip(self.checks, results, seeds):
            if check.untested:
                res.verdict, res.reason = "untested", check.untested
            else:
                self._verdict(check, res, s, base)
        return results

    def unchecked(self, results: list[CheckResult]) -> list[dict]:
        """Every trainable tensor of the plan that no measured check acted on, with the reason."""
        measured = {p for c in results if c.verdict != "untested" for p in c.params}
        untested: dict[str, str] = {}
        for c in results:
            if c.verdict == "untested":
                for p in c.params:
                    untested.setdefault(p, f"{c.kind} untested: {c.reason}")
        in_blocks = {p for b in self.plan.blocks for p in b.params()}
        attention = {p for a in self.structure.attention for p in a.params()}
        out = []
        for e in self.plan.entries:
            if e.name in measured or any(a in measured for a in e.aliases):
                continue
            if e.name in untested:
                why = untested[e.name]
            elif e.role == "vector":
                why = "AdamW, trivial group: no symmetry claimed for it (perturbed at the generic point)"
            elif e.role == "attention" and e.name not in attention:
                why = (
                    "in no recorded AttentionBlock (MLA: q/k/v are not three projections of the residual); "
                    "its head split is not tested"
                )
            elif e.role == "matrix" and not e.found:
                why = "no structure found: in no block, so no symmetry to witness"
            elif e.role == "matrix" and e.layout.flatten:
                why = "convolution kernel: in no block, so no symmetry to witness"
            elif e.role == "matrix":
                what = e.reason.removeprefix("dataflow: ").split(" [")[0]
                why = f"{what}: in no block, so no symmetry to witness"
            elif e.role in ("embedding", "tied_embedding") and self.work.ids is None:
                why = "the model is fed images: no token ids to relabel"
            elif e.name not in in_blocks:
                why = "in no recorded block"
            else:
                why = "no check acts on it"
            out.append({"name": e.name, "role": e.role, "reason": why})
        return out

    def settings(self, keep_precision: bool) -> dict:
        w = self.work
        return {
            "seed": self.seed,
            "dtype": str(w.dtype).replace("torch.", ""),
            "tol": self.tol,
            "approx_tol": self.approx_tol,
            "grads": w.grads,
            "batch_shape": list(w.x.shape),
            "input": "input_ids" if w.ids is not None else "pixel_values",
            "rope_pairing": self.rope_pairing,
            "generic_scale": self.generic_scale,
            "keep_precision": keep_precision,
            "implementation": sorted(set(w.notes)),
            "preset": self.plan.preset,
        }


def audit(
    model: nn.Module,
    batch,
    plan=None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    *,
    tol: float | None = None,
    approx_tol: float = 1e-6,
    grads: bool = True,
    forward: Callable[[nn.Module, Tensor], object] | None = None,
    rope_pairing: str = "half",
    generic_scale: float = 0.1,
    keep_precision: bool = True,
) -> AuditReport:
    """Audit the symmetries the plan's maps assume on ``model`` (see :mod:`equiopt.audit`).

    Args:
        model: the model; it is deep-copied to ``dtype`` and never modified.
        batch: input ids ``[B, T]`` (LongTensor), or a mapping with ``input_ids`` and
            optionally ``labels`` (next-token targets in Hugging Face convention: the loss
            pairs ``logits[:, :-1]`` with ``labels[:, 1:]``, ``-100`` ignored).
        plan: an :class:`equiopt.Plan` of ``model``; default ``equiopt.plan(model)``. The
            checks come from the blocks it recorded (:attr:`equiopt.Plan.blocks`).
        seed: seeds every random group element and the generic-point perturbation.
        dtype: float dtype of the audit copy (float64 makes exact invariance visible).
        tol / approx_tol: relative error bounds of ``exact`` (default ``1e3 * eps(dtype)``)
            and ``approximate``.
        grads: also compare gradients (``grad(g.W) == g.grad(W)`` on the acted tensors).
        forward: ``forward(model, input_ids) -> logits`` (or an output with ``.logits``);
            default ``model(input_ids)``.
        rope_pairing: RoPE 2-planes: ``"half"`` (``(i, i + hd/2)``, Hugging Face
            ``rotate_half``) or ``"interleaved"`` (``(2i, 2i+1)``).
        generic_scale: relative size of the perturbation of the vectors at the generic point.
        keep_precision: run the forward under a torch function mode that keeps requests
            for float32/16 computation (RMSNorm and softmax "upcasts" of HF models) in
            ``dtype``, so that float32 rounding does not mask exact symmetries. Set False
            to audit the model's arithmetic as written (rotations then show ~1e-7).
    """
    if rope_pairing not in PAIRINGS:
        raise AuditError(f"rope_pairing must be one of {tuple(PAIRINGS)}, got {rope_pairing!r}")
    work = WorkModel(model, batch, dtype, forward or default_forward, keep_precision, grads)
    plan = plan if plan is not None else make_plan(model)
    tol = tol if tol is not None else 1e3 * torch.finfo(dtype).eps
    auditor = Auditor(work, plan, seed, tol, approx_tol, rope_pairing, generic_scale)
    results = auditor.run()
    return AuditReport(
        work.name,
        results,
        auditor.settings(keep_precision),
        {r: dict(s) for r, s in plan.specs.items()},
        auditor.unchecked(results),
    )
