"""Dead-Direction Conditioners (DDC): a base optimizer (Adam or Muon) lifted to one whose
trajectory is equivariant under the *gauges* of a model, the continuous symmetries along
whose orbits the loss is flat. See ``docs/ddc.md`` for the derivation and proofs and
``shared/design/ddc.md`` for what is known about the paper ([A]/[L]) and what is our
reconstruction ([R]).

Gauges found from an :func:`equiopt.plan` (``plan.blocks``):

* **neuron rescale** (:class:`RescaleGauge`): for every dense :class:`~equiopt.blocks.MLPBlock`,
  the in-projection whose rows (with their bias) can be multiplied by ``s_i > 0`` while the
  out-projection's columns are divided by ``s_i`` without changing the block's output. It is
  *found by a float64 probe* of the block's module (ReLU / LeakyReLU MLPs: the in-projection;
  SwiGLU: the up projection, never the gate), so an activation that is not positively
  homogeneous gives no gauge. Needs the model (not only the plan).
* **neuron rescale inside stacked / fused weights** (:class:`StackedRescaleGauge`): for every
  other MLP block (stacked experts ``[E, 2h, d]``, a fused gate_up, transposed storage), row
  ``i`` of one in-projection part of expert ``e`` (:func:`part_rows`) times ``s_{e,i}``,
  column ``i`` of expert ``e``'s out-projection divided by it; found by a float64 probe of the
  whole model (:func:`probe_stacked_rescale`) per part, stepped for all experts at once.
* **translation** (:class:`ShiftGauge`): ``W -> W + 1 c^T`` on an untied LM head (softmax
  cross-entropy) and on a softmax MoE router (with its bias, if any: ``b -> b + c0 1``).
* **norm-channel scale** (:class:`NormGauge`): for every module owning exactly a 1-D gain
  (RMSNorm / LayerNorm, + its bias), the ``nn.Linear`` modules that read its output directly
  (:func:`norm_readers`: forward hooks on one float64 forward) and a float64 probe of the
  whole model (:func:`probe_norm`): gain entry ``j`` times ``t_j``, column ``j`` of every
  reader divided by it. A reader's rows may be in a neuron gauge (balanced radius ``r c^T``,
  :func:`balance`), a rotation (per-column radii) or the logit shift (centered columns).
* **rotation** (:class:`RotationGauge`, Muon base only): per kv head ``V_j -> R_j V_j``,
  ``O_i -> O_i R_j^T``. The whole-matrix polar map is equivariant under these block-diagonal
  orthogonal actions, so they need no extra state; they are recorded (and tested). Q/K
  rotations inside the RoPE planes are recorded only where no per-channel q/k norm gain
  breaks them (Qwen3's ``q_norm``/``k_norm`` do).

One step (Lean numbering of ``design/ddc.md``), on a rescale gauge with sides
``A_i = [W_in[i, :], b_in[i]]`` and ``B_i = W_out[:, i]``:

1. decoupled weight decay ``W <- (1 - lr wd) W`` on every member (both sides alike);
2. per side ``rho = ||A_i||`` (resp. ``||B_i||``), ``gh = <g, W>``,
   ``g_tan = g - gh / rho^2 W``, invariant input ``x = rho g_tan``;
4. radial mode ``gU_i = (ghA_i + ghB_i) / sqrt(2)`` to a scalar Adam state per neuron,
   ``dlogrho = -lr adam(gU) / sqrt(2)`` on both sides;
5. gauge mode ``gV = (ghA - ghB) / sqrt(2)``: no motion;
6. base update ``u`` on ``x`` (Adam per coordinate, or the polar map of the whole
   ``diag(rho) G_tan`` matrix for Muon), re-projected ``u <- u - <u, W>/rho^2 W``;
7. ``W <- exp(dlogrho) W - lr rho u``.

Norm-channel gauges (``1 + k`` sides per channel: the gain entry, column ``j`` of each of ``k``
readers) and weights in two gauges step together per unit (``DDCOptimizer._scale_step``):
per-side scalar Adam on the log-gradients with the gauge mode removed, the motion along the
orbit removed (weights 1 for the gain, ``1/k`` per reader), the base rule on ``x = R * G``,
``W <- diag(e^dl_row) W diag(e^dl_col) - lr R * u``; see docs/ddc.md.

Translation gauges: the base AdamW step without weight decay, with the orbit component of
the update (its mean over the vocabulary / expert rows) removed. Every other parameter gets
the base rule unchanged: AdamW (bit-identical to ``torch.optim.AdamW(foreach=False)``), or
for ``base="muon"`` Muon (Nesterov, Newton-Schulz, ``sqrt(max(1, rows/cols))``) on matrices
and AdamW on vectors, embeddings, heads and routers.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, cast, overload

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import distribute_tensor

from . import fastpath, sharding
from .blocks import AttentionBlock, Block, MLPBlock, MoEBlock, VocabBlock
from .functional import muon_scale, same_dense_layout, torch_adamw
from .layouts import MATRIX, Layout
from .maps import hybrid
from .optimizer import NonFiniteGradientError
from .planner import Plan, unwrap
from .planner import plan as make_plan
from .presets import DEFAULTS, PRESETS, check_common
from .roles import ROLE_TABLE, ROLES

#: A probe forward's input: token ids, or a batch dict passed to the model as keywords.
ProbeInput = Tensor | Mapping[str, Tensor]

__all__ = [
    "DDCOptimizer",
    "NormGauge",
    "RescaleGauge",
    "RotationGauge",
    "StackedRescaleGauge",
    "ShiftGauge",
    "balance",
    "derive_gauges",
    "ddc_optimizer",
    "configure",
    "describe",
    "gauge_table",
    "norm_readers",
    "probe_norm",
    "part_rows",
    "probe_rescale",
    "probe_stacked_rescale",
]

ADAM_LR = 6e-3  # harness LR scan (docs/ddc.md "Default learning rates"): lr_scale 2 of 3e-3
MUON_LR = 4e-2  # the same scan: lr_scale 2 of 2e-2 (AdamW parts of DDC-Muon: ADAM_LR)
ADAM_MATRIX_WD = 0.1
MUON_MATRIX_WD = 1e-3
PROBE_TOL = 1e-9
GAUGE_KINDS = ("rescale", "shift", "norm", "rotation")
_SQRT2 = math.sqrt(2.0)
# roles that Muon conventions leave to AdamW
_ADAM_ROLES_UNDER_MUON = ("embedding", "tied_embedding", "lm_head", "router", "vector")


# ----------------------------------------------------------------------------------------
# gauges
# ----------------------------------------------------------------------------------------
@dataclass
class RescaleGauge:
    """Neuron rescale: rows of ``in_weight`` [h, d] (and ``in_bias`` [h]) times ``s``, columns
    of ``out_weight`` [d_out, h] divided by ``s``; one gauge mode per neuron."""

    name: str
    in_weight: Tensor
    out_weight: Tensor
    in_bias: Tensor | None = None
    names: tuple[str, ...] = ()

    kind = "rescale"

    @property
    def params(self) -> tuple[Tensor, ...]:
        return tuple(p for p in (self.in_weight, self.in_bias, self.out_weight) if p is not None)

    @property
    def modes(self) -> int:
        return self.in_weight.shape[0]


@dataclass
class StackedRescaleGauge:
    """Neuron rescale inside stacked / fused / transposed MLP weights (OLMoE's and Qwen3-MoE's
    ``experts.gate_up_proj [E, 2h, d]`` with ``down_proj [E, d, h]``, Phi-3's fused
    ``gate_up_proj``): row ``i`` of part ``part`` of expert ``e``'s logical in-projection
    (:func:`part_rows`) times ``s_{e,i}``, column ``i`` of expert ``e``'s logical
    out-projection divided by it; one gauge mode per (expert, neuron). The other parts of the
    in-projection (the gate) are in no gauge and get the base rule inside the same step."""

    name: str
    in_weight: Tensor
    out_weight: Tensor
    in_layout: Layout
    out_layout: Layout
    part: int
    names: tuple[str, ...] = ()

    kind = "rescale"
    in_bias = None  # in-projection biases are not claimed (derive_gauges gives the reason)

    @property
    def params(self) -> tuple[Tensor, ...]:
        return (self.in_weight, self.out_weight)

    @property
    def modes(self) -> int:
        b, m, _ = self.in_layout.logical_shape(self.in_weight.shape)  # b = E * fused parts
        return b // self.in_layout.fused * m


def _neuron_factor(t: Tensor, layout: Layout, axis: str) -> Tensor:
    """Ones shaped to broadcast over the stored ``t`` with one entry per logical row (``axis =
    "rows"``: the in-axis has size 1) or per logical column (``"cols"``)."""
    shape = list(t.shape)
    in_dim, out_dim = (-2, -1) if layout.transposed else (-1, -2)
    shape[in_dim if axis == "rows" else out_dim] = 1
    return torch.ones(shape, dtype=t.dtype, device=t.device)


def part_rows(t: Tensor, layout: Layout, part: int = 0) -> Tensor:
    """Part ``part`` of the logical matrices of a stored ``t`` as a view ``[E, m, n]`` (E = 1
    unless stacked; rows = neurons): transposed storage read as ``[..., out, in]``, fused parts
    concatenated (rows ``part*m:(part+1)*m``) or interleaved (rows ``part::fused``). Writing
    into the view writes ``t``. Head splits, flattened kernels and flat experts are refused."""
    if layout.heads > 1 or layout.flatten or layout.flat_experts:
        raise ValueError(f"part_rows: layout {layout.describe()} is not a stacked / fused / transposed matrix")
    y = t if layout.stacked else t.unsqueeze(0)
    if layout.transposed:
        y = y.mT
    k = layout.fused
    if k == 1:
        return y
    m = y.shape[1] // k
    return y.unflatten(1, (m, k))[:, :, part] if layout.interleaved else y.unflatten(1, (k, m))[:, part]


@dataclass
class ShiftGauge:
    """Translation ``W -> W + 1 c^T`` of the rows of ``weight`` (and ``bias -> bias + c0``)."""

    name: str
    weight: Tensor
    bias: Tensor | None = None
    names: tuple[str, ...] = ()

    kind = "shift"

    @property
    def params(self) -> tuple[Tensor, ...]:
        return tuple(p for p in (self.weight, self.bias) if p is not None)

    @property
    def modes(self) -> int:
        return self.weight.shape[-1] + (self.bias is not None)


@dataclass
class RotationGauge:
    """Per-head rotation (Muon base): handled by the polar map's two-sided orthogonal
    equivariance; ``axis`` says how each parameter is acted on."""

    name: str
    symmetry: str  # "vo_rotation" | "qk_rope_rotation"
    params: tuple[Tensor, ...] = ()
    names: tuple[str, ...] = ()
    heads: int = 0
    head_dim: int = 0

    kind = "rotation"

    @property
    def modes(self) -> int:
        return 0


@dataclass
class NormGauge:
    """Norm-channel scale: entry ``j`` of a norm's ``gain`` (and of its ``bias``, LayerNorm)
    times ``t_j``, input column ``j`` of every linear map that reads the norm's output
    (``readers``) divided by ``t_j``; one gauge mode per channel, with ``1 + len(readers)``
    sides. ``transposed``: per reader, whether it is stored ``[in, out]`` (GPT-2's Conv1D), so
    the gauge scales its stored rows; empty: every reader is stored ``[out, in]``."""

    name: str
    gain: Tensor
    readers: tuple[Tensor, ...]
    bias: Tensor | None = None
    names: tuple[str, ...] = ()  # gain, bias (if any), readers
    transposed: tuple[bool, ...] = ()

    kind = "norm"

    @property
    def reader_sides(self) -> tuple[str, ...]:
        """The stored side of each reader that the gauge scales: ``"col"`` or ``"row"``."""
        flags = self.transposed or (False,) * len(self.readers)
        return tuple("row" if t else "col" for t in flags)

    @property
    def params(self) -> tuple[Tensor, ...]:
        return tuple(p for p in (self.gain, self.bias) if p is not None) + tuple(self.readers)

    @property
    def modes(self) -> int:
        return self.gain.shape[0]


def _module_param(module: nn.Module, rel: str) -> Tensor:
    return dict(module.named_parameters())[rel]


@torch.no_grad()
def probe_rescale(
    module: nn.Module,
    in_name: str,
    out_name: str,
    bias_name: str | None = None,
    d_in: int | None = None,
    tol: float = PROBE_TOL,
    seed: int = 0,
) -> float:
    """Relative change of ``module``'s output (float64 copy, eval mode) when the rows of
    parameter ``in_name`` (and ``bias_name``) are multiplied by random ``s_i`` in [0.5, 2]
    and the columns of ``out_name`` divided by them. ``~1e-16`` for an exact rescale gauge.
    Names are relative to ``module``."""
    m = copy.deepcopy(module).to(torch.float64).eval()
    w_in, w_out = _module_param(m, in_name), _module_param(m, out_name)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, d_in or w_in.shape[1], generator=gen, dtype=torch.float64)
    y0 = m(x)
    s = torch.exp((torch.rand(w_in.shape[0], generator=gen, dtype=torch.float64) * 2 - 1) * math.log(2.0))
    w_in.mul_(s[:, None])
    if bias_name is not None:
        _module_param(m, bias_name).mul_(s)
    w_out.div_(s[None, :])
    y1 = m(x)
    return float((y1 - y0).norm() / y0.norm().clamp_min(1e-300))


def _is_norm_like(module: nn.Module) -> bool:
    """A module that owns exactly a 1-D ``weight`` (and possibly a 1-D ``bias`` of the same
    shape): RMSNorm / LayerNorm with a per-channel gain. Structure only; the probe decides."""
    own = dict(module.named_parameters(recurse=False))
    w, b = own.get("weight"), own.get("bias")
    return (
        w is not None
        and w.ndim == 1
        and set(own) <= {"weight", "bias"}
        and (b is None or tuple(b.shape) == tuple(w.shape))
    )


def _weight(model: nn.Module, name: str) -> Tensor:
    """The ``weight`` parameter of submodule ``name``."""
    w = getattr(model.get_submodule(name), "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"module {name!r} has no weight tensor")
    return w


def _output_tensor(out) -> Tensor:
    """The tensor a model returns: itself, ``.logits`` (HF), the first field of another HF
    output (``last_hidden_state``; a ``ModelOutput`` is a mapping), or a tuple's first element."""
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, Mapping) and out:
        out = next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"model output is {type(out).__name__}, not a tensor")
    return out


