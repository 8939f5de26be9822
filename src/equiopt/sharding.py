"""Execution paths for torch.distributed: FSDP2 (DTensor parameters) and DDP spreading.

**How each update map runs on shards** (:class:`ShardedExecutor`, :func:`sharded_updates`:
whenever a param_group holds DTensor parameters, as FSDP2's
``fully_shard`` makes them). FSDP2 shards storage dim 0 (``Shard(0)``, ``torch.chunk``
sizes: uneven, trailing ranks may hold an empty shard). Per parameter, decided from the
*global* shape, the layout, the world size and the group's map only, so that every rank
takes the same decisions and issues the same collectives in the same order:

* ``local``: the shard holds whole logical matrices: stacked experts sharded along E,
  per-head q/k/v or fused gate/up whose head/part boundaries fall on shard boundaries
  (``ceil(rows / world) % rows_per_block == 0``), a matrix one rank holds entirely (a
  ``[1, d]`` matrix on 2 ranks: the other rank holds nothing). The map runs on the local
  logical matrices, through the optimizer's own local path (``EquiOptimizer._updates`` on
  plain tensors: the batched fast path when enabled); no communication, any map.
* ``reduce``: row/column normalizations and centering (``row_norm``, ``col_norm``,
  ``centered_row_norm``, ``identity``, and their column-aware / per-head forms) on a shard
  that cuts logical matrices. Row statistics of rows that are local need nothing; a
  statistic that sums over the sharded axis (column sums for centering, per-column squared
  norms for the column-wise maps) is all-reduced: ``[parts, cols]`` numbers per map stage,
  never the matrix. The mean of centering divides by the *global* row count.
* ``gram``: ``right_spectral`` on a row-sharded ``[m, n]`` matrix: the ``n x n`` Gram
  ``X^T X`` is a sum over rows, so it is all-reduced (plus one row of per-column nonzero
  counts) and each rank applies ``(X^T X)^{+1/2}`` to its own rows. ``n^2`` numbers instead
  of the matrix.
* ``gather``: every other map on a cut matrix (polar, scaled polar, hybrid, left spectral,
  per-head maps whose heads straddle a shard boundary, maps registered later): the full
  logical matrix is needed. Matrices get an owner rank (greedy longest-processing-time on
  the cost ``B m n min(m, n)``, deterministic, so no rank orthogonalizes everything); one
  ``all_to_all`` sends every shard to its matrix's owner, owners compute the updates of all
  their matrices with the optimizer's own local path (one batched call, as one process
  would), and a second ``all_to_all`` sends each rank its rows of the result. Per rank and
  step that is ``2 (W-1)/W^2`` of the gathered matrices' bytes on average, against
  ``(W-1)/W`` for all-gathering them on every rank.
* ``replicated``: a ``Replicate()`` DTensor (every rank holds the whole tensor): the local
  path on the local copy.
* ``fallback``: any other placement (``Shard(1)``, two sharded mesh dims, ``Partial``):
  ``full_tensor()`` -> local path -> the local slice. Correct, never fast.

HSDP meshes (``Replicate`` x ``Shard(0)``) use the shard dimension's process group; replicas
compute the same numbers. :func:`param_paths` tells which path each parameter takes;
:func:`estimate_comm` predicts the bytes per rank for any world size from shapes alone.

AdamW (vectors, and the ``adamw`` preset) runs elementwise on the local shards through
torch's functional ``adam`` (DTensor lists work with foreach on and off), no communication.
The finite-gradient check all-reduces one flag per parameter (:func:`finite_flags`) so that
every rank skips the same parameters.

DDP needs nothing: gradients are averaged before ``step()``, every rank computes the same
full update. :func:`spread_spectral` optionally splits the spectral maps over ranks (owners
as above) and all-to-alls the results; see ``results/comm.md`` for when that pays.

**Harness pieces** (torchrun, one process per device): :func:`init_from_env`,
:func:`wrap_model` (``"ddp"`` or ``"fsdp2"``), :func:`plan` / :func:`build` (plan a DDP or
FSDP2 model), :func:`print0` / :func:`is_rank0`, :func:`mean_over_ranks`, :func:`grad_norm` /
:func:`clip_grad_norm_` (global over shards),
:func:`save_checkpoint` / :func:`load_checkpoint` (torch.distributed.checkpoint, resume on
the same or another world size), :func:`cleanup`.

Communication accounting: every collective issued here (all-reduce, all-to-all, and the
``full_tensor()`` of the fallback) adds the bytes *this rank sends* to the active
:func:`count_comm` record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from .execution import LocalExecutor, UpdateContext
from .functional import finite_flags as functional_finite_flags
from .functional import muon_scale
from .layouts import Layout
from .maps import centered_row_norm, col_norm, needs_centering, row_norm, scale_by_nuclear
from .polar import eigh_kept, inv_sqrt_from_eig, linalg_dtype

__all__ = [
    "ShardedExecutor",
    "SpreadExecutor",
    "sharded_updates",
    "finite_flags",
    "gradient_flags",
    "spread_spectral",
    "count_comm",
    "CommStats",
    "estimate_comm",
    "assign_owners",
    "param_paths",
    "REDUCE_MAPS",
    "SPECTRAL_MAPS",
]


#: maps built from row/column statistics only: run on cut shards with all-reduced statistics
REDUCE_MAPS = ("identity", "row_norm", "col_norm", "centered_row_norm")
#: maps whose cost is dominated by a polar factor / Gram eigendecomposition
SPECTRAL_MAPS = ("polar", "scaled_polar", "right_spectral", "left_spectral", "hybrid")


# =========================================================================================
# communication accounting
# =========================================================================================
@dataclass
class CommStats:
    """Bytes this rank sent, by kind of collective, while the record was active.

    Conventions (per rank): ``all_to_all``: the bytes of the chunks addressed to other ranks;
    ``all_reduce`` of N bytes: ``2 (W-1)/W N`` (ring reduce-scatter + all-gather, the
    bandwidth-optimal algorithm NCCL and gloo use for large buffers); ``all_gather`` of a
    local N-byte chunk: ``(W-1) N``. ``calls`` counts collectives.
    """

    bytes: dict = dataclasses.field(default_factory=lambda: defaultdict(int))
    calls: dict = dataclasses.field(default_factory=lambda: defaultdict(int))

    @property
    def total(self) -> int:
        return int(sum(self.bytes.values()))

    def add(self, kind: str, nbytes: float) -> None:
        self.bytes[kind] += int(round(nbytes))
        self.calls[kind] += 1


_RECORDS: list[CommStats] = []


@contextlib.contextmanager
def count_comm():
    """``with count_comm() as stats:`` -- collectives issued by equiopt inside the block are
    added to ``stats`` (a :class:`CommStats`). Nested records all receive the counts."""
    stats = CommStats()
    _RECORDS.append(stats)
    try:
        yield stats
    finally:
        _RECORDS.remove(stats)


def _record(kind: str, nbytes: float) -> None:
    for r in _RECORDS:
        r.add(kind, nbytes)


def _all_reduce(t: torch.Tensor, group, kind: str = "all_reduce", op=dist.ReduceOp.SUM) -> torch.Tensor:
    W = dist.get_world_size(group)
    if W == 1:
        return t
    _record(kind, 2 * (W - 1) / W * t.numel() * t.element_size())
    dist.all_reduce(t, op=op, group=group)
    return t


def _all_to_all(send: torch.Tensor, send_splits: list[int], recv_splits: list[int], group, kind: str) -> torch.Tensor:
    """``all_to_all_single`` of 1-D buffers with per-rank split sizes (elements)."""
    W = dist.get_world_size(group)
    me = dist.get_rank(group)
    recv = send.new_empty(sum(recv_splits))
    if W == 1:
        recv.copy_(send)
        return recv
    _record(kind, sum(s for d, s in enumerate(send_splits) if d != me) * send.element_size())
    dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=group)
    return recv


# =========================================================================================
# shard geometry
# =========================================================================================
@dataclass(frozen=True)
class _Shard:
    """Row shard of a dim-0-sharded DTensor: ``torch.chunk`` semantics over ``world`` ranks."""

    group: Any  # ProcessGroup of the sharded mesh dimension
    world: int
    index: int  # this rank's coordinate on that mesh dimension
    rows: int  # global size of dim 0

    @property
    def chunk(self) -> int:
        return -(-self.rows // self.world) if self.rows else 0

    def bounds(self, k: int) -> tuple[int, int]:
        c = self.chunk
        return min(k * c, self.rows), min((k + 1) * c, self.rows)

    def size(self, k: int) -> int:
        a, b = self.bounds(k)
        return b - a

    @property
    def start(self) -> int:
        return self.bounds(self.index)[0]

    @property
    def local_rows(self) -> int:
        return self.size(self.index)

    def boundaries(self) -> list[int]:
        return sorted({self.bounds(k)[0] for k in range(self.world)} | {self.rows})


def _placement_kind(p: DTensor) -> tuple[str, _Shard | None]:
    """("shard", geometry) | ("replicated", None) | ("fallback", None)."""
    mesh, placements = p.device_mesh, p.placements
    shard_dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    others_ok = all(pl.is_shard() or pl.is_replicate() for pl in placements)
    if not others_ok or len(shard_dims) > 1:
        return "fallback", None
    if not shard_dims:
        return "replicated", None
    i = shard_dims[0]
    if cast(Shard, placements[i]).dim != 0 or p.ndim == 0:  # is_shard() above: a Shard
        return "fallback", None
    geo = _Shard(mesh.get_group(i), mesh.size(i), mesh.get_local_rank(i), p.shape[0])
    if p.to_local().shape[0] != geo.local_rows:  # not torch.chunk semantics: be safe
        return "fallback", None
    return "shard", geo


@dataclass(frozen=True)
class _Axes:
    """Where the logical structure of a non-stacked 2-D layout sits in storage."""

    out_axis: int  # storage axis of the logical rows (0, or 1 when transposed)
    split_axis: int | None  # storage axis along which the logical matrix index varies
    parts: int  # number of logical matrices B
    block: int  # contiguous block length along split_axis (non-interleaved)
    interleaved: bool
    m: int  # logical matrix rows
    n: int  # logical matrix cols

    @classmethod
    def of(cls, layout: Layout, shape) -> _Axes:
        out_axis = 1 if layout.transposed else 0
        in_axis = 1 - out_axis
        _, m, n = layout.logical_shape(shape)
        split, parts, block = None, 1, shape[0]
        if layout.fused > 1:
            split, parts, block = out_axis, layout.fused, shape[out_axis] // layout.fused
        elif layout.heads > 1:
            ax = out_axis if layout.head_axis == "out" else in_axis
            split, parts, block = ax, layout.heads, shape[ax] // layout.heads
        return cls(out_axis, split, parts, block, layout.interleaved, m, n)

    def ids(self, index: torch.Tensor) -> torch.Tensor:
        return index % self.parts if self.interleaved else index // self.block


def _aligned(layout: Layout, shape, geo: _Shard) -> bool:
    """Does every rank's row range hold whole logical matrices?"""
    if layout.stacked:
        return True
    bounds = geo.boundaries()
    if all(b in (0, geo.rows) for b in bounds):  # one rank holds everything
        return True
    ax = _Axes.of(layout, shape)
    if ax.split_axis != 0 or ax.interleaved:
        return False
    return all(b % ax.block == 0 for b in bounds)


