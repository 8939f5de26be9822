"""Dead-direction diagnostics: directions of the weights that stop learning or drift for nothing.

Tracked over training, per block of the plan (:func:`equiopt.plan`):

* **dead hidden neurons** (dense MLPs): the fraction of neurons whose mean ``|activation|``
  (the input of the out-projection) over the window is below ``act_rel`` x the layer's median
  (``dead_act``), and the fraction whose update (gate and up rows plus down column) summed
  over the window is below ``update_rel`` x the median (``dead_update``); for stacked
  experts, ``dead_update`` over (expert, neuron) pairs;
* **dead experts**: the fraction of experts receiving less than ``0.1 / E`` of the top-k
  assignments of the window's training tokens (the paper's definition);
* **stale embedding rows** (untied token embedding only: a tied one gets the head's
  gradient for every token): rows of the token embedding that moved in a step in which their
  token did not occur (momentum or a normalized map keeps moving them): ``stale_rows`` = moved
  absent rows / absent rows, averaged over the window's steps, and ``stale_update_ratio`` =
  mean update norm of absent rows / of present rows;
* **drift along symmetry orbits** (current weights): the LM head's and routers' mean row
  ``|mean_i W_i|`` relative to the mean row norm (``..._abs``: absolute) (the shift orbit ``W + 1 c^T``, invisible
  to the loss when the shift is a symmetry), and per neuron ``log(|up_i| / |down_:,i|)``
  (the rescaling orbit of the linear "up" branch): its spread over neurons (std).

**Gauge orbit drift** (:class:`GaugeDrift`, no hooks, any optimizer; the training harness
logs it under ``"gauge"`` in every ``metrics.jsonl`` record): how far the weights have moved
along the orbit of each gauge since initialisation, the motion the loss cannot see and that
the Dead-Direction Conditioner (:mod:`equiopt.ddc`) removes:

* ``balance_mean`` / ``balance_max`` (per MLP: ``/<scope>``): the balance defect
  ``log||W_up[i]|| - log||W_down[:, i]||`` of each neuron's rescale pair (the up part, per
  expert for stacked experts), as the mean / max over neurons of its absolute change from
  init; a rescale by ``s_i`` moves it by ``2 log s_i``;
* ``head_mean_row`` / ``router_mean_row`` (per parameter: ``/<name>``): ``||c||`` for the
  vocabulary (expert) mean row ``c = mean_i W_i`` of the untied LM head (router), the
  translation orbit's coordinate; ``..._change``: ``||c_t - c_0||``;
* ``vo_angle`` / ``vo_angle_max`` (per attention: ``/<scope>``): the rotation-gauge
  coordinate of each kv head ``j``, the RMS rotation angle (radians) of the orthogonal
  Procrustes fit ``Q_j = polar(V_j V_j0^T + sum_q O_q^T O_q0)`` that best carries the
  initial head ``(V_j0 [| b_j0], O_q0)`` onto the current one (``q``: the query heads reading
  ``j``). It is equivariant: applying a gauge rotation ``R`` now gives ``R Q_j``, so a pure
  gauge move by ``R`` reads as ``R``'s angle (``sqrt(mean_k phi_k^2)`` over its eigenvalues
  ``e^{i phi_k}``). Mean over heads per layer; aggregate mean and max over layers;
* ``norm_channel_drift`` / ``norm_channel_drift_max`` (per norm: ``/<gain name>``): the RMS
  over channels ``j`` of ``psi_j(t) - psi_j(0)``, ``psi_j = log|g_j| - (1/k) sum_r
  log||W_r[:, j]||`` over the ``k`` linear maps reading the norm's output (a norm-channel gauge
  ``t`` moves it by ``2 log t_j``); mean and max over norms. Norms and readers are the plan's
  confirmed norm channels (:attr:`equiopt.Plan.norm_channels`, from the traced dataflow); a
  reader in a shift gauge enters by its centered columns, an overlapped one (the up part of a
  tracked rescale pair) by its balanced radius less ``mean_i log||W_down[:, i]||`` (docs/ddc.md).

The blocks come from the plan (:attr:`equiopt.Plan.blocks`): MLPs and stacked experts
(:class:`~equiopt.blocks.MLPBlock`), routers (:class:`~equiopt.blocks.MoEBlock`), the LM
head (:class:`~equiopt.blocks.VocabBlock`). Orbit coordinates are read off the blocks'
symmetries: the mean row is the shift orbit's tangent component
(:meth:`equiopt.groups.Factor.tangent_component`) of ``logit_shift`` / ``router_shift``,
the up/down ratio the coordinate of :meth:`~equiopt.blocks.MLPBlock.rescale` on the part
:meth:`~equiopt.blocks.MLPBlock.up_part` names (the last in-projection part: up after gate).

Use (the training loop calls two methods)::

    tracker = equiopt.diagnostics.DiagnosticsTracker(model, plan)   # installs forward hooks
    for step in range(steps):
        loss.backward(); opt.step(); opt.zero_grad()
        tracker.step()                         # after every optimizer step
        if (step + 1) % eval_every == 0:
            log(tracker.record(step + 1))      # flat {str: float}, window since the last record
    tracker.close()                            # removes the hooks
    equiopt.diagnostics.plot_history(tracker.history, "diagnostics.png")

``step()`` may be called less often than every optimizer step: the update is then the one
since the previous call and a token counts as present if it occurred in any forward since
then. Only forwards with gradients enabled count (evaluation under ``torch.no_grad()`` is
ignored). ``state_dict()``/``load_state_dict()`` carry the history across a resume.

Memory: one copy of every tracked weight (embedding, LM head, routers, MLP and expert weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .blocks import AttentionBlock, MLPBlock, MoEBlock, Symmetry, VocabBlock, stacked_experts
from .ddc import balance
from .planner import plan as make_plan
from .trace import NormChannel

__all__ = [
    "DiagnosticsTracker",
    "GaugeDrift",
    "GAUGE_AGGREGATES",
    "plot_history",
    "AGGREGATES",
    "tracked_blocks",
    "shift_coordinate",
    "rescale_coordinate",
    "rotation_angle",
    "vo_procrustes",
    "column_log_radius",
    "overlapped_log_radius",
    "norm_channel_coordinate",
]

#: Keys of the model-level aggregates in every record (per-block keys add ``/<block name>``).
AGGREGATES = (
    "dead_act",
    "dead_update",
    "dead_experts",
    "stale_rows",
    "stale_update_ratio",
    "head_mean_row",
    "router_mean_row",
    "updown_log_ratio_std",
)
TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "num_experts_per_token", "moe_top_k", "k")


def _find_top_k(model: nn.Module, router_module: str, explicit: int | None) -> int:
    if explicit is not None:
        return explicit
    names = [router_module, router_module.rpartition(".")[0]]
    for n in names:
        mod = model.get_submodule(n) if n else model
        for src in (mod, getattr(mod, "config", None)):
            for a in TOP_K_ATTRS:
                v = getattr(src, a, None) if src is not None else None
                if isinstance(v, int) and v > 0:
                    return v
    cfg = getattr(model, "config", None)
    for a in TOP_K_ATTRS:
        v = getattr(cfg, a, None) if cfg is not None else None
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError(
        f"router {router_module!r}: cannot find its top-k (no top_k attribute); pass DiagnosticsTracker(top_k=...)"
    )


def _router_choice(output, E: int, k: int, where: str) -> Tensor:
    """Expert indices [N, k] chosen by a router module from its output: an integer
    ``[..., k]`` tensor in a tuple output (HF routers return the indices), else the top-k of
    the ``[..., E]`` logits."""
    outs = output if isinstance(output, (tuple, list)) else (output,)
    for o in outs:
        if isinstance(o, Tensor) and not o.is_floating_point() and o.shape[-1] == k:
            return o.reshape(-1, k)
    for o in outs:
        if isinstance(o, Tensor) and o.is_floating_point() and o.shape[-1] == E:
            return o.detach().reshape(-1, E).topk(k, dim=-1).indices
    raise ValueError(f"router module {where!r}: its output holds neither [..., {k}] indices nor [..., {E}] logits")


def tracked_blocks(plan) -> tuple[list[MLPBlock], list[str], list[Symmetry]]:
    """``(MLPs, routers, shift symmetries)`` of a plan: its dense MLPs and the stacked expert
    MLPs of its MoE blocks, its routers, and the ``logit_shift`` / ``router_shift`` symmetries."""
    mlps = [b for b in plan.blocks if isinstance(b, MLPBlock)]
    routers, shifts = [], []
    for b in plan.blocks:
        if isinstance(b, MoEBlock):
            routers.append(b.router)
            experts, _ = stacked_experts(b, plan.entries)
            mlps += [experts] if experts is not None else []
        if isinstance(b, (MoEBlock, VocabBlock)):
            shifts += [s for s in b.symmetries() if s.factor.kind == "shift"]
    return mlps, routers, shifts


def shift_coordinate(sym: Symmetry, w: Tensor) -> tuple[float, float]:
    """Position of ``W`` along the shift orbit ``W + 1 c^T`` of ``sym``: ``|c|`` for the mean
    row ``c`` (the orbit's tangent component of W), absolute and relative to the mean row norm."""
    w = w.detach().float()
    c = sym.factor.tangent_component(w[None], w[None])[0, 0]
    return float(c.norm() / w.norm(dim=1).mean().clamp_min(1e-30)), float(c.norm())


def rescale_coordinate(sym: Symmetry, tensors: Mapping[str, Tensor], layouts: Mapping) -> Tensor:
    """Per neuron ``[B, h]`` coordinate along a rescaling orbit: ``sum log |row_i|`` over the
    acted rows minus ``sum log |column_i|`` over the inversely acted columns (biases left out);
    the rescaling ``s`` moves it by ``2 log s`` for one up part against one out-projection."""
    out: Tensor | int = 0
    for a in sym.acts:
        if a.axis == "vector":
            continue
        layout = layouts[a.param]
        x = layout.to_logical(tensors[a.param].detach()).float()
        if a.part is not None:
            x = x[a.part :: layout.fused]
        n = x.norm(dim=-1 if a.axis == "rows" else -2).clamp_min(1e-30).log()
        out = out - n if a.inverse else out + n
    if isinstance(out, int):
        raise ValueError(f"{sym.name}: no row or column act, no rescale coordinate")
    return out


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (FSDP2 shard: a collective, every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rotation_angle(q: Tensor) -> Tensor:
    """RMS rotation angle (radians) of orthogonal matrices ``q`` [..., n, n]:
    ``sqrt(mean_k phi_k^2)`` over the eigenvalues ``e^{i phi_k}`` (a reflection's -1 counts pi)."""
    ev = torch.linalg.eigvals(q.double())
    return torch.atan2(ev.imag, ev.real).pow(2).mean(-1).sqrt()


def vo_procrustes(v: Tensor, o: Tensor, v0: Tensor, o0: Tensor, hkv: int, hd: int) -> Tensor:
    """``Q_j = polar(V_j V_j0^T + sum_q O_q^T O_q0)`` [hkv, hd, hd] for V ``[hkv hd, d(+1)]``
    (a bias as the last column) and O ``[d, hq hd]``: the rotation of kv head ``j`` that best
    carries the initial (V0, O0) onto (V, O) (orthogonal Procrustes on both sides)."""
    v, o, v0, o0 = (t.detach().double() for t in (v, o, v0, o0))
    hq = o.shape[1] // hd
    m = v.reshape(hkv, hd, -1) @ v0.reshape(hkv, hd, -1).transpose(1, 2)
    oq = o.reshape(o.shape[0], hq, hd).permute(1, 2, 0)  # [hq, hd, d]
    oq0 = o0.reshape(o0.shape[0], hq, hd).permute(1, 2, 0)
    m = m + (oq @ oq0.transpose(1, 2)).reshape(hkv, hq // hkv, hd, hd).sum(1)
    u, _, vh = torch.linalg.svd(m)
    return u @ vh


def column_log_radius(w: Tensor, orient: str, centered: bool = False) -> Tensor:
    """``log ||W[:, j]||`` per input feature ``j`` of a linear map's weight stored as
    ``orient`` (``"out_in"``: ``[out, in]``; ``"in_out"``), in float64; ``centered``: of
    ``W - 1 m^T`` (``m`` the mean over outputs), the radius of a translated head / router."""
    w = w.detach().double()
    w = w if orient == "out_in" else w.T
    if centered:
        w = w - w.mean(0, keepdim=True)
    return w.norm(dim=0).clamp_min(1e-300).log()


def overlapped_log_radius(up: Tensor, down_cols: Tensor) -> Tensor:
    """The side of an in-projection ``up`` [h, d] whose rows are in a neuron rescale gauge (out-
    projection column norms ``down_cols`` [h]) in a norm-channel coordinate: ``mean_i log R_ij
    - mean_i log ||down[:, i]||`` with ``R = r c^T`` the balanced radius of ``up``
    (:func:`equiopt.ddc.balance`): blind to the radial motion of DDC's neuron step (``up``
    rows and ``down`` columns scaled alike), moved by ``2 mean_i log s_i`` by a neuron
    rescale ``s`` (docs/ddc.md)."""
    r, c = balance(up.detach().double().cpu())  # balance works on the CPU
    return c.log() + r.log().mean() - down_cols.double().cpu().clamp_min(1e-300).log().mean()


def norm_channel_coordinate(gain: Tensor, sides: Sequence[Tensor]) -> Tensor:
    """``psi_j = log|g_j| - (1/k) sum_r side_r,j`` over the ``k`` readers' log column radii
    (:func:`column_log_radius`, :func:`overlapped_log_radius`): the orbit coordinate of norm
    channel ``j``; the gauge (``g_j t_j``, reader columns ``/ t_j``) moves it by ``2 log t_j``."""
    g = gain.detach().double().abs().clamp_min(1e-300).log()
    return g - torch.stack([x.to(g.device) for x in sides]).mean(0)


GAUGE_AGGREGATES = (
    "balance_mean",
    "balance_max",
    "head_mean_row",
    "head_mean_row_change",
    "router_mean_row",
    "router_mean_row_change",
    "vo_angle",
    "vo_angle_max",
    "norm_channel_drift",
    "norm_channel_drift_max",
)


class GaugeDrift:
    """Orbit coordinates of every gauge of ``plan`` and their change since construction (see
    the module docstring: balance defects, head / router mean rows, V/O Procrustes angles).
    Holds a copy (CPU) of the rescale coordinates, mean rows and V/O weights at
    construction; :meth:`record` reads the current weights (no hooks, any optimizer). Works
    on FSDP2 models (DTensor weights are gathered; every rank must call :meth:`record`)."""

    def __init__(self, model: nn.Module, plan=None):
        self.plan = plan if plan is not None else make_plan(model)
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.layouts = {e.name: e.layout for e in self.plan.entries}
        mlps, _, self.shifts = tracked_blocks(self.plan)
        self.rescales = [(b.scope, b.rescale(*b.up_part())) for b in mlps]
        biases = {}
        for b in self.plan.blocks:
            if isinstance(b, MoEBlock) and b.router_bias:
                biases[b.router] = b.router_bias
        self.shift_bias = {sym.params()[0]: biases.get(sym.params()[0]) for sym in self.shifts}
        self.attn = [b for b in self.plan.blocks if isinstance(b, AttentionBlock) and b.qkv is None and b.v and b.o]
        # v bias per attention scope (b.v is set for every block of self.attn)
        self._v_bias: dict[str, str | None] = {b.scope: dict(b.biases).get(b.v or "") for b in self.attn}
        self.norms: list[NormChannel] = [c for c in self.plan.norm_channels if c.certain]
        self._overlap = self._overlapped_readers(mlps)
        with torch.no_grad():
            self.init = self._coordinates()
            self.vo0 = {b.scope: self._vo(b) for b in self.attn}

    def _w(self, name: str) -> Tensor:
        return _full(self.params[name].detach())

    def _overlapped_readers(self, mlps: list[MLPBlock]) -> dict[str, str]:
        """``{in-projection: out-projection}`` of the dense, unfused MLPs whose up part (the
        rows of the rescale pair :attr:`rescales` tracks) reads a norm: an overlapped reader."""
        readers = {r for c in self.norms for r in c.readers}
        out = {}
        for b in mlps:
            up, _ = b.up_part()
            if up in readers and b.experts == 1 and self.layouts[up].fused == 1 and not self.layouts[up].stacked:
                out[up] = b.out
        return out

    def _norm_coordinate(self, c: NormChannel) -> Tensor:
        """psi [d] of norm channel ``c`` (:func:`norm_channel_coordinate`): readers in a
        shift gauge centered, overlapped readers by their balanced radius."""
        shifted = {sym.params()[0] for sym in self.shifts}
        sides = []
        for r, orient in zip(c.readers, c.orients):
            if r in self._overlap:
                down = self.layouts[self._overlap[r]].to_logical(self._w(self._overlap[r]))[0]
                up = self._w(r) if orient == "out_in" else self._w(r).T
                sides.append(overlapped_log_radius(up, down.double().norm(dim=0)))
            else:
                sides.append(column_log_radius(self._w(r), orient, centered=r in shifted))
        return norm_channel_coordinate(self._w(c.gain), sides).cpu()

    def _vo(self, b: AttentionBlock) -> tuple[Tensor, Tensor]:
        """(V [| v bias], O) on the CPU in float32 (the init copy stays off the accelerator)."""
        assert b.v is not None  # self.attn keeps only blocks with a separate V projection
        v = self._w(b.v).float().cpu()
        v_bias = self._v_bias[b.scope]
        if v_bias:
            v = torch.cat([v, self._w(v_bias).float().cpu()[:, None]], 1)
        return v, self._w(b.o).float().cpu().clone()

    def _mean_row(self, name: str) -> Tensor:
        w = self._w(name).double()
        c = w.mean(0)
        bias = self.shift_bias.get(name)
        if bias:
            c = torch.cat([c, self._w(bias).double().mean().reshape(1)])
        return c.cpu()

    def _coordinates(self) -> dict[str, Tensor]:
        out = {}
        for scope, sym in self.rescales:
            ts = {n: self._w(n) for n in sym.params()}
            out["rescale:" + scope] = rescale_coordinate(sym, ts, self.layouts).double().cpu()
        for sym in self.shifts:
            out["shift:" + sym.params()[0]] = self._mean_row(sym.params()[0])
        for c in self.norms:
            out["norm:" + c.gain] = self._norm_coordinate(c)
        return out

    @torch.no_grad()
    def record(self) -> dict[str, float]:
        """``{key: float}``: the aggregates in :data:`GAUGE_AGGREGATES` that the model has and
        the per-block values (``key/<scope or name>``)."""
        now = self._coordinates()
        out: dict[str, float] = {}
        means, maxes = [], []
        for scope, _ in self.rescales:
            d = (now["rescale:" + scope] - self.init["rescale:" + scope]).abs()
            out[f"balance_mean/{scope}"], out[f"balance_max/{scope}"] = float(d.mean()), float(d.max())
            means.append(float(d.mean()))
            maxes.append(float(d.max()))
        if means:
            out["balance_mean"], out["balance_max"] = sum(means) / len(means), max(maxes)
        agg: dict[str, list[float]] = {}
        for sym in self.shifts:
            name = sym.params()[0]
            kind = "head_mean_row" if sym.name == "logit_shift" else "router_mean_row"
            c, c0 = now["shift:" + name], self.init["shift:" + name]
            out[f"{kind}/{name}"], out[f"{kind}_change/{name}"] = float(c.norm()), float((c - c0).norm())
            agg.setdefault(kind, []).append(float(c.norm()))
            agg.setdefault(kind + "_change", []).append(float((c - c0).norm()))
        out.update({k: sum(v) / len(v) for k, v in agg.items()})
        angles = []
        for b in self.attn:
            v, o = self._vo(b)
            v0, o0 = self.vo0[b.scope]
            a = rotation_angle(vo_procrustes(v, o, v0, o0, b.hkv, b.head_dim))
            out[f"vo_angle/{b.scope}"] = float(a.mean())
            angles.append(float(a.mean()))
        if angles:
            out["vo_angle"], out["vo_angle_max"] = sum(angles) / len(angles), max(angles)
        out.update(self._norm_drift(now))
        return out

    def _norm_drift(self, now: Mapping[str, Tensor]) -> dict[str, float]:
        """``norm_channel_drift/<gain>``: RMS over channels of ``psi_j(t) - psi_j(0)``; mean and
        max over norms."""
        out: dict[str, float] = {}
        for c in self.norms:
            d = now["norm:" + c.gain] - self.init["norm:" + c.gain]
            out[f"norm_channel_drift/{c.gain}"] = float(d.pow(2).mean().sqrt())
        vals = list(out.values())
        if vals:
            out["norm_channel_drift"], out["norm_channel_drift_max"] = sum(vals) / len(vals), max(vals)
        return out


def token_embedding_entry(plan, model: nn.Module, name: str | None):
    """The plan entry of the token embedding: ``name``, else the weight of
    ``model.get_input_embeddings()``, else the embedding entry with the most rows."""
    embs = [e for e in plan.entries if e.role in ("embedding", "tied_embedding")]
    if name is not None:
        found = [e for e in embs if name in (e.name, *e.aliases)]
        if not found:
            raise ValueError(
                f"token_embedding={name!r} is not an embedding of the plan; embeddings: {[e.name for e in embs]}"
            )
        return found[0]
    get_in = getattr(model, "get_input_embeddings", None)
    if callable(get_in):
        w = getattr(get_in(), "weight", None)
        for e in embs:
            if e.param is w:
                return e
    return max(embs, key=lambda e: e.shape[0]) if embs else None


def decoupled_decay(optimizer: torch.optim.Optimizer | None, entry) -> float:
    """``lr * weight_decay`` of the optimizer's param group holding ``entry.param`` (0 without an optimizer)."""
    if optimizer is None:
        return 0.0
    for g in optimizer.param_groups:
        if any(q is entry.param for q in g["params"]):
            return float(g.get("lr", 0.0)) * float(g.get("weight_decay", 0.0))
    raise ValueError(f"{entry.name}: not in any param group of the optimizer given to DiagnosticsTracker")


def stale_rows(d: Tensor, seen: Tensor, moved_rel: float) -> tuple[Tensor, float, float] | None:
    """From per-row update norms ``d`` and the rows ``seen`` in the step: (absent rows that
    moved, their fraction of the absent rows, absent / present mean update); None when
    every row (or none) was present."""
    present = seen.to(d.device)
    absent = ~present
    if not (present.any() and absent.any()):
        return None
    moved_mask = absent & (d > moved_rel * d[present].median())
    ratio = d[absent].mean() / d[present].mean().clamp_min(1e-30)
    return moved_mask.nonzero().reshape(-1).cpu(), float(moved_mask.sum().float() / absent.sum()), float(ratio)


def _row_sq(layout, t: Tensor) -> Tensor:
    """Per-neuron squared norms of an in-projection ``[B, h]`` (all fused parts together)."""
    x = layout.to_logical(t).float()  # [B * k, h, n]
    return x.pow(2).sum(-1).reshape(-1, layout.fused, x.shape[1]).sum(1)


def _col_sq(layout, t: Tensor) -> Tensor:
    return layout.to_logical(t).float().pow(2).sum(1)  # squared column norms [B, h]


def _below(x: Tensor, rel: float) -> float:
    x = x.reshape(-1)
    med = x.median()
    return float((x <= rel * med).float().mean()) if med > 0 else float("nan")


class DiagnosticsTracker:
    """Dead-direction diagnostics over training (see the module docstring).

    Args:
        model: the model being trained (hooks are installed on its modules).
        plan: its :class:`equiopt.Plan` (default ``equiopt.plan(model)``); roles say which
            weights are embeddings, heads, routers, MLP blocks.
        token_embedding: name of the token-embedding weight (default: the weight of
            ``model.get_input_embeddings()``, else the embedding entry with the most rows).
        top_k: experts per token (default: read from the router, its MoE block or the config).
        act_rel / update_rel: "dead" thresholds relative to the layer's median neuron.
        moved_rel: an absent token's row "moved" when its update exceeds ``moved_rel`` x the
            median update of the present rows.
        optimizer: the optimizer; when given, the decoupled weight decay of the embedding's
            param group (``W <- W (1 - lr wd)``, read at :meth:`step`, so call ``step()``
            before the lr scheduler steps) is removed from the embedding's update before
            rows are counted as stale: decay moves every row and is not stale momentum.
    """

    def __init__(
        self,
        model: nn.Module,
        plan=None,
        *,
        token_embedding: str | None = None,
        top_k: int | None = None,
        act_rel: float = 1e-3,
        update_rel: float = 1e-2,
        moved_rel: float = 1e-3,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        self.model = model
        self.plan = plan if plan is not None else make_plan(model)
        self.act_rel, self.update_rel, self.moved_rel = act_rel, update_rel, moved_rel
        self.optimizer = optimizer
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.mlps, routers, self.shifts = tracked_blocks(self.plan)
        self.layouts = {e.name: e.layout for e in self.plan.entries}
        self.routers = [self.plan.entry(r) for r in routers]
        # stale rows need an untied embedding: a tied one gets the head's gradient every step
        emb = token_embedding_entry(self.plan, model, token_embedding)
        self.embedding = emb if emb is not None and emb.role == "embedding" else None
        self.last_stale: Tensor = torch.zeros(0, dtype=torch.long)  # absent rows that moved, last step
        self.history: list[dict] = []
        # tracked weights: snapshot at the last step()
        names = [n for b in self.mlps for n in b.params()] + [e.name for e in self.routers]
        if self.embedding is not None:
            names.append(self.embedding.name)
        self._tracked = list(dict.fromkeys(names))
        self._snap = {n: self.params[n].detach().clone() for n in self._tracked}
        self._handles = self._install_hooks(top_k)
        self._reset_window()

    def _install_hooks(self, top_k: int | None) -> list:
        """Forward hooks: hidden activations of dense MLPs, router choices, tokens seen."""
        handles = []
        for b in self.mlps:
            if b.experts == 1 and not self.layouts[b.out].stacked:
                mod = self.model.get_submodule(self.plan.entry(b.out).module_name)
                handles.append(mod.register_forward_pre_hook(self._act_hook(b.scope)))
        for r in self.routers:
            E, k = r.shape[0], _find_top_k(self.model, r.module_name, top_k)
            mod = self.model.get_submodule(r.module_name)
            handles.append(mod.register_forward_hook(self._router_hook(r.module_name, E, k)))
        self._seen: Tensor | None = None
        if self.embedding is not None:
            mod = self.model.get_submodule(self.embedding.module_name)
            handles.append(mod.register_forward_pre_hook(self._ids_hook))
        return handles

    def _act_hook(self, scope: str):
        def hook(module, args):
            if not torch.is_grad_enabled():
                return
            a = args[0].detach()
            s = a.abs().reshape(-1, a.shape[-1]).sum(0).float()
            self._act[scope] = self._act.get(scope, 0) + s
            self._act_count[scope] = self._act_count.get(scope, 0) + a.numel() // a.shape[-1]

        return hook

    def _router_hook(self, name: str, E: int, k: int):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return
            idx = _router_choice(output, E, k, name)
            counts = torch.bincount(idx.reshape(-1).long(), minlength=E).float().cpu()
            self._load[name] = self._load.get(name, torch.zeros(E)) + counts

        return hook

    def _ids_hook(self, module, args):
        if not torch.is_grad_enabled():
            return
        ids = args[0]
        assert self.embedding is not None  # this hook is installed only for an untied embedding
        if self._seen is None:
            self._seen = torch.zeros(self.embedding.shape[0], dtype=torch.bool, device=ids.device)
        self._seen[ids.reshape(-1)] = True

    def _reset_window(self) -> None:
        self._steps = 0
        self._upd: dict[str, Tensor] = {}  # block scope -> summed per-neuron update norm [B, h]
        self._stale: list[tuple[float, float]] = []  # per step: (moved absent / absent, absent/present update ratio)
        self._act: dict[str, Tensor] = {}  # block scope -> summed |hidden activation| [h]
        self._act_count: dict[str, int] = {}  # block scope -> tokens summed into _act
        self._load: dict[str, Tensor] = {}  # router module -> tokens routed per expert [E]

    # -- per step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Record the update since the previous call (call it after ``optimizer.step()``)."""
        delta = {n: self.params[n].detach() - self._snap[n] for n in self._tracked}
        for b in self.mlps:
            sq = _col_sq(self.layouts[b.out], delta[b.out])
            for n in b.ins:
                sq = sq + _row_sq(self.layouts[n], delta[n])
            self._upd[b.scope] = self._upd.get(b.scope, 0) + sq.sqrt()
        if self.embedding is not None and self._seen is not None:
            de = delta[self.embedding.name]
            decay = decoupled_decay(self.optimizer, self.embedding)
            if decay:
                de = de + decay * self._snap[self.embedding.name]  # remove W_prev * (-lr wd)
            found = stale_rows(de.float().norm(dim=-1), self._seen, self.moved_rel)
            if found is not None:
                self.last_stale, moved, ratio = found
                self._stale.append((moved, ratio))
            self._seen.zero_()
        for n in self._tracked:
            self._snap[n].copy_(self.params[n].detach())
        self._steps += 1

    # -- per evaluation ----------------------------------------------------------------
    @torch.no_grad()
    def orbit_drift(self) -> dict[str, float]:
        """Current position along the symmetry orbits (no window): per head/router the mean
        row relative to the mean row norm, per MLP the std over neurons of log(|up|/|down|)."""
        out: dict[str, float] = {}
        vals: dict[str, list[float]] = {"head_mean_row": [], "router_mean_row": []}
        for sym in self.shifts:
            (name,) = sym.params()
            kind = "head_mean_row" if sym.name == "logit_shift" else "router_mean_row"
            rel, absolute = shift_coordinate(sym, self.params[name])
            out[f"{kind}/{name}"], out[f"{kind}_abs/{name}"] = rel, absolute
            vals[kind].append(rel)
        out.update({k: sum(v) / len(v) for k, v in vals.items() if v})
        stds = []
        for b in self.mlps:
            r = rescale_coordinate(b.rescale(*b.up_part()), self.params, self.layouts)
            out[f"updown_log_ratio_std/{b.scope}"] = float(r.std())
            out[f"updown_log_ratio_mean/{b.scope}"] = float(r.mean())
            stds.append(float(r.std()))
        if stds:
            out["updown_log_ratio_std"] = sum(stds) / len(stds)
        return out

    def record(self, step: int | None = None) -> dict[str, float]:
        """Summary of the window since the previous record (flat ``{key: float}``, also
        appended to :attr:`history`); starts a new window."""
        rec: dict[str, float] = {"step": step if step is not None else len(self.history)}
        act, upd = [], []
        for b in self.mlps:
            if b.scope in self._act and self._act_count.get(b.scope):
                v = _below(self._act[b.scope] / self._act_count[b.scope], self.act_rel)
                rec[f"dead_act/{b.scope}"] = v
                act.append(v)
            if b.scope in self._upd:
                v = _below(self._upd[b.scope], self.update_rel)
                rec[f"dead_update/{b.scope}"] = v
                upd.append(v)
        dead_e = []
        for r in self.routers:
            load = self._load.get(r.module_name)
            if load is not None and load.sum() > 0:
                f = load / load.sum()
                v = float((f < 0.1 / f.numel()).float().mean())
                rec[f"dead_experts/{r.module_name}"] = v
                rec[f"max_load/{r.module_name}"] = float(f.max())
                dead_e.append(v)
        for key, vals in (("dead_act", act), ("dead_update", upd), ("dead_experts", dead_e)):
            if vals:
                rec[key] = sum(vals) / len(vals)
        if self._stale:
            rec["stale_rows"] = sum(s for s, _ in self._stale) / len(self._stale)
            rec["stale_update_ratio"] = sum(r for _, r in self._stale) / len(self._stale)
        rec.update(self.orbit_drift())
        rec["window_steps"] = self._steps
        self.history.append(rec)
        self._reset_window()
        return rec

    def dead_neurons(self, scope: str, by: str = "update") -> Tensor:
        """Indices ``[n, 2]`` (expert/batch, neuron) of the neurons of block ``scope`` dead in
        the current window, by ``"update"`` or ``"act"`` (call before :meth:`record`)."""
        if by == "update":
            if scope not in self._upd:
                blocks = [b.scope for b in self.mlps]
                raise KeyError(f"no update recorded for block {scope!r} (call step() first); blocks: {blocks}")
            x = self._upd[scope]
            rel = self.update_rel
        elif by == "act":
            if scope not in self._act:
                raise KeyError(
                    f"no activation recorded for block {scope!r} (dense MLPs only, training forwards); "
                    f"blocks: {list(self._act)}"
                )
            x = (self._act[scope] / self._act_count[scope]).reshape(1, -1)
            rel = self.act_rel
        else:
            raise ValueError(f"by must be 'update' or 'act', got {by!r}")
        return (x <= rel * x.reshape(-1).median()).nonzero()

    def stale_rows(self) -> list[tuple[float, float]]:
        """Per step of the current window: (moved absent rows / absent rows, update ratio)."""
        return list(self._stale)

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def state_dict(self) -> dict:
        """History only: on resume the window restarts at the loaded weights."""
        return {"history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: Mapping) -> None:
        self.history = [dict(r) for r in state["history"]]
        with torch.no_grad():
            for n in self._tracked:
                self._snap[n].copy_(self.params[n].detach())
        self._reset_window()


# ---------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------
PANELS = (
    ("dead_act", "dead neurons (activation ~ 0)"),
    ("dead_update", "dead neurons (update ~ 0)"),
    ("dead_experts", "dead experts (load < 0.1/E)"),
    ("stale_rows", "absent-token embedding rows that moved"),
    ("head_mean_row", "LM head |mean row| / mean |row|"),
    ("router_mean_row", "router |mean row| / mean |row|"),
    ("updown_log_ratio_std", "std over neurons of log(|up_i| / |down_i|)"),
    ("stale_update_ratio", "absent / present embedding-row update"),
)


def plot_history(
    histories: Sequence[Mapping] | Mapping[str, Sequence[Mapping]], path, title: str | None = None
) -> list[str]:
    """Plot diagnostics histories to a PNG at ``path``; returns the keys plotted.

    ``histories``: one history (a list of :meth:`DiagnosticsTracker.record` dicts) or
    ``{label: history}`` to overlay runs (e.g. one per optimizer). Panels without data in
    any run are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = dict(histories) if isinstance(histories, Mapping) else {"": list(histories)}
    keys = [(k, t) for k, t in PANELS if any(k in r for h in runs.values() for r in h)]
    if not keys:
        raise ValueError("plot_history: no diagnostics in the histories (record() was never called?)")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (k, t) in zip(axes.flat, keys):
        for label, h in runs.items():
            pts = [(r["step"], r[k]) for r in h if k in r and r[k] == r[k]]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=label or None)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if any(label for label in runs):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [k for k, _ in keys]