def _same_view(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` are the same values in memory (the same tensor, or a no-op view of it
    such as HF's ``hidden_states[:, slice(0, None)]``)."""
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    )


def _forward(m: nn.Module, inputs: ProbeInput):
    """``m(**inputs)`` for a batch dict (the planner's ``example=``), ``m(inputs)`` for ids."""
    return m(**inputs) if isinstance(inputs, Mapping) else m(inputs)


def _probe_input(example: ProbeInput) -> ProbeInput:
    """``example`` on the CPU, its floating tensors in float64 (the probes' model copy)."""

    def conv(t):
        return t.to(device="cpu", dtype=torch.float64) if t.is_floating_point() else t.to("cpu")

    return (
        {k: conv(v) if isinstance(v, Tensor) else v for k, v in example.items()}
        if isinstance(example, Mapping)
        else conv(example)
    )


def norm_readers(m: nn.Module, ids: ProbeInput, transposed: Collection[str] = ()) -> dict[str, list[str]]:
    """``{norm module name: [names of the reader modules whose input is its output]}`` for
    every norm-like module of ``m`` called exactly once in one forward on ``ids`` (token ids,
    or a batch dict passed as keywords; forward hooks compare the norm's output and each
    reader's input as tensors, not by name). Readers: every nn.Linear and the modules named in
    ``transposed`` (a weight stored ``[in, out]``, GPT-2's Conv1D: the plan's layout says so)."""
    outs: dict[str, list[Tensor]] = {}
    ins: dict[str, list[Tensor]] = {}
    hooks = []
    for name, mod in m.named_modules():
        if _is_norm_like(mod):
            hooks.append(mod.register_forward_hook(lambda _m, _a, y, n=name: outs.setdefault(n, []).append(y)))
        elif isinstance(mod, nn.Linear) or name in transposed:
            hooks.append(mod.register_forward_pre_hook(lambda _m, a, n=name: ins.setdefault(n, []).append(a[0])))
    try:
        with torch.no_grad():
            _output_tensor(_forward(m, ids))
    finally:
        for h in hooks:
            h.remove()
    found: dict[str, list[str]] = {}
    for norm, ys in outs.items():
        if len(ys) == 1 and isinstance(ys[0], Tensor):
            found[norm] = [lin for lin, xs in ins.items() if any(_same_view(x, ys[0]) for x in xs)]
    return found


@torch.no_grad()
def probe_norm(
    m: nn.Module, norm: str, readers: list[str], ids: ProbeInput, seed: int = 0, transposed: Collection[str] = ()
) -> float:
    """Relative change of ``m(ids)`` when channel ``j`` of the gain (and bias) of module
    ``norm`` is multiplied by random ``t_j`` in [0.5, 2] and input column ``j`` of every
    reader's weight divided by it (row ``j`` of the stored ``[in, out]`` weight of a reader
    named in ``transposed``); ``m`` is restored afterwards. ``~1e-16`` for an exact gauge. Run
    it on a float64 copy (:func:`derive_gauges` does)."""
    own: dict[str, Tensor] = dict(m.get_submodule(norm).named_parameters(recurse=False))
    ws = [_weight(m, r) for r in readers]
    saved = [p.clone() for p in list(own.values()) + ws]
    y0 = _output_tensor(_forward(m, ids))
    gen = torch.Generator().manual_seed(seed)
    t = torch.exp((torch.rand(own["weight"].shape[0], generator=gen, dtype=torch.float64) * 2 - 1) * math.log(2.0))
    for p in own.values():
        p.mul_(t.to(p.dtype))
    for r, w in zip(readers, ws):
        w.div_(t.to(w.dtype)[:, None] if r in transposed else t.to(w.dtype)[None, :])
    y1 = _output_tensor(_forward(m, ids))
    for p, old in zip(list(own.values()) + ws, saved):
        p.copy_(old)
    return float((y1 - y0).norm() / y0.norm().clamp_min(1e-300))


@torch.no_grad()
def probe_stacked_rescale(
    m: nn.Module,
    in_name: str,
    in_layout: Layout,
    part: int,
    out_name: str,
    out_layout: Layout,
    ids: ProbeInput,
    seed: int = 0,
) -> float:
    """Relative change of ``m(ids)`` when row ``i`` of part ``part`` of every logical
    in-projection of parameter ``in_name`` (:func:`part_rows`) is multiplied by a random
    ``s_{e,i}`` in [0.5, 2] and column ``i`` of the out-projection ``out_name`` of the same
    expert divided by it; ``m`` is restored afterwards. ``~1e-16`` for an exact gauge. Run it
    on a float64 copy (:func:`derive_gauges` does)."""
    params = dict(m.named_parameters())
    w_in, w_out = params[in_name], params[out_name]
    saved = [w_in.clone(), w_out.clone()]
    rows, cols = part_rows(w_in, in_layout, part), part_rows(w_out, out_layout)
    y0 = _output_tensor(_forward(m, ids))
    gen = torch.Generator().manual_seed(seed)
    s = torch.exp((torch.rand(rows.shape[:2], generator=gen, dtype=torch.float64) * 2 - 1) * math.log(2.0))
    rows.mul_(s.to(rows.dtype)[:, :, None])
    cols.div_(s.to(cols.dtype)[:, None, :])
    y1 = _output_tensor(_forward(m, ids))
    w_in.copy_(saved[0])
    w_out.copy_(saved[1])
    return float((y1 - y0).norm() / y0.norm().clamp_min(1e-300))


def _rel(name: str, scope: str) -> str:
    return name[len(scope) + 1 :] if scope else name


def _qk_norm_present(the_plan: Plan, block: AttentionBlock) -> bool:
    """A per-channel gain on q or k: a vector in the attention's scope of size ``head_dim``
    (Qwen3, Gemma 3: shared by the heads) or ``H * head_dim`` (OLMoE: over all heads) that is
    not a projection bias."""
    scope = block.scope + "." if block.scope else ""
    biases = {b for _, b in block.biases}
    sizes = {(block.head_dim,), (block.hq * block.head_dim,), (block.hkv * block.head_dim,)}
    return any(
        e.role == "vector" and e.name.startswith(scope) and e.name not in biases and tuple(e.shape) in sizes
        for e in the_plan.entries
    )


Gauge = RescaleGauge | StackedRescaleGauge | ShiftGauge | RotationGauge | NormGauge


def _param(the_plan: Plan, name: str) -> Tensor:
    """The parameter of plan entry ``name``. A plan from :func:`equiopt.plan` carries the
    parameter of every entry (``PlanEntry.param`` is only optional in the dataclass)."""
    p = the_plan.entry(name).param
    assert p is not None, f"plan entry {name!r} carries no parameter"
    return p


def _axes(g: Gauge) -> list[tuple[Tensor, str]]:
    """What a gauge holds of each member: ``rows`` (neuron in-projection, translated head /
    router), ``cols`` (neuron out-projection, norm readers) or the ``whole`` tensor (biases,
    gains)."""
    if isinstance(g, RescaleGauge):
        return [(g.in_weight, "rows"), (g.out_weight, "cols")] + (
            [(g.in_bias, "whole")] if g.in_bias is not None else []
        )
    if isinstance(g, NormGauge):
        return [(p, "whole") for p in (g.gain, g.bias) if p is not None] + [(w, "cols") for w in g.readers]
    if isinstance(g, StackedRescaleGauge):  # steps alone (its own path): nothing else may share them
        return [(g.in_weight, "whole"), (g.out_weight, "whole")]
    if isinstance(g, ShiftGauge):  # W -> W + 1 c^T moves along the rows; a column scale can join it
        return [(g.weight, "rows")] + ([(g.bias, "whole")] if g.bias is not None else [])
    return [(p, "whole") for p in g.params]


class _Claims:
    """The gauges found so far and what they hold, per axis: a parameter's rows and its
    columns can be in two different scaling gauges (the overlap rule, docs/ddc.md), a
    ``whole`` claim excludes every other; a tied (aliased) parameter is claimed by none.
    Rotations are recorded but hold nothing (the polar map needs no state)."""

    def __init__(self, the_plan: Plan):
        self.gauges: list[Gauge] = []
        self.taken: dict[int, set[str]] = {}
        self.aliased = {id(e.param) for e in the_plan.entries if e.aliases}

    def free(self, *ps: Tensor | None, axis: str = "whole") -> bool:
        """Every ``p`` is a parameter, untied, and ``axis`` of it (``whole``: all of it) is free."""

        def ok(p: Tensor | None) -> bool:
            if p is None or id(p) in self.aliased:
                return False
            held = self.taken.get(id(p), set())
            return not held if axis == "whole" else not held & {axis, "whole"}

        return all(ok(p) for p in ps)

    def take(self, g: Gauge) -> None:
        self.gauges.append(g)
        for p, axis in _axes(g):
            self.taken.setdefault(id(p), set()).add(axis)


def _claim_shift(the_plan: Plan, block: Block, claims: _Claims) -> None:
    """The logit shift of an untied LM head, the router shift of a softmax MoE router."""
    if isinstance(block, VocabBlock) and block.head and not block.tied:
        w = _param(the_plan, block.head)
        b = _param(the_plan, block.head_bias) if block.head_bias else None
        if claims.free(w, *([b] if b is not None else [])):
            claims.take(
                ShiftGauge(
                    f"logit_shift:{block.head}", w, b, names=tuple(n for n in (block.head, block.head_bias) if n)
                )
            )
    if isinstance(block, MoEBlock) and block.scoring == "softmax" and block.router:
        w = _param(the_plan, block.router)
        b = _param(the_plan, block.router_bias) if block.router_bias else None
        if w.ndim == 2 and claims.free(w, *([b] if b is not None else [])):
            claims.take(
                ShiftGauge(
                    f"router_shift:{block.router}",
                    w,
                    b,
                    names=tuple(n for n in (block.router, block.router_bias) if n),
                )
            )


def _rescale_candidates(the_plan: Plan) -> tuple[list[MLPBlock], list[MLPBlock]]:
    """The MLPs whose neuron rescale can be probed: ``(dense, stacked)``; dense = one expert,
    no fused in-projection, plain ``[out, in]`` storage (:class:`RescaleGauge`, probed on the
    block's module); stacked = every other (:class:`StackedRescaleGauge`, probed on the model)."""
    dense: list[MLPBlock] = []
    stacked: list[MLPBlock] = []
    for b in the_plan.blocks:
        if not isinstance(b, MLPBlock):
            continue
        plain = b.experts == 1 and all(the_plan.entry(n).layout == MATRIX for n in b.params())
        (dense if plain else stacked).append(b)
    return dense, stacked


def _probe_choice(module: nn.Module, b: MLPBlock, tol: float, why: dict[str, str]) -> tuple[str, str | None] | None:
    """``(in-projection, its bias)``: the last in-projection of ``b`` that passes the rescale
    probe (gated: the linear 'up'), or None; the failing ones get their reason in ``why``."""
    biases = dict(b.in_biases)
    chosen = None
    for name in b.ins:
        bias = biases.get(name)
        try:
            err = probe_rescale(
                module, _rel(name, b.scope), _rel(b.out, b.scope), _rel(bias, b.scope) if bias else None
            )
        except (RuntimeError, TypeError, ValueError):
            # the module cannot run forward on one float64 [16, d_in] tensor (shape or dtype
            # mismatch, e.g. an embedding's integer ids; DTensor weights; a forward that needs
            # more arguments or validates its input): no probed gauge. Errors of our own name
            # mapping (KeyError from _module_param) propagate.
            err = math.inf
        if err <= tol:
            chosen = (name, bias)
        else:
            why[name] = (
                f"rescale probe failed (output changes by {err:.1e} relative): the activation "
                "after this projection is not positively homogeneous"
            )
    return chosen


def _claim_rescale(
    the_plan: Plan, b: MLPBlock, module: nn.Module | None, claims: _Claims, tol: float, why: dict[str, str]
) -> None:
    """The neuron rescale gauge of the dense MLP ``b`` (``module``: its module), if probed."""
    out = _param(the_plan, b.out)
    if module is None or out.ndim != 2:
        return
    chosen = _probe_choice(module, b, tol, why)
    if chosen is None:
        why.setdefault(b.out, "no in-projection of its MLP passed the rescale probe")
        return
    in_name, bias_name = chosen
    w_in = _param(the_plan, in_name)
    b_in = _param(the_plan, bias_name) if bias_name else None
    if claims.free(w_in, axis="rows") and claims.free(out, axis="cols") and (b_in is None or claims.free(b_in)):
        claims.take(
            RescaleGauge(
                f"neuron_rescale:{b.scope}",
                w_in,
                out,
                b_in,
                names=tuple(n for n in (in_name, bias_name, b.out) if n),
            )
        )
    else:
        for n in (in_name, bias_name, b.out):
            if n:
                why.setdefault(
                    n,
                    "neuron rescale: a member is in another gauge (a translation) or tied",
                )


def _claim_stacked(
    the_plan: Plan, b: MLPBlock, m64: nn.Module, ids: ProbeInput, claims: _Claims, tol: float, why: dict[str, str]
) -> None:
    """The neuron rescale gauge of a stacked / fused MLP ``b``: the last in-projection part whose
    whole-model probe (:func:`probe_stacked_rescale` on the float64 copy ``m64``) passes."""
    out_layout = the_plan.entry(b.out).layout
    chosen = None
    for name, part in b.parts():
        layout = the_plan.entry(name).layout
        try:
            err = probe_stacked_rescale(m64, name, layout, part, b.out, out_layout, ids)
        except ValueError as e:  # part_rows: a layout without plain neuron rows (head split, flat experts)
            why.setdefault(name, f"neuron rescale: {e}")
            continue
        except (RuntimeError, TypeError):  # the model cannot run forward on the probe input
            err = math.inf
        if err <= tol:
            chosen = (name, part, layout)
        else:
            why[name] = (
                f"rescale probe of part {part} failed (output changes by {err:.1e} relative): the activation "
                "after it is not positively homogeneous"
            )
    if chosen is None:
        why.setdefault(b.out, "no in-projection part of its MLP passed the rescale probe")
        return
    name, part, layout = chosen
    if b.in_bias(name) is not None:
        for n in (name, b.out):
            why[n] = "neuron rescale of a stacked / fused in-projection with a bias is not handled"
        return
    w_in, w_out = _param(the_plan, name), _param(the_plan, b.out)
    if not claims.free(w_in, w_out):
        for n in (name, b.out):
            why.setdefault(n, "neuron rescale: a member is in another gauge or tied")
        return
    gauge = StackedRescaleGauge(f"neuron_rescale:{b.scope}", w_in, w_out, layout, out_layout, part, (name, b.out))
    claims.take(gauge)


def _claim_vo(the_plan: Plan, block: AttentionBlock, claims: _Claims, why: dict[str, str]) -> None:
    """The per-kv-head V/O rotation of an attention with separate q/k/v projections."""
    assert block.v is not None  # the caller skips fused-qkv blocks and blocks without v
    bias_of = dict(block.biases)  # projection weight name -> its bias
    v, o = _param(the_plan, block.v), _param(the_plan, block.o)
    if block.v in bias_of:  # the bias rotates with V's rows but gets AdamW (per coordinate)
        for n in (block.v, block.o):
            why.setdefault(
                n,
                f"V/O rotation not claimed: the v bias {bias_of[block.v]} rotates with V but is "
                "updated by AdamW (per coordinate)",
            )
    elif claims.free(v, axis="rows") and claims.free(o, axis="cols"):
        claims.gauges.append(  # not taken: rotations need no state and overlap nothing
            RotationGauge(
                f"vo_rotation:{block.scope}", "vo_rotation", (v, o), (block.v, block.o), block.hkv, block.head_dim
            )
        )


def _claim_qk(the_plan: Plan, block: AttentionBlock, claims: _Claims, why: dict[str, str]) -> None:
    """The Q/K rotation inside the RoPE planes, where no q/k bias or norm gain breaks it."""
    if not (block.q and block.k):
        return
    bias_of = dict(block.biases)
    if block.q in bias_of or block.k in bias_of:
        reason = "Q/K RoPE rotation not claimed: the q/k biases rotate with Q/K but are updated by AdamW"
    elif _qk_norm_present(the_plan, block):
        reason = "Q/K RoPE rotation broken by the per-channel q/k norm gain"
    else:
        q, k = _param(the_plan, block.q), _param(the_plan, block.k)
        if claims.free(q, k, axis="rows"):
            claims.gauges.append(
                RotationGauge(
                    f"qk_rope_rotation:{block.scope}",
                    "qk_rope_rotation",
                    (q, k),
                    (block.q, block.k),
                    block.hkv,
                    block.head_dim,
                )
            )
        return
    for n in (block.q, block.k):
        why.setdefault(n, reason)


def _claim_rotations(the_plan: Plan, block: AttentionBlock, base: str, claims: _Claims, why: dict[str, str]) -> None:
    """Per-head rotations of one attention block (Muon base only)."""
    if base != "muon":
        for n in block.params():
            why.setdefault(
                n, "rotation gauges need a rotation-equivariant base (Muon's polar map); Adam is per coordinate"
            )
        return
    if block.qkv is not None or not block.v:
        for n in block.params():
            why.setdefault(n, "fused qkv: per-head rotations of a fused projection are not claimed")
        return
    _claim_vo(the_plan, block, claims, why)
    _claim_qk(the_plan, block, claims, why)


def _probe_ids(the_plan: Plan, example: ProbeInput | None = None) -> ProbeInput | None:
    """The norm-channel probe's forward input: ``example`` (float64, CPU) when given, else
    [2, 8] token ids from the plan's token embedding, else None."""
    if example is not None:
        return _probe_input(example)
    for b in the_plan.blocks:
        if isinstance(b, VocabBlock) and b.embedding:
            vocab = _param(the_plan, b.embedding).shape[0]
            return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    return None


def _transposed_modules(the_plan: Plan) -> set[str]:
    """Names of the modules whose 2-D ``weight`` the plan reads as stored ``[in, out]``."""
    return {
        e.name.removesuffix(".weight")
        for e in the_plan.entries
        if e.name.endswith(".weight") and e.layout.transposed and len(e.shape) == 2 and not e.layout.flat_experts
    }


def _reader_conflict(claims: _Claims, w: Tensor, name: str, transposed: bool) -> str | None:
    """Why reader ``w`` cannot take a norm-channel (column) gauge, or None."""
    if transposed and not claims.free(w):  # its unit scales stored rows alone (_scale_units)
        return f"its reader {name} is stored [in, out] and in another gauge (not combined)"
    for g in claims.gauges:
        if isinstance(g, ShiftGauge) and g.weight is w and g.bias is not None:
            return (
                f"its reader {name} is in the {g.name.split(':')[0]} gauge with a bias: the column scale of a "
                "translated matrix with a bias is not combined (the translation is kept)"
            )
        if isinstance(g, RescaleGauge) and g.in_weight is w and g.in_bias is not None:
            return (
                f"its reader {name} has a bias and its rows are in {g.name}: the balanced radius of "
                "[W | b] is undefined for a zero bias (not combined)"
            )
    if not claims.free(w, axis="cols"):
        return f"the columns of its reader {name} are in another gauge or tied"
    return None


def _norm_reason(
    the_plan: Plan,
    model: nn.Module,
    m64: nn.Module,
    norm: str,
    readers: list[str],
    ids: ProbeInput,
    claims: _Claims,
    tol: float,
    transposed: Collection[str] = (),
) -> str | None:
    """Why the norm-like module ``norm`` gets no norm-channel gauge, or None to claim it
    (``transposed``: the readers stored ``[in, out]``)."""
    if not readers:
        return "norm-channel gauge: no linear map (nn.Linear, a weight stored [in, out]) reads its output directly"
    err = probe_norm(m64, norm, readers, ids, transposed=transposed)
    if not err <= tol:
        return (
            f"norm-channel probe failed (output changes by {err:.1e} relative) with readers "
            f"{', '.join(readers)}: its output also reaches something not scaled back (a tied head, "
            "a non-Linear reader such as stacked experts, a (1 + w) gain)"
        )
    ids_of = {id(e.param): e.name for e in the_plan.entries}
    for r in readers:
        w = _weight(model, r)
        if id(w) not in ids_of:
            return f"its reader {r} is not a parameter of the plan"
        reason = _reader_conflict(claims, w, ids_of[id(w)], r in transposed)
        if reason is not None:
            return "norm-channel gauge not claimed: " + reason
    ws = {id(_weight(model, r)) for r in readers}
    shifted = any(g.kind == "shift" and id(g.params[0]) in ws for g in claims.gauges)
    rows = any(isinstance(g, RescaleGauge) and id(g.in_weight) in ws for g in claims.gauges)
    if shifted and rows:
        return (
            "norm-channel gauge not claimed: its readers include a translated matrix (head / router) and a "
            "neuron-gauged one; they step in different param_groups"
        )
    return None


def _claim_norms(
    the_plan: Plan,
    model: nn.Module,
    probe: tuple[nn.Module, ProbeInput | None] | str,
    claims: _Claims,
    tol: float,
    why: dict[str, str],
) -> None:
    """Norm-channel scale gauges: every norm-like module whose direct nn.Linear readers (found
    by hooks on one float64 forward) pass :func:`probe_norm`. ``probe``: the float64 model copy
    and its input (:func:`_probe_model`), or why there is none."""
    ids_of = {id(e.param): e.name for e in the_plan.entries}
    norms = [
        (n, m)
        for n, m in model.named_modules()
        if _is_norm_like(m) and all(id(p) in ids_of for p in m.parameters(recurse=False))
    ]
    if not norms:
        return
    m64, ids = (None, None) if isinstance(probe, str) else probe
    found = None
    why_all = (
        probe
        if isinstance(probe, str)
        else "norm-channel probe needs an input (no token embedding in the plan: pass example=)"
    )
    tmods = _transposed_modules(the_plan)
    if m64 is not None and ids is not None:
        try:
            found = norm_readers(m64, ids, tmods)
        except (RuntimeError, TypeError, ValueError) as err:  # the model cannot run on [2, 8] ids
            why_all = f"norm-channel probe could not run the model forward ({type(err).__name__})"
    for name, mod in norms:
        own = [p for p in (mod.weight, getattr(mod, "bias", None)) if isinstance(p, Tensor)]
        rs = found.get(name) if found is not None else None
        if found is None or m64 is None or ids is None:
            reason: str | None = why_all
        elif rs is None:
            reason = "norm-channel gauge: the norm is called more than once (or never) in one forward"
        elif not claims.free(*own):
            reason = "norm-channel gauge: the gain is in another gauge or tied"
        else:
            reason = _norm_reason(the_plan, model, m64, name, rs, ids, claims, tol, tmods)
        if reason is not None or rs is None:
            for p in own:
                why.setdefault(ids_of[id(p)], reason or "")
            continue
        readers = tuple(_weight(model, r) for r in rs)
        bias = own[1] if len(own) > 1 else None
        names = tuple(ids_of[id(p)] for p in own + list(readers))
        claims.take(NormGauge(f"norm_scale:{name}", own[0], readers, bias, names, tuple(r in tmods for r in rs)))


def _probe_model(
    the_plan: Plan, model: nn.Module, example: ProbeInput | None
) -> tuple[nn.Module, ProbeInput | None] | str:
    """The whole-model probes' float64 CPU copy of ``model`` (eager MoE kernels) and its input
    (:func:`_probe_ids`), or why there is none (FSDP2 DTensors are not copied)."""
    if any(_is_dtensor(p) for p in model.parameters()):  # FSDP2: no copy; the optimizer refuses it
        return "DTensor (FSDP2) parameters: the whole-model probes did not run"
    m64 = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    eager = getattr(m64, "set_experts_implementation", None)
    if callable(eager):  # HF MoE: the grouped_mm kernels take no float64
        eager("eager")
    return m64, _probe_ids(the_plan, example)


def derive_gauges(
    the_plan: Plan,
    model: nn.Module | None = None,
    base: str = "adam",
    kinds: tuple[str, ...] = GAUGE_KINDS,
    tol: float = PROBE_TOL,
    why: dict[str, str] | None = None,
    example: ProbeInput | None = None,
) -> list[Gauge]:
    """The gauges of a planned model (see the module docstring), claimed in the order shift,
    rescale, norm, rotation; ``model`` is needed for the rescale and norm-channel probes
    (without it neither is claimed, with a warning). Claims are per axis (:class:`_Claims`):
    a weight's rows can be in a neuron gauge and its columns in a norm-channel gauge (the
    overlap rule of docs/ddc.md); a gauge whose members are taken otherwise is dropped.
    ``why``: filled with ``{parameter name: reason}`` for candidates that were not claimed
    (:func:`gauge_table` completes it for every other parameter). ``example``: the whole-model
    probes' forward input (a batch dict or ids; default: token ids from the plan's embedding)."""
    why = {} if why is None else why
    claims = _Claims(the_plan)
    if "shift" in kinds:
        for block in the_plan.blocks:
            _claim_shift(the_plan, block, claims)
    dense, stacked = _rescale_candidates(the_plan) if "rescale" in kinds else ([], [])
    if (dense or stacked) and model is None:
        warnings.warn(
            "ddc: no model given, neuron rescale (and norm-channel) gauges cannot be probed and are not claimed",
            stacklevel=2,
        )
        for b in dense + stacked:
            for n in b.params():
                why.setdefault(n, "no model given: the rescale probe could not run")
    if model is None:
        probe: tuple[nn.Module, ProbeInput | None] | str = "no model given"
    else:
        probe = _probe_model(the_plan, model, example) if stacked or "norm" in kinds else "not needed"
        modules = dict(model.named_modules())
        for b in dense:
            _claim_rescale(the_plan, b, modules.get(b.scope), claims, tol, why)
        for b in stacked:
            if isinstance(probe, str) or probe[1] is None:
                reason = probe if isinstance(probe, str) else "the rescale probe needs an input (pass example=)"
                for n in b.params():
                    why.setdefault(n, f"neuron rescale: {reason}")
            else:
                _claim_stacked(the_plan, b, probe[0], probe[1], claims, tol, why)
    if "norm" in kinds and model is not None:
        _claim_norms(the_plan, model, probe, claims, tol, why)
    if "rotation" in kinds:
        for block in the_plan.blocks:
            if isinstance(block, AttentionBlock):
                _claim_rotations(the_plan, block, base, claims, why)
    return claims.gauges


def balance(w: Tensor, iters: int = 500, tol: float | None = None) -> tuple[Tensor, Tensor]:
    """Diagonal balancing of ``w`` [..., m, n] (the radius of a weight in two rescale gauges, one
    on its rows, one on its columns; docs/ddc.md "Overlapping gauges"): ``r`` [m], ``c`` [n]
    > 0 such that ``w / (r c^T)`` has unit RMS in every row and every column (Sinkhorn on
    ``w**2``, float64, matrix-vector products, until ``log c`` moves by less than ``tol``;
    default ``1e-15`` for float64 ``w``, the machine epsilon for lower precision: the linear
    convergence leaves a fraction of the last move, below the rounding of the result; measured
    on the tiny Qwen3's up projections, 5-6 iterations instead of 7 at ``1e-2`` eps, the same
    1.6e-7 error against the float64 fixed point).
    ``r c^T`` is unique for a matrix without zero rows/columns whose square has total support
    (e.g. every entry nonzero), hence equivariant: ``balance(diag(s) w diag(1/t))`` gives
    ``diag(s) r c^T diag(1/t)``. Returns ``r`` and ``c`` with equal geometric means."""
    w2 = (w * w).to(torch.float64)
    m, n = w2.shape[-2:]
    if tol is None:
        tol = 1e-15 if w.dtype == torch.float64 else torch.finfo(w.dtype).eps
    c2 = w2.new_ones(w2.shape[:-2] + (n,))  # squared factors
    for _ in range(iters):
        r2 = _mv(w2, c2.reciprocal()).div_(n)
        c2_new = _mv(w2.mT, r2.reciprocal()).div_(m)
        moved = (c2_new / c2).log_().abs_().max()  # the change of log c; r follows c
        c2 = c2_new
        if (moved < 2 * tol).item():
            break
    r2 = _mv(w2, c2.reciprocal()).div_(n)
    shift = (r2.log().mean(-1, keepdim=True) - c2.log().mean(-1, keepdim=True)) / 4  # equal geometric means
    return (0.5 * r2.log() - shift).exp().to(w.dtype), (0.5 * c2.log() + shift).exp().to(w.dtype)


# ----------------------------------------------------------------------------------------
# the optimizer
# ----------------------------------------------------------------------------------------
def _adam_dir(state: dict, x: Tensor, beta1: float, beta2: float, eps: float, prefix: str = "") -> Tensor:
    """Bias-corrected Adam direction ``m_hat / (sqrt(v_hat) + eps)`` of input ``x``; the step
    counter is the caller's (``state['step']``)."""
    m, v = state[prefix + "exp_avg"], state[prefix + "exp_avg_sq"]
    step = state["step"].item()
    m.lerp_(x, 1 - beta1)
    v.mul_(beta2).addcmul_(x, x, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    return (m / bc1) / ((v.sqrt() / bc2_sqrt).add_(eps))


_FULL = (torch.float32, torch.float64)


def _is_dtensor(p: Tensor) -> bool:
    return hasattr(p, "device_mesh") and hasattr(p, "placements")


def _row_sharded(p: Tensor) -> bool:
    """A float32/64 DTensor sharded on dim 0 (FSDP2): stepped on its local rows where the step
    allows it (AdamW; Adam column units with all-reduced column statistics)."""
    if not _is_dtensor(p) or p.dtype not in _FULL:
        return False
    pl = tuple(cast(Any, p).placements)
    return len(pl) == 1 and pl[0].is_shard() and cast(Any, pl[0]).dim == 0


def _all_reduce(t: Tensor, p: Tensor) -> Tensor:
    """Sum of ``t`` over the shards of the DTensor ``p`` (its mesh's process group), in place."""
    dist.all_reduce(t, group=cast(Any, p).device_mesh.get_group())
    return t


def _plain_shards(p: Tensor) -> bool:
    """A DTensor DDC can step (FSDP2): one mesh dimension, ``Shard(0)`` or ``Replicate()``."""
    pl = tuple(cast(Any, p).placements)
    return len(pl) == 1 and (pl[0].is_replicate() or (pl[0].is_shard() and cast(Any, pl[0]).dim == 0))


def _state_dtype(p: Tensor) -> torch.dtype:
    """State and arithmetic dtype of a parameter: its own for float32/float64, float32 for
    bf16/fp16 (the parameter keeps its dtype; each step rounds the fp32 result into it)."""
    return p.dtype if p.dtype in _FULL else torch.float32


@overload
def _work(p: Tensor) -> Tensor: ...
@overload
def _work(p: None) -> None: ...
def _work(p: Tensor | None) -> Tensor | None:
    """``p`` itself (float32/64: updated in place), a float32 working copy (bf16/fp16), or for
    a DTensor (FSDP2) the whole gathered tensor (every rank then computes the whole update)."""
    if p is not None and _is_dtensor(p):
        full = cast(Any, p).full_tensor().detach()
        return full if full.dtype in _FULL else full.float()
    return p if p is None or p.dtype in _FULL else p.detach().float()


def _grad(p: Tensor, work: Tensor) -> Tensor:
    g = p.grad if p.grad is not None else torch.zeros_like(work)
    if _is_dtensor(g):
        g = cast(Any, g).full_tensor()
    return g if g.dtype == work.dtype else g.to(work.dtype)


def _local_shard(p: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's shard of an FSDP2 (DTensor) parameter and of its gradient (zeros without one)."""
    w = cast(Any, p).to_local()
    return w, (cast(Any, p.grad).to_local() if p.grad is not None else torch.zeros_like(w))


def _write_back(p: Tensor | None, work: Tensor | None) -> None:
    if p is None or work is None or work is p:  # work is None only when p is
        return
    if _is_dtensor(p):  # this rank's shard of the whole result (the same on every rank)
        d = cast(Any, p)
        mine = distribute_tensor(work.to(p.dtype), d.device_mesh, d.placements, src_data_rank=None)
        d.to_local().copy_(mine.to_local())
    else:
        p.copy_(work)


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    """``a / b`` where ``b > 0``, else 0 (the quotient's inf / nan at ``b = 0`` is not selected)."""
    return torch.where(b > 0, a / b, 0.0)


def _buckets(items: list, key) -> list[list]:
    """``items`` grouped by ``key(item)``, in first-seen order."""
    out: dict = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return list(out.values())


def _rescale_key(g) -> tuple:
    """Gauges that can share one stacked step; the last field says whether batching applies
    (float32/64 parameters on one device)."""
    ps = g.params
    return (
        tuple(g.in_weight.shape),
        tuple(g.out_weight.shape),
        g.in_bias is not None,
        g.in_weight.dtype,
        g.in_weight.device,
        all(p.dtype == g.in_weight.dtype and p.dtype in _FULL and not _is_dtensor(p) for p in ps),
    )


def _polar_update(upd: Tensor, group: dict, transposed: bool = False) -> Tensor:
    """Muon's direction of a (batch of) momentum matrices [..., m, n]: Newton-Schulz times
    sqrt(max(1, out/in)) of the logical ``[out, in]`` matrix (``transposed``: stored ``[in,
    out]``, so ``out = n``), evaluated by the fast path's route for the shape (the `muon`
    preset's: :func:`equiopt.fastpath.choose_polar_route`, Gram Newton-Schulz on wide float32 /
    float64 matrices on CPU, else the standard iterations; the same polynomial)."""
    m, n = upd.shape[-2:]
    x = upd.reshape(-1, m, n)
    steps = len(fastpath.polar_coeffs("newton_schulz", group["ns_steps"]))
    route = fastpath.choose_polar_route(min(m, n), max(m, n), steps, False, device=x.device, cdt=x.dtype)
    scale = muon_scale(n, m) if transposed else muon_scale(m, n)
    out = fastpath.iterative_polar(x, "newton_schulz", group["ns_steps"], scale=scale, gram_ns=route == "gram_ns")
    return out.reshape(upd.shape)


# -- the paper's maps lifted into DDC-Muon's conditioning (rules=, docs/ddc.md "Lifting") ----
@dataclass(frozen=True)
class _Lift:
    """The paper's ``hybrid`` map in place of Muon's polar map on one parameter's (conditioned)
    Nesterov momentum: row-aware (``column_aware=False``, an in-projection ``[x_A | x_b]``) or
    column-aware (an out-projection ``x_B``), with the paper preset's options (no Muon scale)
    except ``alpha`` (0 by default: no nuclear-norm factor, see ``_LIFT_ALPHA``)."""

    column_aware: bool
    order: str = "row_then_polar"
    alpha: float = 0.0
    eps: float = 1e-8
    polar_method: str = "polar_express"
    polar_steps: int | None = None


def _lifted_update(upd: Tensor, lift: _Lift) -> Tensor:
    """``maps.hybrid`` of a (batch of) momentum matrices, on ``upd^T`` when column-aware."""
    x = upd.mT if lift.column_aware else upd
    u = hybrid(x, order=lift.order, alpha=lift.alpha, eps=lift.eps, method=lift.polar_method, steps=lift.polar_steps)
    return u.mT if lift.column_aware else u


def _direction(upd: Tensor, group: dict, lift: _Lift | None, transposed: bool = False) -> Tensor:
    """The DDC-Muon base map of a Nesterov momentum: Muon's polar map (``transposed``: of a
    weight stored ``[in, out]``), or a lifted paper map (plain ``[out, in]`` matrices only)."""
    return _polar_update(upd, group, transposed) if lift is None else _lifted_update(upd, lift)


# -- the diagonal-scaling gauges with norm channels (docs/ddc.md "Norm-channel gauges") ----
@dataclass
class _Unit:
    """One conditioned matrix of a scaling-gauge group: the columns of ``params`` side by
    side (a weight [m, n], then its in-bias or a LayerNorm bias as one more column; a gain
    as one column), with the gauge acting on its rows (``row``, sign +1) and on its first
    ``ncol`` columns (``col``, sign -1). ``vector``: the base rule is Adam (gains).
    ``center``: the rows are also translated (a head / router in a shift gauge): the unit is
    the centered matrix, its mean row is kept."""

    params: tuple[Tensor, ...]
    row: Gauge | None = None
    col: Gauge | None = None
    ncol: int = 0
    vector: bool = False
    center: bool = False


def _scale_units(gauges: list[Gauge], centered: set[int]) -> list[_Unit]:
    """The units of a group's neuron-rescale and norm-channel gauges; a weight whose rows are
    in a neuron gauge and whose columns are read from a norm is one unit with both; a reader
    in ``centered`` (ids of translated heads / routers) is a centered unit."""
    units: dict[int, _Unit] = {}
    for g in gauges:
        if isinstance(g, RescaleGauge):
            ins = (g.in_weight,) + ((g.in_bias,) if g.in_bias is not None else ())
            units.setdefault(id(g.in_weight), _Unit(ins)).row = g
            out = units.setdefault(id(g.out_weight), _Unit((g.out_weight,)))
            out.col, out.ncol = g, g.out_weight.shape[1]
    for g in gauges:
        if isinstance(g, NormGauge):
            own = (g.gain,) + ((g.bias,) if g.bias is not None else ())
            units[id(g.gain)] = _Unit(own, row=g, vector=True)
            for w, side in zip(g.readers, g.reader_sides):
                u = units.setdefault(id(w), _Unit((w,)))
                if side == "row":  # stored [in, out]: a unit with rows only (no other gauge, _reader_conflict)
                    u.row = g
                else:
                    u.col, u.ncol, u.center = g, w.shape[1], id(w) in centered
    return list(units.values())


def _columns(ts: list[Tensor]) -> Tensor:
    """Tensors [m, n] or [m] side by side as one [m, *] matrix (a copy unless a single matrix)."""
    if len(ts) == 1 and ts[0].ndim == 2:
        return ts[0]
    return torch.cat([t if t.ndim == 2 else t[:, None] for t in ts], 1)


def _orbit_coeffs(U: Tensor, Wh: Tensor, ncol: int, iterative: bool = False) -> tuple[Tensor, Tensor]:
    """Least-squares ``(a, b)`` of ``U ~ diag(a) Wh + Wh[:, :ncol] diag(b)`` (batched; the orbit tangent
    of a matrix in a row and a column gauge, normalized coordinates): eliminate ``a``, solve the
    ``ncol x ncol`` Schur complement. When every column is gauged its null vector ``1`` (the
    pair ``a = 1, b = -1`` that moves nothing) is deflated, which gives ``1^T b = 0``.
    ``iterative``: conjugate gradients (:func:`_schur_cg`) instead of the dense solve."""
    W2 = Wh * Wh
    Q, Dr = W2[..., :ncol], W2.sum(-1)
    P = U * Wh
    rr, rc = P.sum(-1), P[..., :ncol].sum(-2)
    rhs = rc - _mv(Q.mT, rr / Dr)
    deflate = ncol == Wh.shape[-1]
    if iterative:
        b = _schur_cg(Q, Dr, rhs, deflate)
    else:
        S = torch.diag_embed(Q.sum(-2)) - Q.mT @ (Q / Dr.unsqueeze(-1))
        if deflate:
            S = S + S.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] / ncol
        b = torch.linalg.solve(S, rhs)
    return (rr - _mv(Q, b)) / Dr, b


def _mv(A: Tensor, v: Tensor) -> Tensor:
    """``A v`` for a (batch of) matrices and vectors, as ``v^T A^T`` (a batched product with a
    vector on the right is several times slower on CPU)."""
    return (v.unsqueeze(-2) @ A.mT).squeeze(-2)


def _schur_cg(Q: Tensor, Dr: Tensor, rhs: Tensor, deflate: bool, iters: int = 100) -> Tensor:
    """The solution ``b`` of :func:`_orbit_coeffs`' Schur system ``S b = rhs`` (batched),
    ``S = diag(1^T Q) - Q^T diag(1/Dr) Q``, by preconditioned conjugate gradients on
    matrix-vector products (the fast path: no ``ncol x ncol`` Gram matrix). For a balanced
    matrix ``S`` is close to ``m I`` off its null vector ``1``, so a few iterations reach the
    rounding level. ``deflate``: ``S + delta 1 1^T`` (``rhs`` is orthogonal to ``1``, so the
    solution is the one with ``1^T b = 0`` for any ``delta > 0``). Falls back to the dense
    solve if the residual does not reach ``64 eps |rhs|``."""
    qs = Q.sum(-2)
    delta = qs.mean(-1, keepdim=True) / Q.shape[-1] if deflate else torch.zeros_like(qs[..., :1])

    def S(v: Tensor) -> Tensor:
        return qs * v - _mv(Q.mT, _mv(Q, v) / Dr) + delta * v.sum(-1, keepdim=True)

    def dot(x: Tensor, y: Tensor) -> Tensor:
        return (x * y).sum(-1, keepdim=True)

    diag = qs + delta
    tol2 = (64 * torch.finfo(Q.dtype).eps) ** 2 * dot(rhs, rhs)
    b = rhs / diag
    r = rhs - S(b)
    z = r / diag
    p, rz = z, dot(r, z)
    for _ in range(iters):
        if (dot(r, r) <= tol2).all().item():
            return b
        Sp = S(p)
        alpha = _safe_div(rz, dot(p, Sp))
        b, r = b + alpha * p, r - alpha * Sp
        z = r / diag
        rz, rz_old = dot(r, z), rz
        p = z + _safe_div(rz, rz_old) * p
    dense = torch.diag_embed(qs) - Q.mT @ (Q / Dr.unsqueeze(-1)) + delta.unsqueeze(-1)
    return torch.linalg.solve(dense, rhs)


def _tangent(U: Tensor, M: Tensor, R: Tensor, sq: Tensor | None, unit: _Unit) -> Tensor:
    """``U`` with its component along the unit's gauge orbits removed, in normalized
    coordinates ``W_hat = M / R``: per row / per column ``U - <U, M>/||M||^2 M`` (``sq``: the
    squared norms), or the least-squares ``(a, b)`` of :func:`_orbit_coeffs` for both."""
    if sq is None:
        Wh = M / R
        a, b = _orbit_coeffs(U, Wh, unit.ncol)
        return U - a[:, None] * Wh - torch.nn.functional.pad(Wh[:, : unit.ncol] * b, (0, Wh.shape[1] - unit.ncol))
    if unit.row is not None:
        return U - _safe_div((U * M).sum(1), sq)[:, None] * M
    return U - _safe_div((U * M).sum(0), sq)[None, :] * M


def _radius(M: Tensor, unit: _Unit) -> tuple[Tensor, Tensor | None]:
    """The unit's radius, broadcastable to ``M``: row norms [m, 1], column norms [1, n] (with
    the squared norms as a vector), or the balanced ``r c^T`` when both are in a gauge."""
    if unit.row is not None and unit.col is not None:
        r, c = balance(M)
        return r[:, None] * c[None, :], None
    sq = (M * M).sum(1 if unit.row is not None else 0)
    return (sq.sqrt()[:, None] if unit.row is not None else sq.sqrt()[None, :]), sq


def _norm_radial(hs: list[Tensor], states: list[dict], lr: float, group: dict) -> Tensor:
    """Radial log-steps of one norm-channel gauge, one row per side (gain first, then the
    readers): Adam per side on the log-gradient with the gauge mode removed, then the motion
    along the orbit removed in the weighted sense (gain weight 1, each of k readers 1/k), so
    ``log rho_gain - mean_r log rho_r`` does not move."""
    beta1, beta2 = group["betas"]
    H = torch.stack(hs)
    k = H.shape[0] - 1
    sigma = torch.full((k + 1, 1), -1.0, dtype=H.dtype, device=H.device)
    sigma[0] = 1.0
    H = H - sigma * (sigma * H).sum(0) / (k + 1)
    prefixes = ["radial_"] + ["col_radial_"] * k
    dl = -lr * torch.stack(
        [_adam_dir(_radial_state(st, h, p), h, beta1, beta2, group["eps"], p) for st, h, p in zip(states, H, prefixes)]
    )
    w = torch.full_like(sigma, 1.0 / k)
    w[0] = 1.0
    return dl - sigma * (w * sigma * dl).sum(0) / w.sum()


_CHUNK = 1 << 19  # elements per row chunk of the fast path (temporaries stay small and cached)
_STACK = 1 << 16  # weights of at most this many elements are stacked with their equals (fewer calls)


def _row_chunks(M: Tensor) -> list[slice]:
    """Slices of the rows (dim -2) of ``M`` [..., m, n], about ``_CHUNK`` elements each."""
    rows = max(1, _CHUNK // max(1, M.numel() // max(1, M.shape[-2])))
    return [slice(i, i + rows) for i in range(0, M.shape[-2], rows)]


def _col_sums(M: Tensor, G: Tensor, center: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Per column of ``M`` [..., m, n]: ``||M_j||^2``, ``<G_j, M_j>`` and (``center``) the
    column sums of ``M`` and ``G``, accumulated over row chunks."""
    sums: list[Tensor] = []
    for sl in _row_chunks(M):
        Mi, Gi = M[..., sl, :], G[..., sl, :]
        parts = [(Mi * Mi).sum(-2), (Gi * Mi).sum(-2)] + ([Mi.sum(-2), Gi.sum(-2)] if center else [])
        sums = [t.add_(part) for t, part in zip(sums, parts)] if sums else parts
    if not sums:  # no rows (an empty shard)
        sums = [M.new_zeros(M.shape[:-2] + M.shape[-1:]) for _ in range(4 if center else 2)]
    return sums[0], sums[1], (sums[2] if center else None), (sums[3] if center else None)


def _fusable(*ts: Tensor) -> bool:
    """Whether torch's fused Adam kernel may take ``ts`` together (float32/64, one dense
    layout: :func:`~equiopt.functional.same_dense_layout`)."""
    return ts[0].dtype in _FULL and same_dense_layout(*ts)


def _fused_adam_direction(x: Tensor, m: Tensor, v: Tensor, step: Tensor, group: dict) -> Tensor:
    """Adam's moments of input ``x`` updated in place and its direction
    ``m_hat / (sqrt(v_hat) + eps)`` returned, by torch's fused Adam kernel in one pass (on the
    CPU its square root is ~2x faster than ``torch.sqrt``'s, results/ddc_bench): the kernel's
    ``p <- p - lr m_hat / (sqrt(v_hat) + eps)`` from ``p = 0`` with ``lr = -1``. ``step``: the
    count after this step (the kernel reads it, does not increment it)."""
    beta1, beta2 = group["betas"]
    u = torch.zeros_like(x)
    torch._fused_adam_(
        [u],
        [x],
        [m],
        [v],
        [],
        [step.to(x.device)],
        lr=-1.0,
        beta1=beta1,
        beta2=beta2,
        weight_decay=0.0,
        eps=group["eps"],
        amsgrad=False,
        maximize=False,
    )
    return u


def _member_stack(ts: list[Tensor | None]) -> Tensor | None:
    """The members' tensors of a stacked unit as one (the tensor itself for a single unit)."""
    if any(t is None for t in ts):
        return None
    return ts[0] if len(ts) == 1 else torch.stack([t for t in ts if t is not None])


def _chunked(u: _Unit, pr: dict, muon: bool) -> bool:
    """Whether the fast path steps unit ``u`` in row chunks: a single weight in a one-sided
    gauge whose base rule is Adam."""
    return "R" not in pr and len(u.params) == 1 and u.params[0].ndim == 2 and not (muon and not u.vector)


def _state_misfit(
    p: Tensor, key: str, value: object, modes: Mapping[tuple[int, str], int], unit: tuple[int, int] | None
) -> str | None:
    """What the shape of a saved state tensor ``key`` of ``p`` should have been, or ``None``
    when it fits: a radial state one entry per gauge mode (``modes``:
    :meth:`DDCOptimizer._radial_modes`), the others (moments, momentum) the parameter's shape,
    its local shard's (DTensor) or that of the unit it leads (``unit``:
    :meth:`DDCOptimizer._unit_shapes`); scalars (the step) always fit."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        return None
    if "radial_exp_avg" in key:
        want = modes.get((id(p), key[: key.index("exp_avg")]))
        if want is None:
            return "none (the parameter is in no scaling gauge of this optimizer)"
        return None if value.numel() == want else f"{want} gauge modes"
    shapes = {tuple(p.shape)} | ({tuple(cast(Any, p).to_local().shape)} if _is_dtensor(p) else set())
    shapes |= {unit} if unit is not None else set()
    return None if tuple(value.shape) in shapes else f"the parameter's {tuple(p.shape)}"


def _radial_state(state: dict, like: Tensor, prefix: str) -> dict:
    if prefix + "exp_avg" not in state:
        state[prefix + "exp_avg"] = torch.zeros_like(like)
        state[prefix + "exp_avg_sq"] = torch.zeros_like(like)
    return state


class DDCOptimizer(torch.optim.Optimizer):
    """Dead-Direction Conditioner over Adam or Muon (see the module docstring).

    ``params``: param_groups, each with ``ddc`` in {"rescale", "shift", "none"} and ``rule``
    in {"adam", "muon"} plus ``lr``, ``weight_decay``, ``betas``, ``eps``, ``momentum``,
    ``nesterov``, ``ns_steps``. ``gauges``: the gauges (:func:`derive_gauges`); every
    parameter of a rescale/shift gauge must sit in one group with the matching ``ddc``.
    Build it with :func:`ddc_optimizer`.
    """

    def __init__(
        self,
        params,
        gauges: list,
        base: str = "adam",
        names: dict | None = None,
        table: list[tuple[str, ...]] | None = None,
    ):
        defaults = dict(
            lr=ADAM_LR,
            weight_decay=0.0,
            betas=(0.9, 0.95),
            eps=1e-8,
            momentum=0.95,
            nesterov=True,
            ns_steps=5,
            on_nonfinite="raise",
            ddc="none",
            rule="adam",
        )
        super().__init__(params, defaults)
        self.base = base
        self.gauges = list(gauges)
        self.names = dict(names or {})
        # (name, shape, role, gauges) per parameter, for describe(); from ddc_optimizer
        self.table_rows = list(table or [])
        self.plan_notes: list[str] = []  # the plan's notes (frozen tensors, how roles were found): describe()
        for g in self.param_groups:
            for p in g["params"]:
                if _is_dtensor(p) and not _plain_shards(p):
                    raise NotImplementedError(
                        f"DDCOptimizer: parameter {self.names.get(p, tuple(p.shape))!r} is a DTensor with placements "
                        f"{cast(Any, p).placements}; DDC supports FSDP2's Shard(0) / Replicate() on one mesh dimension"
                    )
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for gauge in self.gauges:
            if gauge.kind == "rotation":
                continue
            groups = {id(group_of.get(id(p))) for p in gauge.params}
            grp = group_of.get(id(gauge.params[0]))
            want = _group_kind(gauge, self.gauges)
            if len(groups) != 1 or grp is None or grp["ddc"] != want:
                raise ValueError(f"{gauge.name}: its parameters must share one param_group with ddc={want!r}")
        self._centered = {id(g.params[0]) for g in self.gauges if g.kind == "shift"}
        self._gauges_of: dict[int, list] = {}
        for g in self.gauges:
            if g.kind != "rotation":
                for p in g.params:
                    self._gauges_of.setdefault(id(p), []).append(g)
        self.batched = True  # configure(opt, batched=False): the reference path
        self.stack_adam_gauges = False  # configure(opt, stack_adam_gauges=True): stacked DDC-Adam gauges
        self.lifts: dict[int, _Lift] = {}  # id(param) -> the paper map lifted there (ddc_optimizer(rules=))
        self.stored_in_out: set[int] = set()  # ids of weights stored [in, out] (Conv1D): Muon's shape factor
        self._units: dict[tuple, list[_Unit]] = {}  # _scale_step's units per gauge list
        self._unit_keys: dict[tuple, tuple] = {}  # _stack_key's fixed part per unit
        self._projections: dict[tuple, tuple[Tensor, Tensor]] = {}  # _radial_projections
        self._stacks: dict[tuple, tuple[Tensor, tuple[Tensor, ...]]] = {}  # _stack_views' buffers, views

    def _map(self, p: Tensor) -> dict:
        """The direction map options of ``p`` for :func:`_direction`: its lifted paper map
        (``rules=``) and whether it is stored ``[in, out]``."""
        return {"lift": self.lifts.get(id(p)), "transposed": id(p) in self.stored_in_out}

    def _lift_record(self) -> dict[int, dict]:
        """{parameter index in param_groups order: the lifted map's options} (configuration that
        the momentum state depends on: a checkpoint must be resumed with the same lifts)."""
        params = [p for g in self.param_groups for p in g["params"]]
        return {i: dataclasses.asdict(self.lifts[id(p)]) for i, p in enumerate(params) if id(p) in self.lifts}

    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict`` plus ``"ddc_lifts"``, the paper maps lifted by
        ``rules=`` (checked by :meth:`load_state_dict`)."""
        return {**super().state_dict(), "ddc_lifts": self._lift_record()}

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group`` (also how ``__init__`` takes its groups), refusing a group
        whose hyperparameters :func:`ddc_optimizer` would refuse, or whose ``ddc`` / ``rule`` is
        unknown, with the group's index; a refused group is not left half-added."""
        gi = len(self.param_groups)
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        try:
            if g["ddc"] not in ("rescale", "shift", "none") or g["rule"] not in ("adam", "muon"):
                raise ValueError(
                    f"param_groups[{gi}]: ddc must be 'rescale', 'shift' or 'none' and rule 'adam' or 'muon', "
                    f"got ddc={g['ddc']!r}, rule={g['rule']!r}"
                )
            numbers = {k: g[k] for k in ("lr", "weight_decay", "eps")}
            _check_options(g["rule"], numbers, dict(g, gauges=()), f"param_groups[{gi}]")
        except ValueError:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, except that the state of a bf16/fp16
        parameter stays float32 (torch casts floating state to the parameter's dtype), and a
        checkpoint whose lifted maps (``rules=``) differ from this optimizer's is refused."""
        saved = {int(k): v for k, v in state_dict.get("ddc_lifts", {}).items()}
        if saved != self._lift_record():
            raise ValueError(
                f"DDCOptimizer.load_state_dict: the checkpoint's lifted maps (rules=) {saved or 'none'} differ "
                f"from this optimizer's {self._lift_record() or 'none'} (parameter index -> map options); "
                "build the optimizer with the rules the checkpoint was trained with"
            )
        self._check_state_shapes(state_dict)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "ddc_lifts"})
        self._stacks.clear()
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if p.dtype in _FULL or i not in state_dict["state"]:
                continue
            for k, v in state_dict["state"][i].items():
                if k != "step" and isinstance(v, Tensor) and v.is_floating_point():
                    self.state[p][k] = v.detach().to(device=p.device, dtype=_state_dtype(p), copy=True)

    def _check_state_shapes(self, state_dict: dict) -> None:
        """Refuse a checkpoint whose state does not fit this optimizer's parameters (torch's
        ``load_state_dict`` takes any shape, and the step then fails far from the cause, or
        broadcasts). Group and parameter counts that differ are left to torch's own error."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved, self.param_groups)
        ):
            return
        modes, units = self._radial_modes(), self._unit_shapes()
        for theirs, mine in zip(saved, self.param_groups):
            for idx, p in zip(theirs["params"], mine["params"]):
                for key, value in state_dict["state"].get(idx, {}).items():
                    expected = _state_misfit(p, key, value, modes, units.get(id(p)))
                    if expected is not None:
                        raise ValueError(
                            f"DDCOptimizer.load_state_dict: {self.names.get(p, 'a parameter')}: saved {key} has "
                            f"shape {tuple(value.shape)}, expected {expected}; the checkpoint is of another model"
                        )

    def _radial_modes(self) -> dict[tuple[int, str], int]:
        """``(id(parameter), radial state prefix) -> gauge modes`` of the scaling gauges: the
        rescale gauge's in-weight and the norm gain hold ``radial_``, each reader ``col_radial_``."""
        modes: dict[tuple[int, str], int] = {}
        for g in self.gauges:
            if isinstance(g, (RescaleGauge, StackedRescaleGauge)):
                modes[(id(g.in_weight), "radial_")] = g.modes
            elif isinstance(g, NormGauge):
                modes[(id(g.gain), "radial_")] = g.modes
                modes.update(((id(r), "col_radial_"), g.modes) for r in g.readers)
        return modes

    def _unit_shapes(self) -> dict[int, tuple[int, int]]:
        """``id(first parameter) -> [m, n]`` of every scaling unit of several parameters side
        by side (a weight and its in-bias as one more column): its state (Muon's momentum) has
        the unit's shape, not the parameter's."""
        scaling: list[Gauge] = [g for g in self.gauges if isinstance(g, (RescaleGauge, NormGauge))]
        return {
            id(u.params[0]): (u.params[0].shape[0], sum(q.shape[1] if q.ndim == 2 else 1 for q in u.params))
            for u in _scale_units(scaling, self._centered)
            if len(u.params) > 1
        }

    def state_modes(self) -> int:
        """Scalars of DDC state beyond the base rule's: two per rescale mode, two per side
        (gain and each reader) of every norm-channel mode."""
        return sum(
            2 * g.modes * (1 + len(g.readers) if isinstance(g, NormGauge) else 1)
            for g in self.gauges
            if g.kind in ("rescale", "norm")
        )

    @property
    def nonfinite_skips(self) -> int:
        """Steps skipped for a non-finite gradient (``on_nonfinite="skip"``)."""
        return max((int(s.get("nonfinite_skips", 0)) for s in self.state.values()), default=0)

    def _gradients_finite(self) -> bool:
        """Whether the step may run: every gradient finite (one sync; a 2-norm that overflows
        float32 counts as non-finite, as for :class:`~equiopt.optimizer.EquiOptimizer`). If not,
        a :class:`~equiopt.optimizer.NonFiniteGradientError` naming the parameters when a group
        of theirs says ``on_nonfinite="raise"`` (the default); with ``"skip"`` the whole step
        is skipped, since the gauges couple their members (no partial step), and counted in
        every parameter's state (:attr:`nonfinite_skips`)."""
        live = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not live:
            return True
        params = [p for p, _ in live]
        finite = sharding.gradient_flags(params)  # FSDP2: every rank decides alike
        if all(finite):
            return True
        bad = [(p, g) for (p, g), ok in zip(live, finite) if not ok]
        if any(g["on_nonfinite"] == "raise" for _, g in bad):
            names = ", ".join(str(self.names.get(p, tuple(p.shape))) for p, _ in bad)
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN, Inf, or a 2-norm that overflows float32) in {names}; "
                "pass on_nonfinite='skip' to skip such steps (DDC skips the whole step)"
            )
        for p in params:
            self.state[p]["nonfinite_skips"] = self.state[p].get("nonfinite_skips", 0) + 1
        return False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._gradients_finite():
            return loss
        for group in self.param_groups:
            if group["ddc"] == "rescale":
                seen: list = []
                for p in group["params"]:
                    for g in self._gauges_of[id(p)]:
                        if not any(g is s for s in seen):
                            seen.append(g)
                for g in seen:  # batched over experts already, and disjoint from the others
                    if isinstance(g, StackedRescaleGauge):
                        self._stacked_rescale_step(g, group)
                seen = [g for g in seen if not isinstance(g, StackedRescaleGauge)]
                if any(g.kind == "norm" for g in seen):  # coupled through shared readers: one step
                    self._scale_step(seen, group)
                    continue
                # stacked only under Muon (one batched Newton-Schulz per shape); the stacked Adam
                # gauge step measured slower than the per-gauge one on CPU (results/ddc_bench)
                if self.batched and (group["rule"] == "muon" or self.stack_adam_gauges):
                    for bucket in _buckets(seen, _rescale_key):
                        if len(bucket) > 1 and _rescale_key(bucket[0])[-1]:
                            self._rescale_batched(bucket, group)
                        else:
                            for gauge in bucket:
                                self._rescale_step(gauge, group)
                else:
                    for gauge in seen:
                        self._rescale_step(gauge, group)
            elif group["ddc"] == "shift":
                norms = list(
                    {id(g): g for p in group["params"] for g in self._gauges_of[id(p)] if g.kind == "norm"}.values()
                )
                if norms:  # a norm gauge read by the translated head: its members step together
                    self._scale_step(norms, group)
                held = {id(p) for g in norms for p in g.params}
                for p in group["params"]:
                    if p.grad is not None and id(p) not in held:
                        self._adam_step(p, group, center=True)
            else:
                live = [p for p in group["params"] if p.grad is not None]
                muon = [p for p in live if group["rule"] == "muon" and p.ndim >= 2]
                adam = [p for p in live if not (group["rule"] == "muon" and p.ndim >= 2)]
                if self.batched:
                    for bucket in _buckets(muon, lambda p: (tuple(p.shape), p.dtype, p.device, *self._map(p).values())):
                        self._muon_batched(bucket, group)
                else:
                    for p in muon:
                        self._muon_step(p, group)
                if self.batched:
                    self._adam_multi(adam, group)
                else:
                    for p in adam:
                        self._adam_step(p, group)
        return loss

    # -- scaling gauges with norm channels (one path: reference and fast alike) -------------
    def _scale_step(self, gauges: list[Gauge], group: dict) -> None:
        """One step of a group's neuron-rescale and norm-channel gauges (docs/ddc.md
        "Norm-channel gauges"): per unit the invariant input ``x = R * G`` and log-gradients,
        per gauge the radial log-steps, per unit the base direction, re-projection and
        ``W <- diag(e^dl_row) W diag(e^dl_col) - lr R * u``."""
        ids = tuple(id(g) for g in gauges)
        if ids not in self._units:  # the gauges are fixed: their units too
            self._units[ids] = _scale_units(gauges, self._centered)
        units = self._units[ids]
        if all(p.grad is None for u in units for p in u.params):
            return
        if self.batched:
            self._scale_fast(units, gauges, group)
            return
        prep = {id(u.params[0]): self._unit_prepare(u, group) for u in units}
        dl: dict[tuple[int, str], Tensor] = {}
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        for g in gauges:
            if isinstance(g, RescaleGauge):  # the Lean pair: one scalar Adam state per neuron
                gU = (prep[id(g.in_weight)]["h_row"] + prep[id(g.out_weight)]["h_col"]) / _SQRT2
                st = _radial_state(self.state[g.in_weight], gU, "radial_")
                d = -lr * _adam_dir(st, gU, beta1, beta2, group["eps"], prefix="radial_") / _SQRT2
                dl[(id(g.in_weight), "row")] = dl[(id(g.out_weight), "col")] = d
            elif isinstance(g, NormGauge):  # 1 + k sides: Adam per side, orbit motion removed
                sides = g.reader_sides
                hs = [prep[id(g.gain)]["h_row"]] + [prep[id(w)]["h_" + s] for w, s in zip(g.readers, sides)]
                states = [self.state[g.gain]] + [self.state[w] for w in g.readers]
                d = _norm_radial(hs, states, lr, group)
                dl[(id(g.gain), "row")] = d[0]
                for w, s, dw in zip(g.readers, sides, d[1:]):
                    dl[(id(w), s)] = dw
        dirs = self._unit_directions(units, prep, group)
        for u in units:
            key = id(u.params[0])
            self._unit_update(u, prep[key], dirs[key], dl.get((key, "row")), dl.get((key, "col")), group)

    def _unit_prepare(self, unit: _Unit, group: dict) -> dict:
        """Step counters, weight decay, radius, log-gradients and invariant input of a unit."""
        for p in unit.params:
            st = self.state[p]
            st["step"] = st.get("step", torch.tensor(0.0)) + 1
        ws = [_work(p) for p in unit.params]
        M = _columns(ws)
        G = _columns([_grad(p, w) for p, w in zip(unit.params, ws)])
        mean = M.mean(0, keepdim=True) if unit.center else None
        if mean is not None:  # translation-invariant: the centered matrix (its mean row is kept)
            M = M - mean
        if group["weight_decay"] != 0:
            M = M * (1 - group["lr"] * group["weight_decay"])
        GM = G * M
        R, sq = _radius(M, unit)
        return dict(
            ws=ws,
            M=M,
            mean=mean,
            R=R,
            sq=sq,
            x=R * G,
            h_row=GM.sum(1) if unit.row is not None else None,
            h_col=GM[:, : unit.ncol].sum(0) if unit.col is not None else None,
        )

    def _unit_directions(self, units: list[_Unit], prep: dict, group: dict) -> dict[int, Tensor]:
        """The base rule's direction of every unit's invariant input ``x``: Muon's (stacked per
        shape on the fast path, one call per unit on the reference path) for matrices under
        DDC-Muon, otherwise Adam per parameter (column block)."""
        beta1, beta2 = group["betas"]
        out: dict[int, Tensor] = {}
        muon = [u for u in units if group["rule"] == "muon" and not u.vector]
        if self.batched:
            for bucket in _buckets(
                muon,
                lambda u: (
                    tuple(prep[id(u.params[0])]["x"].shape),
                    u.params[0].device,
                    tuple(self._map(u.params[0]).values()),
                ),
            ):
                X = torch.stack([prep[id(u.params[0])]["x"] for u in bucket])
                U = self._muon_stacked(
                    [self.state[u.params[0]] for u in bucket], X, group, **self._map(bucket[0].params[0])
                )
                out.update((id(u.params[0]), Ui) for u, Ui in zip(bucket, U.unbind(0)))
        else:
            for u in muon:
                out[id(u.params[0])] = self._muon_direction(
                    prep[id(u.params[0])]["x"], self.state[u.params[0]], group, **self._map(u.params[0])
                )
        for u in units:
            if id(u.params[0]) in out:
                continue
            x, blocks, j = prep[id(u.params[0])]["x"], [], 0
            for p in u.params:
                n = p.shape[1] if p.ndim == 2 else 1
                xb = x[:, j : j + n] if p.ndim == 2 else x[:, j]
                blocks.append(_adam_dir(self._adam_state(p), xb, beta1, beta2, group["eps"]))
                j += n
            out[id(u.params[0])] = _columns(blocks)
        return out

    def _unit_update(
        self, unit: _Unit, pr: dict, U: Tensor, dl_row: Tensor | None, dl_col: Tensor | None, group: dict
    ) -> None:
        """Re-projection of the base direction ``U`` off the unit's orbits, then the step."""
        M, R = pr["M"], pr["R"]
        if unit.center:
            U = U - U.mean(0, keepdim=True)
        U = _tangent(U, M, R, pr["sq"], unit)
        e = torch.ones_like(M[:1])
        if dl_col is not None:
            e[0, : unit.ncol] = torch.exp(dl_col)
        M = M * (e if dl_row is None else torch.exp(dl_row)[:, None] * e)
        M.addcmul_(R, U, value=-group["lr"])
        if pr["mean"] is not None:
            M.add_(pr["mean"])
        j = 0
        for p, w in zip(unit.params, pr["ws"]):
            n = p.shape[1] if p.ndim == 2 else 1
            w.copy_(M[:, j : j + n] if p.ndim == 2 else M[:, j])
            j += n
            _write_back(p, w)

    # -- the fast path (configure(opt, batched=True), the default) ----------------------
    def _scale_fast(self, units: list[_Unit], gauges: list[Gauge], group: dict) -> None:
        """:meth:`_scale_step` on the fast path: the same step up to rounding, with the weight
        decay, Adam's bias corrections and the re-projection folded into per-column (per-row)
        factors (``W <- W diag(F) - s U diag(rho)``), small equal-shape units stacked into one,
        the radial states of equal-size gauges stacked, Newton-Schulz stacked per shape, the
        overlap's Schur system by conjugate gradients, and single weights under Adam stepped in
        row chunks (no full-size temporaries: on CPU a fresh large tensor costs several passes
        over it)."""
        muon = group["rule"] == "muon"
        packs = [(b, self._fast_prepare(b, group)) for b in _buckets(units, lambda u: self._stack_key(u, muon))]
        prep: dict = {}
        for bucket, pr in packs:  # each member's log-gradients, for the radial step
            for i, u in enumerate(bucket):
                hs = {k: pr[k] if pr[k] is None or len(bucket) == 1 else pr[k][i] for k in ("h_row", "h_col")}
                prep[id(u.params[0])] = hs
        dl = self._fast_radial(gauges, prep, group)
        rest = []
        for bucket, pr in packs:
            d = {side: _member_stack([dl.get((id(u.params[0]), side)) for u in bucket]) for side in ("row", "col")}
            if _chunked(bucket[0], pr, muon):
                self._fast_adam_cols([u.params[0] for u in bucket], pr, d["row" if pr["T"] else "col"], group)
            else:
                rest.append((bucket, pr, d))
        dirs = self._fast_directions([(b, pr) for b, pr, _ in rest], group)
        for (bucket, pr, d), (U, kappa) in zip(rest, dirs):
            self._fast_update(bucket[0], pr, U, kappa, d["row"], d["col"], group)

    def _stack_key(self, u: _Unit, muon: bool) -> tuple | int:
        """The bucket of a unit that the fast path stacks with its equals (same kind, shapes,
        dtype, device and step count, at most ``_STACK`` elements); an id: stepped alone."""
        p = u.params[0]
        cache = (id(u), muon, tuple(q.dtype for q in u.params))  # units are kept (_scale_step)
        if cache not in self._unit_keys:  # () for a unit stepped alone
            plain = all(q.dtype in _FULL and not _is_dtensor(q) for q in u.params)
            kind = (u.row is not None, u.col is not None, u.ncol, u.vector, muon and not u.vector)
            kind += tuple(self._map(p).values())
            stack = not u.center and p.numel() <= _STACK and plain
            self._unit_keys[cache] = (
                kind + (tuple(tuple(q.shape) for q in u.params), p.dtype, p.device) if stack else ()
            )
        key = self._unit_keys[cache]
        if not key or any(q.grad is None for q in u.params):
            return id(p)
        return key + (float(self.state[p].get("step", 0.0)),)

    def _fast_prepare(self, units: list[_Unit], group: dict) -> dict:
        """:meth:`_unit_prepare` of the fast path, without the invariant input (built where it
        is used), for one unit or a stack of equal ones (``M`` [B, m, n]). A single unit's ``M``
        is the weight itself (or its columns side by side): the decay ``a = 1 - lr wd`` enters
        as a factor of the radius, the log-gradients and the update; a centered unit's column
        sums come from the weight's; a unit with rows only is handled through its transpose,
        as a column unit."""
        u0, p0 = units[0], units[0].params[0]
        one = len(units) == 1 and len(u0.params) == 1 and u0.row is None and group["rule"] != "muon"
        shard = p0 if one and _row_sharded(p0) else None  # FSDP2: local rows, column sums all-reduced
        for u in units:
            for p in u.params:
                st = self.state[p]
                st["step"] = st["step"] + 1 if "step" in st else torch.tensor(1.0)
        if shard is not None:
            w0, g0 = _local_shard(p0)
            wss, Gs = [[w0]], [g0]
        else:
            wss = [[_work(p) for p in u.params] for u in units]
            Gs = [_columns([_grad(p, w) for p, w in zip(u.params, ws)]) for u, ws in zip(units, wss)]
        Ms = [_columns(ws) for ws in wss]
        M, G = (torch.stack(Ms), torch.stack(Gs)) if len(units) > 1 else (Ms[0], Gs[0])
        a = 1 - group["lr"] * group["weight_decay"]
        pr: dict = dict(members=[u.params for u in units], wss=wss, M=M, G=G, a=a, mean=None, T=u0.col is None)
        pr.update(h_row=None, h_col=None, shard=shard, rows=p0.shape[0])
        if u0.row is not None and u0.col is not None:
            r, c = balance(M)  # of the undecayed weight: r c^T scales with it
            GM = G * M
            pr.update(R=r.unsqueeze(-1) * c.unsqueeze(-2), h_row=a * GM.sum(-1), h_col=a * GM[..., : u0.ncol].sum(-2))
            return pr
        Mc, Gc = (M.mT, G.mT) if pr["T"] else (M, G)
        sq, gw, msum, gsum = _col_sums(Mc, Gc, u0.center)
        if shard is not None:  # sums over the rows of every shard
            sums = _all_reduce(torch.stack([t for t in (sq, gw, msum, gsum) if t is not None]), shard)
            sq, gw = sums[0], sums[1]
            msum, gsum = (sums[2], sums[3]) if msum is not None else (None, None)
        if msum is not None and gsum is not None:  # centered: C = W - 1 mean^T, ||C_j||^2 and <G_j, C_j> from W's
            mean = msum / pr["rows"]
            sq, gw, pr["mean"] = sq - pr["rows"] * mean * mean, gw - mean * gsum, mean
        pr.update(sq=sq, rho=sq.sqrt())
        pr["h_row" if pr["T"] else "h_col"] = a * gw
        return pr

    def _fast_x(self, pr: dict, out: Tensor | None = None) -> Tensor:
        """The invariant input ``x = R * G`` of a prepared unit (into ``out`` if given)."""
        if "R" in pr:
            x = torch.mul(pr["G"], pr["R"], out=out) if out is not None else pr["G"] * pr["R"]
            return x.mul_(pr["a"]) if pr["a"] != 1 else x
        Gc = pr["G"].mT if pr["T"] else pr["G"]
        scale = (pr["a"] * pr["rho"]).unsqueeze(-2)
        x = torch.mul(Gc, scale, out=out.mT if pr["T"] else out) if out is not None else Gc * scale
        return x.mT if pr["T"] else x

    def _fast_adam_cols(self, params: list[Tensor], pr: dict, dl: Tensor | None, group: dict) -> None:
        """Adam direction, re-projection and step of a single weight in a one-sided gauge
        (column unit; rows only: its transpose), or of a stack of equal-shape ones (``params``:
        the weights of ``pr``), in two passes over row chunks: the moments and ``<U, W>`` per
        column, then ``W <- W diag(F) - s U diag(rho)`` with ``U`` recomputed from the moments
        (bitwise the same). A weight in one chunk takes its moments and ``U`` from torch's fused
        Adam kernel (:func:`_fused_adam_direction`)."""
        assert dl is not None
        beta1, beta2 = group["betas"]
        states = [self._adam_state(p, local=pr["shard"] is not None) for p in params]
        t = states[0]["step"].item()  # stacked weights share their step count (_stack_key)
        bc2 = (1 - beta2**t) ** 0.5
        kappa, eps = bc2 / (1 - beta1**t), group["eps"] * bc2
        if len(params) > 1:  # views of kept stacks: updated in place
            m0 = self._stack_views([(st, "exp_avg") for st in states])
            v0 = self._stack_views([(st, "exp_avg_sq") for st in states])
        else:
            m0, v0 = states[0]["exp_avg"], states[0]["exp_avg_sq"]
        Mc, Gc, mc, vc = (t_.mT if pr["T"] else t_ for t_ in (pr["M"], pr["G"], m0, v0))
        scale, rho, center = (pr["a"] * pr["rho"]).unsqueeze(-2), pr["rho"].unsqueeze(-2), pr["mean"] is not None
        uw, usum, chunks = torch.zeros_like(pr["sq"]), torch.zeros_like(pr["sq"]), _row_chunks(Mc)
        for i, sl in enumerate(chunks):
            x = Gc[..., sl, :] * scale
            m_, v_ = mc[..., sl, :], vc[..., sl, :]
            if len(chunks) == 1 and _fusable(x, m_, v_):  # U = Adam's m_hat / (sqrt(v_hat) + eps)
                U, kappa = _fused_adam_direction(x, m_, v_, states[0]["step"], group), 1.0
            else:
                m_.lerp_(x, 1 - beta1)
                v_.mul_(beta2).addcmul_(x, x, value=1 - beta2)
                U = torch.div(m_, torch.sqrt(v_, out=x).add_(eps), out=x)
            part = (U * Mc[..., sl, :]).sum(-2)
            uw = uw.add_(part) if i else part
            if center:
                usum = usum.add_(U.sum(-2)) if i else U.sum(-2)
        if pr["shard"] is not None:
            uw, usum = _all_reduce(torch.stack([uw, usum]), pr["shard"]).unbind(0)
        F, row, s = self._fold(pr, uw, usum, dl, kappa, group)
        F = F.unsqueeze(-2)
        for sl in chunks:
            if len(chunks) > 1:  # else U is still the one of the first pass
                U = torch.sqrt(vc[..., sl, :]).add_(eps)
                U = torch.div(mc[..., sl, :], U, out=U)
            Mi = Mc[..., sl, :]
            (torch.addcmul(row, Mi, F, out=Mi) if row is not None else Mi.mul_(F)).addcmul_(U, rho, value=-s)
        if pr["shard"] is None:  # else the step went into the local shard itself
            self._fast_write_back(pr)

    @staticmethod
    def _fast_write_back(pr: dict) -> None:
        """Copy a prepared unit's ``M`` (a stack, or the columns of several parameters) back
        into its parameters."""
        members, M = pr["members"], pr["M"]
        if len(members) > 1 and all(len(ws) == 1 for ws in pr["wss"]):  # a stack of single parameters: one call
            ws = [w for (w,) in pr["wss"]]
            torch._foreach_copy_(ws, list(M.view((len(ws),) + ws[0].shape).unbind(0)))
        else:
            for i, (params, ws) in enumerate(zip(members, pr["wss"])):
                Mi, j = (M[i] if len(members) > 1 else M), 0
                for p, w in zip(params, ws):
                    n = p.shape[1] if p.ndim == 2 else 1
                    if Mi is not w:
                        w.copy_(Mi[:, j : j + n] if p.ndim == 2 else Mi[:, j])
                    j += n
        for params, ws in zip(members, pr["wss"]):
            for p, w in zip(params, ws):
                _write_back(p, w)

    @staticmethod
    def _fold(
        pr: dict, uw: Tensor, usum: Tensor, dl: Tensor, kappa: float, group: dict
    ) -> tuple[Tensor, Tensor | None, float]:
        """The factors of a column unit's folded step ``W <- W diag(F) + 1 row^T - s U diag(rho)``
        from ``uw = <U, W>`` and ``usum = 1^T U`` per column (``U`` the unscaled direction, Adam's
        times ``kappa``): the re-projection ``U - <U, W>/||W||^2 W`` is a multiple of ``W`` per
        column; a centered unit keeps its mean row and centers ``U`` (``row``)."""
        a, lr, rho = pr["a"], group["lr"], pr["rho"]
        s = a * lr * kappa
        if pr["mean"] is not None:  # <U - 1 Ubar^T, C> = <U, W> - mean * sum_i U_i
            uw = uw - pr["mean"] * usum
        F = a * (torch.exp(dl) + lr * kappa * rho * _safe_div(uw, pr["sq"]))
        if pr["mean"] is None:
            return F, None, s
        return F, (1 - F) * pr["mean"] + s * rho * usum / pr["rows"], s  # centered units are column units

    def _fast_radial(self, gauges: list[Gauge], prep: dict, group: dict) -> dict[tuple[int, str], Tensor]:
        """The radial log-steps of :meth:`_scale_step`, with the scalar Adam states of
        equal-size gauges stacked (rescale gauges per width; norm gauges per reader count and
        width)."""
        lr, eps = group["lr"], group["eps"]
        beta1, beta2 = group["betas"]
        dl: dict[tuple[int, str], Tensor] = {}
        resc = [g for g in gauges if isinstance(g, RescaleGauge)]
        for bucket in _buckets(resc, lambda g: tuple(prep[id(g.in_weight)]["h_row"].shape)):
            gU = torch.stack([prep[id(g.in_weight)]["h_row"] + prep[id(g.out_weight)]["h_col"] for g in bucket])
            gU = gU / _SQRT2
            sts = [_radial_state(self.state[g.in_weight], gU[0], "radial_") for g in bucket]
            steps = [st["step"].item() for st in sts]
            d = -lr * self._adam_dir_stacked(sts, gU, steps, beta1, beta2, eps, "radial_") / _SQRT2
            for g, di in zip(bucket, d.unbind(0)):
                dl[(id(g.in_weight), "row")] = dl[(id(g.out_weight), "col")] = di
        norms = [g for g in gauges if isinstance(g, NormGauge)]
        for bucket in _buckets(norms, lambda g: (len(g.readers), tuple(prep[id(g.gain)]["h_row"].shape))):
            keys = [(p, s) for g in bucket for p, s in zip((g.gain, *g.readers), ("row", *g.reader_sides))]
            hs = [prep[id(p)]["h_" + s] for p, s in keys]
            d = self._norm_radial_stacked(
                torch.stack(hs).unflatten(0, (len(bucket), -1)), [p for p, _ in keys], lr, group
            )
            for (p, s), dp in zip(keys, d.flatten(0, 1).unbind(0)):
                dl[(id(p), s)] = dp
        return dl

    def _norm_radial_stacked(self, H: Tensor, sides: list[Tensor], lr: float, group: dict) -> Tensor:
        """:func:`_norm_radial` of ``B`` norm gauges with ``k`` readers each: ``H`` [B, 1 + k, n]
        (gain first), ``sides`` the matching parameters (their states hold the radial Adam)."""
        beta1, beta2 = group["betas"]
        B, k1, n = H.shape
        off, back = self._radial_projections(k1, H)
        flat = torch.matmul(off, H).reshape(B * k1, n)  # the gauge mode removed
        prefixes = (["radial_"] + ["col_radial_"] * (k1 - 1)) * B
        states = [_radial_state(self.state[p], flat[0], pre) for p, pre in zip(sides, prefixes)]
        steps = [st["step"].item() for st in states]
        d = self._adam_dir_stacked(states, flat, steps, beta1, beta2, group["eps"], prefixes).reshape(B, k1, n)
        return torch.matmul(back, d).mul_(-lr)  # the orbit motion removed

    def _radial_projections(self, k1: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The projections of :func:`_norm_radial` for ``k1`` sides (gain first), as matrices
        (cached): ``I - sigma sigma^T / k1`` (the gauge mode off the log-gradients) and
        ``I - sigma (w sigma)^T / 1^T w`` (the weighted orbit motion off the log-steps)."""
        key = (k1, like.dtype, like.device)
        if key not in self._projections:
            sigma = torch.full((k1, 1), -1.0, dtype=like.dtype, device=like.device)
            sigma[0] = 1.0
            w = torch.full_like(sigma, 1.0 / (k1 - 1))
            w[0] = 1.0
            eye = torch.eye(k1, dtype=like.dtype, device=like.device)
            self._projections[key] = (eye - sigma @ sigma.T / k1, eye - sigma @ (w * sigma).T / w.sum())
        return self._projections[key]

    def _fast_directions(self, packs: list[tuple[list[_Unit], dict]], group: dict) -> list[tuple[Tensor, float]]:
        """The base directions of prepared (stacks of) units with their scale ``kappa``: Muon
        stacked per shape (``kappa = 1``); Adam as one multi-tensor update over every column
        block of every member, written into its input ``x``, as
        ``m / (sqrt(v) + eps sqrt(1 - b2^t))`` with ``kappa = sqrt(1 - b2^t) / (1 - b1^t)``
        (their product is Adam's ``m_hat / (sqrt(v_hat) + eps)``; :meth:`_fast_update` applies
        ``kappa`` in its scalars)."""
        beta1, beta2 = group["betas"]
        out: dict[int, tuple[Tensor, float]] = {}
        muon = [i for i, (b, _) in enumerate(packs) if group["rule"] == "muon" and not b[0].vector]

        def key(i: int) -> tuple:  # members of one pack share their direction map (_stack_key)
            G = packs[i][1]["G"]
            return (tuple(G.shape[-2:]), G.device, *self._map(packs[i][0][0].params[0]).values())

        for bucket in _buckets(muon, key):
            sizes = [len(packs[i][0]) for i in bucket]
            G0 = packs[bucket[0]][1]["G"]
            X = G0.new_empty((sum(sizes),) + G0.shape[-2:])
            for i, Xi in zip(bucket, X.split(sizes)):
                self._fast_x(packs[i][1], out=Xi if len(packs[i][0]) > 1 else Xi[0])
            states = [self.state[u.params[0]] for i in bucket for u in packs[i][0]]
            U = self._muon_stacked(states, X, group, **self._map(packs[bucket[0]][0][0].params[0]))
            out.update((i, (Ui if len(packs[i][0]) > 1 else Ui[0], 1.0)) for i, Ui in zip(bucket, U.split(sizes)))
        blocks: list[tuple[Tensor, Tensor, Tensor, float]] = []  # (m, v, a block of x, its step)
        for i in [i for i in range(len(packs)) if i not in out]:
            bucket, pr = packs[i]
            x = self._fast_x(pr)
            t = self.state[bucket[0].params[0]]["step"].item()  # shared by members and parameters (_stack_key)
            out[i] = (x, (1 - beta2**t) ** 0.5 / (1 - beta1**t))
            blocks += self._adam_blocks(bucket, x, t)
        if blocks:
            ms, vs, xs = [b[0] for b in blocks], [b[1] for b in blocks], [b[2] for b in blocks]
            torch._foreach_lerp_(ms, xs, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, xs, xs, value=1 - beta2)
            for m, v, x, t in blocks:  # x is dead: the direction is written into it
                torch.div(m, torch.sqrt(v, out=x).add_(group["eps"] * (1 - beta2**t) ** 0.5), out=x)
        return [out[i] for i in range(len(packs))]

    def _adam_blocks(self, bucket: list[_Unit], x: Tensor, t: float) -> list[tuple[Tensor, Tensor, Tensor, float]]:
        """Adam's ``(m, v, block of x, step)`` of a prepared (stack of) unit(s) with input ``x``
        and step ``t``: one block when every unit is one parameter (a stack's moments as views
        of kept buffers, :meth:`_stack_views`), else one per parameter (column block)."""
        if all(len(u.params) == 1 for u in bucket):
            states = [self._adam_state(u.params[0]) for u in bucket]
            if len(bucket) == 1:
                m, v = states[0]["exp_avg"], states[0]["exp_avg_sq"]
            else:
                m = self._stack_views([(st, "exp_avg") for st in states])
                v = self._stack_views([(st, "exp_avg_sq") for st in states])
            return [(m, v, x.view(m.shape), t)]
        blocks = []
        for k, u in enumerate(bucket):
            xk, j = (x[k] if len(bucket) > 1 else x), 0
            for p in u.params:
                n = p.shape[1] if p.ndim == 2 else 1
                st = self._adam_state(p)
                xb = xk[:, j : j + n] if p.ndim == 2 else xk[:, j]
                blocks.append((st["exp_avg"], st["exp_avg_sq"], xb, st["step"].item()))
                j += n
        return blocks

    def _fast_update(
        self, unit: _Unit, pr: dict, U: Tensor, kappa: float, dl_row: Tensor | None, dl_col: Tensor | None, group: dict
    ) -> None:
        """The re-projection and step of the fast path, folded into the weight's factors (of
        one unit or a stack, ``unit`` its first member): a column unit takes
        ``W <- W diag(F) - s U diag(rho)`` (:meth:`_fold`); a unit in two gauges the matrix
        ``F = a (e^dl_row e^dl_col^T + lr kappa (a_i + b_j))`` and ``R`` in place of ``rho``."""
        M, a, lr = pr["M"], pr["a"], group["lr"]
        s = a * lr * kappa
        if "R" in pr:
            assert dl_row is not None and dl_col is not None
            ca, cb = _orbit_coeffs(U, M / pr["R"], unit.ncol, iterative=True)
            pad = M.shape[-1] - unit.ncol
            e_col = torch.nn.functional.pad(torch.exp(dl_col), (0, pad), value=1.0)
            # F = a (e_row e_col^T + lr kappa (ca 1^T + 1 cb^T)) as one rank-3 product
            left = torch.stack([torch.exp(dl_row).mul_(a), ca * s, torch.full_like(ca, s)], -1)
            right = torch.stack([e_col, torch.ones_like(e_col), torch.nn.functional.pad(cb, (0, pad))], -2)
            M.mul_(torch.matmul(left, right)).addcmul_(pr["R"], U, value=-s)
        else:
            Mc, Uc, dl = (M.mT, U.mT, dl_row) if pr["T"] else (M, U, dl_col)
            assert dl is not None
            usum = Uc.sum(-2) if pr["mean"] is not None else Uc.new_zeros(())
            F, row, s = self._fold(pr, (Uc * Mc).sum(-2), usum, dl, kappa, group)
            F = F.unsqueeze(-2)
            rho = pr["rho"].unsqueeze(-2)
            (torch.addcmul(row, Mc, F, out=Mc) if row is not None else Mc.mul_(F)).addcmul_(Uc, rho, value=-s)
        self._fast_write_back(pr)

    def _muon_batched(self, params: list[Tensor], group: dict) -> None:
        """Muon on equal-shape matrices as one stacked Newton-Schulz call."""
        if len(params) == 1:
            self._muon_step(params[0], group)
            return
        ws = [_work(p) for p in params]
        X = torch.stack([_grad(p, w) for p, w in zip(params, ws)])
        U = self._muon_stacked([self.state[p] for p in params], X, group, **self._map(params[0]))
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0:
            torch._foreach_mul_(ws, 1 - lr * wd)
        torch._foreach_add_(ws, list(U.unbind(0)), alpha=-lr)
        for p, w in zip(params, ws):
            _write_back(p, w)

    def _rescale_batched(self, gauges: list[RescaleGauge], group: dict) -> None:
        """:meth:`_rescale_step` for equal-shape gauges (float32/64 parameters), stacked:
        the same operations with a leading gauge axis; state stays per parameter. The gauges
        of one bucket (:func:`_rescale_key`) all have an in-bias or none has."""
        live = [g for g in gauges if any(p.grad is not None for p in g.params)]
        if not live:
            return
        has_b = live[0].in_bias is not None
        P1 = [g.in_weight for g in live]
        P2 = [g.out_weight for g in live]
        Pb = [g.in_bias for g in live if g.in_bias is not None] if has_b else []
        W1, W2 = torch.stack(P1), torch.stack(P2)
        g1 = torch.stack([_grad(p, p) for p in P1])
        g2 = torch.stack([_grad(p, p) for p in P2])
        b = torch.stack(Pb) if has_b else None
        gb = torch.stack([_grad(p, p) for p in Pb]) if has_b else None
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        if wd != 0:
            for t in (W1, W2, b):
                if t is not None:
                    t.mul_(1 - lr * wd)
        n1 = (W1 * W1).sum(2) + (b * b if b is not None else 0)
        n2 = (W2 * W2).sum(1)
        gh1 = (g1 * W1).sum(2) + (gb * b if gb is not None and b is not None else 0)
        gh2 = (g2 * W2).sum(1)
        rho1, rho2 = n1.sqrt(), n2.sqrt()
        c1, c2 = _safe_div(gh1, n1), _safe_div(gh2, n2)
        x1 = rho1[:, :, None] * (g1 - c1[:, :, None] * W1)
        x2 = (g2 - c2[:, None, :] * W2) * rho2[:, None, :]
        xb = rho1 * (gb - c1 * b) if gb is not None and b is not None else None
        st1 = self._rescale_states(live, n1)
        steps = [st["step"].item() for st in st1]
        gU = (gh1 + gh2) / _SQRT2
        dlog = -lr * self._adam_dir_stacked(st1, gU, steps, beta1, beta2, eps, "radial_") / _SQRT2
        u1, u2, ub = self._rescale_directions(group, st1, (P1, P2, Pb), (x1, x2, xb), steps)
        a1 = _safe_div((u1 * W1).sum(2) + (ub * b if ub is not None and b is not None else 0), n1)
        a2 = _safe_div((u2 * W2).sum(1), n2)
        u1 = u1 - a1[:, :, None] * W1
        u2 = u2 - a2[:, None, :] * W2
        e = torch.exp(dlog)
        W1.mul_(e[:, :, None]).sub_(lr * rho1[:, :, None] * u1)
        W2.mul_(e[:, None, :]).sub_(lr * u2 * rho2[:, None, :])
        if ub is not None and b is not None:
            ub = ub - a1 * b
            b.mul_(e).sub_(lr * rho1 * ub)
        torch._foreach_copy_(
            P1 + P2 + Pb, list(W1.unbind(0)) + list(W2.unbind(0)) + (list(b.unbind(0)) if b is not None else [])
        )

    def _rescale_directions(
        self, group: dict, st1: list[dict], params: tuple, xs: tuple, steps: list
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The base rule's directions of the stacked invariant inputs ``xs = (x1, x2, xb)``
        of in-rows, out-columns and in-biases (``params`` the matching parameter lists):
        per-coordinate Adam, or Muon on ``[x1 | xb]`` and on ``x2``."""
        (P1, P2, Pb), (x1, x2, xb) = params, xs
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        if group["rule"] == "adam":

            def adam(ps: list, x: Tensor) -> Tensor:
                return self._adam_dir_stacked([self._adam_state(p) for p in ps], x, steps, beta1, beta2, eps)

            return adam(P1, x1), adam(P2, x2), (adam(Pb, xb) if xb is not None else None)
        X1 = torch.cat([x1, xb[:, :, None]], 2) if xb is not None else x1
        U1 = self._muon_stacked(st1, X1, group, **self._bucket_map(P1))
        u1, ub = (U1[:, :, :-1], U1[:, :, -1]) if xb is not None else (U1, None)
        return u1, self._muon_stacked([self.state[p] for p in P2], x2, group, **self._bucket_map(P2)), ub

    def _bucket_map(self, params: list[Tensor]) -> dict:
        """The direction map shared by a stacked bucket (lifts are per role: one per bucket)."""
        maps = {tuple(self._map(p).items()) for p in params}
        if len(maps) != 1:
            raise ValueError("DDCOptimizer: a stacked rescale bucket mixes lifted and unlifted maps; use batched=False")
        return dict(maps.pop())

    def _rescale_states(self, live: list[RescaleGauge], n1: Tensor) -> list[dict]:
        """The in-weight states of stacked gauges: step counters (advanced, and copied to
        the other members) and the radial Adam state (``n1``: the stacked in-side norms)."""
        st1 = [self.state[g.in_weight] for g in live]
        for st, g in zip(st1, live):
            if "step" not in st:
                st["step"] = torch.tensor(0.0)
            st["step"] += 1
            for p in g.params[1:]:
                self.state[p]["step"] = st["step"].clone()
            if "radial_exp_avg" not in st:
                st["radial_exp_avg"] = torch.zeros_like(n1[0])
                st["radial_exp_avg_sq"] = torch.zeros_like(n1[0])
        return st1

    def _stack_views(self, entries: list[tuple[dict, str]]) -> Tensor:
        """The state tensors ``state[key]`` of ``entries`` as one stacked buffer [B, ...] that
        the entries are views of, kept between steps (a stacked step updates them in place:
        no stacking and copying back per step); re-stacked when an entry was replaced (new
        state, ``load_state_dict``)."""
        key = tuple((id(st), k) for st, k in entries)
        hit = self._stacks.get(key)
        if hit is not None and all(st[k] is v for (st, k), v in zip(entries, hit[1])):
            return hit[0]
        mine = set(key)  # stacks sharing an entry are stale (a bucket changed): dropped
        for other in [o for o in self._stacks if mine.intersection(o)]:
            del self._stacks[other]
        buf = torch.stack([st[k] for st, k in entries])
        views = buf.unbind(0)
        for (st, k), v in zip(entries, views):
            st[k] = v
        self._stacks[key] = (buf, views)
        return buf

    def _adam_dir_stacked(
        self,
        states: list[dict],
        x: Tensor,
        steps: list[float],
        beta1: float,
        beta2: float,
        eps: float,
        prefix: str | list[str] = "",
    ) -> Tensor:
        """:func:`_adam_dir` of a stack (one state per slice, kept as views of one buffer:
        :meth:`_stack_views`; ``prefix`` one for all or one per slice)."""
        pre = [prefix] * len(states) if isinstance(prefix, str) else prefix
        m = self._stack_views([(s, p + "exp_avg") for s, p in zip(states, pre)])
        v = self._stack_views([(s, p + "exp_avg_sq") for s, p in zip(states, pre)])
        m.lerp_(x, 1 - beta1)
        v.mul_(beta2).addcmul_(x, x, value=1 - beta2)
        if all(t == steps[0] for t in steps):  # the usual case: one step count, scalar corrections
            return (m / (1 - beta1 ** steps[0])) / ((v.sqrt() / (1 - beta2 ** steps[0]) ** 0.5).add_(eps))
        shape = (-1,) + (1,) * (x.ndim - 1)
        bc1 = torch.tensor([1 - beta1**t for t in steps], dtype=x.dtype, device=x.device).reshape(shape)
        bc2 = torch.tensor([(1 - beta2**t) ** 0.5 for t in steps], dtype=x.dtype, device=x.device).reshape(shape)
        return (m / bc1) / ((v.sqrt() / bc2).add_(eps))

    def _muon_stacked(
        self,
        states: list[dict],
        x: Tensor,
        group: dict,
        key: str = "momentum_buffer",
        lift: _Lift | None = None,
        transposed: bool = False,
    ) -> Tensor:
        """:meth:`_muon_direction` of a stack (one momentum buffer per slice, views of one kept buffer)."""
        mom = group["momentum"]
        for st in states:
            if key not in st:
                st[key] = torch.zeros_like(x[0])
        buf = self._stack_views([(st, key) for st in states])  # the buffers are views of it
        buf.mul_(mom).add_(x)
        upd = x.add(buf, alpha=mom) if group["nesterov"] else buf
        return _direction(upd, group, lift, transposed)

    # -- base rules -------------------------------------------------------------------
    def _adam_state(self, p: Tensor, prefix: str = "", local: bool = False) -> dict:
        """AdamW's state of ``p``; for a DTensor the local shard's (``local``: the step runs on
        the local rows) or the whole tensor's (the gathered step)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        if prefix + "exp_avg" not in state:
            dt = _state_dtype(p)
            if _is_dtensor(p):  # FSDP2: whole (unsharded) state, as the gathered step uses it
                shape = cast(Any, p).to_local().shape if local else p.shape
                state[prefix + "exp_avg"] = torch.zeros(shape, dtype=dt, device=cast(Any, p).to_local().device)
                state[prefix + "exp_avg_sq"] = torch.zeros_like(state[prefix + "exp_avg"])
            else:
                state[prefix + "exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                state[prefix + "exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        return state

    def _adam_step(self, p: Tensor, group: dict, center: bool = False, chunked: bool = False) -> None:
        """torch.optim.AdamW's single-tensor step (bit-identical); ``center`` removes the
        update's mean over rows (dim -2; a vector's mean) for a translation gauge. ``chunked``
        (fast path): a matrix is stepped in row chunks, the same operations per element."""
        assert p.grad is not None  # step() passes only parameters with a gradient here
        if p.grad.is_sparse:
            raise RuntimeError("DDCOptimizer does not support sparse gradients")
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        local = _row_sharded(p) and not center  # FSDP2: elementwise on the local rows
        state = self._adam_state(p, local=local)
        state["step"] += 1
        if local:
            w, grad = _local_shard(p)
        else:
            w = _work(p)
            grad = _grad(p, w)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        step = state["step"].item()
        bc2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / (1 - beta1**step)
        if center:
            if wd != 0:
                w.mul_(1 - lr * wd)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            u = m / (v.sqrt() / bc2_sqrt).add_(eps)
            u = u - u.mean(dim=-2 if u.ndim >= 2 else -1, keepdim=True)
            w.add_(u, alpha=-step_size)
        else:
            chunks = _row_chunks(w) if chunked and w.ndim == 2 else [slice(None)]
            for sl in chunks:
                wi, gi, mi, vi = w[sl], grad[sl], m[sl], v[sl]
                if wd != 0:
                    wi.mul_(1 - lr * wd)
                mi.lerp_(gi, 1 - beta1)
                vi.mul_(beta2).addcmul_(gi, gi, value=1 - beta2)
                wi.addcdiv_(mi, (vi.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
        if not local:
            _write_back(p, w)

    def _adam_multi(self, params: list[Tensor], group: dict) -> None:
        """The fast path's AdamW over plain float32/64 tensors: torch's fused AdamW kernel per
        (device, dtype), the step of ``torch.optim.AdamW(fused=True)`` bit for bit (one pass per
        tensor, no temporaries; measured faster than the multi-tensor calls it replaced,
        results/ddc_bench); other tensors (bf16 / fp16, FSDP2 shards, a gradient or state in
        another memory layout than its parameter) per tensor (:meth:`_adam_step`)."""
        plain = [
            p
            for p in params
            if not _is_dtensor(p)
            and _fusable(p, cast(Tensor, p.grad), *(self._adam_state(p)[k] for k in ("exp_avg", "exp_avg_sq")))
        ]
        for p in params:
            if not any(p is q for q in plain):
                self._adam_step(p, group, chunked=True)
        for bucket in _buckets(plain, lambda p: (p.device, p.dtype)):
            grads = [cast(Tensor, p.grad) for p in bucket]  # dense (_fusable): sparse ones raise in _adam_step
            torch_adamw(bucket, grads, [self._adam_state(p) for p in bucket], group, fused=True)

    def _muon_direction(
        self,
        x: Tensor,
        state: dict,
        group: dict,
        key: str = "momentum_buffer",
        lift: _Lift | None = None,
        transposed: bool = False,
    ) -> Tensor:
        mom = group["momentum"]
        if key not in state:
            state[key] = torch.zeros_like(x)
        buf = state[key]
        buf.mul_(mom).add_(x)
        upd = x.add(buf, alpha=mom) if group["nesterov"] else buf
        return _direction(upd, group, lift, transposed)

    def _muon_step(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        w = _work(p)
        u = self._muon_direction(_grad(p, w), state, group, **self._map(p))
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0:
            w.mul_(1 - lr * wd)
        w.add_(u, alpha=-lr)
        _write_back(p, w)

    # -- the rescale gauge ------------------------------------------------------------
    def _rescale_step(self, gauge: RescaleGauge, group: dict) -> None:
        P1, P2, Pb = gauge.in_weight, gauge.out_weight, gauge.in_bias
        if P1.grad is None and P2.grad is None and (Pb is None or Pb.grad is None):
            return
        W1, W2, b = _work(P1), _work(P2), _work(Pb)
        g1, g2 = _grad(P1, W1), _grad(P2, W2)
        gb = None if Pb is None or b is None else _grad(Pb, b)
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        # 1. decoupled weight decay on every member alike
        if wd != 0:
            for p in (W1, W2, b):
                if p is not None:
                    p.mul_(1 - lr * wd)
        # 2. per-neuron side norms, log-norm gradients, tangential parts, invariant inputs
        n1 = (W1 * W1).sum(1) + (b * b if b is not None else 0)
        n2 = (W2 * W2).sum(0)
        gh1 = (g1 * W1).sum(1) + (gb * b if gb is not None and b is not None else 0)
        gh2 = (g2 * W2).sum(0)
        rho1, rho2 = n1.sqrt(), n2.sqrt()
        c1, c2 = _safe_div(gh1, n1), _safe_div(gh2, n2)
        x1 = rho1[:, None] * (g1 - c1[:, None] * W1)
        x2 = (g2 - c2[None, :] * W2) * rho2[None, :]
        xb = rho1 * (gb - c1 * b) if gb is not None and b is not None else None
        # 4./5. radial mode (scalar Adam per neuron); the gauge mode gV is not moved
        st1 = self.state[P1]
        if "step" not in st1:
            st1["step"] = torch.tensor(0.0)
        st1["step"] += 1
        for p in gauge.params[1:]:
            st = self.state[p]
            st["step"] = st1["step"].clone()
        if "radial_exp_avg" not in st1:
            st1["radial_exp_avg"] = torch.zeros_like(n1)
            st1["radial_exp_avg_sq"] = torch.zeros_like(n1)
        gU = (gh1 + gh2) / _SQRT2
        dlog = -lr * _adam_dir(st1, gU, beta1, beta2, eps, prefix="radial_") / _SQRT2
        # 6. base update on the invariant inputs, re-projected off W
        if group["rule"] == "adam":
            u1 = _adam_dir(self._adam_state(P1), x1, beta1, beta2, eps)
            u2 = _adam_dir(self._adam_state(P2), x2, beta1, beta2, eps)
            ub = _adam_dir(self._adam_state(Pb), xb, beta1, beta2, eps) if Pb is not None and xb is not None else None
        else:  # muon: polar of the whole invariant matrix [x1 | xb] and of x2
            X1 = torch.cat([x1, xb[:, None]], 1) if xb is not None else x1
            U1 = self._muon_direction(X1, st1, group, **self._map(P1))
            u1, ub = (U1[:, :-1], U1[:, -1]) if b is not None else (U1, None)
            u2 = self._muon_direction(x2, self.state[P2], group, **self._map(P2))
        a1 = _safe_div((u1 * W1).sum(1) + (ub * b if ub is not None and b is not None else 0), n1)
        a2 = _safe_div((u2 * W2).sum(0), n2)
        u1 = u1 - a1[:, None] * W1
        u2 = u2 - a2[None, :] * W2
        # 7. multiplicative radial step, additive tangential step
        e = torch.exp(dlog)
        W1.mul_(e[:, None]).sub_(lr * rho1[:, None] * u1)
        W2.mul_(e[None, :]).sub_(lr * u2 * rho2[None, :])
        if ub is not None and b is not None:
            ub = ub - a1 * b
            b.mul_(e).sub_(lr * rho1 * ub)
        for p, w in ((P1, W1), (P2, W2), (Pb, b)):
            _write_back(p, w)

    def _stacked_rescale_step(self, gauge: StackedRescaleGauge, group: dict) -> None:
        """:meth:`_rescale_step` on the logical views of a :class:`StackedRescaleGauge`
        (``W1 = part_rows(W_in) [E, h, d]``, ``W2 = part_rows(W_out) [E, d_out, h]``, every
        expert at once): per (expert, neuron) radius, radial Adam state and tangential input.
        The base rule runs on the whole stored tensors, whose gauged rows / columns carry the
        invariant inputs and whose other rows (the gate part) the gradient: per element for
        Adam, per stored expert matrix for Muon (as off the gauges). The decay factor
        ``k = 1 - lr wd`` is folded in (the same step in fewer passes; docs/ddc.md): with the
        undecayed ``W``, ``x = k rho (g - <g, W>/rho^2 W)`` and ``W <- k (e^dl W - lr rho u)``."""
        P1, P2 = gauge.in_weight, gauge.out_weight
        if P1.grad is None and P2.grad is None:
            return
        # FSDP2 with experts sharded along E (Shard(0) of both stacked tensors): every quantity is
        # per expert, so the step runs on the local experts, no communication
        local = gauge.in_layout.stacked and gauge.out_layout.stacked and _row_sharded(P1) and _row_sharded(P2)
        if local:
            (S1, G1), (S2, G2) = _local_shard(P1), _local_shard(P2)
        else:
            S1, S2 = _work(P1), _work(P2)  # stored layout (FSDP2 otherwise: gathered)
            G1, G2 = _grad(P1, S1), _grad(P2, S2)
        lr, k = group["lr"], 1 - group["lr"] * group["weight_decay"]
        beta1, beta2 = group["betas"]
        ins, outs = gauge.in_layout, gauge.out_layout
        W1, W2 = part_rows(S1, ins, gauge.part), part_rows(S2, outs)  # [E, h, d], [E, d_out, h]
        n1, n2 = (W1 * W1).sum(-1), (W2 * W2).sum(-2)  # [E, h]; vector_norm over dim -2 is ~9x slower on CPU
        rho1, rho2 = n1.sqrt(), n2.sqrt()
        gh1 = (part_rows(G1, ins, gauge.part) * W1).sum(-1)
        gh2 = (part_rows(G2, outs) * W2).sum(-2)
        # R: k rho on the gauged rows / columns, 1 elsewhere (broadcast over the stored tensor)
        R1, R2 = _neuron_factor(S1, ins, "rows"), _neuron_factor(S2, outs, "cols")
        part_rows(R1, ins, gauge.part).copy_(k * rho1[..., None])
        part_rows(R2, outs).copy_(k * rho2[:, None, :])
        X1, X2 = G1 * R1, G2 * R2
        part_rows(X1, ins, gauge.part).addcmul_(W1, (-k * rho1 * _safe_div(gh1, n1))[..., None])
        part_rows(X2, outs).addcmul_(W2, (-k * rho2 * _safe_div(gh2, n2))[:, None, :])
        st1 = self.state[P1]
        st1["step"] = st1.get("step", torch.tensor(0.0)) + 1
        self.state[P2]["step"] = st1["step"].clone()
        gU = k * (gh1 + gh2) / _SQRT2  # radial mode; the gauge mode (gh1 - gh2) is not moved
        dlog = -lr * _adam_dir(_radial_state(st1, gU, "radial_"), gU, beta1, beta2, group["eps"], "radial_") / _SQRT2
        if group["rule"] == "adam":
            (U1, c1), (U2, c2) = (self._adam_scaled_dir(P, X, group, local) for P, X in ((P1, X1), (P2, X2)))
        else:
            U1 = self._muon_direction(X1, st1, group, **self._map(P1))
            U2 = self._muon_direction(X2, self.state[P2], group, **self._map(P2))
            c1 = c2 = 1.0
        u1, u2 = part_rows(U1, ins, gauge.part), part_rows(U2, outs)  # re-projected off W
        u1.addcmul_(W1, (-_safe_div((u1 * W1).sum(-1), n1))[..., None])
        u2.addcmul_(W2, (-_safe_div((u2 * W2).sum(-2), n2))[:, None, :])
        e = torch.exp(dlog)
        for S, U, R, c, W, ee in ((S1, U1, R1, c1, W1, e[..., None]), (S2, U2, R2, c2, W2, e[:, None, :])):
            W.mul_(ee)  # k e^dl W on the gauged part, k W elsewhere, then - lr R u
            S.mul_(k).addcmul_(U, R, value=-lr * c)
        if not local:  # else the step went into the local shards themselves
            _write_back(P1, S1)
            _write_back(P2, S2)

    def _adam_scaled_dir(self, p: Tensor, x: Tensor, group: dict, local: bool = False) -> tuple[Tensor, float]:
        """Adam's direction of ``x`` as ``(m / (sqrt(v) + eps sqrt(bc2)), sqrt(bc2) / bc1)``: the
        product is ``m_hat / (sqrt(v_hat) + eps)``, in two passes fewer than :func:`_adam_dir`
        (on the fast path, where the kernel can take the tensors, torch's fused Adam kernel in
        one: :func:`_fused_adam_direction`, scale 1); ``local``: the state of a DTensor's local
        shard."""
        state = self._adam_state(p, local=local)
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if self.batched and _fusable(x, m, v):  # the fast path: one fused pass, kappa = 1
            return _fused_adam_direction(x, m, v, state["step"], group), 1.0
        step = state["step"].item()
        m.lerp_(x, 1 - beta1)
        v.mul_(beta2).addcmul_(x, x, value=1 - beta2)
        bc2_sqrt = (1 - beta2**step) ** 0.5
        return m / v.sqrt().add_(group["eps"] * bc2_sqrt), bc2_sqrt / (1 - beta1**step)


# ----------------------------------------------------------------------------------------
# construction
# ----------------------------------------------------------------------------------------
def _group_kind(g: Gauge, found: list[Gauge]) -> str:
    """The param_group (``ddc``) a gauge steps in: ``shift`` for translations and for a norm
    gauge read by a translated head / router (centered columns), ``rescale`` otherwise."""
    if isinstance(g, NormGauge):
        shifted = {id(s.params[0]) for s in found if s.kind == "shift"}
        return "shift" if any(id(w) in shifted for w in g.readers) else "rescale"
    return "shift" if g.kind == "shift" else "rescale"


def _partition(the_plan: Plan, found: list[Gauge], base: str) -> tuple[dict[str, list[Tensor]], dict[Tensor, str]]:
    """The plan's parameters by how they are updated: ``rescale`` / ``shift`` (held by such a
    gauge), ``muon`` (Muon matrices), ``adam_mat`` (AdamW, decayed) and ``vec`` (AdamW, no
    decay), in plan order; and the name of every parameter."""
    in_gauge = {id(p): _group_kind(g, found) for g in found if g.kind != "rotation" for p in g.params}
    parts: dict[str, list[Tensor]] = {k: [] for k in ("rescale", "shift", "muon", "adam_mat", "vec")}
    names: dict[Tensor, str] = {}
    for e in the_plan.entries:
        p = e.param
        assert p is not None, f"plan entry {e.name!r} carries no parameter"  # equiopt.plan sets every one
        names[p] = e.name
        kind = in_gauge.get(id(p))
        if kind is not None:
            parts[kind].append(p)
        elif base == "muon" and p.ndim >= 2 and e.role not in _ADAM_ROLES_UNDER_MUON:
            parts["muon"].append(p)
        elif p.ndim >= 2 and e.role != "vector":  # [E, out] expert biases are vectors: no decay
            parts["adam_mat"].append(p)
        else:
            parts["vec"].append(p)
    return parts, names


def _param_groups(
    parts: dict[str, list[Tensor]],
    base: str,
    lr: float,
    adam_lr: float,
    wd: float,
    adam_weight_decay: float,
    common: dict[str, object],
) -> list[dict]:
    """One param_group per non-empty part of :func:`_partition`, in that order."""
    specs: tuple[tuple[str, dict[str, object]], ...] = (
        ("rescale", dict(ddc="rescale", rule=base, lr=lr, weight_decay=wd)),
        ("shift", dict(ddc="shift", rule="adam", lr=adam_lr, weight_decay=0.0)),
        ("muon", dict(ddc="none", rule="muon", lr=lr, weight_decay=wd)),
        (
            "adam_mat",
            dict(ddc="none", rule="adam", lr=adam_lr, weight_decay=wd if base == "adam" else adam_weight_decay),
        ),
        ("vec", dict(ddc="none", rule="adam", lr=adam_lr, weight_decay=0.0)),
    )
    return [dict(params=parts[key], **spec, **common) for key, spec in specs if parts[key]]


#: why a role takes no paper map under DDC-Muon (``rules=``); mlp_in / mlp_out lift ``hybrid``
_NOT_LIFTED = {
    "attention": "DDC-Muon claims V/O and Q/K rotation gauges there, which need a map equivariant under "
    "row rotations O(rows) x O(cols): only the polar map (DDC-Muon's own) is",
    "matrix": "a general matrix's group is O(out) x O(in): only the polar map (DDC-Muon's own) is compatible",
    "embedding": "DDC-Muon updates it with AdamW, as Muon does; the paper's row_norm is not lifted there",
    "tied_embedding": "DDC-Muon updates it with AdamW, as Muon does; the paper's row_norm is not lifted there",
    "lm_head": "DDC-Muon updates it with centered AdamW (the translation gauge); the centered paper maps would "
    "add nothing to the translation conditioning and are not lifted",
    "router": "DDC-Muon updates it with centered AdamW (the translation gauge); the centered paper maps would "
    "add nothing to the translation conditioning and are not lifted",
    "expert_in": "DDC-Muon's polar map takes each stored expert matrix whole (experts' fused gate|up as one matrix); "
    "the paper's per-part hybrid is not lifted there",
    "expert_out": "DDC-Muon's polar map takes each stored expert matrix whole; the paper's column-aware hybrid "
    "is not lifted there",
    "vector": "vectors are AdamW (or radial Adam in a norm-channel gauge): a matrix map means nothing there",
}
_LIFT_KEYS = ("order", "alpha", "eps", "polar_method", "polar_steps")
# the paper's alpha = 1 scales the step by ||rn(x)||_* (up to sqrt(h d)), which its preset offsets by a
# per-role lr (1e-3); DDC has one lr per gauge group (shared with gains and norm readers): alpha = 0
_LIFT_ALPHA = 0.0


def _role_lift(role: str, rule: str | Mapping) -> _Lift | None:
    """The lift of one ``rules`` entry (``None``: DDC-Muon's polar map is kept), or ValueError."""
    if role not in ROLES:
        raise ValueError(f"rules: unknown role {role!r}; valid roles: {list(ROLES)}")
    spec = {"map": rule} if isinstance(rule, str) else dict(rule)
    name = spec.pop("map", None)
    extra = sorted(set(spec) - set(_LIFT_KEYS))
    if extra:
        raise ValueError(
            f"rules[{role!r}]: {extra} mean nothing under DDC (its param_groups are gauge kinds with one lr and "
            f"weight decay each; use lr=, adam_lr=, weight_decay=, lr_scale=); a rule takes 'map' and "
            f"{list(_LIFT_KEYS)}"
        )
    if name == "polar" and not spec and role not in _ADAM_ROLES_UNDER_MUON:
        return None  # the map DDC-Muon already runs there
    if role in _NOT_LIFTED:
        raise ValueError(f"rules[{role!r}] = {name!r} refused under DDC-Muon: {_NOT_LIFTED[role]}")
    if name != "hybrid":
        raise ValueError(
            f"rules[{role!r}] = {name!r} refused under DDC-Muon: on {role} only the paper's map 'hybrid' is lifted "
            "into the conditioning ('polar' keeps DDC-Muon's own map)"
        )
    paper = PRESETS["paper"][role]
    opts = {k: paper.get(k, DEFAULTS[k]) for k in _LIFT_KEYS} | {"alpha": _LIFT_ALPHA} | spec
    return _Lift(column_aware=ROLE_TABLE[role].column_aware, **opts)


def _lifts(the_plan: Plan, parts: dict[str, list[Tensor]], base: str, rules: Mapping | None) -> dict[int, _Lift]:
    """``rules`` resolved to the lifted map of every parameter (by id): each plain 2-D weight of a
    lifted role steps under Muon in DDC-Muon (a gauge's conditioned input, or the raw momentum)."""
    if not rules:
        return {}
    if base != "muon":
        raise ValueError(
            "rules= refused with base='adam': the paper's maps are matrix maps of a momentum and lift into "
            "DDC-Muon's base step; DDC-Adam's base is per-coordinate Adam (use base='muon')"
        )
    by_role = {role: _role_lift(role, rule) for role, rule in rules.items()}
    muon = {id(p) for p in parts["rescale"] + parts["muon"]}
    out: dict[int, _Lift] = {}
    for e in the_plan.entries:
        lift = by_role.get(e.role)
        if lift is None:
            continue
        if e.layout != MATRIX or e.tensor().ndim != 2 or id(e.param) not in muon:
            raise ValueError(f"rules[{e.role!r}]: {e.name} (layout {e.layout}) is not a plain matrix stepped by Muon")
        out[id(e.param)] = lift
    return out


def ddc_optimizer(
    model_or_plan: nn.Module | Plan,
    base: str = "adam",
    *,
    model: nn.Module | None = None,
    lr: float | None = None,
    adam_lr: float | None = None,
    weight_decay: float | None = None,
    adam_weight_decay: float = ADAM_MATRIX_WD,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    gauges: tuple[str, ...] = GAUGE_KINDS,
    probe_tol: float = PROBE_TOL,
    lr_scale: float = 1.0,
    rules: Mapping[str, str | Mapping] | None = None,
    example: ProbeInput | None = None,
    on_nonfinite: str = "raise",
) -> DDCOptimizer:
    """A :class:`DDCOptimizer` for ``model_or_plan`` (an ``nn.Module``, planned with
    ``equiopt.plan(model, "adamw")``, or a :class:`Plan`; with a plan pass ``model=`` for the
    rescale probe).

    ``base="adam"``: ``lr`` (default 6e-3) for every group; ``weight_decay`` (default 0.1) on
    rescale gauges and other 2-D+ weights; 0 on vectors and translation gauges.
    ``base="muon"``: ``lr`` (default 4e-2) and ``weight_decay`` (default 1e-3) for rescale
    gauges and Muon matrices; ``adam_lr`` (default 6e-3) and ``adam_weight_decay`` (0.1) for
    AdamW on embeddings (and other non-Muon 2-D weights); vectors and translation gauges 0.
    ``gauges``: the gauge kinds to claim. ``lr_scale`` multiplies ``lr`` and ``adam_lr``
    (given or default). A model wrapped in DDP or ``torch.compile`` is unwrapped for the plan
    and the probe. FSDP2 (DTensor parameters): ``model=`` an unsharded replica, same parameter
    names, for the plan and the probes (docs/ddc.md "Execution, numerics, distribution").
    ``rules``: ``{role: map}`` lifts a paper map into DDC-Muon's conditioning (``{"mlp_in": "hybrid",
    "mlp_out": "hybrid"}``; a map may be ``{"map": "hybrid", "alpha": ...}``); refused (``ValueError``)
    where it would mean nothing or break a gauge (docs/ddc.md "Lifting the paper's maps").
    ``example``: a batch (dict of keyword inputs, or token ids) for the planner's trace and the
    norm-channel probe, as ``equiopt.plan(example=)``; models without a token embedding need it.
    ``on_nonfinite``: a NaN / Inf gradient raises (``"raise"``) or skips the whole step (``"skip"``).
    """
    rates = dict(lr=lr, adam_lr=adam_lr, weight_decay=weight_decay, adam_weight_decay=adam_weight_decay, eps=eps)
    spec = dict(betas=betas, momentum=momentum, ns_steps=ns_steps, gauges=gauges, on_nonfinite=on_nonfinite)
    _check_options(base, dict(rates, probe_tol=probe_tol, lr_scale=lr_scale), spec)
    target, the_plan, model = _plan_and_model(model_or_plan, model, example)
    why: dict[str, str] = {}
    found = derive_gauges(the_plan, model, base, tuple(gauges), probe_tol, why=why, example=example)
    lr, adam_lr, wd = _rates(base, lr, adam_lr, weight_decay, lr_scale)
    common = dict(
        betas=tuple(betas), eps=eps, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, on_nonfinite=on_nonfinite
    )
    parts, names = _partition(the_plan, found, base)
    groups = _param_groups(parts, base, lr, adam_lr, wd, adam_weight_decay, common)
    table = _table_rows(the_plan, model, base, found, why)
    lifts = _lifts(the_plan, parts, base, rules)
    stored_in_out = {id(e.param): True for e in the_plan.entries if e.layout.transposed and e.param is not None}
    if target is not None:  # FSDP2: built on the replica, mapped onto the DTensor parameters
        groups, found, names, lifts, stored_in_out = _onto(target, model, groups, found, names, lifts, stored_in_out)
    opt = DDCOptimizer(groups, found, base, names, table)
    opt.lifts, opt.stored_in_out, opt.plan_notes = lifts, set(stored_in_out), list(the_plan.notes)
    return opt


def _check_options(base: str, numbers: Mapping[str, object], spec: Mapping, where: str = "ddc_optimizer") -> None:
    """``ddc_optimizer``'s arguments (or a group's, ``where`` naming it), each checked by name
    before anything is built: ``base`` "adam" or "muon"; ``numbers`` (rates, decays, eps, probe
    tolerance, ``lr_scale``; ``None`` = the default), ``spec``'s ``betas``, ``momentum`` and
    ``on_nonfinite`` as every equiopt optimizer checks them (:func:`~equiopt.presets.check_common`);
    ``ns_steps`` a positive int; ``gauges`` a collection of known kinds (a bare string would be
    read letter by letter)."""
    if base not in ("adam", "muon"):
        raise ValueError(f"{where}: base must be 'adam' or 'muon', got {base!r}")
    check_common(where, numbers, spec)
    ns_steps, gauges = spec["ns_steps"], spec["gauges"]
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"{where}: ns_steps must be a positive int, got {ns_steps!r}")
    if isinstance(gauges, str) or not isinstance(gauges, Collection) or set(gauges) - set(GAUGE_KINDS):
        raise ValueError(f"{where}: gauges must be a collection of {GAUGE_KINDS}, got {gauges!r}")


def _plan_and_model(
    model_or_plan: nn.Module | Plan, model: nn.Module | None, example: ProbeInput | None
) -> tuple[nn.Module | None, Plan, nn.Module | None]:
    """``ddc_optimizer``'s ``(FSDP2 target or None, plan, unwrapped model for the probes)``: a
    plan is used as given; a module is planned with the AdamW preset (an FSDP2 module's replica)."""
    target, model_or_plan, model = _sharded_target(model_or_plan, model)
    if isinstance(model_or_plan, Plan):
        the_plan = model_or_plan
    else:
        the_plan = make_plan(model_or_plan, "adamw", example=example)
        model = model_or_plan if model is None else model
    return target, the_plan, (unwrap(model) if model is not None else None)


def _rates(
    base: str, lr: float | None, adam_lr: float | None, weight_decay: float | None, lr_scale: float
) -> tuple[float, float, float]:
    """``ddc_optimizer``'s ``lr``, ``adam_lr`` (both times ``lr_scale``) and weight decay."""
    lr = (ADAM_LR if base == "adam" else MUON_LR) if lr is None else float(lr)
    adam_lr = (lr if base == "adam" else ADAM_LR) if adam_lr is None else float(adam_lr)
    wd = (ADAM_MATRIX_WD if base == "adam" else MUON_MATRIX_WD) if weight_decay is None else float(weight_decay)
    return lr * float(lr_scale), adam_lr * float(lr_scale), wd


def _sharded_target(model_or_plan: nn.Module | Plan, model: nn.Module | None) -> tuple:
    """``(target, model_or_plan, model)``: for an FSDP2 (DTensor) model the model itself as the
    target and its unsharded replica ``model`` to plan and probe; otherwise no target."""
    if not isinstance(model_or_plan, nn.Module) or not any(_is_dtensor(p) for p in model_or_plan.parameters()):
        return None, model_or_plan, model
    if model is None or any(_is_dtensor(p) for p in model.parameters()):
        raise ValueError(
            "ddc_optimizer: an FSDP2 (DTensor) model needs model= an unsharded replica with the same "
            "parameter names (e.g. built from the same config): the plan and the probes run on it"
        )
    return model_or_plan, model, None


def _onto(
    target: nn.Module,
    replica: nn.Module | None,
    groups: list[dict],
    found: list,
    names: dict,
    lifts: dict,
    stored_in_out: dict,
) -> tuple:
    """The param_groups, gauges, names, lifts and ``[in, out]`` marks built on ``replica`` with
    every parameter replaced by ``target``'s of the same name (an FSDP2 model: its DTensor
    parameters)."""
    assert replica is not None
    mine = dict(unwrap(target).named_parameters())
    theirs = dict(unwrap(replica).named_parameters())
    if mine.keys() != theirs.keys():
        raise ValueError("ddc_optimizer: model= must have the same parameter names as the FSDP2 model")
    to = {id(p): mine[n] for n, p in theirs.items()}

    def m(v):
        if isinstance(v, Tensor):
            return to[id(v)]
        return type(v)(m(x) for x in v) if isinstance(v, (tuple, list)) else v

    found = [dataclasses.replace(g, **{f.name: m(getattr(g, f.name)) for f in dataclasses.fields(g)}) for g in found]
    groups = [{**g, "params": [to[id(p)] for p in g["params"]]} for g in groups]

    def by_id(d: dict) -> dict:
        return {id(to[i]): v for i, v in d.items()}

    return groups, found, {to[id(p)]: n for p, n in names.items()}, by_id(lifts), by_id(stored_in_out)


# ----------------------------------------------------------------------------------------
# what DDC does with each parameter
# ----------------------------------------------------------------------------------------
def _module_kind(model: nn.Module | None, module_name: str) -> str:
    if model is None:
        return ""
    try:
        return type(model.get_submodule(module_name)).__name__ if module_name else type(model).__name__
    except AttributeError:
        return ""


def _gauge_label(g, name: str) -> str:
    if isinstance(g, StackedRescaleGauge):
        return f"{g.name} ({'cols' if name == g.names[-1] else f'rows of part {g.part}'}, per expert)"
    if g.kind == "rescale":
        side = "cols" if name == g.names[-1] else ("bias" if g.in_bias is not None and name == g.names[1] else "rows")
        return f"{g.name} ({side})"
    if g.kind == "shift":
        return f"{g.name.split(':')[0]} ({'bias' if g.bias is not None and name == g.names[-1] else 'rows'})"
    if g.kind == "norm":
        side = "gain" if name == g.names[0] else ("bias" if g.bias is not None and name == g.names[1] else "cols")
        return f"{g.name} ({side})"
    return f"{g.name} (polar-map equivariance)"


def _no_gauge_reason(e, model, base: str, why: dict[str, str]) -> str:
    if e.name in why:
        return why[e.name]
    if e.aliases:
        return "tied to " + ", ".join(e.aliases) + ": the input embedding breaks the logit shift"
    role = e.role
    if role == "embedding":
        return "token embedding: no continuous gauge acts on it alone"
    if role == "tied_embedding":
        return "tied embedding / head: the input embedding breaks the logit shift"
    if role == "lm_head":
        return "LM head: no logit-shift gauge (tied, or not a plain softmax head)"
    if role == "router":
        return "router: no shift gauge (scoring is not softmax)"
    if role in ("expert_in", "expert_out"):
        return "stacked / fused experts: no per-expert neuron rescale gauge claimed"
    if role == "vector":
        kind = _module_kind(model, e.module_name)
        if model is None:
            return "vector: no model given, the norm-channel probe could not run"
        return f"vector ({kind or 'bias, sink, gain'}): no gauge claimed"
    return "no gauge found for this block"


def _table_rows(the_plan: Plan, model, base: str, found: list, why: dict[str, str]) -> list[tuple[str, ...]]:
    """``(name, shape, role, gauges)`` per plan entry; ``gauges`` = the claimed gauges or
    ``none: base rule (reason)``."""
    by_param: dict[int, list] = {}
    for g in found:
        for p in g.params:
            by_param.setdefault(id(p), []).append(g)
    rows: list[tuple[str, ...]] = []
    for e in the_plan.entries:
        gs = by_param.get(id(e.param), [])
        if gs:
            text = "; ".join(_gauge_label(g, e.name) for g in gs)
        else:
            text = "none: base rule (" + _no_gauge_reason(e, model, base, why) + ")"
        rows.append((e.name, "x".join(map(str, e.shape)), e.role, text))
    return rows


def _rule_of(group: dict, in_norm_gauge: bool = False, translated: bool = False) -> str:
    if group["ddc"] == "rescale":
        return f"ddc-{group['rule']}"
    if group["ddc"] == "shift" and in_norm_gauge:  # the final norm and the head it feeds
        return "ddc-adam centered" if translated else "ddc-adam"
    if group["ddc"] == "shift":
        return "adamw centered"
    return "muon" if group["rule"] == "muon" else "adamw"


def _format(rows: list[tuple[str, ...]], footer: str, notes: Collection[str] = ()) -> str:
    """``rows`` as aligned columns (the first a header), then ``footer`` and the plan's notes."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(footer)
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def configure(opt: DDCOptimizer, *, batched: bool | None = None, stack_adam_gauges: bool | None = None) -> DDCOptimizer:
    """Execution options: ``batched`` (default True) is the fast path: equal-shape rescale
    gauges of DDC-Muon as one computation, equal-shape Muon matrices as one batched
    Newton-Schulz call, the scaling-gauge step with norm channels folded, stacked and in row
    chunks (``DDCOptimizer._scale_fast``; equal to the reference up to rounding), and AdamW off
    the gauges as multi-tensor calls on small tensors and in row chunks on large ones (per
    element the single-tensor operations: bit-identical to
    ``torch.optim.AdamW(foreach=False)``); False is the per-gauge, per-parameter reference path
    (``_rescale_step``, ``_unit_prepare`` / ``_unit_update``, ``_muon_step``, single-tensor
    AdamW). ``stack_adam_gauges`` (default False) also stacks the DDC-Adam rescale gauges of
    groups without norm channels (fewer kernel launches, more copies: for accelerators; tested
    equal to the reference)."""
    if batched is not None:
        opt.batched = bool(batched)
    if stack_adam_gauges is not None:
        opt.stack_adam_gauges = bool(stack_adam_gauges)
    return opt


def describe(opt: DDCOptimizer) -> str:
    """Every parameter of ``opt`` with its role, its gauge(s) (or ``none: base rule`` and
    why), the rule that updates it, and its group's current lr and weight decay; a
    ``Plan.table()``-like text (``equiopt train`` writes it to the run's ``plan.txt``)."""
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = {n: p for p, n in opt.names.items()}
    rows: list[tuple[str, ...]] = [("name", "shape", "role", "rule", "lr", "wd", "gauges")]
    for name, shape, role, text in opt.table_rows:
        p = params.get(name)
        g = group_of.get(id(p))
        normed = any(x.kind == "norm" for x in opt._gauges_of.get(id(p), []))
        rule = "-" if g is None else _rule_of(g, normed, id(p) in opt._centered)
        rule += " hybrid (lifted)" if id(p) in opt.lifts else ""
        lr, wd = ("-", "-") if g is None else (f"{g['lr']:g}", f"{g['weight_decay']:g}")
        rows.append((name, shape, role, rule, lr, wd, text))
    claimed = sum(not t.startswith("none") for *_, t in opt.table_rows)
    kinds: dict[str, int] = {}
    for gg in opt.gauges:
        k = gg.name.split(":")[0]
        kinds[k] = kinds.get(k, 0) + 1
    footer = (
        f"DDC-{opt.base.capitalize()}: {len(opt.table_rows)} tensors, {claimed} in a gauge; gauges: "
        + (", ".join(f"{k} x{v}" for k, v in kinds.items()) or "none")
        + f"; {opt.state_modes()} extra state scalars"
    )
    return _format(rows, footer, opt.plan_notes)


def gauge_table(
    the_plan: Plan,
    model: nn.Module | None = None,
    base: str = "adam",
    kinds: tuple[str, ...] = GAUGE_KINDS,
) -> str:
    """The gauges of every parameter of a plan as DDC over ``base`` would claim them (the
    table :func:`describe` prints, without an optimizer): what ``equiopt.plan`` can print for
    its entries. ``model`` is needed for the rescale probe."""
    why: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = derive_gauges(the_plan, unwrap(model) if model is not None else None, base, kinds, why=why)
    rows = [("name", "shape", "role", "gauges")] + _table_rows(the_plan, model, base, found, why)
    return _format(rows, f"{len(found)} gauges claimed by DDC-{base.capitalize()}", the_plan.notes)