# =========================================================================================
# the per-parameter paths
# =========================================================================================
@dataclass(frozen=True)
class _Local:
    """The local path the sharded paths hand whole matrices to, with its context."""

    ctx: UpdateContext
    executor: Any


def _run_local(run: _Local, group, entries: list[tuple[torch.Tensor, Layout]]) -> list[torch.Tensor]:
    """Updates of plain tensors that hold whole logical matrices, computed by the very code
    a single process runs (the local executor: the batched fast path when enabled, else the
    reference path), all entries of the group in one call so that equal shapes are batched
    as in one process. Each tensor stands in for its own parameter, with its layout added
    to a copy of the context."""
    out: list = [None] * len(entries)
    live = [i for i, (x, _) in enumerate(entries) if x.numel() > 0]
    for i, (x, _) in enumerate(entries):
        if x.numel() == 0:
            out[i] = torch.zeros_like(x)
    if not live:
        return out
    xs = [entries[i][0] for i in live]
    xs = [x if x.is_contiguous() else x.contiguous() for x in xs]
    ctx = run.ctx.with_layouts({x: entries[i][1] for i, x in zip(live, xs)})
    us = run.executor.updates(ctx, group, xs, xs)
    for i, u in zip(live, us):
        out[i] = u
    return out


def _local_layout(layout: Layout, shape, geo: _Shard) -> Layout:
    """Layout of an aligned local shard (whole blocks of the global layout)."""
    if layout.stacked or geo.local_rows in (0, geo.rows):
        return layout
    ax = _Axes.of(layout, shape)
    k = geo.local_rows // ax.block
    if layout.fused > 1:
        return dataclasses.replace(layout, fused=k, interleaved=False)
    return dataclasses.replace(layout, heads=k) if k > 1 else layout.without_heads()


