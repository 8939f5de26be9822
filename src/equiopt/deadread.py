"""Dead-direction readout: per-layer observables on a fixed probe batch, their log-log rate
fits along a training trajectory, and the "read" criterion (``docs/dead_directions.md``).

The readout is defined once, here, and applied identically to every optimizer:

* **sites**: every MLP in-projection (``up_proj`` / ``fc1``), every MLP out-projection
  (``down_proj`` / ``fc2``) and the LM head (Linear sites), and every block's output
  (block sites); :func:`find_sites`.
* **observables** (float64, eval mode, the fixed probe batch of ``N`` sequences of ``T``
  tokens; :func:`observe`):
  ``act_smin``  smallest singular value of the site's activation matrix (``N*T x d``: the
  Linear's input, or the block's output);
  ``fisher_lmin``  smallest positive eigenvalue of the ``N x N`` per-sample-gradient Gram
  ``K_ij = <g_i, g_j>`` of the Linear's weight (``g_i``: gradient of sequence ``i``'s mean
  token cross-entropy; ``K_ij = sum_{t,s} (delta_it . delta_js)(a_it . a_js)``);
  ``fisher_logdet``  log-det over the positive eigenvalues of ``K``, divided by their number
  (the mean log-eigenvalue, so that its slope is a per-eigenvalue rate like the others);
  ``dead``  number of dead hidden neurons at an MLP out-projection's input (mean ``|a|``
  over the probe tokens below ``1e-3`` x the layer's median: the rule of
  :class:`equiopt.diagnostics.DiagnosticsTracker`'s ``dead_act``).
* **rate fit** (:func:`fit_rate`): least squares of ``log y`` against ``log t`` (``t`` the
  training step; ``fisher_logdet`` is already a log and is fitted as is) over the
  checkpoints with ``t >= t_min``; slope, its 95% confidence interval, ``R^2``, the
  slopes without the first and without the last point, and the rate ``k = 1 + slope / 2``.
* **criterion** (:class:`Criterion`, fixed before any optimizer's result was seen): a cell
  (site, observable) is *read* when the fit has >= 5 points, ``R^2 >= 0.9``, a slope CI
  that excludes 0, and drop-first / drop-last slopes of the same sign within 25% of the
  full slope. ``LOOSE`` and ``STRICT`` are the two sensitivity variants.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

OBSERVABLES = ("act_smin", "fisher_lmin", "fisher_logdet", "dead")
LOG_OBSERVABLES = ("fisher_logdet",)  # already logarithms: fitted against log t as they are
DEAD_REL = 1e-3  # DiagnosticsTracker's act_rel
EIG_REL_TOL = 1e-10  # an eigenvalue is "positive" above this x the largest (float64)

MLP_IN = re.compile(r"(^|\.)(up_proj|fc1|w1|c_fc)$")
MLP_OUT = re.compile(r"(^|\.)(down_proj|fc2|w2|c_proj)$")
HEAD = re.compile(r"(^|\.)(lm_head|head)$")
BLOCK_LISTS = ("layers", "blocks", "h")


@dataclass(frozen=True)
class Site:
    name: str  # short label, e.g. "L0.mlp_in", "L2.block", "head"
    module: str  # the module's qualified name in the model
    kind: str  # "linear" or "block"
    role: str  # "mlp_in", "mlp_out", "head", "block"


def find_sites(model: nn.Module) -> list[Site]:
    """The readout's sites in model order (see the module docstring)."""
    sites: list[Site] = []
    blocks: dict[str, int] = {}
    for name, _ in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in BLOCK_LISTS and parts[-1].isdigit():
            parent = model.get_submodule(".".join(parts[:-1]))
            if isinstance(parent, nn.ModuleList):
                blocks[name] = int(parts[-1])
    for name, mod in model.named_modules():
        if name in blocks:
            continue
        if not isinstance(mod, nn.Linear):
            continue
        layer = next((i for b, i in blocks.items() if name.startswith(b + ".")), None)
        if MLP_IN.search(name) and layer is not None:
            sites.append(Site(f"L{layer}.mlp_in", name, "linear", "mlp_in"))
        elif MLP_OUT.search(name) and layer is not None:
            sites.append(Site(f"L{layer}.mlp_out", name, "linear", "mlp_out"))
        elif HEAD.search(name) and layer is None:
            sites.append(Site("head", name, "linear", "head"))
    for b, i in blocks.items():
        sites.append(Site(f"L{i}.block", b, "block", "block"))
    order = {"mlp_in": 0, "mlp_out": 1, "block": 2, "head": 3}
    sites.sort(key=lambda s: (10**9 if s.role == "head" else int(s.name[1:].split(".")[0]), order[s.role]))
    return sites


def observables_of(site: Site) -> tuple[str, ...]:
    if site.kind == "block":
        return ("act_smin",)
    if site.role == "mlp_out":
        return OBSERVABLES
    return ("act_smin", "fisher_lmin", "fisher_logdet")


