"""Blocks: the structural units the planner finds, with their parameters and symmetries.

A block names its parameters (by their plan names) in *slots* that say what each does, so
that consumers (the audit's group actions, the diagnostics' orbit coordinates, the
Dead-Direction Conditioner's gauges) act on the structure the planner read instead of
re-deriving it from parameter names:

* :class:`VocabBlock`     token embedding and LM head (tied or not) [vocab, d]
* :class:`AttentionBlock` q/k/v (separate, in registration order, or one fused qkv) and o
* :class:`MLPBlock`       in-projections (gate/up, fused parts) and one out-projection,
  dense or stacked over experts
* :class:`MoEBlock`       a router [E, d] and the expert MLP it routes to

Each block lists its :class:`Symmetry` s: a named transformation acting jointly on several
parameters' axes with one group element (a hidden-neuron permutation acts on the rows of
every in-projection part and on the out-projection's columns). ``gauge`` marks the
continuous symmetries whose orbit the loss is flat along (rescales, shifts, rotations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .groups import Factor

__all__ = ["Act", "Symmetry", "Block", "VocabBlock", "AttentionBlock", "MLPBlock", "MoEBlock", "stacked_experts"]


@dataclass(frozen=True)
class Act:
    """One parameter axis a symmetry acts on.

    ``axis``: ``"rows"`` / ``"cols"`` of the parameter's logical matrices (``"vector"`` for
    a bias, acted on entrywise like the rows it belongs to); ``inverse``: acted on by the
    inverse element (the compensating side: ``down`` columns divided by ``s`` when ``up``
    rows are multiplied); ``part``: one fused part (None: every logical matrix)."""

    param: str
    axis: str
    inverse: bool = False
    part: int | None = None


@dataclass(frozen=True)
class Symmetry:
    """A transformation of the network that leaves its function unchanged (claimed by the
    structure; the audit measures it)."""

    name: str
    factor: Factor
    acts: tuple[Act, ...]
    gauge: bool = False
    note: str = ""

    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a.param for a in self.acts))


@dataclass(frozen=True)
class Block:
    scope: str  # module name the block lives in ("" = the model)

    @property
    def kind(self) -> str:
        return type(self).__name__.removesuffix("Block").lower()

    def params(self) -> tuple[str, ...]:
        raise NotImplementedError

    def symmetries(self) -> tuple[Symmetry, ...]:
        return ()

    def describe(self) -> str:
        syms = ", ".join(s.name for s in self.symmetries())
        return f"{self.kind} {self.scope or '<model>'}: {', '.join(self.params())}" + (f" [{syms}]" if syms else "")


@dataclass(frozen=True)
class VocabBlock(Block):
    embedding: str | None = None
    head: str | None = None  # == embedding when tied
    head_bias: str | None = None

    @property
    def tied(self) -> bool:
        return self.head is not None and self.head == self.embedding

    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for p in (self.embedding, self.head, self.head_bias) if p))

    def symmetries(self) -> tuple[Symmetry, ...]:
        out = []
        if self.head and not self.tied:
            acts = (Act(self.head, "rows"),) + ((Act(self.head_bias, "vector"),) if self.head_bias else ())
            out.append(
                Symmetry(
                    "logit_shift",
                    Factor("shift", "rows"),
                    acts[:1],
                    gauge=True,
                    note="softmax cross-entropy is invariant under W -> W + 1 c^T",
                )
            )
        return tuple(out)


@dataclass(frozen=True)
class AttentionBlock(Block):
    o: str = ""
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # fused [ (Hq + 2 Hkv) hd, d ], order q | k | v
    hq: int = 0
    hkv: int = 0
    head_dim: int = 0
    biases: tuple[tuple[str, str], ...] = ()  # (projection slot, bias name)
    #: ``(q, k, v)``: for each head the attention computes, the row block (head) of its
    #: projection's ``heads{N}:out`` layout that feeds it -- query heads in attention order,
    #: k / v per query head (repeated for grouped kv heads) or per kv head. Empty: the
    #: contiguous default (q heads ``0..Hq-1``; k, v heads ``0..Hkv-1`` of their own
    #: projection, or after the q (and k) heads of a fused ``[q | k | v]``). GPT-NeoX's
    #: per-head ``[q_h; k_h; v_h]`` is ``((0, 3, ...), (1, 4, ...), (2, 5, ...))``.
    head_blocks: tuple[tuple[int, ...], ...] = ()  # () or (q, k, v)

    def params(self) -> tuple[str, ...]:
        return tuple(p for p in (self.q, self.k, self.v, self.qkv, self.o) if p)

    def heads(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(q blocks [Hq], k blocks [Hkv], v blocks [Hkv], kv head of each query head [Hq])``:
        the row block of each head in its projection (see :attr:`head_blocks`)."""
        hq, hkv = self.hq, self.hkv
        if not self.head_blocks:
            rep = hq // hkv if hkv and hq % hkv == 0 else 1
            off_k, off_v = (hq, hq + hkv) if self.qkv is not None else (0, 0)
            return (
                tuple(range(hq)),
                tuple(off_k + j for j in range(hkv)),
                tuple(off_v + j for j in range(hkv)),
                tuple(i // rep for i in range(hq)),
            )
        qb, kb, vb = self.head_blocks
        if len(kb) == len(qb) and len(vb) == len(qb):  # k / v listed per query head
            kv = list(dict.fromkeys(zip(kb, vb)))
            return tuple(qb), tuple(a for a, _ in kv), tuple(b for _, b in kv), tuple(kv.index(p) for p in zip(kb, vb))
        rep = len(qb) // len(kb) if kb and len(qb) % len(kb) == 0 else 1
        return tuple(qb), tuple(kb), tuple(vb), tuple(i // rep for i in range(len(qb)))

    def symmetries(self) -> tuple[Symmetry, ...]:
        if self.qkv is not None:
            return ()
        assert self.q is not None and self.k is not None and self.v is not None, "unfused attention names q, k and v"
        return (
            Symmetry(
                "vo_rotation",
                Factor("orth", "rows"),
                (Act(self.v, "rows"), Act(self.o, "cols")),
                gauge=True,
                note="per kv head R_j: V_j -> R_j V_j, O_i -> O_i R_j^T for the query heads sharing j",
            ),
            Symmetry(
                "qk_rope_rotation",
                Factor("rope_rotation", "rows"),
                (Act(self.q, "rows"), Act(self.k, "rows")),
                gauge=True,
                note="per kv head rotations inside the RoPE planes, on Q_i and K_j rows",
            ),
        )


@dataclass(frozen=True)
class MLPBlock(Block):
    ins: tuple[str, ...] = ()  # in-projections in registration order (gate before up in HF)
    out: str = ""
    hidden: int = 0
    experts: int = 1  # logical batch of the out-projection: E for stacked experts
    fused: tuple[int, ...] = ()  # fused parts per in-projection (1 = plain)
    in_biases: tuple[tuple[str, str], ...] = ()  # (in-projection, bias)
    out_bias: str | None = None

    @property
    def gated(self) -> bool:
        return sum(self.fused or (1,) * len(self.ins)) >= 2

    def params(self) -> tuple[str, ...]:
        return (*self.ins, self.out)

    def parts(self) -> tuple[tuple[str, int], ...]:
        """``(in-projection, part)`` for every logical in-projection (gate and up of a fused one)."""
        fused = self.fused or (1,) * len(self.ins)
        return tuple((p, j) for p, k in zip(self.ins, fused) for j in range(k))

    def in_bias(self, param: str) -> str | None:
        """The bias of in-projection ``param`` (None without one)."""
        return next((b for p, b in self.in_biases if p == param), None)

    def rescale(self, param: str, part: int = 0) -> Symmetry:
        """The candidate gauge of one in-projection part: its row ``i`` (and bias) times
        ``s_i > 0``, the out-projection's column ``i`` divided by ``s_i``. A symmetry exactly
        when the part enters the MLP linearly (the "up" branch of a gated MLP, any part
        before a positively homogeneous activation); the structure does not say which, so
        it is not among :meth:`symmetries` (the audit measures every part)."""
        acts: tuple[Act, ...] = (Act(param, "rows", part=part),)
        if (bias := self.in_bias(param)) is not None:
            acts += (Act(bias, "vector", part=part),)
        return Symmetry(
            "neuron_rescale",
            Factor("scale", "rows"),
            acts + (Act(self.out, "cols", inverse=True),),
            gauge=True,
            note="in-projection part row i * s_i, out-projection column i / s_i",
        )

    def rescales(self) -> tuple[Symmetry, ...]:
        """:meth:`rescale` of every in-projection part (see :meth:`parts`)."""
        return tuple(self.rescale(p, j) for p, j in self.parts())

    def up_part(self) -> tuple[str, int]:
        """The part taken as the linear "up" branch: the last in-projection part in
        registration / storage order (gate before up in every gated MLP we know, fused or
        not; the one in-projection of an ungated MLP). A convention, not a measurement:
        ``neuron_rescale`` in :mod:`equiopt.audit` tells which parts really are linear."""
        return self.parts()[-1]

    def symmetries(self) -> tuple[Symmetry, ...]:
        rows = tuple(Act(p, "rows") for p in self.ins) + tuple(Act(b, "vector") for _, b in self.in_biases)
        return (
            Symmetry(
                "neuron_perm",
                Factor("perm", "rows"),
                rows + (Act(self.out, "cols"),),
                note="hidden neurons permuted in every in-projection part and the out-projection columns",
            ),
        )


@dataclass(frozen=True)
class MoEBlock(Block):
    router: str = ""
    experts: int = 0
    router_bias: str | None = None
    mlp: MLPBlock | None = None  # the stacked experts (None: experts as a module list)
    scoring: str = "softmax"

    def params(self) -> tuple[str, ...]:
        return (self.router, *(self.mlp.params() if self.mlp else ()))

    def symmetries(self) -> tuple[Symmetry, ...]:
        out = []
        if self.mlp is not None:
            out.append(
                Symmetry(
                    "expert_perm",
                    Factor("perm", "rows"),
                    (Act(self.router, "rows"),) + tuple(Act(p, "experts") for p in self.mlp.params()),
                    note="experts relabelled in the router rows and the stacked expert tensors",
                )
            )
        if self.scoring == "softmax":
            out.append(
                Symmetry(
                    "router_shift",
                    Factor("shift", "rows"),
                    (Act(self.router, "rows"),),
                    gauge=True,
                    note="softmax scores are invariant under W -> W + 1 c^T",
                )
            )
        return tuple(out)


def _under(module: str, scope: str) -> bool:
    return not scope or module == scope or module.startswith(scope + ".")


def stacked_experts(moe: MoEBlock, entries) -> tuple[MLPBlock | None, str]:
    """``(experts, why not)``: the stacked expert MLP of ``moe`` -- ``moe.mlp``, or, when the
    planner left it out because a ``layouts=`` override decided the fused layout after its
    pass, the block rebuilt from the plan ``entries`` (role ``expert_in``/``expert_out``,
    stacked layout, ``E`` leading rows, owned by one module inside the MoE module; a bias is
    an ``[E, out]`` vector of that module). ``None`` with the reason otherwise (experts as a
    ModuleList of MLPs)."""
    if moe.mlp is not None:
        return moe.mlp, ""
    es = [
        e
        for e in entries
        if e.role in ("expert_in", "expert_out")
        and e.layout.stacked
        and e.shape[0] == moe.experts
        and _under(e.module_name, moe.scope)
    ]
    if not es:
        return None, (
            f"no stacked [E={moe.experts}, ...] expert weights under {moe.scope!r} (experts as a ModuleList "
            "are not supported by the expert permutation)"
        )
    mods = {e.module_name for e in es}
    outs = [e for e in es if e.role == "expert_out"]
    if len(mods) != 1 or len(outs) != 1:
        return None, f"stacked experts of {moe.scope!r}: not one module with one out-projection ({sorted(mods)})"
    ins = [e for e in es if e.role == "expert_in"]
    out = outs[0]
    hidden = out.layout.logical_shape(out.shape)[2]
    vectors = [v for v in entries if v.role == "vector" and v.module_name == out.module_name]
    biases = []
    for e in ins:
        match = [v.name for v in vectors if tuple(v.shape) == (moe.experts, hidden * e.layout.fused)]
        if len(match) == 1 and len(ins) == 1:
            biases.append((e.name, match[0]))
    return MLPBlock(
        out.module_name,
        ins=tuple(e.name for e in ins),
        out=out.name,
        hidden=hidden,
        experts=moe.experts,
        fused=tuple(e.layout.fused for e in ins),
        in_biases=tuple(biases),
    ), ""


@dataclass
class BlockRecorder:
    """Collects blocks as the planner decides; :class:`~equiopt.planner.Plan` keeps them."""

    blocks: list[Block] = field(default_factory=list)

    def add(self, block: Block) -> None:
        self.blocks.append(block)