def _reduce_update(group, layout: Layout, shape, x: torch.Tensor, geo: _Shard) -> torch.Tensor:
    """Row/column-statistics maps on a row shard of a non-stacked 2-D parameter."""
    ax = _Axes.of(layout, shape)
    in_axis = 1 - ax.out_axis
    rows_idx = torch.arange(geo.start, geo.start + geo.local_rows, device=x.device)
    cols_idx = torch.arange(shape[1], device=x.device)

    def reduce(v: torch.Tensor, axis: int) -> torch.Tensor:
        """Sum of ``v`` over storage ``axis`` within each logical matrix, broadcast back."""
        if ax.split_axis == axis:
            ids = ax.ids(rows_idx if axis == 0 else cols_idx)
            if axis == 0:
                s = v.new_zeros(ax.parts, v.shape[1]).index_add_(0, ids, v)
            else:
                s = v.new_zeros(v.shape[0], ax.parts).index_add_(1, ids, v)
        else:
            s = v.sum(axis, keepdim=True)
            ids = None
        if axis == 0:
            _all_reduce(s, geo.group)
        if ids is None:
            return s
        return s[ids] if axis == 0 else s[:, ids]

    col_aware = group["column_aware"]
    R = in_axis if col_aware else ax.out_axis  # storage axis of the map's rows
    K = 1 - R
    count_R = ax.n if col_aware else ax.m
    eps = group["eps"]

    def over(axis: int):
        """Sum over storage ``axis``, seen in the map's orientation (rows along ``R``)."""
        if R == 0:
            return lambda v: reduce(v, axis)
        return lambda v: reduce(v.mT, axis).mT

    xm = x if R == 0 else x.mT  # the matrix as the map sees it
    sums = {"sum_rows": over(R), "sum_cols": over(K)}
    name = group["map"]
    if name == "row_norm" and needs_centering(name, group.get("center")):
        name = "centered_row_norm"  # C(rn(C(X))) on a shift-symmetric block
    if name == "identity":
        um = xm
    elif name == "row_norm":
        um = row_norm(xm, eps, sum_cols=sums["sum_cols"])
    elif name == "col_norm":
        um = col_norm(xm, eps, sum_rows=sums["sum_rows"])
    elif name == "centered_row_norm":
        um = centered_row_norm(xm, eps, **sums, count=count_R)
    else:  # pragma: no cover - guarded by _path
        raise AssertionError(name)
    u = um if R == 0 else um.mT
    if group["scale"] == "muon":
        u = u * muon_scale(ax.m, ax.n)
    return u