def cells(sites: Sequence[Site]) -> list[tuple[str, str]]:
    return [(s.name, o) for s in sites for o in observables_of(s)]


# ----------------------------------------------------------------------------- observables


def smallest_singular(a: Tensor) -> float:
    """Smallest singular value of a (rows x cols) matrix (min(rows, cols) singular values)."""
    return float(torch.linalg.svdvals(a.double())[-1])


def fisher_gram(a: Tensor, d: Tensor) -> Tensor:
    """``K_ij = <g_i, g_j>``, ``g_i = sum_t d_it a_it^T`` (the per-sample gradient of a Linear's
    weight): ``a`` (N, T, d_in) inputs, ``d`` (N, T, d_out) output gradients. Uses whichever of
    the materialised per-sample gradients (N d_out d_in) or the token kernel ((NT)^2) is cheaper."""
    a, d = a.double(), d.double()
    n, t, din = a.shape
    dout = d.shape[-1]
    if din * dout <= n * t * (din + dout) and n * din * dout <= 50_000_000:
        g = torch.einsum("nto,nti->noi", d, a).reshape(n, -1)
        return g @ g.T
    ka = a.reshape(n * t, din) @ a.reshape(n * t, din).T
    kd = d.reshape(n * t, dout) @ d.reshape(n * t, dout).T
    return (ka * kd).reshape(n, t, n, t).sum((1, 3))


def fisher_gram_kernel(a: Tensor, d: Tensor) -> Tensor:
    """The token-kernel form of :func:`fisher_gram` (always), for tests and large layers."""
    a, d = a.double(), d.double()
    n, t, _ = a.shape
    ka = a.reshape(n * t, -1) @ a.reshape(n * t, -1).T
    kd = d.reshape(n * t, -1) @ d.reshape(n * t, -1).T
    return (ka * kd).reshape(n, t, n, t).sum((1, 3))


def positive_spectrum(k: Tensor) -> Tensor:
    ev = torch.linalg.eigvalsh(k.double())
    top = float(ev.max()) if ev.numel() else 0.0
    return ev[ev > EIG_REL_TOL * max(top, 0.0)] if top > 0 else ev[:0]


def gram_observables(k: Tensor) -> dict[str, float]:
    pos = positive_spectrum(k)
    if pos.numel() == 0:
        return {"fisher_lmin": math.nan, "fisher_logdet": math.nan, "fisher_rank": 0}
    return {
        "fisher_lmin": float(pos.min()),
        "fisher_logdet": float(torch.log(pos).mean()),
        "fisher_rank": int(pos.numel()),
    }


def dead_count(h: Tensor, rel: float = DEAD_REL) -> int:
    """Hidden neurons (last dim of ``h``) whose mean |activation| is below ``rel`` x the median."""
    m = h.double().abs().reshape(-1, h.shape[-1]).mean(0)
    return int((m < rel * m.median()).sum()) if m.numel() else 0


def _loss_per_sample(logits: Tensor, targets: Tensor) -> Tensor:
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return ce.reshape(targets.shape).mean(-1) if targets.dim() > 1 else ce


def _logits(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


@torch.enable_grad()
def observe(model: nn.Module, inputs: Tensor, targets: Tensor, sites: Sequence[Site] | None = None) -> dict:
    """All observables of every site on the probe batch: {site name: {observable: value}}.

    ``inputs`` (N, T) token ids (or (N, k) for a k-token classifier; ``targets`` (N, T) or (N,)).
    Per-sample loss: sample ``i``'s mean cross-entropy over its targets. Runs on a float64 copy
    in eval mode; the model itself is not touched."""
    m = copy.deepcopy(model).double().eval()
    sites = list(find_sites(m) if sites is None else sites)
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    handles = []

    def lin_hook(name):
        def hook(mod, args, out):
            acts[name] = args[0].detach()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach()))

        return hook

    def block_hook(name):
        def hook(mod, args, out):
            o = out[0] if isinstance(out, (tuple, list)) else out
            acts[name] = o.detach()

        return hook

    for s in sites:
        mod = m.get_submodule(s.module)
        handles.append(mod.register_forward_hook(lin_hook(s.name) if s.kind == "linear" else block_hook(s.name)))
    try:
        for p in m.parameters():
            p.requires_grad_(True)
        logits = _logits(m(inputs) if not _is_hf(m) else m(input_ids=inputs)).double()
        _loss_per_sample(logits, targets).sum().backward()
    finally:
        for h in handles:
            h.remove()
    n = inputs.shape[0]
    out: dict[str, dict] = {}
    for s in sites:
        a = acts[s.name]
        a3 = a.reshape(n, -1, a.shape[-1])
        rec: dict[str, float | int] = {"act_smin": smallest_singular(a3.reshape(-1, a3.shape[-1]))}
        if s.kind == "linear":
            d = grads[s.name]
            rec.update(gram_observables(fisher_gram(a3, d.reshape(n, -1, d.shape[-1]))))
            if s.role == "mlp_out":
                rec["dead"] = dead_count(a3)
        out[s.name] = rec
    return out


