"""Dataflow tracing: what each parameter's values really flow through in the forward.

:func:`trace` runs the model's own forward once on a small batch under a
``TorchFunctionMode`` recorder. Every tensor the forward makes carries a provenance tag: the
*leaves* it derives from and, per leaf, the kinds of operations met on the way (pointwise
nonlinearity, a reduction over features, softmax, sigmoid, a bias added, routing). A leaf is
the output of one use of a parameter as a linear map (``F.linear``, ``x @ W``, ``addmm``,
``bmm``, ``grouped_mm``, a convolution) or as an embedding table; the *input* of such a use
is detached, so that a leaf's autograd graph reaches only the ops between this linear map and
the next one ("until its values mix with other parameters' values"). Where the structure
needs indices (which rows of a projection feed which attention head; which columns of an
output projection read which head; which rows of a fused projection are the gate and which
the up part), the recorder asks autograd: the gradient of a masked, randomly weighted output
with respect to the leaf is nonzero exactly on the features that feed it.

Recorded events (see :class:`Trace`):

* ``lookup``: a table indexed by integer ids (``F.embedding``, ``W[ids]``);
* ``linear``: a parameter used as a linear map, with the orientation it is used in
  (``[out, in]`` for ``F.linear``, ``[in, out]`` for ``x @ W`` / Conv1D's ``addmm``), whether
  it is a stacked 3-D weight, indexed by routed expert ids, or a 2-D weight viewed as
  ``[E, a, b]`` (flattened experts), and its input's provenance;
* ``conv``: a convolution kernel;
* ``attention``: ``scaled_dot_product_attention`` or ``softmax(q k^T) v``, with, per
  q/k/v operand and per source leaf, the features feeding each head; the attention output
  becomes a leaf, and a linear reading it records the head of each of its input columns;
* ``gate``: ``act(a) * b`` of equal shapes from linear leaves, with the features of each
  operand (fused ``chunk``/``split``/``[..., ::2]`` parts);
* ``router``: ``topk`` over scores, with the scoring (softmax / sigmoid / a correction bias);
* ``logits``: a leaf whose last axis is the vocabulary reaching the model's output,
  ``cross_entropy`` or ``log_softmax``;
* ``gain_reads``: a linear map whose input is a tensor scaled by a 1-D gain (``x * g``, a
  norm with a weight), through shape ops; any other use of such a tensor is an escape
  (:func:`norm_channels`: the norm-channel gauge candidates).

:func:`infer` turns a :class:`Trace` into a :class:`Reading` (role, layout, why) per
parameter and the blocks found (:mod:`equiopt.blocks`). Tracing never changes the model:
parameters and buffers are left untouched (buffers are restored if the forward writes one),
the torch and Python RNG states, the training flags of every module and the grad mode are
restored; it runs in eval mode (no dropout).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_flatten, tree_map

from .blocks import AttentionBlock, Block, MLPBlock, MoEBlock, VocabBlock
from .layouts import MATRIX, Layout

__all__ = [
    "Trace",
    "TraceError",
    "Reading",
    "trace",
    "infer",
    "default_inputs",
    "shrink_config",
    "preserved",
    "NormChannel",
    "norm_channels",
]

LINEAR_OPS = {
    "linear",
    "matmul",
    "mm",
    "bmm",
    "addmm",
    "baddbmm",
    "addbmm",
    "grouped_mm",
    "_grouped_mm",
    "grouped_mm_fallback",
    "einsum",
}
CONV_OPS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
ACT_OPS = {
    "silu",
    "gelu",
    "relu",
    "tanh",
    "sigmoid",
    "softplus",
    "elu",
    "selu",
    "leaky_relu",
    "mish",
    "hardswish",
    "hardsigmoid",
    "relu6",
    "erf",
    "exp",
    "clamp",
    "clip",
    "clamp_min",
    "clamp_max",
    "pow",
    "sin",
    "cos",
    "square",
    "abs",
    "gelu_",
    "silu_",
    "relu_",
    "logsigmoid",
    "glu",
    "swiglu",
    "sigmoid_",
    "tanh_",
}
REDUCE_OPS = {
    "mean",
    "sum",
    "var",
    "std",
    "norm",
    "amax",
    "amin",
    "max",
    "min",
    "logsumexp",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "batch_norm",
    "instance_norm",
    "softmax",
    "log_softmax",
    "_softmax",
    "cumsum",
    "prod",
    "var_mean",
    "normalize",
    "linalg_vector_norm",
    "vector_norm",
}
SCORING_OPS = {"softmax", "log_softmax", "_softmax", "sigmoid", "sigmoid_"}
SHAPE_OPS = {
    "view",
    "reshape",
    "transpose",
    "permute",
    "contiguous",
    "t",
    "T",
    "mT",
    "flatten",
    "unflatten",
    "unsqueeze",
    "squeeze",
    "expand",
    "expand_as",
    "repeat",
    "to",
    "float",
    "type",
    "type_as",
    "half",
    "bfloat16",
    "double",
    "clone",
    "detach",
    "view_as",
    "reshape_as",
    "movedim",
    "swapaxes",
}


POINTWISE_OPS = {
    "add",
    "sub",
    "mul",
    "div",
    "truediv",
    "add_",
    "sub_",
    "mul_",
    "div_",
    "cat",
    "concat",
    "stack",
    "where",
    "masked_fill",
    "addcmul",
    "lerp",
    "maximum",
    "minimum",
    "neg",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "batch_norm",
    "instance_norm",
    "expand",
    "expand_as",
    "repeat",
    "to",
    "type_as",
}


class TraceError(RuntimeError):
    """The forward could not be traced (the planner then falls back to the structure, with a note)."""


# ----------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------
@dataclass
class Leaf:
    """A tensor a parameter's values start from: the output of a linear map, a lookup, an
    attention."""

    index: int
    kind: str  # "linear" | "lookup" | "conv" | "attention"
    param: str | None
    tensor: Tensor | None = field(repr=False)  # None once the trace is done (the record keeps indices)
    use: int | None = None  # index into Trace.uses
    event: int | None = None  # attention event index
    feat_axis: int = -1  # the axis of the output features


@dataclass
class Use:
    """One use of a parameter as a linear map / table / kernel."""

    param: str
    kind: str  # "linear" | "lookup" | "conv"
    op: str
    orient: str = "out_in"  # how the stored weight is read: "out_in" ([out, in]) or "in_out"
    stacked: bool = False  # 3-D [E, a, b] weight (used whole or indexed)
    flat_experts: int = 0  # 2-D weight viewed as [E, a, b] before use
    routed: bool = False  # indexed by, or its input gathered by, routed expert ids
    bias: str | None = None
    leaf: int = -1
    inputs: dict[int, frozenset] = field(default_factory=dict)  # input's leaves -> flags
    in_heads: tuple | None = None  # (event, H, head of every input column) when reading an attention output
    features: int = 0  # size of the output feature axis
    by_input: bool = False  # a lookup indexed by the example's own integer inputs (token ids)


@dataclass
class AttentionEvent:
    index: int
    op: str
    heads: int
    # role -> leaf -> list over heads of the feature indices feeding that head (tuple of ints)
    sources: dict[str, dict[int, list[tuple[int, ...]]]] = field(default_factory=dict)
    other: dict[str, set] = field(default_factory=dict)  # role -> non-linear leaves (lookups, ...)


@dataclass
class GateEvent:
    index: int
    # operand -> leaf -> feature indices feeding it
    operands: tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]] = ({}, {})


@dataclass
class RouterEvent:
    index: int
    leaves: dict[int, frozenset]  # leaves of the topk input -> flags at that point
    k: int


@dataclass
class GainRead:
    """A linear map whose input is a tensor scaled by a 1-D gain (and shifted by a 1-D bias)."""

    gain: str
    bias: str | None
    reader: str
    orient: str  # the reader's Use.orient: "out_in" (input features on its last axis) or "in_out"
    plain: bool  # a plain 2-D weight (not stacked, flattened experts or routed)


@dataclass
class Trace:
    """Everything the recorder saw. ``names``: parameter id -> name (first name)."""

    leaves: list[Leaf] = field(default_factory=list)
    uses: list[Use] = field(default_factory=list)
    attention: list[AttentionEvent] = field(default_factory=list)
    gates: list[GateEvent] = field(default_factory=list)
    routers: list[RouterEvent] = field(default_factory=list)
    logits: set = field(default_factory=set)  # leaves reaching the output / a loss over the vocabulary
    elementwise: dict[str, set] = field(default_factory=dict)  # param -> op names where used pointwise
    opaque: set = field(default_factory=set)  # params used by ops the recorder does not model
    leaf_flags: dict[int, set] = field(default_factory=dict)  # every flag a leaf's values met
    vocab: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # 1-D gains (a norm's weight, ``x * g``): every tensor scaled by one is followed through
    # shape ops to its consumers; see :func:`norm_channels`
    gain_reads: list[GainRead] = field(default_factory=list)  # a linear map reading a gained tensor
    gain_starts: dict[str, int] = field(default_factory=dict)  # gain -> tensors it scaled (calls)
    gain_escapes: dict[str, set] = field(default_factory=dict)  # gain -> other ops its output met

    def uses_of(self, name: str) -> list[Use]:
        return [u for u in self.uses if u.param == name]

    def params_seen(self) -> set[str]:
        return {u.param for u in self.uses} | set(self.elementwise)


# ----------------------------------------------------------------------------------------
# the recorder
# ----------------------------------------------------------------------------------------
def _short(func) -> str:
    try:
        name = resolve_name(func) or getattr(func, "__name__", str(func))
    except Exception:  # noqa: BLE001 - some builtins have no resolvable name
        name = getattr(func, "__name__", str(func))
    name = str(name)
    if name.endswith(".__get__"):
        name = name[: -len(".__get__")]
    name = name.split(".")[-1] if not name.endswith(".default") else name.split(".")[-2]
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith(("r", "i")) and name[1:] in ("mul", "add", "sub", "truediv", "matmul", "div", "pow"):
            name = name[1:]
    return name


@dataclass
class _PView:
    """A tensor that is a parameter or a view / cast / index of one."""

    param: str
    swapped: bool = False  # last two axes swapped relative to storage
    stacked: bool = False  # a 3-D stacked weight (possibly indexed to 2-D)
    flat_experts: int = 0  # 2-D parameter viewed as [E, a, b]
    routed: bool = False
    ndim: int = 2


class _Recorder(TorchFunctionMode):
    def __init__(self, names: dict[int, str], params: dict[str, Tensor], vocab: int | None, gen: torch.Generator):
        super().__init__()
        self.names = names
        self.params = params
        self.tr = Trace(vocab=vocab)
        self.tags: dict[int, dict[int, frozenset]] = {}
        self.pviews: dict[int, _PView] = {}
        self.special: dict[int, tuple] = {}  # eager attention: id -> ("scores"|"probs", q, kT)
        self.routed: set[int] = set()  # tensors gathered by routed expert ids (and their reshapes)
        self.keep: list = []  # strong refs: ids stay unique while tracing
        self.gen = gen
        self.input_storages: set[int] = set()  # storages of the example's integer inputs
        self.gained: dict[int, tuple[str, str | None]] = {}  # id -> (gain, bias) it is scaled by
        self.gain_read = False  # the current op is a linear map reading a gained tensor

    # -- tags -------------------------------------------------------------------------
    def pview(self, t) -> _PView | None:
        if not isinstance(t, Tensor):
            return None
        if id(t) in self.names:
            return _PView(self.names[id(t)], stacked=t.ndim == 3, ndim=t.ndim)
        return self.pviews.get(id(t))

    def known_view(self, t) -> _PView:
        """:meth:`pview` of a tensor the dispatcher already found to be a parameter view."""
        pv = self.pview(t)
        assert pv is not None, "only called on a tensor of pvs (or its weight operand): pview() is not None"
        return pv

    def tag(self, t) -> dict[int, frozenset] | None:
        return self.tags.get(id(t)) if isinstance(t, Tensor) else None

    def set_tag(self, t: Tensor, tag: dict[int, frozenset]) -> None:
        if not tag:
            return
        self.tags[id(t)] = tag
        self.keep.append(t)
        for k, fl in tag.items():
            self.tr.leaf_flags.setdefault(k, set()).update(fl)

    def merged(self, tensors, extra: frozenset = frozenset()) -> dict[int, frozenset]:
        out: dict[int, frozenset] = {}
        for t in tensors:
            for k, fl in (self.tag(t) or {}).items():
                out[k] = out.get(k, frozenset()) | fl | extra
        return out

    def new_leaf(
        self,
        out: Tensor,
        kind: str,
        param: str | None,
        use: int | None = None,
        event: int | None = None,
        feat_axis: int = -1,
    ) -> Tensor:
        base = out.detach()
        if base.is_floating_point():
            base.requires_grad_(True)
        ret = base.clone() if base.requires_grad else base  # a non-leaf: the forward may write in place
        k = len(self.tr.leaves)
        self.tr.leaves.append(Leaf(k, kind, param, base, use, event, feat_axis))
        self.keep.extend([base, ret])
        self.set_tag(ret, {k: frozenset()})
        return ret

    # -- dispatch ---------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, Tensor)]
        pvs = [t for t in tensors if self.pview(t) is not None]
        acts = [t for t in tensors if id(t) in self.tags]
        if not pvs and not acts:
            return func(*args, **kwargs)
        name = _short(func)
        gains = {self.gained[id(t)] for t in tensors if id(t) in self.gained}
        self.gain_read = False
        out = self.dispatch(func, name, args, kwargs, tensors, pvs, acts)
        self.follow_gains(name, flat, out, pvs, acts, gains)
        return out

    def dispatch(self, func, name, args, kwargs, tensors, pvs, acts):
        if name == "einsum" and pvs:
            return self.einsum(func, args, kwargs, tensors, pvs)
        if name in LINEAR_OPS and pvs and name != "einsum":
            return self.linear(func, name, args, kwargs, tensors, pvs)
        if name in CONV_OPS and pvs:
            return self.conv(func, name, args, kwargs, pvs)
        if name == "embedding" and pvs:
            return self.lookup(func, name, args, kwargs, pvs[-1])
        if name == "getitem" and pvs and pvs[0] is args[0]:
            idx = args[1]
            idx_t = [t for t in tree_flatten(idx)[0] if isinstance(t, Tensor)]
            if (
                idx_t
                and not any(id(t) in self.tags for t in idx_t)
                and not idx_t[0].is_floating_point()
                and idx_t[0].dtype != torch.bool
                and self.known_view(args[0]).ndim == 2
            ):
                return self.lookup(func, "getitem", args, kwargs, args[0])
        if not acts:
            return self.param_view(func, name, args, kwargs, pvs)
        if name == "getitem" and pvs and pvs[0] is args[0]:
            return self.param_view(func, name, args, kwargs, pvs, routed=True)
        if name == "scaled_dot_product_attention":
            return self.attention(func, name, args, kwargs)
        if name in ("matmul", "bmm") and len(acts) == 2 and not pvs:
            return self.act_matmul(func, name, args, kwargs)
        if name == "topk":
            return self.topk(func, args, kwargs)
        if name in ("cross_entropy", "nll_loss", "log_softmax"):
            self.loss_input(args[0])
        return self.generic(func, name, args, kwargs, tensors, pvs, acts)

    # -- 1-D gains: which linear maps read a tensor scaled by one -----------------------
    @staticmethod
    def _starts_gain(name: str, acts: list, pvs: list, views: list[_PView], outs: list[Tensor]) -> bool:
        """``act * g`` or a norm op with a weight (and bias): 1-D parameters on the last axis."""
        return (
            name in ("mul", "layer_norm", "rms_norm")
            and len(acts) == 1
            and 1 <= len(views) <= 2
            and all(v.ndim == 1 for v in views)
            and bool(outs)
            and outs[0].shape[-1:] == pvs[0].shape[-1:]
        )

    def follow_gains(self, name: str, flat: list, out, pvs: list, acts: list, gains: set) -> None:
        """After an op: mark its outputs scaled by a gain (``x * g``, a norm with a weight,
        a shape op on a scaled tensor, ``+ b`` of a 1-D bias); any other use of a scaled
        tensor, or a gain transformed before use (``1 + g``), is an escape."""
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, Tensor)]
        views = [self.known_view(p) for p in pvs]
        one_d = [v.param for v in views if v.ndim == 1]
        new: tuple[str, str | None] | None = None
        if not acts:
            if name not in SHAPE_OPS and name != "getitem":
                for g in one_d:
                    self.tr.gain_escapes.setdefault(g, set()).add(f"{name} of the gain")
            return
        if not gains:
            if self._starts_gain(name, acts, pvs, views, outs):
                new = (one_d[0], one_d[1] if len(one_d) > 1 else None)
                self.tr.gain_starts[new[0]] = self.tr.gain_starts.get(new[0], 0) + 1
        elif len(gains) == 1 and (len(acts) == 1 or name in SHAPE_OPS or name == "dropout"):
            (g,) = gains
            tensor_index = any(isinstance(t, Tensor) for t in flat[1:])
            # dropout: a random diagonal mask, it commutes with a channel scale (identity in eval)
            passes = name in SHAPE_OPS or name == "dropout"
            if (passes and id(flat[0]) in self.gained) or (name == "getitem" and not tensor_index):
                new = g
            elif name == "add" and g[1] is None and len(one_d) == 1 and len(views) == 1:
                new = (g[0], one_d[0])
        if new is not None:
            for o in outs:
                self.gained[id(o)] = new
                self.keep.append(o)
        elif gains and not self.gain_read and outs:
            for g in gains:
                self.tr.gain_escapes.setdefault(g[0], set()).add(name)

    # -- handlers ---------------------------------------------------------------------
    def param_view(self, func, name, args, kwargs, pvs, routed=False):
        out = func(*args, **kwargs)
        base = self.known_view(pvs[0])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if not isinstance(o, Tensor):
                continue
            pv = _PView(base.param, base.swapped, base.stacked, base.flat_experts, base.routed or routed, o.ndim)
            if name in ("t", "T", "mT", "transpose", "swapaxes") and o.ndim >= 2:
                if name in ("t", "T", "mT") or _swaps_last_two(args, kwargs, base.ndim):
                    pv.swapped = not base.swapped
            elif name == "permute" and o.ndim >= 2:
                dims = [d % base.ndim for d in _dims_arg(args, kwargs)]
                if dims[-2:] == [base.ndim - 1, base.ndim - 2]:
                    pv.swapped = not base.swapped
            elif name in ("view", "reshape", "unflatten") and base.ndim == 2 and o.ndim == 3 and not base.stacked:
                pv.flat_experts, pv.stacked = o.shape[0], True
            elif name == "getitem" and base.ndim == 3 and o.ndim in (2, 3):
                pv.stacked = True
            self.pviews[id(o)] = pv
            self.keep.append(o)
        return out

    def lookup(self, func, name, args, kwargs, w):
        out = func(*args, **kwargs)
        pv = self.known_view(w)
        index = args[1] if name == "getitem" else (args[0] if args[0] is not w else args[1])
        by_input = isinstance(index, Tensor) and index.untyped_storage().data_ptr() in self.input_storages
        u = Use(pv.param, "lookup", name, features=out.shape[-1], by_input=by_input)
        self.tr.uses.append(u)
        ret = self.new_leaf(out, "lookup", pv.param, len(self.tr.uses) - 1)
        u.leaf = len(self.tr.leaves) - 1
        return ret

    def conv(self, func, name, args, kwargs, pvs):
        det = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, (args, kwargs))
        out = func(*det[0], **det[1])
        w = self.known_view(pvs[0])
        bias = self.known_view(pvs[1]).param if len(pvs) > 1 else None
        x = args[0]
        u = Use(w.param, "conv", name, bias=bias, inputs=dict(self.tag(x) or {}), features=out.shape[1])
        self.tr.uses.append(u)
        ret = self.new_leaf(out, "conv", w.param, len(self.tr.uses) - 1)
        u.leaf = len(self.tr.leaves) - 1
        return ret

    def einsum(self, func, args, kwargs, tensors, pvs):
        """``einsum("nd,ekd->nek", x, W)``: a linear use when one operand is a weight, the
        output's last index is the weight's output axis and one index is contracted."""
        eq = args[0].replace(" ", "")
        ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        acts = [t for t in tensors if id(t) in self.tags]
        if "->" not in eq or len(ops) != 2 or sum(self.pview(t) is not None for t in ops) != 1:
            return (
                self.generic(func, "einsum", args, kwargs, tensors, pvs, acts)
                if acts
                else self.param_view(func, "einsum", args, kwargs, pvs)
            )
        lhs, out_s = eq.split("->")
        subs = lhs.split(",")
        wi = 0 if self.pview(ops[0]) is not None else 1
        w, x, ws, xs = ops[wi], ops[1 - wi], subs[wi], subs[1 - wi]
        contracted = [c for c in ws if c in xs and c not in out_s]
        if len(contracted) != 1 or not out_s or out_s[-1] not in ws or out_s[-1] in xs or w.ndim not in (2, 3):
            return (
                self.generic(func, "einsum", args, kwargs, tensors, pvs, acts)
                if acts
                else self.param_view(func, "einsum", args, kwargs, pvs)
            )
        pos_in, pos_out = ws.index(contracted[0]), ws.index(out_s[-1])
        if {pos_in, pos_out} != {w.ndim - 2, w.ndim - 1}:
            return self.generic(func, "einsum", args, kwargs, tensors, pvs, acts)
        return self._linear_use(
            func, "einsum", args, kwargs, x, w, None, "out_in" if pos_out < pos_in else "in_out", [x, w]
        )

    def linear(self, func, name, args, kwargs, tensors, pvs):
        flat_args = list(args) + [v for v in kwargs.values() if isinstance(v, Tensor)]
        # the weight: the parameter view in the weight position of the op
        if name == "linear":
            w, x, b = (
                args[1] if len(args) > 1 else kwargs.get("weight"),
                args[0],
                (args[2] if len(args) > 2 else kwargs.get("bias")),
            )
            orient_used = "out_in"
        elif name in ("addmm", "baddbmm", "addbmm"):
            b, x, w = args[0], args[1], args[2]
            orient_used = "in_out"
        else:
            a0, a1 = args[0], args[1] if len(args) > 1 else kwargs.get("mat2", kwargs.get("other"))
            if self.pview(a1) is not None and self.pview(a0) is None:
                x, w = a0, a1
            elif (
                self.pview(a0) is not None
                and self.pview(a1) is None
                and isinstance(a1, Tensor)
                and a1.ndim >= 2
                and a1.shape[-1] == 1
            ):
                # W x with x a column ([..., in, 1]): W read as [out, in], features on axis -2
                return self._linear_use(func, name, args, kwargs, a1, a0, None, "out_in", [a0, a1], feat_axis=-2)
            elif self.pview(a0) is not None and self.pview(a1) is None:
                return self.generic(func, name, args, kwargs, tensors, pvs, [t for t in tensors if id(t) in self.tags])
            else:
                return self.param_view(func, name, args, kwargs, pvs)
            b = None
            orient_used = "in_out"
        wv = self.pview(w)
        if wv is None or (isinstance(x, Tensor) and self.pview(x) is not None):
            return self.param_view(func, name, args, kwargs, pvs)
        return self._linear_use(func, name, args, kwargs, x, w, b, orient_used, flat_args)

    def _linear_use(self, func, name, args, kwargs, x, w, b, orient_used, flat_args, feat_axis=-1):
        wv = self.known_view(w)
        det = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, (args, kwargs))
        out = func(*det[0], **det[1])
        orient = orient_used if not wv.swapped else ("in_out" if orient_used == "out_in" else "out_in")
        bv = self.pview(b) if isinstance(b, Tensor) else None
        xt = self.tag(x) or {}
        routed = (
            wv.routed
            or id(x) in self.routed
            or any(
                "topk_idx" in fl
                for t in flat_args
                if isinstance(t, Tensor) and t is not x and t is not w
                for fl in (self.tag(t) or {}).values()
            )
        )
        u = Use(
            wv.param,
            "linear",
            name,
            orient,
            wv.stacked,
            wv.flat_experts,
            routed,
            bv.param if bv is not None else None,
            inputs=dict(xt),
            features=out.shape[feat_axis],
        )
        self.tr.uses.append(u)
        ui = len(self.tr.uses) - 1
        if id(x) in self.gained:
            gain, bias = self.gained[id(x)]
            plain = not (wv.stacked or wv.flat_experts or routed)
            self.tr.gain_reads.append(GainRead(gain, bias, wv.param, orient, plain))
            self.gain_read = True
        if isinstance(x, Tensor) and x.requires_grad:
            att = [k for k in xt if self.tr.leaves[k].kind == "attention"]
            if att:
                u.in_heads = self.column_heads(x, att)
        ret = self.new_leaf(out, "linear", wv.param, ui, feat_axis=feat_axis)
        u.leaf = len(self.tr.leaves) - 1
        return ret

    def generic(self, func, name, args, kwargs, tensors, pvs, acts):
        out = self._diagonal_statistic(func(*args, **kwargs), name, args, kwargs)
        flags = self._flags(name, args, kwargs, tensors, acts)
        if pvs and name not in ("getitem",):
            for p in pvs:
                if name in POINTWISE_OPS:
                    self.tr.elementwise.setdefault(self.known_view(p).param, set()).add(name)
                else:  # an op the recorder does not model (nn.MultiheadAttention's fused forward)
                    self.tr.opaque.add(self.known_view(p).param)
        idx_routed = name in ("getitem", "index_select", "gather", "index_add", "index_add_") and any(
            "topk_idx" in fl for t in tensors[1:] for fl in (self.tag(t) or {}).values()
        )
        outs = out if isinstance(out, (tuple, list)) else (out,)
        src_special = self.special.get(id(acts[0])) if acts else None
        for o in outs:
            if not isinstance(o, Tensor):
                continue
            if idx_routed or (name in SHAPE_OPS and args and id(args[0]) in self.routed):
                self.routed.add(id(o))
            tag = self.merged([args[0]]) if name == "getitem" and idx_routed else self.merged(acts, frozenset(flags))
            self.set_tag(o, tag)
            if src_special is not None and o.ndim == acts[0].ndim and o.shape[:-1] == acts[0].shape[:-1]:
                kind = "probs" if name in ("softmax", "_softmax") else src_special[0]
                self.special[id(o)] = (kind,) + src_special[1:]
        return out

    @staticmethod
    def _diagonal_statistic(out, name: str, args, kwargs):
        """A statistic over features (a norm's mean / variance, a softmax's normalizer) would
        make every feature depend on every other one: keep the value, let autograd see only
        the per-feature (diagonal) path, so the probes read the projection's structure."""
        if not (
            name in REDUCE_OPS
            and isinstance(out, Tensor)
            and out.is_floating_point()
            and _reduces_last(name, args, kwargs)
        ):
            return out
        x = args[0]
        if isinstance(x, Tensor) and x.shape == out.shape and x.requires_grad:
            return out.detach() + (x - x.detach()).to(out.dtype)
        return out.detach()

    def _flags(self, name: str, args, kwargs, tensors, acts) -> set[str]:
        """What this op adds to the provenance of its inputs' leaves."""
        flags = set()
        if name in ACT_OPS:
            flags.add("act")
        if name in SCORING_OPS:
            flags.add("sigmoid" if name.startswith("sigmoid") else "softmax")
        if name in REDUCE_OPS and _reduces_last(name, args, kwargs):
            flags.add("reduce")
        if name in ("add", "sub", "add_", "sub_") and len(acts) == 1:
            others = [t for t in tensors if t is not acts[0]]
            if any(t.ndim >= 1 and t.numel() > 1 for t in others):
                flags.add("biased")
        if name in ("mul", "mul_") and len(acts) == 2 and acts[0].shape == acts[1].shape and acts[0].shape[-1] > 1:
            if self.gate(acts[0], acts[1]) is not None:
                flags.add("gated")
            elif self.tags[id(acts[0])].keys() == self.tags[id(acts[1])].keys():
                flags.add("act")  # x * f(x): a pointwise nonlinearity (GELU's tanh form)
        return flags

    def loss_input(self, logits):
        for k in self.tag(logits) or {}:
            if self.tr.vocab is not None and logits.shape[-1] == self.tr.vocab:
                self.tr.logits.add(k)

    # -- autograd probes --------------------------------------------------------------
    def _grad(self, out: Tensor, weight: Tensor, leaf: Tensor) -> Tensor | None:
        try:
            (g,) = torch.autograd.grad((out * weight).sum(), leaf, retain_graph=True, allow_unused=True)
        except RuntimeError:
            return None
        return g

    def _rand(self, t: Tensor) -> Tensor:
        return (torch.rand(t.shape, generator=self.gen, dtype=torch.float32) + 0.5).to(t.device, t.dtype)

    def feature_sets(self, t: Tensor, axis: int | None, leaf: Leaf) -> list[tuple[int, ...]] | None:
        """Per index along ``axis`` of ``t`` (all of ``t`` when None): the leaf's features
        (last axis) that feed it."""
        if not t.requires_grad:
            return None
        r = self._rand(t)
        n = 1 if axis is None else t.shape[axis]
        out: list[tuple[int, ...]] = []
        for h in range(n):
            if axis is None:
                w = r
            else:
                mask = torch.zeros(t.shape[axis], dtype=t.dtype, device=t.device)
                mask[h] = 1
                w = r * mask.view(*([-1] + [1] * (t.ndim - 1 - (axis % t.ndim))))
            assert leaf.tensor is not None, "leaf tensors are dropped only after the forward"
            g = self._grad(t, w, leaf.tensor)
            if g is None:
                out.append(())
                continue
            g = g.detach().abs().movedim(leaf.feat_axis, -1)
            nz = g.reshape(-1, g.shape[-1]).sum(0) > 0
            out.append(tuple(nz.nonzero().flatten().tolist()))
        return out

    def column_heads(self, x: Tensor, att_leaves: list[int]):
        """For a linear reading an attention output: the (event, heads, head of each input
        column) when every column is one attention-output entry (views only)."""
        k = att_leaves[0]
        leaf = self.tr.leaves[k]
        A = leaf.tensor  # [B, H, T, hd]
        assert A is not None, "leaf tensors are dropped only after the forward"
        H = A.shape[-3] if A.ndim >= 3 else 1
        n = x.shape[-1]
        bits = max(1, math.ceil(math.log2(max(n, 2))))
        r = self._rand(x)
        cols = torch.arange(n, device=x.device)
        col_of = torch.zeros(A.shape, dtype=torch.long, device=A.device)
        for b in range(bits):
            m1 = ((cols >> b) & 1).to(x.dtype)
            g1 = self._grad(x, r * m1, A)
            g0 = self._grad(x, r * (1 - m1), A)
            if g1 is None or g0 is None:
                return None
            on, off = g1.abs() > 0, g0.abs() > 0
            if bool((on & off).any()):
                return None  # an attention entry reaches several columns: not a plain view
            col_of |= on.long() << b
        reached = self._grad(x, r, A)
        if reached is None:
            return None
        reached = reached.abs() > 0
        head_of = [-1] * n
        for h in range(H):
            sel = (col_of.select(-3, h) if A.ndim >= 3 else col_of)[(reached.select(-3, h) if A.ndim >= 3 else reached)]
            for c in set(sel.tolist()):
                if head_of[c] not in (-1, h):
                    return None
                head_of[c] = h
        return (leaf.event, H, tuple(head_of))

    # -- events -----------------------------------------------------------------------
    def attention(self, func, name, args, kwargs):
        q, k, v = (args + tuple(kwargs.get(n) for n in ("query", "key", "value")[len(args) :]))[:3]
        out = func(*args, **kwargs)
        return self.attention_event(name, (q, k, v), out, kT=False)

    def attention_event(self, name, qkv, out, kT):
        ev = AttentionEvent(len(self.tr.attention), name, out.shape[-3] if out.ndim >= 3 else 1)
        for role, t in zip("qkv", qkv):
            ev.sources[role] = {}
            ev.other[role] = set()
            if not isinstance(t, Tensor):
                continue
            for li in self.tag(t) or {}:
                leaf = self.tr.leaves[li]
                if leaf.kind != "linear":
                    ev.other[role].add(li)
                    continue
                sets = self.feature_sets(t, -3 if t.ndim >= 3 else None, leaf)
                if sets is not None:
                    ev.sources[role][li] = sets
        self.tr.attention.append(ev)
        return self.new_leaf(out, "attention", None, event=ev.index)

    def act_matmul(self, func, name, args, kwargs):
        a, b = args[0], args[1]
        out = func(*args, **kwargs)
        sa = self.special.get(id(a))
        if sa is not None and sa[0] == "probs":
            q, kT = sa[1], sa[2]
            return self.attention_event("softmax(qk^T)v", (q, kT, b), out, kT=True)
        self.set_tag(out, self.merged([a, b], frozenset({"scores"})))
        self.special[id(out)] = ("scores", a, b)
        return out

    def gate(self, a: Tensor, b: Tensor) -> int | None:
        ta, tb = self.tags[id(a)], self.tags[id(b)]  # both are tagged activations (generic's acts)
        if any(self.tr.leaves[k].kind != "linear" for k in (*ta, *tb)):
            return None
        if any({"scores", "topk", "reduce"} & fl for fl in (*ta.values(), *tb.values())):
            return None
        if not any("act" in fl for fl in (*ta.values(), *tb.values())):
            return None
        ops: list[dict[int, tuple[int, ...]]] = []
        for t, tg in ((a, ta), (b, tb)):
            d = {}
            for k in tg:
                s = self.feature_sets(t, None, self.tr.leaves[k])
                if s is None:
                    return None
                d[k] = s[0]
            ops.append(d)
        if ops[0] == ops[1]:
            return None  # x * f(x) on the same features: a pointwise nonlinearity, not a gate
        ev = GateEvent(len(self.tr.gates), (ops[0], ops[1]))
        self.tr.gates.append(ev)
        return ev.index

    def topk(self, func, args, kwargs):
        t = args[0]
        out = func(*args, **kwargs)
        tag = self.tag(t) or {}
        k = args[1] if len(args) > 1 else kwargs.get("k")
        self.tr.routers.append(RouterEvent(len(self.tr.routers), dict(tag), int(k)))
        values, indices = out[0], out[1]
        self.set_tag(values, self.merged([t], frozenset({"topk"})))
        self.set_tag(indices, self.merged([t], frozenset({"topk_idx"})))
        return out