def _gram_update(group, layout: Layout, shape, x: torch.Tensor, geo: _Shard) -> torch.Tensor:
    """right_spectral ``||X||_*^a X (X^T X)^{+1/2}`` on a row shard: all-reduce of the Gram."""
    n = shape[1]
    X = x.to(linalg_dtype(x.dtype))
    stats = torch.cat([X.mT @ X, (X != 0).sum(0, dtype=X.dtype)[None]], 0)  # [n + 1, n]
    _all_reduce(stats, geo.group)
    gram, nonzero_cols = stats[:n], stats[n] > 0
    lam, V, keep = eigh_kept(gram, None)
    P = X @ inv_sqrt_from_eig(lam, V, keep)
    P = P * ((X != 0).any(-1, keepdim=True) & nonzero_cols[None]).to(P.dtype)
    nuc = torch.where(keep, lam.sqrt(), torch.zeros_like(lam)).sum(-1)
    alpha = float(group["alpha"])
    u = (P if alpha == 0.0 else scale_by_nuclear(P[None], nuc[None], alpha)[0]).to(x.dtype)
    if group["scale"] == "muon":
        u = u * muon_scale(*shape)
    return u


def _cost(layout: Layout, shape) -> float:
    B, m, n = layout.logical_shape(shape)
    return float(B) * m * n * max(1, min(m, n))


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Greedy longest-processing-time assignment of matrices to ranks (deterministic:
    ties go to the lower index / lower rank). Returns the owner rank of each matrix."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