def _is_hf(m: nn.Module) -> bool:
    return hasattr(m, "config") and hasattr(m.config, "model_type")


# ----------------------------------------------------------------------------- fits


@dataclass(frozen=True)
class Criterion:
    """When a cell's fit counts as read (all conditions). Fixed in docs/dead_directions.md."""

    name: str = "main"
    min_points: int = 5
    min_r2: float = 0.9
    ci_excludes_zero: bool = True
    max_drop_rel: float = 0.25  # |slope without first (last) point - slope| / |slope|


MAIN = Criterion()
LOOSE = Criterion("loose", min_points=4, min_r2=0.8, max_drop_rel=0.5)
STRICT = Criterion("strict", min_points=6, min_r2=0.95, max_drop_rel=0.1)
CRITERIA = (MAIN, LOOSE, STRICT)


def _t95(dof: int) -> float:
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.975, dof))


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """(slope, intercept, R^2, slope standard error)."""
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum()) / sxx
    icpt = float(ym - slope * xm)
    res = y - (icpt + slope * x)
    sst = float(((y - ym) ** 2).sum())
    r2 = 1.0 - float((res**2).sum()) / sst if sst > 0 else (1.0 if float((res**2).sum()) == 0 else 0.0)
    se = math.sqrt(float((res**2).sum()) / max(1, len(x) - 2) / sxx) if len(x) > 2 else math.inf
    return slope, icpt, r2, se


def fit_rate(t: Sequence[float], y: Sequence[float], *, log_y: bool = True) -> dict:
    """Log-log fit of ``y`` against the approach parameter ``t`` (``log_y=False``: ``y`` is
    already a log). Points with non-finite or (log_y) non-positive values are dropped."""
    tt, yy = np.asarray(t, float), np.asarray(y, float)
    ok = np.isfinite(tt) & np.isfinite(yy) & (tt > 0)
    if log_y:
        ok &= yy > 0
    x = np.log(tt[ok])
    z = np.log(yy[ok]) if log_y else yy[ok]
    n = int(ok.sum())
    res = {"n": n, "slope": math.nan, "k": math.nan, "r2": math.nan, "ci": [math.nan, math.nan]}
    res.update(slope_drop_first=math.nan, slope_drop_last=math.nan, constant=False)
    if n < 3 or np.ptp(x) == 0:
        return res
    if np.ptp(z) == 0:
        res.update(slope=0.0, k=1.0, r2=0.0, ci=[0.0, 0.0], constant=True)
        return res
    slope, icpt, r2, se = _ols(x, z)
    h = _t95(n - 2) * se
    res.update(slope=slope, intercept=icpt, k=1.0 + slope / 2.0, r2=r2, ci=[slope - h, slope + h])
    if n >= 4:
        res["slope_drop_first"] = _ols(x[1:], z[1:])[0]
        res["slope_drop_last"] = _ols(x[:-1], z[:-1])[0]
    return res


def is_read(fit: dict, crit: Criterion = MAIN) -> bool:
    if fit["n"] < crit.min_points or fit.get("constant") or not math.isfinite(fit["slope"]):
        return False
    if not fit["r2"] >= crit.min_r2:
        return False
    lo, hi = fit["ci"]
    if crit.ci_excludes_zero and not (lo > 0 or hi < 0):
        return False
    s = fit["slope"]
    for d in (fit["slope_drop_first"], fit["slope_drop_last"]):
        if not math.isfinite(d) or d * s <= 0 or abs(d - s) > crit.max_drop_rel * abs(s):
            return False
    return True


def fit_trajectory(history: Sequence[dict], *, t_min: float = 0.0) -> dict:
    """``history``: [{"step": t, "obs": {site: {observable: value}}}, ...] ->
    {site: {observable: fit (with "read": {criterion name: bool})}}."""
    hs = [h for h in history if h["step"] >= t_min and h["step"] > 0]
    out: dict[str, dict] = {}
    if not hs:
        return out
    for site, rec in hs[0]["obs"].items():
        for obs in rec:
            if obs not in OBSERVABLES:
                continue
            ts = [h["step"] for h in hs]
            ys = [h["obs"][site].get(obs, math.nan) for h in hs]
            f = fit_rate(ts, ys, log_y=obs not in LOG_OBSERVABLES)
            f["read"] = {c.name: is_read(f, c) for c in CRITERIA}
            out.setdefault(site, {})[obs] = f
    return out


def count_read(fits: dict, crit: Criterion = MAIN) -> tuple[int, int]:
    """(cells read, cells) of one trajectory's fits."""
    n = r = 0
    for obs in fits.values():
        for f in obs.values():
            n += 1
            r += bool(f["read"][crit.name])
    return r, n


def criteria_table() -> list[dict]:
    return [asdict(c) for c in CRITERIA]