def _dims_arg(args, kwargs):
    dims = args[1:] if len(args) > 1 else kwargs.get("dims", ())
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return list(dims)


def _swaps_last_two(args, kwargs, ndim):
    d = [a for a in args[1:3] if isinstance(a, int)]
    if len(d) < 2:
        d = [kwargs.get("dim0"), kwargs.get("dim1")]
    try:
        return sorted(x % ndim for x in d) == [ndim - 2, ndim - 1]
    except TypeError:
        return False


def _reduces_last(name, args, kwargs) -> bool:
    if name in ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm", "normalize"):
        return True
    x = args[0] if args else None
    if not isinstance(x, Tensor):
        return False
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], (bool, float)) else None)
    if dim is None:
        return name not in ("max", "min", "cumsum", "softmax", "log_softmax", "_softmax") or x.ndim <= 1
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    try:
        return any(int(d) % max(x.ndim, 1) == x.ndim - 1 for d in dims)
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------
# running the forward
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def preserved(model: nn.Module):
    """Run something on ``model`` and leave it as it was: training flags, grad mode, torch and
    Python RNG states, buffers (restored in place if written; re-attached if replaced)."""
    training = [(m, m.training) for m in model.modules()]
    grad = torch.is_grad_enabled()
    py_state = random.getstate()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    buffers = [
        (m, n, b, b.detach().clone() if b is not None and b.device.type != "meta" else None)
        for m in model.modules()
        for n, b in m._buffers.items()
    ]
    attrs = {id(m): dict(m.__dict__) for m in model.modules()}
    try:
        yield
    finally:
        for m, flag in training:
            m.training = flag
        torch.set_grad_enabled(grad)
        random.setstate(py_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        with torch.no_grad():
            for m, n, b, saved in buffers:
                m._buffers[n] = b
                if saved is not None and b is not None and not torch.equal(b, saved):
                    b.copy_(saved)
        for m in model.modules():  # plain attributes a forward may cache (rotary caches, flags)
            before = attrs.get(id(m))
            if before is None:
                continue
            for key in [k for k in m.__dict__ if k not in before and not k.startswith("_")]:
                del m.__dict__[key]


def _vocab(model: nn.Module) -> int | None:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get_in):
        try:
            emb = get_in()
        except (NotImplementedError, AttributeError):
            emb = None
    if emb is None:
        embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        emb = max(embs, key=lambda m: m.num_embeddings) if embs else None
    w = getattr(emb, "weight", None)
    return int(w.shape[0]) if isinstance(w, Tensor) and w.ndim == 2 else None