@dataclass
class _Item:
    idx: int  # position in the group's params list
    p: Any
    x: torch.Tensor  # local shard (plain tensor)
    geo: _Shard
    layout: Layout


def _gather_updates(run: _Local, group, items: list[_Item]) -> dict[int, torch.Tensor]:
    """Owner scheme: shards -> owner (all_to_all), owner maps whole matrices, rows -> ranks."""
    out: dict[int, torch.Tensor] = {}
    buckets: dict[tuple, list[_Item]] = defaultdict(list)
    for it in items:
        buckets[(id(it.geo.group), it.geo.world, it.x.dtype)].append(it)
    for bucket in buckets.values():
        geo0 = bucket[0].geo
        W, me, pg = geo0.world, geo0.index, geo0.group
        owners = assign_owners([_cost(it.layout, it.p.shape) for it in bucket], W)
        row_numel = [math.prod(it.p.shape[1:]) for it in bucket]
        mine = [j for j, o in enumerate(owners) if o == me]
        # 1. every shard to its matrix's owner
        send_parts, send_splits = [], []
        for d in range(W):
            parts = [bucket[j].x.reshape(-1) for j in range(len(bucket)) if owners[j] == d]
            send_parts += parts
            send_splits.append(sum(t.numel() for t in parts))
        recv_splits = [sum(bucket[j].geo.size(s) * row_numel[j] for j in mine) for s in range(W)]
        dtype = bucket[0].x.dtype
        send = torch.cat(send_parts) if send_parts else bucket[0].x.new_empty(0)
        recv = _all_to_all(send, send_splits, recv_splits, pg, "all_to_all")
        # 2. owners compute whole matrices
        segs = list(torch.split(recv, recv_splits))
        pieces: dict[int, list[torch.Tensor]] = {j: [] for j in mine}
        for s in range(W):
            off = 0
            for j in mine:
                n = bucket[j].geo.size(s) * row_numel[j]
                pieces[j].append(segs[s][off : off + n])
                off += n
        back: dict[int, list[torch.Tensor]] = {s: [] for s in range(W)}
        fulls = [(torch.cat(pieces[j]).reshape(bucket[j].p.shape), bucket[j].layout) for j in mine]
        for j, u in zip(mine, _run_local(run, group, fulls)):
            it = bucket[j]
            for s, rows in enumerate(torch.split(u.to(dtype), [it.geo.size(s) for s in range(W)], dim=0)):
                back[s].append(rows.reshape(-1))
        # 3. each rank its rows of every result
        send2_splits = [sum(t.numel() for t in back[s]) for s in range(W)]
        send2_parts = [t for s in range(W) for t in back[s]]
        send2 = torch.cat(send2_parts) if send2_parts else bucket[0].x.new_empty(0)
        recv2_splits = [sum(bucket[j].x.numel() for j in range(len(bucket)) if owners[j] == d) for d in range(W)]
        recv2 = _all_to_all(send2, send2_splits, recv2_splits, pg, "all_to_all")
        segs2 = list(torch.split(recv2, recv2_splits))
        offs = [0] * W
        for j, it in enumerate(bucket):
            d = owners[j]
            n = it.x.numel()
            out[it.idx] = segs2[d][offs[d] : offs[d] + n].reshape(it.x.shape)
            offs[d] += n
    return out


def _path(group, layout: Layout, p: DTensor, kind: str, geo: _Shard | None) -> str:
    """Which path a parameter takes; a function of global facts only (same on every rank)."""
    if kind != "shard":
        return kind
    assert geo is not None  # _placement_kind: "shard" comes with its geometry
    if _aligned(layout, p.shape, geo):
        return "local"
    name = group["map"]
    centered = needs_centering(name, group.get("center"))
    if name in REDUCE_MAPS and p.ndim == 2 and (not centered or name == "row_norm"):
        return "reduce"
    if (
        name == "right_spectral"
        and not centered
        and p.ndim == 2
        and not group["column_aware"]
        and not layout.transposed
        and layout.fused == 1
        and layout.heads == 1
    ):
        return "gram"
    return "gather"


