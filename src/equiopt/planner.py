"""Model -> Plan: a role and a storage layout for every trainable parameter.

Roles are found from the model's structure, not from parameter names alone:

* ``embedding``: weights of ``nn.Embedding`` modules (and ``get_input_embeddings()``);
* ``lm_head``: ``get_output_embeddings()`` when the model has it, else the one ``nn.Linear``
  whose weight has the embedding's ``[vocab, d]`` shape; ``tied_embedding`` when the head
  and the embedding are one tensor (same Parameter or same storage);
* ``router`` / ``expert_in`` / ``expert_out``: a module owning 3-D parameters ``[E, a, b]``
  (stacked experts) next to a 2-D ``[E, d]`` weight (the router); the expert layout
  (transposed or not, fused gate/up) is read from the shapes, with ``d`` the router's input
  size; a ``ModuleList`` of E identical MLPs next to such a router gives per-expert weights;
* ``attention``: a module that declares a head count (``num_heads``/``n_head``/...,
  or ``config.num_attention_heads``) and whose Linear children fit it: the output projection
  reads ``Hq*hd`` features (the last registered such Linear when q and o are both square),
  the others are q/k/v (or fused qkv) with ``out_features / hd`` heads;
* ``mlp_in`` / ``mlp_out``: a module whose Linear children are in-projections ``[h, d]`` and
  one out-projection ``[d, h]`` (SwiGLU/GeGLU gate+up+down, or fc1+fc2);
* ``matrix``: any other 2-D weight; ``vector``: every parameter with fewer than 2 dims.

Anything else (an unrecognised >2-D parameter, an ambiguous layout) is an error that names
the parameter and shows the override (``roles={"regex": "role"}``,
``layouts={"regex": "stacked+fused2:concat"}``). Frozen parameters are left out.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import AttentionBlock, Block, MLPBlock, MoEBlock, VocabBlock
from .groups import Factor, Group
from .layouts import MATRIX, Layout, parse_layout
from .maps import MAP_SPECS, map_spec
from .presets import resolve
from .roles import ROLES, role_group
from .trace import NormChannel, Reading, TraceError, infer, norm_channels, shrink_config
from .trace import trace as run_trace

__all__ = ["Plan", "PlanEntry", "PlanError", "plan", "detect_roles"]

# Fused gate/up order of stacked-expert classes whose shapes cannot tell it (the forward
# decides it: ``chunk(2)`` = concat, ``[..., ::2]`` = interleaved).
FUSED_ORDER_BY_CLASS = {
    "GptOssExperts": "interleaved",
    "OlmoeExperts": "concat",
    "Qwen3MoeExperts": "concat",
    "Qwen2MoeExperts": "concat",
    "MixtralExperts": "concat",
}
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_head", "n_kv_heads")
OVERRIDE_HINT = 'pass roles={{"<regex>": "<role>"}} (roles: {})'.format(", ".join(ROLES))


class PlanError(ValueError):
    """The planner could not decide a role or layout; the message says how to override."""


@dataclass(frozen=True)
class PlanEntry:
    """One trainable parameter: its role, its storage layout and why."""

    name: str
    role: str
    shape: tuple[int, ...]
    layout: Layout
    module_name: str
    reason: str
    aliases: tuple[str, ...] = ()
    param: nn.Parameter | None = field(default=None, compare=False, repr=False)

    def tensor(self) -> nn.Parameter:
        """The parameter itself (detection always sets it)."""
        assert self.param is not None, "entries of a plan come from detection, which sets param"
        return self.param

    found: bool = True  # False: a 2-D weight whose flow matches no block ("matrix (no structure found)")
    group: Group | None = None  # the block's group when it differs from the role's (a sigmoid router: no shift)


@dataclass
class _Decision:
    role: str | None
    layout: Layout = MATRIX
    reason: str = ""
    strong: bool = False  # read from the module type (nn.Embedding, get_output_embeddings(), stacked experts, MHA)
    found: bool = True  # False: the fallback "matrix" of a 2-D weight no rule matched


def _attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    config = getattr(module, "config", None)
    for source in (module, config):
        for n in names:
            value = getattr(source, n, None) if source is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in module.named_children() if isinstance(m, nn.Linear)]


class _Detector:
    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        names: dict[int, list[str]] = {}
        self.params: dict[int, nn.Parameter] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
            self.params[id(p)] = p
        self.names = names
        self._check_storage_ties()
        self.decisions: dict[int, _Decision] = {}
        self.errors: dict[int, str] = {}
        self.role_hints: dict[int, str] = {}
        self.d_model: int | None = None
        self.blocks: list[Block] = []
        self._expert_list: set[int] = set()  # ids of the experts of ModuleList MoEs
        self.norm_channels: list[NormChannel] = []  # set by _apply_trace
        self.entry_groups: dict[int, Group] = {}  # routers whose scoring narrows their group (set by _merge)
        self.scorings: dict[int, str] = {}  # router scoring read by the dataflow (set by _merge)

    def _bias_name(self, module: nn.Module, attr: str = "bias") -> str | None:
        b = getattr(module, attr, None)
        return self.name(b) if isinstance(b, nn.Parameter) and id(b) in self.params else None

    def _owner(self, p: torch.Tensor, within: nn.Module) -> nn.Module | None:
        return next((m for m in within.modules() if any(q is p for q in m.parameters(recurse=False))), None)

    def _check_storage_ties(self) -> None:
        """Distinct Parameters whose memory overlaps (same storage, or a transposed view or
        slice of it) would be updated twice per step with two momenta: refused."""
        spans = []  # (storage ptr, first byte, last byte + 1, pid)
        for pid, p in self.params.items():
            # DTensor shards (FSDP2) have no probe-able storage; ties there are by identity
            if p.device.type == "meta" or p.numel() == 0 or type(p).__name__ == "DTensor":
                continue
            size = p.element_size()
            lo = p.storage_offset()
            hi = lo + sum((n - 1) * st for n, st in zip(p.shape, p.stride())) + 1
            spans.append((p.untyped_storage().data_ptr(), lo * size, hi * size, pid))
        spans.sort()
        for (ptr_a, _, hi_a, pid_a), (ptr_b, lo_b, _, pid_b) in zip(spans, spans[1:]):
            if ptr_a == ptr_b and lo_b < hi_a:
                raise PlanError(
                    f"{self.names[pid_b][0]} and {self.names[pid_a][0]} are distinct Parameters sharing memory "
                    "(one storage, a view, a slice or a transpose); tie them by assigning the same nn.Parameter "
                    "to both modules so that one gradient (the sum) is optimized once"
                )

    def name(self, p: torch.Tensor) -> str:
        return self.names[id(p)][0]

    def decide(
        self, p: torch.Tensor, role: str, reason: str, layout: Layout = MATRIX, strong: bool = False, found: bool = True
    ) -> None:
        if id(p) not in self.decisions:
            self.decisions[id(p)] = _Decision(role, layout, reason, strong, found)

    def undecided(self, p: torch.Tensor, why: str, role: str | None = None) -> None:
        """No decision for ``p``; ``role`` is known when only the layout is in doubt."""
        self.errors.setdefault(id(p), why)
        if role is not None:
            self.role_hints[id(p)] = role

    # -- passes -------------------------------------------------------------------------
    def run(self) -> None:
        self.embeddings_and_head()
        self.mixtures_of_experts()
        self.attention()
        self.mlps()
        self.remaining()

    def embeddings_and_head(self) -> None:
        embeddings = [m for m in self.modules.values() if isinstance(m, nn.Embedding)]
        get_in = getattr(self.model, "get_input_embeddings", None)
        if callable(get_in):
            emb = get_in()
            if (
                isinstance(getattr(emb, "weight", None), torch.Tensor)
                and emb.weight.ndim == 2
                and emb not in embeddings
            ):
                embeddings.append(emb)
        head, head_reason = self._find_head(embeddings)
        strong = head_reason == "get_output_embeddings()"
        for emb in embeddings:
            w = emb.weight
            self.d_model = self.d_model or w.shape[-1]
            if head is not None and head is w:
                self.decide(
                    w, "tied_embedding", f"{type(emb).__name__} tied to the LM head ({head_reason})", strong=strong
                )
            else:
                self.decide(w, "embedding", type(emb).__name__, strong=True)
        if head is not None and id(head) in self.params:
            self.decide(head, "lm_head", head_reason, strong=strong)
        token = get_in() if callable(get_in) else None
        self._vocab_block(token, embeddings, head)

    def _find_head(self, embeddings: list[nn.Embedding]) -> tuple[torch.Tensor | None, str]:
        """The LM head: ``get_output_embeddings()``, else the one Linear of an embedding's
        ``[vocab, d]`` shape (several such Linears: each left undecided with the question)."""
        get_out = getattr(self.model, "get_output_embeddings", None)
        if callable(get_out):
            out = get_out()
            if isinstance(getattr(out, "weight", None), torch.Tensor) and out.weight.ndim == 2:
                return out.weight, "get_output_embeddings()"
        if not embeddings:
            return None, ""
        shapes = {tuple(e.weight.shape) for e in embeddings}
        cands = [
            m.weight
            for m in self.modules.values()
            if isinstance(m, nn.Linear) and tuple(m.weight.shape) in shapes and m.weight.shape[0] != m.weight.shape[1]
        ]
        if len(cands) == 1:
            return cands[0], "nn.Linear with the embedding's [vocab, d] shape"
        for c in cands:
            self.undecided(c, "several Linear layers have the embedding's [vocab, d] shape; which is the LM head?")
        return None, ""

    def _vocab_block(self, token, embeddings: list[nn.Embedding], head: torch.Tensor | None) -> None:
        token_w = (
            getattr(token, "weight", None)
            if token is not None
            else (embeddings[0].weight if len(embeddings) == 1 else None)
        )
        if token_w is None and head is None:
            return
        head_mod = self._owner(head, self.model) if head is not None else None
        self.blocks.append(
            VocabBlock(
                "",
                embedding=self.name(token_w)
                if isinstance(token_w, nn.Parameter) and id(token_w) in self.params
                else None,
                head=self.name(head) if head is not None and id(head) in self.params else None,
                head_bias=self._bias_name(head_mod) if head_mod is not None else None,
            )
        )

    def _stacked(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in module.named_parameters(recurse=False) if p.ndim == 3]

    def _find_router(self, block: nn.Module, skip: nn.Module, experts: int) -> list[nn.Parameter]:
        found = []
        for m in block.modules():
            if m is skip or any(m is s for s in skip.modules()):
                continue
            for p in m.parameters(recurse=False):
                if p.ndim == 2 and p.shape[0] == experts and id(p) not in self.decisions:
                    found.append(p)
        return found

    def mixtures_of_experts(self) -> None:
        for mname, module in self.modules.items():
            stacked = self._stacked(module)
            if not stacked:
                continue
            parent = self.modules.get(mname.rpartition(".")[0] if "." in mname else "", self.model)
            experts = {p.shape[0] for _, p in stacked}
            if len(experts) != 1:
                for _, p in stacked:
                    self.undecided(p, f"stacked parameters of {mname} disagree on the expert count {sorted(experts)}")
                continue
            (E,) = experts
            routers = self._find_router(parent, module, E)
            if len(routers) != 1:
                why = "no [E, d] router next to it" if not routers else "several [E, d] router candidates"
                for _, p in stacked:
                    self.undecided(p, f"3-D parameter of {mname}: {why}; cannot tell stacked experts apart")
                continue
            router = routers[0]
            self.decide(router, "router", f"[E={E}, d] weight beside stacked experts {mname}", strong=True)
            for _n, p in module.named_parameters(recurse=False):
                if p.ndim == 2 and p.shape[0] == E:  # gpt-oss gate_up_proj_bias [E, 2h]
                    self.decide(p, "vector", f"stacked per-expert bias of {mname}")
            d = router.shape[1]
            mlp = self._expert_layouts(mname, module, stacked, d)
            owner = self._owner(router, parent)
            self.blocks.append(
                MoEBlock(
                    mname.rpartition(".")[0],
                    router=self.name(router),
                    experts=E,
                    router_bias=self._bias_name(owner) if owner is not None else None,
                    mlp=mlp,
                )
            )
        # experts as a ModuleList of E identical MLPs beside a router
        for mname, module in self.modules.items():
            if not isinstance(module, nn.ModuleList) or len(module) < 2:
                continue
            kinds = {(type(m), tuple(tuple(p.shape) for p in m.parameters())) for m in module}
            if len(kinds) != 1 or not _linears(module[0]):
                continue
            parent = self.modules.get(mname.rpartition(".")[0], self.model)
            routers = self._find_router(parent, module, len(module))
            if len(routers) == 1:
                self.decide(routers[0], "router", f"[E={len(module)}, d] weight beside expert list {mname}")
                owner = self._owner(routers[0], parent)
                self.blocks.append(
                    MoEBlock(
                        mname.rpartition(".")[0],
                        router=self.name(routers[0]),
                        experts=len(module),
                        router_bias=self._bias_name(owner) if owner is not None else None,
                    )
                )
                self._expert_list = self._expert_list | {id(m) for m in module}

    def _expert_layouts(self, mname: str, module: nn.Module, stacked, d: int) -> MLPBlock | None:
        info = self._expert_axes(stacked, d)
        if info is None:
            return None
        d_last_is_in = self._expert_orientation(mname, info)
        if d_last_is_in is None:
            return None
        ins, outs = [x for x in info if x[3] == d_last_is_in], [x for x in info if x[3] != d_last_is_in]
        if len(outs) != 1:
            for _, p, _, _ in info:
                self.undecided(p, f"expected one out-projection among the stacked weights of {mname}")
            return None
        h = outs[0][2]
        transposed = not d_last_is_in
        for _attr, p, k, _ in ins:
            self._decide_expert_in(mname, module, p, k, h, transposed)
        attr, p, _, _ = outs[0]
        self.decide(
            p,
            "expert_out",
            f"stacked experts of {mname}: out-projection",
            Layout(stacked=True, transposed=transposed),
            strong=True,
        )
        decided = [q for _, q, _, _ in ins if id(q) in self.decisions]
        if len(decided) != len(ins):
            return None
        return MLPBlock(
            mname,
            ins=tuple(self.name(q) for q in decided),
            out=self.name(p),
            hidden=h,
            experts=p.shape[0],
            fused=tuple(self.decisions[id(q)].layout.fused for q in decided),
            in_biases=tuple(
                (self.name(q), b)
                for q, (a, _q, _, _) in zip(decided, ins)
                if (b := self._bias_name(module, a + "_bias"))
            ),
            out_bias=self._bias_name(module, attr + "_bias"),
        )

    def _expert_axes(self, stacked, d: int) -> list[tuple[str, nn.Parameter, int, bool]] | None:
        """``(attr, param, other_dim, d_last)`` per stacked expert weight, or None (undecided)
        when an axis cannot be matched to the model dim ``d``."""
        info = []
        square = [(attr, p) for attr, p in stacked if p.shape[1] == p.shape[2] == d]
        for attr, p in stacked:
            a, b = p.shape[1:]
            if a == d and b == d:
                continue
            if a != d and b != d:
                self.undecided(p, f"neither axis of {tuple(p.shape)} is the model dim d={d}")
                return None
            info.append((attr, p, a if b == d else b, b == d))
        if square:
            # [E, d, d] is a fused gate/up with 2h == d (OLMoE-1B-7B: d 2048, h 1024) when the
            # one other stacked weight is the [d, h] out-projection; its d axis gives the orientation
            if len(square) == 1 and len(info) == 1 and 2 * info[0][2] == d:
                out_d_last = info[0][3]
                info.append((*square[0], d, not out_d_last))
            else:
                for _, p in square:
                    self.undecided(p, f"cannot tell which axis of {tuple(p.shape)} is the model dim d={d}")
                return None
        return info

    def _expert_orientation(self, mname: str, info: list[tuple[str, nn.Parameter, int, bool]]) -> bool | None:
        """Whether the in-projections store d last, or None (undecided). In-projections share
        one orientation, the out-projection has the other."""
        by_orient: dict[bool, list] = {True: [], False: []}
        for item in info:
            by_orient[item[3]].append(item)
        if not by_orient[True] or not by_orient[False]:
            for _, p, _, _ in info:
                self.undecided(p, f"all stacked weights of {mname} have d on the same axis; cannot tell in from out")
            return None
        if len(by_orient[True]) == len(by_orient[False]) == 1:
            (_, p1, k1, _), (_, p0, k0, _) = by_orient[True][0], by_orient[False][0]
            if k1 == 2 * k0:  # [E, 2h, d] fused in, standard storage
                return True
            if k0 == 2 * k1:  # [E, d, 2h] fused in, transposed storage
                return False
            for p in (p1, p0):
                self.undecided(p, f"cannot tell the in- from the out-projection among the stacked weights of {mname}")
            return None
        return len(by_orient[True]) > len(by_orient[False])

    def _decide_expert_in(
        self, mname: str, module: nn.Module, p: nn.Parameter, k: int, h: int, transposed: bool
    ) -> None:
        if k == h:
            layout = Layout(stacked=True, transposed=transposed)
        elif k % h == 0:
            order = FUSED_ORDER_BY_CLASS.get(type(module).__name__)
            if order is None:
                self.undecided(
                    p,
                    f"fused in-projection of {type(module).__name__}: concatenated or interleaved parts? "
                    f'pass layouts={{"{re.escape(self.name(p))}": "stacked{"+transposed" if transposed else ""}'
                    f'+fused{k // h}:concat"}} (or :interleaved)',
                    role="expert_in",
                )
                return
            layout = Layout(stacked=True, transposed=transposed, fused=k // h, interleaved=order == "interleaved")
        else:
            self.undecided(p, f"in-projection width {k} is not a multiple of the hidden width {h}")
            return
        self.decide(p, "expert_in", f"stacked experts of {mname}: in-projection", layout, strong=True)

    def attention(self) -> None:
        for mname, module in self.modules.items():
            if isinstance(module, nn.MultiheadAttention):
                self._torch_mha(mname, module)
                continue
            hq = _attr(module, HEAD_COUNT_ATTRS)
            lin = _linears(module)
            if (
                hq is None
                or len(lin) < 2
                or not (
                    hasattr(module, "head_dim") or hasattr(module, "config") or _attr(module, ("n_head", "n_heads"))
                )
            ):
                continue
            hkv = _attr(module, KV_HEAD_COUNT_ATTRS) or hq
            hd = getattr(module, "head_dim", None)
            widths = [m.out_features for _, m in lin] + [m.in_features for _, m in lin]
            if not isinstance(hd, int):
                d = self.d_model or max(widths)
                hd = d // hq
            if hd <= 0:
                continue
            out_cands = [(n, m) for n, m in lin if m.in_features == hq * hd]
            if not out_cands:
                continue
            # o is usually registered after q/k/v, but not always (Phi-3: o_proj before qkv_proj):
            # the output projection is the candidate the others fit around, as one fused
            # [(Hq + 2 Hkv) hd, d] or three q [Hq hd, d], k, v [Hkv hd, d]
            fit = None
            for oname, out in reversed(out_cands):
                d = out.out_features
                ins = [(n, m) for n, m in lin if m is not out and m.in_features == d]
                widths = [m.out_features for _, m in ins]
                if len(ins) + 1 == len(lin) and (
                    (len(ins) == 1 and widths[0] == (hq + 2 * hkv) * hd)
                    or (len(ins) == 3 and widths[0] == hq * hd and widths[1] == widths[2] == hkv * hd)
                ):
                    fit = (oname, out, ins)
                    break
            if fit is None:
                continue  # not an attention block we understand (an MLP keeping a config, q/k/v without o)
            oname, out, ins = fit
            why = f"attention {type(module).__name__} (Hq={hq}, Hkv={hkv}, head_dim={hd})"
            for n, m in ins:
                self.decide(m.weight, "attention", f"{why}: {n}", Layout(heads=m.out_features // hd, head_axis="out"))
            self.decide(out.weight, "attention", f"{why}: {oname} (output)", Layout(heads=hq, head_axis="in"))
            self._attention_block(mname, [m for _, m in ins], out, hq, hkv, hd)

    def _attention_block(self, scope: str, ins: list, out, hq: int, hkv: int, hd: int) -> None:
        """q, k, v in registration order (every implementation we know registers them so),
        or one fused qkv of (Hq + 2 Hkv) heads."""
        slots: dict = {}
        if len(ins) == 1 and ins[0].weight.shape[0] == (hq + 2 * hkv) * hd:
            slots["qkv"] = self.name(ins[0].weight)
        elif len(ins) == 3:
            slots.update(zip(("q", "k", "v"), (self.name(m.weight) for m in ins)))
        biases = tuple((self.name(m.weight), b) for m in (*ins, out) if (b := self._bias_name(m)))
        self.blocks.append(
            AttentionBlock(scope, o=self.name(out.weight), hq=hq, hkv=hkv, head_dim=hd, biases=biases, **slots)
        )

    def _torch_mha(self, mname: str, mha: nn.MultiheadAttention) -> None:
        why = f"nn.MultiheadAttention (H={mha.num_heads})"
        H, hd = mha.num_heads, mha.head_dim
        if mha.in_proj_weight is not None:
            self.blocks.append(
                AttentionBlock(
                    mname, o=self.name(mha.out_proj.weight), qkv=self.name(mha.in_proj_weight), hq=H, hkv=H, head_dim=hd
                )
            )
        elif all(w is not None for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)):
            self.blocks.append(
                AttentionBlock(
                    mname,
                    o=self.name(mha.out_proj.weight),
                    q=self.name(mha.q_proj_weight),
                    k=self.name(mha.k_proj_weight),
                    v=self.name(mha.v_proj_weight),
                    hq=H,
                    hkv=H,
                    head_dim=hd,
                )
            )
        if mha.in_proj_weight is not None:
            self.decide(
                mha.in_proj_weight, "attention", why, Layout(heads=3 * mha.num_heads, head_axis="out"), strong=True
            )
        for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight):
            if w is not None:
                self.decide(w, "attention", why, Layout(heads=mha.num_heads, head_axis="out"), strong=True)
        self.decide(mha.out_proj.weight, "attention", why, Layout(heads=mha.num_heads, head_axis="in"), strong=True)

    def mlps(self) -> None:
        expert_list = self._expert_list
        for mname, module in self.modules.items():
            lin = [(n, m) for n, m in _linears(module) if id(m.weight) not in self.decisions]
            if len(lin) < 2 or len(lin) != len(_linears(module)):
                continue
            out_name, out = lin[-1]
            d, h = out.out_features, out.in_features
            ins = [(n, m) for n, m in lin[:-1]]
            if h == d:
                continue  # square Linears (q/k/v of an attention without its o): shapes cannot tell
            if not all(m.in_features == d and m.out_features == h for _, m in ins):
                # try the other registration orders: out-projection is the odd shape
                shapes = [(m.out_features, m.in_features) for _, m in lin]
                odd = [i for i, s in enumerate(shapes) if shapes.count(s) == 1]
                if len(odd) != 1:
                    continue
                out_name, out = lin[odd[0]]
                d, h = out.out_features, out.in_features
                ins = [(n, m) for i, (n, m) in enumerate(lin) if i != odd[0]]
                if not all(m.in_features == d and m.out_features == h for _, m in ins):
                    continue
            expert = id(module) in expert_list
            rin, rout = ("expert_in", "expert_out") if expert else ("mlp_in", "mlp_out")
            kind = "gated MLP" if len(ins) >= 2 else "MLP"
            for n, m in ins:
                self.decide(m.weight, rin, f"{kind} {type(module).__name__}: {n} [h={h}, d={d}]")
            self.decide(out.weight, rout, f"{kind} {type(module).__name__}: {out_name} [d={d}, h={h}]")
            self.blocks.append(
                MLPBlock(
                    mname,
                    ins=tuple(self.name(m.weight) for _, m in ins),
                    out=self.name(out.weight),
                    hidden=h,
                    fused=(1,) * len(ins),
                    in_biases=tuple((self.name(m.weight), b) for _, m in ins if (b := self._bias_name(m))),
                    out_bias=self._bias_name(out),
                )
            )

    def remaining(self) -> None:
        for pid, p in self.params.items():
            if pid in self.decisions or pid in self.errors:
                continue
            owner = self._owner(p, self.model)
            if p.ndim < 2 or sum(1 for s in p.shape if s > 1) <= 1:
                self.decide(
                    p,
                    "vector",
                    f"{p.ndim}-D parameter" + (f" {tuple(p.shape)}" if p.ndim >= 2 else ""),
                    strong=p.ndim < 2,
                )
            elif isinstance(owner, nn.modules.conv._ConvNd) and p is owner.weight:
                self.decide(p, "matrix", f"{type(owner).__name__} kernel as a matrix [out, in*k]", Layout(flatten=True))
            elif p.ndim == 2 and type(owner).__name__ == "Conv1D" and p is getattr(owner, "weight", None):
                self.decide(p, "matrix", "Conv1D weight, stored [in, out]", Layout(transposed=True))
            elif p.ndim == 2:
                self.decide(p, "matrix", "2-D weight outside the recognised blocks", found=False)
            else:
                self.undecided(p, f"{p.ndim}-D parameter that is not a stacked-expert weight")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``), so
    names and ``get_output_embeddings()`` are the model's own."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(orig := getattr(model, "_orig_mod", None), nn.Module):
            model = orig
        else:
            return model


def detect_roles(
    model: nn.Module,
    roles: Mapping[str, str] | None = None,
    layouts: Mapping[str, str | Layout] | None = None,
    example=None,
    trace: bool = True,
) -> list[PlanEntry]:
    """Role and layout of every trainable parameter of ``model``, in registration order.

    ``roles`` / ``layouts`` map regular expressions (``re.search`` on every name of a
    parameter, tied aliases included) to a role / a layout; they take precedence over what
    the structure says. An override that matches no trainable parameter is an error.
    """
    return _detect(model, roles, layouts, example, trace)[0]


def _layer_map(name: str, small: set[str]) -> str | None:
    """The parameter of the shrunk model standing for ``name``: the same name, or with its
    layer index moved onto the last shrunk layer of the same structure."""
    if name in small:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            for j in range(int(parts[i]), -1, -1):
                cand = ".".join(parts[:i] + [str(j)] + parts[i + 1 :])
                if cand in small:
                    return cand
    return None


def _renamed(small_gain: str, full_gain: str, name: str) -> str | None:
    """``name`` (a small-copy parameter of the same layer as ``small_gain``) with the layer
    indices by which ``full_gain`` differs from ``small_gain``; None when the names do not align."""
    a, b, parts = small_gain.split("."), full_gain.split("."), name.split(".")
    if len(a) != len(b):
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            if not (x.isdigit() and y.isdigit()) or i >= len(parts) or parts[i] != x:
                return None
            parts[i] = y
    return ".".join(parts)


def _carried_channels(channels: list[NormChannel], full: list[str], small: set[str]) -> list[NormChannel]:
    """Norm channels of a shrunk copy carried to the full model: each full gain that maps onto
    a small one (:func:`_layer_map`) takes its bias and readers at the same layer indices."""
    by_gain = {c.gain: c for c in channels}
    known = set(full)
    out = []
    for n in full:
        c = by_gain.get(_layer_map(n, small) or "")
        if c is None:
            continue
        members = [c.bias, *c.readers] if c.bias else list(c.readers)
        mapped = [_renamed(c.gain, n, m) for m in members]
        if not all(x in known and _layer_map(x, small) == m for x, m in zip(mapped, members)):
            continue
        names = [x for x in mapped if x is not None]
        bias, readers = (names[0], names[1:]) if c.bias else (None, names)
        out.append(dataclasses.replace(c, gain=n, bias=bias, readers=tuple(readers)))
    return out


def _shrunk_trace(model: nn.Module, example) -> tuple[dict[str, Reading], list, list[str], list[NormChannel]]:
    """Trace a small model of the same architecture (the model itself is on the meta device
    or too large to run): readings and norm channels carried over by name, blocks left to
    the structure."""
    config = getattr(model, "config", None)
    if config is None:
        raise TraceError("meta-device model without a config: no smaller copy to run")
    try:
        small_cfg = shrink_config(config)
        with torch.device("cpu"):
            small = type(model)(small_cfg)
    except Exception as err:  # noqa: BLE001 - an architecture whose config does not shrink
        raise TraceError(
            f"could not build a shrunk copy of {type(model).__name__}: {type(err).__name__}: {err}"
        ) from err
    tr = run_trace(small, example)
    shapes = {n: tuple(p.shape) for n, p in small.named_parameters(remove_duplicate=False)}
    readings, _ = infer(tr, shapes)
    out = {}
    full = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for n in full:
        m = _layer_map(n, set(readings))
        if m is not None:
            r = readings[m]
            out[n] = Reading(r.role, r.layout, f"{r.reason} (traced on a shrunk copy)", r.found, r.scoring, r.error)
    note = (
        f"traced a shrunk copy ({sum(p.numel() for p in small.parameters()):,} parameters, "
        f"{tr.seconds:.2f}s): the model was not materialised"
    )
    return out, [], [note], _carried_channels(norm_channels(tr), full, set(shapes))


_FAMILY: dict[str | None, str | None] = {"tied_embedding": "embedding"}


def _agree(dec: _Decision, r: Reading) -> bool:
    return _FAMILY.get(dec.role, dec.role) == _FAMILY.get(r.role, r.role) and (
        dec.role == "vector" or dec.layout == r.layout
    )


def _merge(det: _Detector, readings: dict[str, Reading], traced: bool) -> list[str]:
    """Dataflow readings over the structure's: a strong structural reading (module types) that
    the flow contradicts is an error naming both; weaker ones yield to the flow."""
    conflicts = []
    router_groups: dict[int, Group] = {}
    for pid, names in det.names.items():
        r = readings.get(names[0])
        dec = det.decisions.get(pid)
        if r is None:
            if traced and dec is not None and dec.role != "vector":
                dec.reason += " (not reached by the traced forward)"
            continue
        override = f'roles={{"{re.escape(names[0])}$": "<role>"}} / layouts={{"{re.escape(names[0])}$": "<layout>"}}'
        if r.error is not None:
            det.errors[pid] = f"dataflow: {r.role}: {r.error}; pass {override}"
            det.role_hints[pid] = r.role
            det.decisions.pop(pid, None)
            continue
        if not r.found and dec is not None and dec.role is not None and dec.found:
            dec.reason += f" (dataflow: {r.reason})"
            continue  # the flow found nothing; the structure did
        if dec is not None and dec.strong and not _agree(dec, r):
            conflicts.append(
                f"  {names[0]}: structure reads {dec.role} {dec.layout.describe()} ({dec.reason}); "
                f"dataflow reads {r.role} {r.layout.describe()} ({r.reason}); settle it with {override}"
            )
            continue
        why = f"dataflow: {r.reason}"
        if dec is not None and dec.role is not None and not _agree(dec, r) and dec.found:
            why += f" [structure read {dec.role} {dec.layout.describe()}]"
        det.decisions[pid] = _Decision(r.role, r.layout, why, found=r.found)
        det.errors.pop(pid, None)
        if r.role == "router" and r.scoring not in (None, "softmax"):
            router_groups[pid] = role_group("router").without("shift")
    det.entry_groups = router_groups
    # router_groups holds only routers with a scoring other than softmax, so none is None
    det.scorings = {pid: sc for pid in router_groups if (sc := readings[det.names[pid][0]].scoring) is not None}
    if conflicts:
        raise PlanError("the structure and the dataflow disagree on:\n" + "\n".join(conflicts))
    return []


def _detect(
    model, roles, layouts, example=None, use_trace: bool = True
) -> tuple[list[PlanEntry], list[Block], list[str], list[NormChannel]]:
    """Entries (see :func:`detect_roles`), the blocks whose parameters are all trainable,
    notes on how the roles were found (a structural fallback is never silent) and the traced
    norm channels (:func:`equiopt.trace.norm_channels`) whose members are all trainable."""
    inner = unwrap(model)
    det = _Detector(inner)
    det.run()
    det.entry_groups, det.scorings = {}, {}
    notes = _apply_trace(det, inner, example) if use_trace else []
    overrides = _compile_overrides(roles, layouts)
    entries: list[PlanEntry] = []
    problems: list[str] = []
    used: set[tuple[str, str]] = set()
    frozen = [det.names[pid][0] for pid, p in det.params.items() if not p.requires_grad]
    if frozen:  # not planned, not optimized: said, not silent (a frozen base model: thousands)
        shown = ", ".join(frozen[:5]) + (f" and {len(frozen) - 5} more" if len(frozen) > 5 else "")
        notes.append(f"{len(frozen)} frozen tensor(s) (requires_grad=False), not optimized: {shown}")
    for pid, p in det.params.items():
        if not p.requires_grad:
            continue
        decision = _overridden(det, pid, overrides, used)
        entry = _entry(det, pid, p, decision, problems)
        if entry is not None:
            entries.append(entry)
    unused = [f"{kind}[{pattern!r}]" for kind, pattern, _, _ in overrides if (kind, pattern) not in used]
    if unused:
        raise PlanError(f"override(s) {', '.join(unused)} match no trainable parameter")
    if problems:
        raise PlanError(
            "cannot decide the role of:\n" + "\n".join(problems) + "\nTo decide it yourself, " + OVERRIDE_HINT
        )
    entry_names = {e.name for e in entries}
    blocks = [b for b in det.blocks if all(p in entry_names for p in b.params())]
    return entries, blocks, notes, _trainable_channels(det.norm_channels, entries)


def _trainable_channels(channels: list[NormChannel], entries: list[PlanEntry]) -> list[NormChannel]:
    """The norm channels whose gain, bias and readers are all trainable entries, by entry name."""
    names = {n: e.name for e in entries for n in (e.name, *e.aliases)}
    out = []
    for c in channels:
        members = [c.gain, *([c.bias] if c.bias else []), *c.readers]
        if all(m in names for m in members):
            bias = names[c.bias] if c.bias else None
            out.append(
                dataclasses.replace(c, gain=names[c.gain], bias=bias, readers=tuple(names[r] for r in c.readers))
            )
    return out


def _apply_trace(det: _Detector, inner: nn.Module, example) -> list[str]:
    """Run the tracer (on a shrunk copy for meta models) and merge its readings and blocks
    over the structural ones; returns the notes (a failed trace is a note, not an error)."""
    notes: list[str] = []
    readings: dict[str, Reading] | None = None
    tblocks: list[Block] = []
    try:
        if any(p.device.type == "meta" for p in inner.parameters()):
            readings, tblocks, more, det.norm_channels = _shrunk_trace(inner, example)
            notes.extend(more)
        else:
            tr = run_trace(inner, example)
            shapes = {n: tuple(p.shape) for n, p in inner.named_parameters(remove_duplicate=False)}
            readings, tblocks = infer(tr, shapes)
            det.norm_channels = norm_channels(tr)
            notes.extend(tr.notes)
    except TraceError as err:
        notes.append(f"not traced ({err}); roles come from the module structure only")
    if readings is not None:
        _merge(det, readings, traced=True)
        traced_names = set(readings)
        keep = [b for b in det.blocks if not any(p in traced_names for p in b.params())]
        det.blocks = [_with_stacked_biases(b, det) for b in _with_scoring(keep + list(tblocks), det)]
    return notes


def _compile_overrides(roles, layouts) -> list[tuple]:
    """``(kind, pattern, regex, value)`` for every ``roles=`` / ``layouts=`` override."""
    overrides = []
    for kind, table in (("roles", roles or {}), ("layouts", layouts or {})):
        for pattern, value in table.items():
            if kind == "roles" and value not in ROLES:
                raise PlanError(f"roles[{pattern!r}]: unknown role {value!r}; valid roles: {list(ROLES)}")
            if kind == "layouts" and isinstance(value, str):
                value = parse_layout(value)
            overrides.append((kind, pattern, re.compile(pattern), value))
    return overrides


def _overridden(det: _Detector, pid: int, overrides: list[tuple], used: set) -> _Decision:
    """The decision for a parameter after the overrides that match any of its names."""
    names = det.names[pid]
    decision = det.decisions.get(pid, _Decision(None))
    for kind, pattern, rx, value in overrides:
        if not any(rx.search(n) for n in names):
            continue
        used.add((kind, pattern))
        if kind == "roles":
            layout = decision.layout if decision.role == value else MATRIX
            decision = _Decision(value, layout, f"override roles[{pattern!r}]")
        else:
            role = decision.role or det.role_hints.get(pid)
            reason = f"{decision.reason or 'role from structure'}; override layouts[{pattern!r}]"
            decision = _Decision(role, value, reason)
    return decision


def _entry(det: _Detector, pid: int, p: nn.Parameter, decision: _Decision, problems: list[str]) -> PlanEntry | None:
    """The plan entry of a decided parameter; an undecided or misfit one adds to ``problems``."""
    names = det.names[pid]
    if decision.role is None:
        problems.append(f"  {names[0]} {tuple(p.shape)}: {det.errors.get(pid, 'no rule applies')}")
        return None
    if decision.role != "vector":
        try:
            decision.layout.check(p.shape, names[0])
        except ValueError as err:
            problems.append(f"  {err}")
            return None
    group = det.entry_groups.get(pid) if decision.role == "router" else None
    return PlanEntry(
        names[0],
        decision.role,
        tuple(p.shape),
        decision.layout,
        names[0].rpartition(".")[0],
        decision.reason,
        tuple(names[1:]),
        p,
        found=decision.found or decision.role != "matrix",
        group=group,
    )


def _with_stacked_biases(block: Block, det: _Detector) -> Block:
    """Stacked experts add their ``[E, out]`` biases outside a linear op the tracer sees
    (``x @ W[e] + b[e]``): take them, as the structural pass does, from the ``<weight>_bias``
    parameter of the module that owns the stacked weight."""
    if isinstance(block, MoEBlock) and block.mlp is not None:
        return dataclasses.replace(block, mlp=_mlp_with_stacked_biases(block.mlp, det))
    if isinstance(block, MLPBlock):
        return _mlp_with_stacked_biases(block, det)
    return block


def _mlp_with_stacked_biases(block: MLPBlock, det: _Detector) -> MLPBlock:
    if block.experts <= 1 or block.in_biases or block.out_bias:
        return block
    known = {n for ns in det.names.values() for n in ns}
    ins = tuple((p, p + "_bias") for p in block.ins if p + "_bias" in known)
    out = block.out + "_bias" if block.out + "_bias" in known else None
    return dataclasses.replace(block, in_biases=ins, out_bias=out)


def _with_scoring(blocks: list[Block], det: _Detector) -> list[Block]:
    by_name = {det.names[pid][0]: sc for pid, sc in det.scorings.items()}
    return [
        dataclasses.replace(b, scoring=by_name[b.router]) if isinstance(b, MoEBlock) and b.router in by_name else b
        for b in blocks
    ]


def check_compatible(entries: list[PlanEntry], specs: Mapping[str, Mapping], groups: Mapping[str, Group]) -> None:
    """Refuse a map that is not equivariant under its block's group, or that projects out an
    orbit direction the block's loss depends on, naming the parameter, the group and the map.
    Baseline rules (AdamW) are exempt: they are the comparison, not the method."""
    problems = []
    for role in dict.fromkeys(e.role for e in entries):
        s = specs[role]
        m = map_spec(s["map"], center=s["center"], column_aware=s["column_aware"])
        if m.baseline:
            continue
        group = groups[role]
        missing = group.missing_from(m.group)
        extra = [f for f in m.projects_out if not group.has(f.kind, f.axis)]
        if not missing and not extra:
            continue
        names = ", ".join(e.name for e in entries if e.role == role)
        why = (
            f"not equivariant under {', '.join(f.describe() for f in missing)}"
            if missing
            else f"projects out {', '.join(f.describe() for f in extra)}, which the block's loss is not invariant under"
        )
        problems.append(
            f"  role {role!r} ({names}): block group {group}; map {s['map']!r} "
            f"(center={s['center']}, column_aware={s['column_aware']}) has group {m.group}: {why}"
        )
    if problems:
        raise PlanError(
            "incompatible update map(s):\n"
            + "\n".join(problems)
            + "\nchoose a map whose group contains the block's (see equiopt.maps.MAP_SPECS), or 'adamw'"
        )


def role_groups(broken: Mapping[str, tuple[Factor, ...]] | None = None) -> dict[str, Group]:
    """Each role's group, less the factors an audit found broken (``{role: factors}``)."""
    out = {}
    for role in ROLES:
        g = role_group(role)
        for f in (broken or {}).get(role, ()):
            g = g.without(f.kind, f.axis)
        out[role] = g
    return out


