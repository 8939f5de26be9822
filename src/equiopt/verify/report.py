"""The audit's results: one :class:`CheckResult` per group action, an :class:`AuditReport`
with its table / markdown / JSON forms and the planner hooks (:meth:`AuditReport.broken_factors`,
:meth:`AuditReport.downgrade_rules`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ..groups import Factor

__all__ = [
    "KINDS",
    "VERDICTS",
    "SHIFT_KINDS",
    "STRUCTURE_KINDS",
    "INFORMATIONAL_KINDS",
    "AuditError",
    "CheckResult",
    "AuditReport",
    "downgrade_rules",
]

VERDICTS = ("exact", "approximate", "broken", "untested")

#: kind -> one-line description of the group action (the table legend).
KINDS: dict[str, str] = {
    "tied_perm": "Perm(vocab) of the tied embedding/head rows, input ids and targets relabelled",
    "vocab_perm": "Perm(vocab) of the token-embedding rows, input ids relabelled",
    "head_perm": "Perm(vocab) of the LM-head rows, targets relabelled",
    "row_perm": "Perm(rows) of a non-token embedding (nothing to relabel)",
    "logit_shift": "LM head W -> W + 1 c^T (logits move by a per-position constant)",
    "residual_rotation": "O(d) rotation of the residual basis (readers W Q^T, writers Q W)",
    "neuron_perm": "Perm(hidden) of in-projection rows (every part) and out-projection columns",
    "neuron_rescale": "gauge: in-projection part row i * s_i, out-projection column i / s_i",
    "vo_rotation": "per-head O(head_dim): V_j -> R_j V_j, O_i -> O_i R_j^T",
    "qk_rotation": "per-head O(head_dim) on the rows of Q_i and K_j",
    "qk_rope_rotation": "per-head rotations inside the RoPE 2-planes on Q_i and K_j",
    "expert_perm": "Perm(experts) of router rows/bias and stacked expert tensors",
    "router_shift": "router W -> W + 1 c^T",
}

# kinds whose invariance a *centering* map relies on (it projects the orbit direction out)
SHIFT_KINDS = ("logit_shift", "router_shift")
#: kinds that witness the structure the planner read (rows are tokens / hidden neurons /
#: experts, the head split of v and o, the gate|up pairing): each holds in every network
#: whose structure is read right, whatever its other weights, so a map that uses that
#: structure relies on it being exact
STRUCTURE_KINDS = ("vocab_perm", "tied_perm", "head_perm", "neuron_perm", "vo_rotation", "expert_perm")
#: kinds measured to describe the model, never relied on: whether they hold depends on
#: weights the plan does not constrain (norm gains, RoPE, QK norms, activations, positions),
#: and a map equivariant under more than the network's group is still compatible with it
INFORMATIONAL_KINDS = ("residual_rotation", "qk_rotation", "qk_rope_rotation", "neuron_rescale", "row_perm")


class AuditError(ValueError):
    """The audit cannot run on this model/batch; the message names the parameter or input."""


@dataclass
class CheckResult:
    """One group action on one block: errors, verdict and (when broken) the reason."""

    kind: str
    scope: str
    params: list[str]
    #: ``"name: role/map"`` of the acted parameters whose planned map relies on the check's
    #: symmetry being exact (see :func:`equiopt.verify.relies_on`); empty: informational
    assumed_by: list[str]
    logits_err: float = float("nan")  # generic point, relative
    loss_err: float = float("nan")  # generic point, |delta loss| (absolute)
    grad_err: float = float("nan")  # generic point, relative
    error: float = float("nan")  # the verdict's error (max of the relative errors)
    as_given_error: float = float("nan")  # same, at the weights as given
    verdict: str = "untested"
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    part: str = ""  # neuron_rescale: the in-projection part rescaled
    relied: str = ""  # why it is relied on: "projects out" (a centering map) or "structure"; "" = informational

    @property
    def group(self) -> str:
        return KINDS[self.kind]

    @property
    def relied_on(self) -> bool:
        """The plan depends on this symmetry being exact (same as ``bool(assumed_by)``)."""
        return bool(self.assumed_by)

    def assumed_roles(self) -> list[str]:
        return list(dict.fromkeys(item.split(": ", 1)[1].split("/", 1)[0] for item in self.assumed_by))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["group"] = self.group
        return d


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.1e}"


def _short(names: list[str], scope: str, limit: int = 6) -> str:
    pre = scope + "." if scope else ""
    short = [n[len(pre) :] if pre and n.startswith(pre) else n for n in names]
    if len(short) > limit:
        return ", ".join(short[:3]) + f", ... ({len(short)} tensors; to_dict() lists them)"
    return ", ".join(short)


def downgrade_rules(report: AuditReport, include_approximate: bool = False) -> dict[str, dict]:
    """Planner rules (``equiopt.plan(model, rules=...)``) replacing maps whose assumed
    symmetry is broken by safer ones.

    Only the shift symmetry calls for a change: a centering map removes the ``1 c^T``
    direction of the update, which is a real direction of the loss when the shift is
    broken (soft-capped logits, per-expert router scales). ``centered_row_norm`` becomes
    ``row_norm``; any other centered map (``left_spectral``, a centered ``hybrid``) keeps its
    name; each rule says ``center=False`` (with ``center=None`` the planner would center a
    map again on a role whose group has the shift). Pass the report itself,
    ``equiopt.plan(model, audit=report)``: it also drops the shift from the role's group, so
    that the uncentered map is compatible. Only a relied-on shift check gives a rule (one
    whose ``assumed_by`` names a centering map): a sigmoid router's map is uncentered and its
    group has no shift, so its broken ``router_shift`` is informational. A broken *structure*
    check (``neuron_perm``, ``vo_rotation``, ...) means the planner read the structure wrong:
    no map change repairs that (pass ``layouts=`` / ``roles=``), so it gives no rule either; an
    informational one (``residual_rotation``, ``qk_rotation``, ...) leaves the maps compatible
    (equivariant under a larger group than the network's). Rules are per role, so one broken
    router downgrades every router.
    """
    bad = ("broken", "approximate") if include_approximate else ("broken",)
    rules: dict[str, dict] = {}
    for c in report.checks:
        if c.kind not in SHIFT_KINDS or c.verdict not in bad or c.relied != "projects out":
            continue
        for role in c.assumed_roles():
            spec = report.specs[role]
            rules[role] = {"map": "row_norm" if spec["map"] == "centered_row_norm" else spec["map"], "center": False}
    return rules


@dataclass
class AuditReport:
    """All checks of one audit. ``print(report)`` shows the table; see also
    :meth:`to_markdown`, :meth:`to_dict`, :meth:`by_parameter`, :meth:`summary`."""

    model: str
    checks: list[CheckResult]
    settings: dict
    specs: dict  # role -> map spec of the plan audited (for downgrade_rules)
    #: ``[{"name", "role", "reason"}]``: every trainable tensor no measured check acted on, and why
    unchecked: list[dict] = field(default_factory=list)

    _HEAD = ("group", "scope", "parameters", "relied on", "dlogits", "dloss", "dgrad", "as given", "verdict", "reason")

    def downgrade_rules(self, include_approximate: bool = False) -> dict[str, dict]:
        """See :func:`downgrade_rules`."""
        return downgrade_rules(self, include_approximate)

    def broken_factors(self) -> dict[str, tuple]:
        """``{role: factors}`` of the role groups this audit found broken (the row shift of an
        LM head or router whose checks failed); :func:`equiopt.plan` drops them."""
        out: dict[str, tuple] = {}
        for c in self.checks:
            if c.kind in SHIFT_KINDS and c.verdict == "broken" and c.relied == "projects out":
                for role in c.assumed_roles():
                    out[role] = (Factor("shift", "rows"),)
        return out

    def broken(self, assumed_only: bool = False, *, relied_on: bool | None = None) -> list[CheckResult]:
        """Broken checks; ``relied_on=True`` (or ``assumed_only=True``): only those the plan
        relies on (the acceptance criterion is that this list is empty), ``False``: only the
        informational ones."""
        want = relied_on if relied_on is not None else (True if assumed_only else None)
        return [c for c in self.checks if c.verdict == "broken" and (want is None or c.relied_on == want)]

    def relied_on_broken(self) -> list[CheckResult]:
        """The broken checks the plan relies on (see :meth:`broken`)."""
        return self.broken(relied_on=True)

    def unchecked_names(self) -> list[str]:
        return [u["name"] for u in self.unchecked]

    def _unchecked_lines(self) -> list[str]:
        """The unchecked tensors grouped by reason: one line per reason."""
        by: dict[str, list[str]] = {}
        for u in self.unchecked:
            by.setdefault(f"{u['role']}: {u['reason']}", []).append(u["name"])
        lines = []
        for why, names in by.items():
            shown = ", ".join(names[:6]) + (f", ... ({len(names)} tensors)" if len(names) > 6 else "")
            lines.append(f"{why}: {shown}")
        return lines

    def by_kind(self, kind: str) -> list[CheckResult]:
        return [c for c in self.checks if c.kind == kind]

    def by_parameter(self) -> dict[str, list[dict]]:
        """``{parameter: [{kind, scope, error, verdict, reason}, ...]}`` over every check acting on it."""
        out: dict[str, list[dict]] = {}
        for c in self.checks:
            for p in c.params:
                out.setdefault(p, []).append(
                    {"kind": c.kind, "scope": c.scope, "error": c.error, "verdict": c.verdict, "reason": c.reason}
                )
        return out

    def summary(self) -> list[dict]:
        """Per group kind: number of checks per verdict and the largest error."""
        rows = []
        for kind in KINDS:
            cs = self.by_kind(kind)
            if not cs:
                continue
            errs = [c.error for c in cs if c.error == c.error]
            given = [c.as_given_error for c in cs if c.as_given_error == c.as_given_error]
            rows.append(
                {
                    "kind": kind,
                    "checks": len(cs),
                    **{v: sum(c.verdict == v for c in cs) for v in VERDICTS},
                    "max_error": max(errs) if errs else float("nan"),
                    "max_error_as_given": max(given, default=float("nan")),
                }
            )
        return rows

    def _rows(self) -> list[tuple[str, ...]]:
        rows: list[tuple[str, ...]] = []
        for c in self.checks:
            params = _short(c.params, c.scope)
            if c.part:
                params = f"{c.part} / {_short(c.params[-1:], c.scope)}"
            rows.append(
                (
                    c.kind,
                    c.scope or "(model)",
                    params,
                    c.relied or ("yes" if c.assumed_by else "no"),
                    _fmt(c.logits_err),
                    _fmt(c.loss_err),
                    _fmt(c.grad_err),
                    _fmt(c.as_given_error),
                    c.verdict,
                    c.reason,
                )
            )
        return rows

    def table(self) -> str:
        rows = [self._HEAD, *self._rows()]
        widths = [min(max(len(r[i]) for r in rows), 60) for i in range(len(self._HEAD) - 1)]
        lines = []
        for k, r in enumerate(rows):
            cells = [c if len(c) <= w else c[: w - 3] + "..." for c, w in zip(r[:-1], widths)]
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + r[-1])
            if k == 0:
                lines.append("  ".join("-" * w for w in widths) + "  ------")
        s = self.settings
        lines.append(
            f"{self.model}: {len(self.checks)} checks, dtype {s['dtype']}, tol {s['tol']:.1e}, "
            f"approx_tol {s['approx_tol']:.1e}, seed {s['seed']}; errors at the generic point "
            "(vectors perturbed), 'as given' at the model's own weights; "
            f"{len(self.relied_on_broken())} relied-on symmetries broken, "
            f"{len(self.broken(relied_on=False))} informational ones broken"
        )
        if self.unchecked:
            lines.append(f"unchecked trainable tensors ({len(self.unchecked)}):")
            lines += [f"  {line}" for line in self._unchecked_lines()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_markdown(self) -> str:
        s = self.settings
        out = [
            f"### Symmetry audit: {self.model}",
            "",
            f"float dtype {s['dtype']}, batch {s['batch_shape']}, seed {s['seed']}; verdict: exact <= {s['tol']:.1e}, "
            f"approximate <= {s['approx_tol']:.1e} (relative error, max of logits, loss and gradient), measured at a "
            "generic point (trainable vectors perturbed); 'as given' = the same error at the model's own weights. "
            "'relied on': the plan needs the symmetry exact -- 'projects out' (a centering map removes its orbit "
            "direction) or 'structure' (a map uses the rows / heads / experts the check witnesses); 'no': "
            "informational (a map equivariant under more than the network's group stays compatible).",
            "",
            "| kind | checks | exact | approximate | broken | untested | max error | max error (as given) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.summary():
            cells = [r[k] for k in ("kind", "checks", "exact", "approximate", "broken", "untested")]
            cells += [_fmt(r["max_error"]), _fmt(r["max_error_as_given"])]
            out.append("| " + " | ".join(map(str, cells)) + " |")
        out += ["", "| " + " | ".join(self._HEAD) + " |", "|" + "---|" * len(self._HEAD)]
        for row in self._rows():
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        out += ["", "Groups:", ""]
        for k in dict.fromkeys(c.kind for c in self.checks):
            out.append(f"- `{k}`: {KINDS[k]}")
        if self.unchecked:
            out += ["", f"Unchecked trainable tensors ({len(self.unchecked)}):", ""]
            out += [f"- {line}" for line in self._unchecked_lines()]
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "settings": self.settings,
            "summary": self.summary(),
            "checks": [c.to_dict() for c in self.checks],
            "unchecked": list(self.unchecked),
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)