def param_paths(opt, group) -> dict[str, str]:
    ctx = getattr(opt, "context", opt)
    """``{parameter name: path}`` for a param_group of DTensor parameters (diagnostics)."""
    res = {}
    for p in group["params"]:
        if not isinstance(p, DTensor):
            res[ctx.name_of(p)] = "plain"
            continue
        kind, geo = _placement_kind(p)
        res[ctx.name_of(p)] = _path(group, ctx.layout(group, p), p, kind, geo)
    return res


def sharded_updates(ctx: UpdateContext, group, params: list, momenta: list, local=None) -> list:
    """Update direction of each parameter (before ``-lr``), for a param_group holding DTensor
    parameters; returns DTensors placed like their parameters. See the module docstring.
    ``local``: the executor whole matrices go through (default :class:`LocalExecutor`)."""
    run = _Local(ctx, local if local is not None else LocalExecutor())
    out: list = [None] * len(params)
    gathers: list[_Item] = []
    whole: list[tuple[int, torch.Tensor, Layout]] = []  # whole matrices at hand: one batched call
    for i, (p, x) in enumerate(zip(params, momenta)):
        layout = ctx.layout(group, p)
        if not isinstance(p, DTensor):  # a plain parameter next to sharded ones: replicated
            whole.append((i, x, layout))
            continue
        if not isinstance(x, DTensor) or x.placements != p.placements:
            x = (
                x.redistribute(p.device_mesh, p.placements)
                if isinstance(x, DTensor)
                else DTensor.from_local(x, p.device_mesh, [Replicate()] * p.device_mesh.ndim).redistribute(
                    p.device_mesh, p.placements
                )
            )
        kind, geo = _placement_kind(p)
        path = _path(group, layout, p, kind, geo)
        if path == "fallback":
            _record("fallback_all_gather", (p.device_mesh.size() - 1) * x.to_local().numel() * x.element_size())
            whole.append((i, x.full_tensor(), layout))
            continue
        xl = x.to_local()
        if path == "replicated":
            whole.append((i, xl, layout))
            continue
        assert geo is not None  # every other path is a "shard" one, which has its geometry
        if path == "local":
            whole.append((i, xl, _local_layout(layout, p.shape, geo)))
        elif path == "reduce":
            out[i] = _reduce_update(group, layout, p.shape, xl, geo)
        elif path == "gram":
            out[i] = _gram_update(group, layout, p.shape, xl, geo)
        else:
            gathers.append(_Item(i, p, xl, geo, layout))
    if whole:
        for (i, _, _), u in zip(whole, _run_local(run, group, [(x, lay) for _, x, lay in whole])):
            p = params[i]
            if isinstance(p, DTensor) and _placement_kind(p)[0] == "fallback":
                u = DTensor.from_local(u, p.device_mesh, [Replicate()] * p.device_mesh.ndim).redistribute(
                    p.device_mesh, p.placements
                )
            out[i] = u
    if gathers:
        for idx, u in _gather_updates(run, group, gathers).items():
            out[idx] = u
    for i, p in enumerate(params):
        if isinstance(p, DTensor) and not isinstance(out[i], DTensor):
            out[i] = DTensor.from_local(
                out[i], p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
            )
    return out


def finite_flags(params: list) -> list[bool]:
    """Whether each parameter's gradient is finite on *every* rank (one all-reduce per mesh
    dimension), so that ``on_nonfinite="skip"`` skips the same parameters everywhere."""
    if not params:
        return []
    local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
    flags = torch.stack([torch.isfinite(g).all() for g in local]).to(torch.float32)
    by_mesh: dict[int, list[int]] = defaultdict(list)
    meshes = {}
    for i, p in enumerate(params):
        if isinstance(p.grad, DTensor):
            by_mesh[id(p.grad.device_mesh)].append(i)
            meshes[id(p.grad.device_mesh)] = p.grad.device_mesh
    for key, idx in by_mesh.items():
        mesh = meshes[key]
        sub = flags[idx].clone()
        for d in range(mesh.ndim):
            _all_reduce(sub, mesh.get_group(d), kind="finite_check", op=dist.ReduceOp.MIN)
        flags[idx] = sub
    return [bool(v) for v in flags.tolist()]


def gradient_flags(params: list) -> list[bool]:
    """Per parameter, whether its gradient may be stepped on: :func:`finite_flags`, the same on
    every rank, when a gradient is a DTensor (FSDP2); else
    :func:`equiopt.functional.finite_flags` (one sync; a 2-norm that overflows float32 fails
    too). Both optimizers check with it before a step."""
    if any(isinstance(p.grad, DTensor) for p in params):
        return finite_flags(params)
    return functional_finite_flags([p.grad for p in params])