def default_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict | None:
    """A small batch for ``model``: ``input_ids [2, 8]`` from the embedding's vocabulary, or
    ``pixel_values`` from a vision config; None when neither can be built."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    main = getattr(model, "main_input_name", "input_ids")
    config = getattr(model, "config", None)
    if main == "pixel_values" and config is not None:
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, (tuple, list)) else size
        ch = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, ch, size, size, generator=gen).to(device)}
    vocab = _vocab(model)
    if vocab is None:
        return None
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "input_ids" in params:
        return {"input_ids": ids}
    return {"__args__": (ids,)}


def trace(model: nn.Module, inputs=None) -> Trace:
    """Run ``model``'s forward once on ``inputs`` (a dict of keyword arguments, a tuple of
    positional ones or one tensor; default :func:`default_inputs`) and record the dataflow of
    every parameter. Raises :class:`TraceError` when the forward cannot run."""
    t0 = time.perf_counter()
    names: dict[int, str] = {}
    params: dict[str, Tensor] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
        params.setdefault(names[id(p)], p)
    if any(p.device.type == "meta" for p in params.values()):
        raise TraceError("the model is on the meta device (no values to run); plan it through shrink_config()")
    if any(
        type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor" for p in params.values()
    ):
        raise TraceError("DTensor (FSDP2) parameters: the forward needs collectives")
    if inputs is None:
        inputs = default_inputs(model)
        if inputs is None:
            raise TraceError("no example batch: pass one (example=...) or give the model an nn.Embedding")
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    if isinstance(inputs, Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    elif isinstance(inputs, Mapping):
        kwargs = dict(inputs)
        args = tuple(kwargs.pop("__args__", ()))
    else:
        raise TraceError(f"example batch of type {type(inputs).__name__}: pass a dict, a tuple or a tensor")
    rec = _Recorder(names, params, _vocab(model), torch.Generator().manual_seed(1234))
    rec.input_storages = {
        t.untyped_storage().data_ptr()
        for t in tree_flatten((args, kwargs))[0]
        if isinstance(t, Tensor) and not t.is_floating_point() and t.dtype != torch.bool
    }
    with preserved(model):
        model.eval()
        try:
            with torch.enable_grad(), rec:
                out = model(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any failure of a user's forward becomes a note
            raise TraceError(f"the forward failed under the tracer: {type(err).__name__}: {err}") from err
        leaves: list[int] = []
        for o in tree_flatten(_plain(out))[0]:
            if isinstance(o, Tensor) and rec.tr.vocab is not None and o.ndim >= 1 and o.shape[-1] == rec.tr.vocab:
                leaves.extend(rec.tag(o) or {})
        rec.tr.logits.update(leaves)
    tr = rec.tr
    for leaf in tr.leaves:  # drop the tensors: the record keeps indices only
        leaf.tensor = None
    rec.keep.clear()
    rec.tags.clear()
    rec.pviews.clear()
    rec.special.clear()
    tr.seconds = time.perf_counter() - t0
    return tr


def _plain(out):
    if hasattr(out, "to_tuple"):
        try:
            return out.to_tuple()
        except Exception:  # noqa: BLE001
            return tuple(out.values()) if hasattr(out, "values") else out
    return out


# ----------------------------------------------------------------------------------------
# large and meta models: the same architecture, smaller
# ----------------------------------------------------------------------------------------
WIDTH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "head_dim",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "n_embd",
    "n_inner",
    "d_model",
    "d_ff",
    "ffn_dim",
    "shared_expert_intermediate_size",
    "d_kv",
    "dim",
    "hidden_dim",
)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def shrink_config(config, width: int = 8, layers: int = 2, vocab: int = 256):
    """A copy of a Hugging Face config for the same architecture, small enough to run: widths
    divided by ``width`` (head counts, expert counts and ratios kept), ``layers`` layers (more
    when the layer pattern needs them: ``first_k_dense_replace``, ``layer_types``) and a
    vocabulary of ``vocab`` tokens. Role and layout readings of the small model carry over by
    name (layer indices collapse onto the pattern)."""
    cfg = copy.deepcopy(config)
    d: dict[str, Any] = getattr(cfg, "to_dict", lambda: {})()
    for key in WIDTH_KEYS:
        v = d.get(key)
        if isinstance(v, int) and v >= 2 * width and v % width == 0:
            setattr(cfg, key, v // width)
    for key in LAYER_KEYS:
        v = d.get(key)
        if isinstance(v, int) and v > layers:
            keep = layers
            k = d.get("first_k_dense_replace")
            if isinstance(k, int):
                keep = max(keep, k + 1)
            lt = d.get("layer_types")
            if isinstance(lt, list) and lt:
                seen = list(dict.fromkeys(lt))
                keep = max(keep, max(lt.index(x) for x in seen) + 1)
                cfg.layer_types = lt[:keep]
            setattr(cfg, key, keep)
    for key in ("vocab_size",):
        v = d.get(key)
        if isinstance(v, int) and v > vocab:
            setattr(cfg, key, vocab)
    return cfg


@dataclass(frozen=True)
class NormChannel:
    """A 1-D gain (a norm's weight; LayerNorm: with its bias) whose scaled output linear maps
    read: scaling channel ``j`` of the gain (and bias) by ``t_j`` and dividing input column
    ``j`` of every reader by it is a candidate gauge. ``certain``: the traced flow confirms
    it (the gain scales one tensor, used as is, that reaches only plain 2-D linear maps,
    through shape ops); else ``why`` says what the flow cannot confirm (the DDC optimizer's
    float64 probe decides). ``orients``: each reader's :attr:`Use.orient`."""

    gain: str
    bias: str | None
    readers: tuple[str, ...]
    orients: tuple[str, ...]
    certain: bool
    why: str = ""


def norm_channels(tr: Trace) -> list[NormChannel]:
    """The norm-channel candidates of a trace, one per gain with at least one reader."""
    reads: dict[str, list[GainRead]] = {}
    for r in tr.gain_reads:
        reads.setdefault(r.gain, []).append(r)
    out = []
    for gain, rs in reads.items():
        why = []
        if tr.gain_starts.get(gain, 0) != 1:
            why.append(f"the gain scales {tr.gain_starts.get(gain, 0)} tensors in one forward")
        if tr.gain_escapes.get(gain):
            why.append(f"its output (or the gain) also meets {', '.join(sorted(tr.gain_escapes[gain]))}")
        if not all(r.plain for r in rs):
            why.append("a reader is a stacked / routed expert weight")
        shared = sorted({r.reader for r in rs if len(tr.uses_of(r.reader)) > sum(q.reader == r.reader for q in rs)})
        if shared:
            why.append(f"{', '.join(shared)} also used elsewhere (tied or shared)")
        if len({r.bias for r in rs}) > 1:
            why.append("its readers see different biases")
        first = dict.fromkeys(r.reader for r in rs)  # a reader used twice on the same input counts once
        orient = {r.reader: r.orient for r in rs}
        out.append(
            NormChannel(gain, rs[0].bias, tuple(first), tuple(orient[n] for n in first), not why, "; ".join(why))
        )
    return out


# ----------------------------------------------------------------------------------------
# inference: record -> role, layout, blocks
# ----------------------------------------------------------------------------------------
@dataclass
class Reading:
    """What the dataflow says about one parameter. ``error``: the flow was seen but no layout
    expresses it (the planner refuses, naming the override)."""

    role: str
    layout: Layout = MATRIX
    reason: str = ""
    found: bool = True  # False: a 2-D weight whose flow matches no block
    scoring: str | None = None  # routers: "softmax" | "sigmoid" | "softmax+bias"
    error: str | None = None


def _blocks_of(sets: list[tuple[int, ...]], n: int) -> int | None:
    """Number of equal contiguous blocks tiling ``range(n)`` that ``sets`` are (after
    de-duplication), or None."""
    uniq = sorted({s for s in sets if s}, key=lambda s: s[0])
    if not uniq:
        return None
    size = len(uniq[0])
    pos = 0
    for s in uniq:
        if len(s) != size or s != tuple(range(pos, pos + size)):
            return None
        pos += size
    return len(uniq) if pos == n else None


def _fused_order(s0: tuple[int, ...], s1: tuple[int, ...], n: int) -> str | None:
    h = n // 2
    if len(s0) != h or len(s1) != h or n % 2:
        return None
    a, b = sorted((s0, s1))
    if a == tuple(range(h)) and b == tuple(range(h, n)):
        return "concat"
    if a == tuple(range(0, n, 2)) and b == tuple(range(1, n, 2)):
        return "interleaved"
    return None


def _scope(names) -> str:
    mods = [n.rpartition(".")[0].split(".") for n in names]
    common = []
    for parts in zip(*mods):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _head_blocks(ev, params: dict, readings: dict, shapes) -> tuple:
    """For q, k and v of attention event ``ev``: the row block (head of the projection's
    ``heads{N}:out`` layout) feeding each head the attention computes; ``()`` when some head
    does not read exactly one whole block (the contiguous default then applies)."""
    out = []
    for r in "qkv":
        srcs = ev.sources[r]
        lay = readings[params[r]].layout
        if not srcs or lay.heads <= 1 or lay.head_axis != "out" or params[r] not in shapes:
            return ()
        m = lay.logical_shape(shapes[params[r]])[1]
        sets = srcs[next(iter(srcs))]
        blocks = []
        for s in sets:
            if not s or len(s) != m or min(s) % m or tuple(s) != tuple(range(min(s), min(s) + m)):
                return ()
            blocks.append(min(s) // m)
        out.append(tuple(blocks))
    return tuple(out)


@dataclass
class _Flow:
    """The trace indexed by parameter: who feeds whom, for reading roles and blocks."""

    uses_by: dict[str, list[Use]]
    leaf_param: dict[int, str]  # leaves made by a parameter (every linear leaf has one)
    leaf_use: dict[int, Use]
    lookups: set[str]
    logits: set[str]
    routers: dict[str, dict[str, Any]]  # router param -> scoring flags, "E", "bias_param"
    # filled by _add_mlp_edges and _add_attention_edges
    mlp_out: dict[str, list[tuple[Use, list[int]]]] = field(default_factory=dict)  # out -> [(use, in leaves)]
    mlp_in: dict[str, list[tuple[Use, str]]] = field(default_factory=dict)  # in param -> [(use, out param)]
    mlp_group: dict[str, set[str]] = field(default_factory=dict)  # param -> every param of its MLP(s)
    gate_parts: dict[str, list[tuple[int, tuple[int, ...], int]]] = field(
        default_factory=dict
    )  # (operand, feats, gate)
    attn_in: dict[str, list[tuple[int, str, list[tuple[int, ...]]]]] = field(
        default_factory=dict
    )  # (event, role, sets)
    attn_out: dict[str, list[Use]] = field(default_factory=dict)  # param -> uses reading an attention output
    feeds_linear: set[str] = field(default_factory=set)


def _layout_base(u: Use, **kw) -> Layout:
    return Layout(stacked=u.stacked, transposed=u.orient == "in_out", flat_experts=u.flat_experts, **kw)


def _flow(tr: Trace) -> _Flow:
    uses_by: dict[str, list[Use]] = {}
    for u in tr.uses:
        uses_by.setdefault(u.param, []).append(u)
    leaf_param = {lf.index: lf.param for lf in tr.leaves if lf.param is not None}
    leaf_use = {lf.index: tr.uses[lf.use] for lf in tr.leaves if lf.use is not None}
    lookups = {u.param for u in tr.uses if u.kind == "lookup"}
    logit_params = {
        leaf_param[k] for k in tr.logits if leaf_param.get(k) is not None and tr.leaves[k].kind in ("linear", "lookup")
    }
    logits = {
        p
        for p in logit_params
        if tr.vocab is not None and any(u.kind == "linear" and u.features == tr.vocab for u in uses_by[p])
    }
    flow = _Flow(uses_by, leaf_param, leaf_use, lookups, logits, _routers(tr, leaf_param, leaf_use))
    _add_mlp_edges(tr, flow)
    _add_attention_edges(tr, flow)
    return flow


def _routers(tr: Trace, leaf_param: dict[int, str], leaf_use: dict[int, Use]) -> dict[str, dict[str, Any]]:
    routers: dict[str, dict[str, Any]] = {}
    for ev in tr.routers:
        for k, flags in ev.leaves.items():
            p = leaf_param.get(k)
            if p is None or tr.leaves[k].kind != "linear":
                continue
            allf = tr.leaf_flags.get(k, set())
            r = routers.setdefault(
                p,
                {
                    "sigmoid": False,
                    "softmax": False,
                    "bias": False,
                    "E": leaf_use[k].features,
                    "bias_param": leaf_use[k].bias,
                },
            )
            r["sigmoid"] |= "sigmoid" in allf
            r["softmax"] |= "softmax" in allf
            r["bias"] |= "biased" in flags
    return routers


def _add_mlp_edges(tr: Trace, flow: _Flow) -> None:
    leaf_param = flow.leaf_param
    for u in tr.uses:
        if u.kind != "linear" or not u.inputs:
            continue
        ks = list(u.inputs)
        if not all(tr.leaves[k].kind == "linear" and leaf_param[k] not in flow.routers for k in ks):
            continue
        fl = [u.inputs[k] for k in ks]
        if all(({"act", "gated"} & f) and not ({"reduce", "scores", "topk", "softmax"} & f) for f in fl):
            flow.mlp_out.setdefault(u.param, []).append((u, ks))
            for k in ks:
                flow.mlp_in.setdefault(leaf_param[k], []).append((flow.leaf_use[k], u.param))
    for out, lst in flow.mlp_out.items():
        members = {out} | {leaf_param[k] for _, ks in lst for k in ks}
        for q in members:
            flow.mlp_group.setdefault(q, set()).update(members)
    for g in tr.gates:
        for j, op in enumerate(g.operands):
            for k, feats in op.items():
                flow.gate_parts.setdefault(leaf_param[k], []).append((j, feats, g.index))


def _add_attention_edges(tr: Trace, flow: _Flow) -> None:
    leaf_param = flow.leaf_param
    for ev in tr.attention:
        for role, srcs in ev.sources.items():
            for k, sets in srcs.items():
                flow.attn_in.setdefault(leaf_param[k], []).append((ev.index, role, sets))
    for u in tr.uses:
        if u.in_heads is not None:
            flow.attn_out.setdefault(u.param, []).append(u)
    flow.feeds_linear.update(
        leaf_param[k] for u in tr.uses if u.kind == "linear" for k in u.inputs if tr.leaves[k].kind == "linear"
    )


def infer(tr: Trace, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, Reading], list[Block]]:
    """Role, layout and reason per parameter name seen in ``tr``, and the blocks found."""
    flow = _flow(tr)
    readings = {p: _read(p, us, flow, shapes) for p, us in flow.uses_by.items()}
    for p, ops in tr.elementwise.items():
        if p not in readings and p not in tr.opaque:
            readings[p] = Reading(
                "vector", reason=f"used elementwise ({', '.join(sorted(ops))}), never as a linear map"
            )
    for u in tr.uses:
        if u.bias and u.bias not in readings:
            readings[u.bias] = Reading("vector", reason=f"bias of {u.param}")
    blocks: list[Block] = []
    vocab = _vocab_block(tr, flow, shapes)
    if vocab is not None:
        blocks.append(vocab)
    for blk in _attention_blocks(tr, flow, readings, shapes):
        if blk not in blocks:
            blocks.append(blk)
    mlps = _mlp_blocks(flow, readings, shapes)
    blocks.extend(mlps)
    blocks.extend(_moe_blocks(flow, readings, [b for b in mlps if b.experts > 1]))
    return readings, blocks


def _read(p: str, us: list[Use], flow: _Flow, shapes: Mapping[str, tuple[int, ...]]) -> Reading:
    """The reading of one parameter from its uses, the first rule that applies."""
    u = us[0]
    shape = tuple(shapes.get(p, ()))
    kinds = {x.kind for x in us}
    if sum(1 for s in shape if s > 1) <= 1 and "lookup" not in kinds:
        return Reading("vector", reason=f"{len(shape)}-D parameter")
    if "lookup" in kinds:
        if p in flow.logits:
            return Reading("tied_embedding", reason="embedding lookup whose table also makes the logits")
        return Reading("embedding", reason="embedding lookup by ids")
    if "conv" in kinds:
        return Reading("matrix", Layout(flatten=len(shape) > 2), f"{u.op} kernel as a matrix [out, in*k]")
    if p in flow.logits:
        return Reading("lm_head", _layout_base(u), "linear map to logits over the vocabulary")
    if p in flow.routers:
        r = flow.routers[p]
        scoring = (
            "sigmoid" if r["sigmoid"] else ("softmax+bias" if r["bias"] else "softmax" if r["softmax"] else "none")
        )
        return Reading("router", _layout_base(u), f"scores of {r['E']} experts -> {scoring} -> topk", scoring=scoring)
    expert = any(x.routed or x.stacked or x.flat_experts for x in us) or any(
        x.routed or x.stacked or x.flat_experts for q in flow.mlp_group.get(p, ()) for x in flow.uses_by.get(q, ())
    )
    if p in flow.mlp_out:
        gated = any("gated" in f for uu, _ in flow.mlp_out[p] for f in uu.inputs.values())
        return Reading(
            "expert_out" if expert else "mlp_out",
            _layout_base(u),
            f"reads {'act(a)*b' if gated else 'act(a)'} of "
            + ", ".join(sorted({flow.leaf_param[k] for _, ks in flow.mlp_out[p] for k in ks})),
        )
    if p in flow.mlp_in:
        return _read_mlp_in(p, u, flow, expert)
    # a projection whose rows do not cover the heads falls through to the rules below
    if p in flow.attn_in and (reading := _read_attention_in(p, u, flow)) is not None:
        return reading
    if p in flow.attn_out and all(x.in_heads is not None and -1 not in x.in_heads[2] for x in flow.attn_out[p]):
        return _read_attention_out(p, u, flow)
    if p in flow.attn_in:
        return Reading("matrix", _layout_base(u), "low-rank / mixed projection: part of its rows feed attention")
    if p in flow.feeds_linear:
        return Reading("matrix", _layout_base(u), "low-rank factor: its output feeds another linear map")
    return Reading("matrix", _layout_base(u), "no structure found", found=False)


def _read_mlp_in(p: str, u: Use, flow: _Flow, expert: bool) -> Reading:
    outs = sorted({o for _, o in flow.mlp_in[p]})
    parts = flow.gate_parts.get(p, [])
    n = u.features
    fused, order, err = 1, None, None
    if len({j for j, _, _ in parts}) == 2:
        s0 = next(f for j, f, _ in parts if j == 0)
        s1 = next(f for j, f, _ in parts if j == 1)
        order = _fused_order(s0, s1, n)
        if order is None:
            err = (
                f"fused in-projection whose two gate operands read features {s0[:4]}... and {s1[:4]}...: "
                "neither concatenated nor interleaved halves"
            )
        fused = 2
    kw = dict(fused=2, interleaved=order == "interleaved") if fused == 2 and order else {}
    return Reading(
        "expert_in" if expert else "mlp_in",
        _layout_base(u, **kw),
        f"in-projection{' (fused gate|up, ' + order + ')' if order else ''} of {', '.join(outs)}",
        error=err,
    )


def _read_attention_in(p: str, u: Use, flow: _Flow) -> Reading | None:
    """A projection feeding attention q / k / v: its head blocks, or None when its rows do
    not cover every output feature."""
    n = u.features
    srcs = flow.attn_in[p]
    covered: set[int] = set()
    for _, _, sets in srcs:
        for s in sets:
            covered.update(s)
    if covered != set(range(n)):
        return None
    heads = _blocks_of([s for _, _, sets in srcs for s in sets], n)
    if heads is None:
        # per-position sets can split a head: merge each (event, head)'s sets and try again
        coarse: dict[tuple[int, int], set[int]] = {}
        for ev, _, sets in srcs:
            for h, s in enumerate(sets):
                coarse.setdefault((ev, h), set()).update(s)
        heads = _blocks_of([tuple(sorted(s)) for s in coarse.values()], n)
    roles = "/".join(sorted({r for _, r, _ in srcs}))
    if heads is None:
        return Reading(
            "attention",
            _layout_base(u),
            f"feeds attention {roles}",
            error="its rows feed attention heads, but not as equal contiguous blocks per head",
        )
    return Reading(
        "attention",
        _layout_base(u, heads=heads, head_axis="out"),
        f"feeds attention {roles} ({heads} head blocks of {n // heads})",
    )


def _read_attention_out(p: str, u: Use, flow: _Flow) -> Reading:
    in_heads = flow.attn_out[p][0].in_heads
    assert in_heads is not None, "attn_out holds only uses with in_heads"
    _, H, head_of = in_heads
    n = len(head_of)
    if head_of == tuple(j // (n // H) for j in range(n)):
        return Reading(
            "attention",
            _layout_base(u, heads=H, head_axis="in"),
            f"reads the attention output ({H} heads of {n // H} columns)",
        )
    return Reading(
        "attention",
        _layout_base(u),
        "reads the attention output",
        error="its columns read attention heads, but not as contiguous blocks per head",
    )


def _vocab_block(tr: Trace, flow: _Flow, shapes: Mapping[str, tuple[int, ...]]) -> VocabBlock | None:
    # the token embedding: the table indexed by the input ids (positions are indexed by an
    # arange the model makes), else the one table of the vocabulary's size
    by_ids = [u.param for u in tr.uses if u.kind == "lookup" and u.by_input]
    emb = (
        by_ids[0]
        if len(set(by_ids)) == 1
        else next((p for p in flow.lookups if shapes.get(p, (0,))[0] == tr.vocab), None)
    )
    head = next(iter(flow.logits), None) if len(flow.logits) == 1 else None
    if not (emb or head):
        return None
    hb = next((x.bias for x in flow.uses_by.get(head, []) if x.bias), None) if head else None
    return VocabBlock("", embedding=emb, head=head, head_bias=hb)


def _attention_blocks(
    tr: Trace, flow: _Flow, readings: dict[str, Reading], shapes: Mapping[str, tuple[int, ...]]
) -> list[AttentionBlock]:
    found = []
    for ev in tr.attention:
        src = {r: [flow.leaf_param[k] for k in s] for r, s in ev.sources.items()}
        outs = sorted(
            {p for p, us in flow.attn_out.items() for x in us if x.in_heads is not None and x.in_heads[0] == ev.index}
        )
        if len(outs) != 1 or any(len(set(v)) != 1 for v in src.values()):
            continue
        q, k, v = (src[r][0] for r in "qkv")
        if any(readings.get(x, Reading("")).role != "attention" for x in (q, k, v, outs[0])):
            continue
        hd = len(ev.sources["q"][next(iter(ev.sources["q"]))][0])
        hkv = len({s for s in ev.sources["k"][next(iter(ev.sources["k"]))]})
        slots = {"qkv": q} if q == k == v else ({"q": q, "k": k, "v": v} if len({q, k, v}) == 3 else None)
        if slots is None:
            continue
        bias = tuple((p, b) for p in dict.fromkeys((q, k, v, outs[0])) for x in flow.uses_by[p][:1] if (b := x.bias))
        found.append(
            AttentionBlock(
                _scope([q, k, v, outs[0]]),
                o=outs[0],
                hq=ev.heads,
                hkv=hkv,
                head_dim=hd,
                biases=bias,
                head_blocks=_head_blocks(ev, {"q": q, "k": k, "v": v}, readings, shapes),
                **slots,
            )
        )
    return found


def _mlp_blocks(flow: _Flow, readings: dict[str, Reading], shapes: Mapping[str, tuple[int, ...]]) -> list[MLPBlock]:
    found = []
    for out, lst in flow.mlp_out.items():
        ins = list(dict.fromkeys(flow.leaf_param[k] for _, ks in lst for k in ks))
        gated_first = sorted(ins, key=lambda p: 0 if any(j == 0 for j, _, _ in flow.gate_parts.get(p, [])) else 1)
        uo = flow.uses_by[out][0]
        ro = readings[out]
        hidden = ro.layout.logical_shape(shapes[out])[2] if out in shapes else 0
        E = shapes[out][0] if ro.layout.stacked and not ro.layout.flat_experts else (ro.layout.flat_experts or 1)
        found.append(
            MLPBlock(
                _scope(gated_first + [out]),
                ins=tuple(gated_first),
                out=out,
                hidden=hidden,
                experts=E,
                fused=tuple(readings[p].layout.fused for p in gated_first),
                in_biases=tuple((p, b) for p in gated_first for x in flow.uses_by[p][:1] if (b := x.bias)),
                out_bias=uo.bias,
            )
        )
    return found


def _moe_blocks(flow: _Flow, readings: dict[str, Reading], moe_mlps: list[MLPBlock]) -> list[MoEBlock]:
    found = []
    for p, r in flow.routers.items():
        scope = p.rpartition(".")[0].rpartition(".")[0] if p.count(".") >= 2 else ""
        mlp = next((b for b in moe_mlps if b.scope.startswith(scope + ".") or not scope), None)
        if mlp is not None and mlp.experts != r["E"]:
            mlp = None
        found.append(
            MoEBlock(
                scope,
                router=p,
                experts=r["E"],
                router_bias=r["bias_param"],
                mlp=mlp,
                scoring=readings[p].scoring or "softmax",
            )
        )
    return found