def resolve_centering(specs: dict[str, dict], groups: Mapping[str, Group]) -> dict[str, dict]:
    """``center=None`` (the default) becomes True exactly on blocks whose group has the row shift."""
    return {
        role: {**s, "center": groups[role].has("shift") if s["center"] is None else s["center"]}
        for role, s in specs.items()
    }


class Plan:
    """Roles, layouts and per-role hyperparameters of a model: what :func:`equiopt.build` uses."""

    def __init__(
        self,
        entries: list[PlanEntry],
        specs: dict[str, dict],
        preset: str,
        blocks: list[Block] | None = None,
        groups: Mapping[str, Group] | None = None,
        variants: Mapping[tuple[str, Group], dict] | None = None,
        notes: list[str] | None = None,
        norm_channels: list[NormChannel] | None = None,
    ):
        self.entries = entries
        self.specs = specs
        self.preset = preset
        self.blocks: list[Block] = list(blocks or [])
        self.groups: dict[str, Group] = dict(groups or role_groups())
        #: ``(role, group) -> spec`` for entries whose block group differs from the role's
        #: (:attr:`PlanEntry.group`, e.g. a sigmoid router without the shift): their own param_group
        self.variants: dict[tuple[str, Group], dict] = dict(variants or {})
        #: how the roles were found where it is not the default (a structural fallback, a shrunk trace)
        self.notes: list[str] = list(notes or [])
        #: traced norm-channel gauge candidates (:class:`equiopt.trace.NormChannel`): a norm's
        #: gain (and bias) and the linear maps reading its output; ``certain`` where the flow
        #: confirms the gauge, else the DDC optimizer's probe decides
        self.norm_channels: list[NormChannel] = list(norm_channels or [])
        self._by_name = {}
        for e in entries:
            for n in (e.name, *e.aliases):
                self._by_name[n] = e

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def entry(self, name: str) -> PlanEntry:
        if name not in self._by_name:
            close = [n for n in self._by_name if name.split(".")[-1] in n][:5]
            raise KeyError(f"{name!r} is not a trainable parameter of the planned model; similar: {close}")
        return self._by_name[name]

    def role(self, name: str) -> str:
        return self.entry(name).role

    def by_role(self) -> dict[str, list[PlanEntry]]:
        out: dict[str, list[PlanEntry]] = {}
        for e in self.entries:
            out.setdefault(e.role, []).append(e)
        return out

    def spec(self, e: PlanEntry) -> dict:
        """The hyperparameters ``e`` is optimized with (its role's, or its block group's variant)."""
        return self.variants[(e.role, e.group)] if e.group is not None else self.specs[e.role]

    def group_of(self, name: str) -> Group:
        """The symmetry group of the block ``name`` belongs to."""
        e = self.entry(name)
        return e.group if e.group is not None else self.groups[e.role]

    def param_groups(self) -> list[dict]:
        """One param_group per role present (and one per block-group variant of a role, e.g.
        sigmoid routers), carrying the full spec."""
        out: dict[tuple, dict] = {}
        for e in self.entries:
            key = (e.role, e.group)
            if key not in out:
                out[key] = {"params": [], "role": e.role, **self.spec(e)}
            out[key]["params"].append(e.param)
        return list(out.values())

    def layouts(self) -> dict[torch.Tensor, Layout]:
        return {e.tensor(): e.layout for e in self.entries if e.role != "vector"}

    def names(self) -> dict[torch.Tensor, str]:
        return {e.tensor(): e.name for e in self.entries}

    def map_label(self, role: str, spec: dict | None = None) -> str:
        s = spec if spec is not None else self.specs[role]
        label = s["map"]
        if label == "hybrid":
            label += f"[{s['order']}]"
        if s["map"] in ("polar", "scaled_polar", "hybrid"):
            label += f"/{s['polar_method']}"
        if s["column_aware"] and s["map"] not in ("adamw", "identity", "polar", "scaled_polar"):
            label = f"column_aware({label})"
        if s["per_head"] and role == "attention":
            label += " per-head"
        if s["nesterov"] and label != "adamw":
            label += " +nesterov"
        return label

    def gauges(self, name: str) -> list[str]:
        """The continuous symmetries (gauges) the plan's blocks claim on parameter ``name``;
        ``neuron_rescale?`` marks a candidate the structure cannot confirm (which in-projection
        of a gated MLP is linear is measured by the audit and probed by :mod:`equiopt.ddc`);
        ``norm_channel`` on a norm's gain / bias and the linear maps reading its output
        (:attr:`norm_channels`), ``norm_channel?`` where the traced flow cannot confirm it."""
        out: list[str] = []
        for b in self.blocks:
            if name not in b.params():
                continue
            out += [sym.name for sym in b.symmetries() if sym.gauge and name in sym.params()]
            if isinstance(b, MLPBlock):  # dense or stacked: the probe decides (per expert for stacked)
                out.append("neuron_rescale?")
        for c in self.norm_channels:
            if name in (c.gain, c.bias, *c.readers):
                out.append("norm_channel" if c.certain else "norm_channel?")
        return list(dict.fromkeys(out))

    def table(self) -> str:
        rows = [("name", "shape", "role", "layout", "map", "lr", "wd", "gauges")]
        for e in self.entries:
            s = self.spec(e)
            layout = "" if e.role == "vector" else e.layout.describe()
            role = e.role if e.found else f"{e.role} (no structure found)"
            if e.group is not None and e.role == "router":
                role += " (no shift)"
            rows.append(
                (
                    e.name,
                    "x".join(map(str, e.shape)),
                    role,
                    layout,
                    self.map_label(e.role, s),
                    f"{s['lr']:g}",
                    f"{s['weight_decay']:g}",
                    ", ".join(self.gauges(e.name)),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n = sum(e.tensor().numel() for e in self.entries)
        summary = f"{len(self.entries)} trainable tensors, {n:,} parameters, preset {self.preset!r}"
        unfound = sum(1 for e in self.entries if not e.found)
        if unfound:
            summary += f"; {unfound} 2-D weight(s) with no structure found (planned as matrix)"
        lines.append(summary)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        counts = {r: len(es) for r, es in self.by_role().items()}
        return f"Plan(preset={self.preset!r}, roles={counts})"


def plan(
    model: nn.Module,
    preset: str = "paper",
    *,
    rules: Mapping | None = None,
    lr: Mapping[str, float] | float | None = None,
    lr_scale: Mapping[str, float] | float | None = None,
    roles: Mapping[str, str] | None = None,
    layouts: Mapping[str, str | Layout] | None = None,
    audit=None,
    example=None,
    trace: bool = True,
    **overrides,
) -> Plan:
    """Plan the optimizer of ``model``: role + layout per parameter, hyperparameters per role.

    See :func:`equiopt.presets.resolve` for ``preset``/``rules``/``lr``/``lr_scale``/
    ``overrides`` and :func:`detect_roles` for ``roles``/``layouts``. ``audit``: an
    :class:`equiopt.audit.AuditReport` of this model (anything with ``broken_factors()`` and
    ``downgrade_rules()``); maps whose symmetry it found broken are downgraded, explicit
    ``rules`` still win when they are compatible with the reduced group.
    The plan records the model's blocks (:attr:`Plan.blocks`) and each role's group
    (:attr:`Plan.groups`, less what ``audit`` found broken), resolves ``center=None`` from
    the groups and refuses maps incompatible with them (:func:`check_compatible`).
    """
    broken = audit.broken_factors() if audit is not None else {}
    user_rules = dict(rules or {})
    if audit is not None:
        rules = {**audit.downgrade_rules(), **(rules or {})}
    groups = role_groups(broken)
    raw = resolve(preset, rules=rules, lr=lr, lr_scale=lr_scale, **overrides)
    specs = resolve_centering(raw, groups)
    entries, blocks, notes, channels = _detect(model, roles, layouts, example, trace)
    check_compatible([e for e in entries if e.group is None], specs, groups)
    variants = {}
    for key in dict.fromkeys((e.role, e.group) for e in entries if e.group is not None):
        role, group = key
        variants[key] = _variant_spec(raw[role], group, explicit=role in user_rules)
        check_compatible([e for e in entries if (e.role, e.group) == key], {role: variants[key]}, {role: group})
    return Plan(entries, specs, preset, blocks, groups, variants, notes, channels)


# a map that projects out the row shift -> the same map without it (for blocks without the shift)
UNCENTERED = {"centered_row_norm": "row_norm"}


def _variant_spec(spec: dict, group: Group, explicit: bool) -> dict:
    """A role's spec for a block whose group differs (a sigmoid router: no shift): ``center=None``
    resolves from that group, and a centering map the preset chose is replaced by its uncentered
    form; one the user chose stays, and :func:`check_compatible` refuses it."""
    s = dict(spec)
    if s["center"] is None:
        s["center"] = group.has("shift")
    m = MAP_SPECS.get(s["map"])
    if not explicit and m is not None and m.projects_out and not group.has("shift"):
        s["map"] = UNCENTERED.get(s["map"], s["map"])
    return s