# =========================================================================================
# communication model (no process group needed)
# =========================================================================================
def _reduce_stats_numel(group, layout: Layout, shape) -> int:
    """Elements all-reduced by :func:`_reduce_update` for one parameter (all stages)."""
    ax = _Axes.of(layout, shape)
    in_axis = 1 - ax.out_axis
    R = in_axis if group["column_aware"] else ax.out_axis
    K = 1 - R
    stages = {"identity": [], "row_norm": [K], "col_norm": [R], "centered_row_norm": [R, K, R]}[group["map"]]
    width = shape[1]
    return sum((ax.parts if ax.split_axis == 0 else 1) * width for axis in stages if axis == 0)


def _naive_bytes(group, world: int, elem_bytes: int, naive: list[float], naive_mat: list[float]) -> None:
    """All-gather every optimizer input of ``group`` (the naive scheme), added per rank."""
    for p in group["params"]:
        geo = _Shard(None, world, 0, p.shape[0] if p.ndim else 1)
        row = math.prod(p.shape[1:]) if p.ndim else 1
        for k in range(world):
            naive[k] += (world - 1) * geo.size(k) * row * elem_bytes
            if group["map"] != "adamw":
                naive_mat[k] += (world - 1) * geo.size(k) * row * elem_bytes


def _gather_bytes(gathers: list, world: int, elem_bytes: int, out: list[float]) -> None:
    """Shards to each matrix's owner and its rows back (the ``gather`` path), per rank."""
    owners = assign_owners([_cost(lay, p.shape) for p, lay, _ in gathers], world)
    for (p, _, geo), o in zip(gathers, owners):
        row = math.prod(p.shape[1:])
        for k in range(world):
            if k != o:
                out[k] += geo.size(k) * row * elem_bytes  # to the owner
            else:
                out[k] += (p.shape[0] - geo.size(k)) * row * elem_bytes  # back


def _matrix_paths_bytes(ctx, group, world: int, elem_bytes: int, by_path, numel_by_path) -> None:
    """Bytes of the matrix paths of one param_group (reduce, gram, gather), per rank."""
    ring = 2 * (world - 1) / world if world > 1 else 0.0
    gathers = []
    for p in group["params"]:
        layout = ctx.layout(group, p)
        geo = _Shard(None, world, 0, p.shape[0])
        path = _path(group, layout, p, "shard", geo) if world > 1 else "local"
        numel_by_path[path] += p.numel()
        if path == "reduce":
            n = _reduce_stats_numel(group, layout, p.shape)
        elif path == "gram":
            n = (p.shape[1] + 1) * p.shape[1]
        else:
            if path == "gather":
                gathers.append((p, layout, geo))
            continue
        for k in range(world):
            by_path[path][k] += ring * n * elem_bytes
    if gathers:
        _gather_bytes(gathers, world, elem_bytes, by_path["gather"])


def estimate_comm(opt, world: int, elem_bytes: int = 4) -> dict:
    """Bytes each rank sends in one optimizer step if every parameter of ``opt`` were sharded
    ``Shard(0)`` over ``world`` ranks (as FSDP2 does), by the rules of :func:`sharded_updates`;
    and the same for the naive scheme (all-gather every optimizer input, update everything
    everywhere). Needs only global shapes: ``opt`` may hold meta tensors.

    Returns ``{"ours": [bytes per rank], "naive": [...], "naive_matrices": [...],
    "by_path": {path: [bytes per rank]}, "numel_by_path": {path: elements}}``. Same
    conventions as :class:`CommStats` (``finite_check`` included in ``ours``).
    """
    by_path: dict[str, list[float]] = defaultdict(lambda: [0.0] * world)
    numel_by_path: dict[str, int] = defaultdict(int)
    naive, naive_mat = [0.0] * world, [0.0] * world
    ring = 2 * (world - 1) / world if world > 1 else 0.0
    for group in opt.param_groups:
        if not group["params"]:
            continue
        _naive_bytes(group, world, elem_bytes, naive, naive_mat)
        for k in range(world):
            by_path["finite_check"][k] += ring * len(group["params"]) * 4
        if group["map"] == "adamw":
            numel_by_path["adamw (local)"] += sum(p.numel() for p in group["params"])
            continue
        _matrix_paths_bytes(opt.context, group, world, elem_bytes, by_path, numel_by_path)
    ours = [sum(vals[k] for vals in by_path.values()) for k in range(world)]

    def rnd(v: list[float]) -> list[int]:
        return [int(round(x)) for x in v]

    return {
        "ours": rnd(ours),
        "naive": rnd(naive),
        "naive_matrices": rnd(naive_mat),
        "by_path": {k: rnd(v) for k, v in by_path.items()},
        "numel_by_path": dict(numel_by_path),
    }


