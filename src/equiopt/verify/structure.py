"""What the audit reads from the plan: the blocks the planner recorded, each parameter's
layout, the residual width, the token embedding, and the vectors that may break a symmetry
(the suspects of the ablation)."""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import AttentionBlock, MLPBlock, MoEBlock, VocabBlock, stacked_experts
from ..layouts import Layout
from .actions import vector_layout
from .report import AuditError
from .runner import WorkModel

__all__ = ["Structure"]

READ_ROLES = ("embedding", "tied_embedding")


def _under(name: str, scope: str) -> bool:
    """``name`` lies in module ``scope`` (module-tree containment of the dotted path)."""
    return not scope or name == scope or name.startswith(scope + ".")


class Structure:
    """The plan's blocks and the tables the checks need, on the audit's work copy."""

    def __init__(self, plan, work: WorkModel):
        self.plan, self.work = plan, work
        blocks = plan.blocks
        self.vocab = next((b for b in blocks if isinstance(b, VocabBlock)), None)
        self.attention = [b for b in blocks if isinstance(b, AttentionBlock)]
        self.moes = [b for b in blocks if isinstance(b, MoEBlock)]
        self.experts: dict[str, MLPBlock | str] = {m.scope: self._experts_of(m) for m in self.moes}
        stacked = [m for m in self.experts.values() if isinstance(m, MLPBlock)]
        recorded = [b for b in blocks if isinstance(b, MLPBlock)]
        # the planner may record the stacked experts both on their own and inside the MoE
        # block; the MoE's reading (with the expert biases) wins
        self.mlps = [b for b in recorded if b.out not in {m.out for m in stacked}] + stacked
        self.embeddings = [e for e in plan.entries if e.role in READ_ROLES]
        self.vectors = [e.name for e in plan.entries if e.role == "vector"]
        self.layouts = self._layouts()
        self.d_model = (
            self.embeddings[0].shape[1]
            if self.embeddings
            else (plan.entry(self.vocab.head).shape[1] if self.vocab and self.vocab.head else self._width())
        )

    def _width(self) -> int | None:
        """The residual width read from a writer (attention o, MLP out) when no table reads it."""
        for name in [a.o for a in self.attention] + [m.out for m in self.mlps]:
            e = self.plan.entry(name)
            return e.layout.logical_shape(e.shape)[1]
        return None

    # -- tables ------------------------------------------------------------------------
    def _layouts(self) -> dict[str, tuple[Layout, bool]]:
        """Parameter -> (layout, is a bias); a bias gets its weight's :func:`vector_layout`."""
        out = {e.name: (e.layout, False) for e in self.plan.entries if e.role != "vector"}
        pairs = [p for a in self.attention for p in a.biases]
        pairs += [p for m in self.mlps for p in m.in_biases]
        pairs += [(m.out, m.out_bias) for m in self.mlps if m.out_bias]
        for weight, bias in pairs:
            out[bias] = (vector_layout(self.plan.entry(weight).layout), True)
        return out

    def layout(self, name: str) -> Layout:
        return self.layouts[name][0]

    def bias(self, block: AttentionBlock, weight: str) -> str | None:
        return next((b for w, b in block.biases if w == weight), None)

    def _experts_of(self, moe: MoEBlock) -> MLPBlock | str:
        """The stacked experts of ``moe`` (:func:`equiopt.blocks.stacked_experts`), or why none."""
        mlp, why = stacked_experts(moe, self.plan.entries)
        return mlp if mlp is not None else why

    # -- the token embedding -------------------------------------------------------------
    def token_embedding(self) -> str | None:
        """The embedding the forward indexes with the input ids (seen by forward hooks; the
        vocabulary block's embedding when the hooks cannot tell)."""
        if self.work.ids is None:  # images: no token ids to follow
            return None
        seen, hooks = [], []
        for mname, mod in self.work.model.named_modules():
            if isinstance(mod, nn.Embedding):
                hooks.append(mod.register_forward_hook(lambda m, inp, out, mname=mname: seen.append((mname, inp[0]))))
        try:
            with torch.no_grad():
                self.work.call(self.work.x)
        finally:
            for h in hooks:
                h.remove()
        ids = self.work.ids
        names = {f"{m}.weight" for m, inp in seen if inp.shape == ids.shape and torch.equal(inp, ids)}
        emb = [e.name for e in self.embeddings if {e.name, *e.aliases} & names]
        if len(emb) == 1:
            return emb[0]
        return self.vocab.embedding if self.vocab is not None else None

    def check_residual(self, name: str, reads: bool) -> None:
        """Raise when a reader's logical input (a writer's output) is not the residual width."""
        e = self.plan.entry(name)
        B, m, n = e.layout.logical_shape(e.shape)
        size = n if reads else m
        if size != self.d_model:
            what = "read" if reads else "write"
            raise AuditError(
                f"{name}: role {e.role} should {what} the residual stream (d={self.d_model}) but its "
                f"logical {'input' if reads else 'output'} size is {size}"
            )

    # -- suspects ------------------------------------------------------------------------
    def residual_suspects(self, exclude=()) -> list[tuple[str, list[str]]]:
        """Trainable size-d vectors: the norm gains as one group, the others one by one."""
        d = self.d_model
        params = self.work.params
        vecs = [
            n
            for n in self.vectors
            if d is not None and params[n].ndim == 1 and params[n].numel() == d and n not in exclude
        ]
        gains = [n for n in vecs if "norm" in type(self.work.module_of(n)).__name__.lower()]
        out = []
        if gains:
            out.append(
                (
                    f"{len(gains)} norm gains of size d ({', '.join(gains[:2])}{', ...' if len(gains) > 2 else ''})",
                    gains,
                )
            )
        return out + [(n, [n]) for n in vecs if n not in gains]

    def scope_suspects(self, scope: str, exclude) -> list[tuple[str, list[str]]]:
        """Trainable vectors and float buffers (more than one entry) inside module ``scope``."""
        out = [(n, [n]) for n in self.vectors if _under(n, scope) and n != scope and n not in exclude]
        out += [
            (n, [n])
            for n, b in self.work.buffers.items()
            if _under(n, scope) and n not in exclude and b.is_floating_point() and b.ndim >= 1 and b.numel() > 1
        ]
        return out
