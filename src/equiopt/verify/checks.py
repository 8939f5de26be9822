"""The audit's checks, built from the blocks the planner recorded (:mod:`equiopt.blocks`)
and their symmetries; random elements come from :mod:`equiopt.groups`."""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import Act, AttentionBlock, MLPBlock, MoEBlock, Symmetry
from ..groups import Factor, haar, inverse_permutation, permutation, rope_rotations
from .actions import Action, Check, Edit, edit, expert_edit, identity_like, lift, sample, symmetry_edits
from .structure import Structure

__all__ = ["CheckBuilder", "PAIRINGS"]

SHIFT = Factor("shift", "rows")
PERM = Factor("perm", "rows")
ORTH = Factor("orth", "rows")
#: the audit's ``rope_pairing`` names -> :func:`equiopt.groups.rope_planes` pairings
PAIRINGS = {"half": "half", "interleaved": "adjacent"}


def _named(syms: tuple[Symmetry, ...], name: str) -> Symmetry | None:
    return next((s for s in syms if s.name == name), None)


def _acts(sym: Symmetry) -> tuple[tuple[str, Factor | None], ...]:
    """``(parameter, factor on its axis)`` of the matrix axes ``sym`` acts on (``None``: the
    stacked-expert batch axis); biases are left out (vectors have no map to assume it)."""
    out: list[tuple[str, Factor | None]] = []
    for a in sym.acts:
        if a.axis == "experts":
            out.append((a.param, None))
        elif a.axis in ("rows", "cols"):
            out.append((a.param, Factor(sym.factor.kind, a.axis, sym.factor.pairing)))
    return tuple(out)