# =========================================================================================
# DDP: optional spreading of the spectral maps over ranks
# =========================================================================================
def spread_spectral(opt, process_group=None, maps: Iterable[str] = SPECTRAL_MAPS):
    """Under DDP, let each rank compute the spectral maps of only the matrices it owns
    (greedy by cost, as for FSDP2) and share the results with one ``all_to_all`` per
    param_group, instead of every rank computing every map. Returns ``opt``.

    Only worth it when the maps dominate the step and the interconnect is fast; see
    ``results/comm.md`` for the measurement on 2 CPU processes. Plain (non-DTensor)
    parameters only; DTensor groups keep :func:`sharded_updates`.
    """
    if not isinstance(opt.executor, SpreadExecutor):
        opt.executor = SpreadExecutor(process_group, maps)
    return opt


class ShardedExecutor:
    """DTensor param_groups through :func:`sharded_updates`, plain ones through ``local``
    (the optimizer's default executor: it covers one process, DDP and FSDP2 alike)."""

    def __init__(self, local=None):
        self.local = local if local is not None else LocalExecutor()

    def updates(self, ctx: UpdateContext, group, params, momenta) -> list[torch.Tensor]:
        if any(isinstance(p, DTensor) for p in params):
            return sharded_updates(ctx, group, params, momenta, self.local)
        return self.local.updates(ctx, group, params, momenta)


class SpreadExecutor:
    """Under DDP: each rank maps only the matrices it owns, results shared by all_to_all
    (see :func:`spread_spectral`); other groups go to ``inner``."""

    def __init__(self, process_group=None, maps: Iterable[str] = SPECTRAL_MAPS, inner=None):
        self.process_group = process_group
        self.maps = frozenset(maps)
        self.inner = inner if inner is not None else ShardedExecutor()

    def __getstate__(self):  # a process group does not pickle: a copy spreads over WORLD
        return {**self.__dict__, "process_group": None}

    def updates(self, ctx: UpdateContext, group, params, momenta) -> list[torch.Tensor]:
        pg = self.process_group
        if (
            group["map"] in self.maps
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(pg) > 1
            and not any(isinstance(p, DTensor) for p in params)
        ):
            return _spread_updates(_Local(ctx, self.inner.local), group, params, momenta, pg)
        return self.inner.updates(ctx, group, params, momenta)


def _spread_updates(run: _Local, group, params, momenta, pg) -> list[torch.Tensor]:
    W, me = dist.get_world_size(pg), dist.get_rank(pg)
    layouts = [run.ctx.layout(group, p) for p in params]
    owners = assign_owners([_cost(lay, p.shape) for lay, p in zip(layouts, params)], W)
    out: list = [None] * len(params)
    by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
    for i, x in enumerate(momenta):
        by_dtype[x.dtype].append(i)
    for dtype, idx in by_dtype.items():
        mine = [i for i in idx if owners[i] == me]
        if mine:  # the local path (fast path when enabled) on the owned subset
            us = run.executor.updates(run.ctx, group, [params[i] for i in mine], [momenta[i] for i in mine])
            for i, u in zip(mine, us):
                out[i] = u.to(dtype)
        own = torch.cat([out[i].reshape(-1) for i in mine]) if mine else momenta[idx[0]].new_empty(0)
        sizes = [sum(momenta[i].numel() for i in idx if owners[i] == d) for d in range(W)]
        send = own.repeat(W)
        recv = _all_to_all(send, [own.numel()] * W, sizes, pg, "all_to_all")
        segs = list(torch.split(recv, sizes))
        offs = [0] * W
        for i in idx:
            d = owners[i]
            n = momenta[i].numel()
            if d != me:
                out[i] = segs[d][offs[d] : offs[d] + n].reshape(momenta[i].shape)
            offs[d] += n
    return out