class CheckBuilder:
    """Checks of every block of a :class:`Structure` (see :func:`equiopt.audit.audit`)."""

    def __init__(self, s: Structure, rope_pairing: str):
        self.s, self.w = s, s.work
        self.dtype, self.device = s.work.dtype, s.work.device
        self.rope_pairing = rope_pairing

    def checks(self) -> list[Check]:
        out = self.vocab() + self.residual()
        for attn in self.s.attention:
            out += self.attention(attn)
        for mlp in self.s.mlps:
            out += self.mlp(mlp)
        for moe in self.s.moes:
            out += self.moe(moe)
        return out

    def _symmetry(self, sym: Symmetry, scope: str, g_of, suspects, action: dict | None = None, **kw) -> Check:
        """A check acting with ``g_of(gen)`` (an element of ``sym.factor``) on every axis of
        ``sym``; ``action``: further fields of the :class:`Action` (logits, notes)."""

        def build(gen):
            return Action(symmetry_edits(sym, g_of(gen), self.s.layouts), **(action or {}))

        return Check(sym.name, scope, build, sym.params(), _acts(sym), suspects, **kw)

    # -- vocabulary ----------------------------------------------------------------------
    def _vocab_rows(self, name: str, tied: bool) -> list[str]:
        """Tensors whose rows are indexed by the vocabulary besides the embedding ``name``: the
        bias of a tied head (``logits = x E^T + b``) and ``matrix``-role weights (no block)
        with one row per token (``V`` rows, ``V != d``; e.g. a soft lookup
        ``softmax(A x) @ E``): relabelling the tokens permutes them too."""
        V = self.w.params[name].shape[0]
        out = []
        vocab = self.s.vocab
        if tied and vocab is not None and vocab.tied and vocab.head_bias:
            out.append(vocab.head_bias)
        for e in self.s.plan.entries:
            if e.role == "matrix" and V != self.s.d_model and e.layout.logical_shape(e.shape)[:2] == (1, V):
                out.append(e.name)
        return out

    def _vocab_perm(self, name: str, kind: str, pad: int | None) -> Check:
        tied = kind == "tied_perm"
        extra = self._vocab_rows(name, tied)

        def build(gen):
            P = permutation(self.w.params[name].shape[0], gen, pad).to(self.device)
            inv = inverse_permutation(P)
            notes = [f"padding_idx={pad} kept fixed (its row gets no gradient)"] if pad is not None else []
            if extra:
                notes.append(f"rows indexed by the vocabulary permuted too: {extra}")
            edits = [Edit(name, lambda w: w[P], lambda g: g[P])]
            for n in extra:
                lay = self.s.layouts.get(n, (None, True))[0]
                edits.append(
                    Edit(
                        n,
                        lift(lay, lambda x: x[:, P]) if lay is not None else (lambda t: t[P]),
                        lift(lay, lambda x: x[:, P]) if lay is not None else (lambda t: t[P]),
                    )
                )
            return Action(
                edits,
                input_map=inv,
                target_map=inv if tied else None,
                logits="perm" if tied else "same",
                logit_perm=P if tied else None,
                notes=notes,
            )

        acts = ((name, PERM),) + tuple((n, PERM) for n in extra if n in self.s.layouts and not self.s.layouts[n][1])
        return Check(kind, name.rpartition(".")[0], build, (name, *extra), acts, self.s.residual_suspects)

    def _row_perm(self, name: str) -> Check:
        def build(gen):
            P = permutation(self.w.params[name].shape[0], gen).to(self.device)
            return Action([Edit(name, lambda w: w[P], lambda g: g[P])])

        return Check(
            "row_perm",
            name.rpartition(".")[0],
            build,
            (name,),
            ((name, PERM),),
            hint="rows are not indexed by the input ids (e.g. positions): nothing relabels them",
        )

    def _head_perm(self, head: str, bias: str | None) -> Check:
        def build(gen):
            P = permutation(self.w.params[head].shape[0], gen).to(self.device)
            edits = [Edit(n, lambda t: t[P], lambda g: g[P]) for n in (head, bias) if n]
            return Action(edits, target_map=inverse_permutation(P), logits="perm", logit_perm=P)

        return Check(
            "head_perm",
            head.rpartition(".")[0],
            build,
            (head,) + ((bias,) if bias else ()),
            ((head, PERM),),
            self.s.residual_suspects,
        )

    def shift(self, sym: Symmetry, scope: str, suspects=None, hint: str = "") -> Check:
        """``W -> W + 1 c^T`` on the rows of ``sym``'s parameter, ``c`` of i.i.d. entries 3x the
        RMS entry of W (the logits move by O(row norm) per position)."""
        (name,) = sym.params()
        w = self.w.params[name]

        def g_of(gen):
            return sample(SHIFT, 1, w.shape[-1], gen, self.dtype, self.device) * (3 * w.detach().pow(2).mean().sqrt())

        logits = "shift" if sym.name == "logit_shift" else "same"
        return self._symmetry(
            sym, scope, g_of, suspects or self.s.residual_suspects, hint=hint, action={"logits": logits}
        )

    def vocab(self) -> list[Check]:
        vocab, out = self.s.vocab, []
        token = self.s.token_embedding()
        for e in self.s.embeddings:
            if e.name != token:
                out.append(self._row_perm(e.name))
                continue
            pad = getattr(self.w.module_of(e.name), "padding_idx", None)
            tied = e.role == "tied_embedding"
            out.append(self._vocab_perm(e.name, "tied_perm" if tied else "vocab_perm", pad))
            if tied:
                sym = Symmetry("logit_shift", SHIFT, (Act(e.name, "rows"),))
                out.append(
                    self.shift(
                        sym,
                        e.module_name,
                        hint="tied: the shift also moves every input embedding by c (not a symmetry of a tied head)",
                    )
                )
        if vocab is not None and vocab.head and not vocab.tied:
            out.append(self._head_perm(vocab.head, vocab.head_bias))
            shift = _named(vocab.symmetries(), "logit_shift")
            assert shift is not None  # an untied head always declares it
            out.append(self.shift(shift, self.s.plan.entry(vocab.head).module_name))
        return out

    # -- the residual stream ---------------------------------------------------------------
    def residual(self) -> list[Check]:
        """``Q in O(d)`` on every reader of the residual (``W Q^T``) and writer (``Q W``, ``Q b``)."""
        s = self.s
        if s.d_model is None:
            return []
        readers = [e.name for e in s.embeddings]
        if s.vocab is not None and s.vocab.head and not s.vocab.tied:
            readers.append(s.vocab.head)
        readers += [p for a in s.attention for p in (a.q, a.k, a.v, a.qkv) if p]
        readers += [p for m in s.mlps for p in m.ins] + [m.router for m in s.moes]
        writers = [a.o for a in s.attention] + [m.out for m in s.mlps]
        biases = [b for a in s.attention for w, b in a.biases if w == a.o] + [m.out_bias for m in s.mlps if m.out_bias]
        for n in readers + writers:
            s.check_residual(n, n in readers)
        acted = set(readers + writers)
        skipped = [e.name for e in s.plan.entries if e.role != "vector" and e.name not in acted]
        sym = Symmetry(
            "residual_rotation",
            ORTH,
            tuple(Act(n, "cols") for n in readers)
            + tuple(Act(n, "rows") for n in writers)
            + tuple(Act(b, "vector") for b in biases),
        )
        hint = (
            "nn.LayerNorm subtracts the feature mean: its output is not rotation-equivariant"
            if any(isinstance(m, nn.LayerNorm) for m in self.w.model.modules())
            else ""
        )
        if skipped:
            hint = (
                hint + "; " if hint else ""
            ) + f"parameters outside the recognised blocks were not rotated: {skipped}"
        names = sym.params()
        notes = [f"not rotated (outside the recognised blocks): {skipped}"] if skipped else []
        return [
            self._symmetry(
                sym,
                "",
                lambda gen: haar(1, s.d_model, gen, self.dtype).to(self.device),
                lambda: s.residual_suspects(names),
                hint=hint,
                action={"notes": notes},
            )
        ]

    # -- attention ---------------------------------------------------------------------------
    def _heads(self, blk: AttentionBlock):
        """``(q, k, v)`` as ``(parameter, row blocks of its heads)`` (the traced head order of
        :meth:`~equiopt.blocks.AttentionBlock.heads`: per-head interleaved fused qkv included)."""
        qb, kb, vb, _ = blk.heads()
        if blk.qkv is not None:
            return (blk.qkv, qb), (blk.qkv, kb), (blk.qkv, vb)
        return (blk.q, qb), (blk.k, kb), (blk.v, vb)

    def _head_edits(self, blk: AttentionBlock, which: dict[int, torch.Tensor]) -> list[Edit]:
        """Rows of the q (0), k (1), v (2) heads times per-head rotations ``which[i]``; one
        edit per tensor (a fused qkv gets all of them, identity on the other heads)."""
        by: dict[str, torch.Tensor] = {}
        for i, (name, blocks) in enumerate(self._heads(blk)):
            if i not in which:
                continue
            if name not in by:
                B = self.s.layout(name).logical_shape(self.w.params[name].shape)[0]
                by[name] = identity_like(ORTH, which[i][:1].expand(B, -1, -1))
            by[name][torch.tensor(blocks, dtype=torch.long)] = which[i]
        edits = []
        for name, g in by.items():
            edits.append(edit(name, self.s.layout(name), ORTH, g))
            if (b := self.s.bias(blk, name)) is not None:
                edits.append(edit(b, self.s.layouts[b][0], ORTH, g, vector=True))
        return edits

    def _attention_names(self, blk: AttentionBlock, which: tuple[int, ...]) -> tuple[str, ...]:
        heads = self._heads(blk)
        names = dict.fromkeys(heads[i][0] for i in which)
        return tuple(n for p in names for n in (p, self.s.bias(blk, p)) if n)

    def _qk_hints(self) -> tuple[str, str]:
        """Why a q/k rotation check may fail: RoPE (general rotations), the pairing (RoPE planes)."""
        has_rope = any("rotary" in type(m).__name__.lower() for m in self.w.model.modules())
        other = "interleaved" if self.rope_pairing == "half" else "half"
        qk = "RoPE turns q and k by position-dependent angles in fixed 2-planes; a general rotation of a head "
        qk += "does not commute with it"
        rope = f"rotations inside the RoPE planes ({self.rope_pairing} pairing) do not commute with this "
        rope += f"attention; pass rope_pairing='{other}'?"
        return (qk if has_rope else ""), rope

    def attention(self, blk: AttentionBlock) -> list[Check]:
        hq, hd = blk.hq, blk.head_dim
        kinds = ("vo_rotation", "qk_rotation", "qk_rope_rotation")
        qb, kb, vb, kv_of = blk.heads()
        hkv = len(kb)
        if not hkv or len(vb) != hkv or len(qb) != hq or len(kv_of) != hq:
            return [
                Check(k, blk.scope, None, (blk.o,), untested=f"query heads {hq} do not map onto kv heads {hkv}")
                for k in kinds
            ]
        group = torch.tensor(kv_of, dtype=torch.long)  # kv head of each query head
        rope = Factor("rope_rotation", "rows", PAIRINGS[self.rope_pairing])

        def vo(gen):
            R = haar(hkv, hd, gen, self.dtype).to(self.device)
            return Action(
                self._head_edits(blk, {2: R}) + [edit(blk.o, self.s.layout(blk.o), Factor("orth", "cols"), R[group])]
            )

        def qk(gen, factor):
            R = (
                rope_rotations(hkv, hd, gen, self.dtype, factor.pairing)
                if factor.kind == "rope_rotation"
                else haar(hkv, hd, gen, self.dtype)
            ).to(self.device)
            return Action(self._head_edits(blk, {0: R[group], 1: R}))

        vo_names, qk_names = self._attention_names(blk, (2,)) + (blk.o,), self._attention_names(blk, (0, 1))
        qk_acts = lambda f: tuple((n, f) for n in qk_names if n in (blk.q, blk.k, blk.qkv))  # noqa: E731
        vo_acts = tuple((n, ORTH) for n in vo_names if n in (blk.v, blk.qkv)) + ((blk.o, Factor("orth", "cols")),)
        sus = lambda names: lambda: self.s.scope_suspects(blk.scope, set(names))  # noqa: E731
        qk_hint, rope_hint = self._qk_hints()
        out = [
            Check("vo_rotation", blk.scope, vo, vo_names, vo_acts, sus(vo_names)),
            Check(
                "qk_rotation",
                blk.scope,
                lambda g: qk(g, ORTH),
                qk_names,
                qk_acts(ORTH),
                sus(qk_names),
                hint=qk_hint,
            ),
            Check(
                "qk_rope_rotation",
                blk.scope,
                lambda g: qk(g, rope),
                qk_names,
                qk_acts(rope),
                sus(qk_names),
                hint=rope_hint,
            ),
        ]
        if hd % 2:
            out[2] = Check(
                "qk_rope_rotation", blk.scope, None, qk_names, untested=f"odd head_dim {hd} has no RoPE planes"
            )
        return out

    # -- MLPs and experts --------------------------------------------------------------------
    def part_label(self, blk: MLPBlock, param: str, part: int) -> str:
        attr = param[len(blk.scope) + 1 :] if blk.scope and param.startswith(blk.scope + ".") else param
        return f"{attr}[part {part}]" if self.s.layout(param).fused > 1 else attr

    def mlp(self, blk: MLPBlock) -> list[Check]:
        B, h = blk.experts, blk.hidden
        perm = blk.symmetries()[0]
        sus = lambda sym: lambda: self.s.scope_suspects(blk.scope, set(sym.params()))  # noqa: E731
        out = [self._symmetry(perm, blk.scope, lambda gen: sample(PERM, B, h, gen, self.dtype, self.device), sus(perm))]
        for sym, (param, part) in zip(blk.rescales(), blk.parts()):
            label = self.part_label(blk, param, part)
            out.append(
                self._symmetry(
                    sym,
                    blk.scope,
                    lambda gen, f=sym.factor: sample(f, B, h, gen, self.dtype, self.device),
                    sus(sym),
                    part=label,
                    hint=f"{label} feeds a non-homogeneous function (an activation, a clamp or an offset): "
                    "not a linear branch",
                )
            )
        return out

    def _expert_tensors(self, moe: MoEBlock, experts: MLPBlock) -> list[str]:
        """Every tensor indexed by expert: the stacked expert weights (also flattened to 2-D)
        and their biases, and the tensors of the router's module, the stacked experts' module
        or the MoE module itself (e.g. a per-expert scale) with leading dim E."""
        mods = dict.fromkeys((self.s.plan.entry(moe.router).module_name, experts.scope, moe.scope))
        out = [*experts.params(), *(b for _, b in experts.in_biases), *([experts.out_bias] if experts.out_bias else [])]
        for mod in mods:
            owner = self.w.model.get_submodule(mod)
            pre = mod + "." if mod else ""
            named = list(owner.named_parameters(recurse=False)) + list(owner.named_buffers(recurse=False))
            out += [pre + n for n, t in named if t.ndim >= 1 and t.shape[0] == moe.experts]
        return list(dict.fromkeys(out))

    def _expert_groups(self, moe: MoEBlock) -> int:
        """Group-limited routing (DeepSeek-V3 ``n_group``: experts chosen inside the best
        ``topk_group`` contiguous groups): the number of groups, 1 without."""
        mods = [
            self.w.model.get_submodule(self.s.plan.entry(moe.router).module_name),
            self.w.model.get_submodule(moe.scope),
        ]
        for mod in mods:
            for src in (mod, getattr(mod, "config", None)):
                for attr in ("num_group", "n_group"):
                    n = getattr(src, attr, None) if src is not None else None
                    if isinstance(n, int) and n > 1 and moe.experts % n == 0:
                        return n
        return 1

    def _expert_permutation(self, E: int, groups: int, gen: torch.Generator) -> torch.Tensor:
        """A random permutation of ``E`` experts; with group-limited routing, one that keeps
        the contiguous groups (experts permuted inside each group, the groups permuted)."""
        if groups == 1:
            return permutation(E, gen)
        size = E // groups
        order = permutation(groups, gen)
        return torch.cat([order[g] * size + permutation(size, gen) for g in range(groups)])

    def moe(self, moe: MoEBlock) -> list[Check]:
        syms = moe.symmetries()
        rscope = self.s.plan.entry(moe.router).module_name
        shift = self.shift(
            _named(syms, "router_shift") or Symmetry("router_shift", SHIFT, (Act(moe.router, "rows"),)),
            rscope,
            suspects=lambda: self.s.scope_suspects(moe.scope, {moe.router}),
            hint="a per-expert factor or a non-softmax routing function makes the router logits' common offset matter",
        )
        experts = self.s.experts[moe.scope]
        if isinstance(experts, str):
            return [Check("expert_perm", moe.scope, None, (moe.router,), untested=experts), shift]
        tensors = self._expert_tensors(moe, experts)
        grads = tuple(n for n in tensors if n in self.w.params)
        buffers = [n for n in tensors if n not in self.w.params]

        groups = self._expert_groups(moe)
        stacked = set(experts.params())

        def build(gen):
            P = self._expert_permutation(moe.experts, groups, gen).to(self.device)
            edits = [
                expert_edit(n, self.s.layout(n) if n in stacked else None, P, grads=n in self.w.params) for n in tensors
            ]
            notes = [f"buffers permuted too: {buffers}"] if buffers else []
            if groups > 1:
                notes.append(
                    f"group-limited routing ({groups} groups): experts permuted within groups, groups permuted"
                )
            return Action(edits, notes=notes)

        acts = ((moe.router, PERM),) + tuple((p, None) for p in experts.params())
        return [
            Check("expert_perm", moe.scope, build, grads, acts, lambda: self.s.scope_suspects(moe.scope, set(tensors))),
            shift,
        ]
