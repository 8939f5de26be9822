"""equiopt under torch.distributed: process groups, model wrapping (DDP / FSDP2), building
the optimizer for a wrapped model, gradient norms, and distributed checkpoints.

How the update maps run on shards lives in :mod:`equiopt.sharding` (re-exported here).
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .optimizer import EquiOptimizer
from .planner import plan as _plan
from .planner import unwrap  # re-exported: the user's module inside DDP / torch.compile
from .sharding import (  # re-exported for existing callers
    REDUCE_MAPS,
    CommStats,
    _all_reduce,
    assign_owners,
    count_comm,
    estimate_comm,
    finite_flags,
    param_paths,
    sharded_updates,
    spread_spectral,
)

__all__ = [
    "sharded_updates",
    "finite_flags",
    "spread_spectral",
    "count_comm",
    "CommStats",
    "estimate_comm",
    "assign_owners",
    "param_paths",
    "DistInfo",
    "init_from_env",
    "cleanup",
    "wrap_model",
    "unwrap",
    "plan",
    "build",
    "is_rank0",
    "print0",
    "mean_over_ranks",
    "grad_norm",
    "clip_grad_norm_",
    "barrier",
    "save_checkpoint",
    "load_checkpoint",
    "has_checkpoint",
    "REDUCE_MAPS",
]


# =========================================================================================
# harness pieces
# =========================================================================================
@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. ``world_size == 1`` and ``initialized == False`` when the
    program was not started by torchrun (then every helper here is a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    initialized: bool = False

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def init_from_env(backend: str | None = None, timeout_s: float = 600.0, device: str | None = None) -> DistInfo:
    """Initialize the default process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    ``backend`` defaults to ``"nccl"`` when CUDA is available and ``device`` is not
    ``"cpu"``, else ``"gloo"``. On CUDA the process is bound to ``cuda:LOCAL_RANK``. Without
    torchrun's variables (``WORLD_SIZE`` unset) nothing is initialized and a single-process
    :class:`DistInfo` is returned. Calling it again returns the current state.
    """
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if "WORLD_SIZE" not in os.environ or not dist.is_available():
        dev = torch.device("cuda" if use_cuda else "cpu") if device is None else torch.device(device)
        return DistInfo(device=dev)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        kw: dict[str, Any] = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend(), True)


def cleanup() -> None:
    """Destroy the default process group (end of a torchrun program)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank0() -> bool:
    """True on global rank 0 and in a single process."""
    return _world()[0] == 0


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushes)."""
    if is_rank0():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def mean_over_ranks(value: float | torch.Tensor) -> float:
    """Mean of a scalar over all ranks (for logging a loss); the value itself in one process."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).clone()
    rank, world = _world()
    if world > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        t /= world
    return float(t.item())


def grad_norm(parameters: Iterable[torch.Tensor]) -> float:
    """Global L2 norm of the gradients, the same number on every rank: DTensor gradients
    (FSDP2) sum their shards' squares over the sharded mesh dimensions (one all-reduce per
    mesh and placement pattern), plain gradients (one process, DDP: already averaged and
    identical on every rank) count once. Parameters without a gradient (or repeated) are
    skipped. Float64 accumulation."""
    seen: set[int] = set()
    plain = torch.zeros((), dtype=torch.float64)
    sharded: dict[tuple, list] = {}
    for p in parameters:
        if p.grad is None or id(p) in seen:
            continue
        seen.add(id(p))
        g = p.grad.detach()
        if isinstance(g, DTensor):
            dims = tuple(i for i, pl in enumerate(g.placements) if pl.is_shard())
            if any(not (pl.is_shard() or pl.is_replicate()) for pl in g.placements):
                plain = plain + g.full_tensor().double().square().sum().cpu()
                continue
            key = (id(g.device_mesh), dims)
            entry = sharded.setdefault(
                key, [g.device_mesh, dims, torch.zeros((), dtype=torch.float64, device=g.to_local().device)]
            )
            entry[2] = entry[2] + g.to_local().double().square().sum()
        else:
            plain = plain + g.double().square().sum().cpu()
    total = float(plain)
    for mesh, dims, sq in sharded.values():
        sq = sq.reshape(1).clone()
        for d in dims:
            _all_reduce(sq, mesh.get_group(d), kind="grad_norm")
        total += float(sq.item())
    return math.sqrt(total)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, eps: float = 1e-6) -> float:
    """Scale the gradients in place so that their global norm (:func:`grad_norm`) is at most
    ``max_norm`` (torch's rule: factor ``min(1, max_norm / (norm + eps))``); returns the norm
    before clipping. Works for plain, DDP and FSDP2 (DTensor) gradients alike."""
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params)
    coef = max_norm / (total + eps)
    if coef < 1.0:
        for p in {id(p): p for p in params}.values():
            assert p.grad is not None  # params: those with a gradient (above)
            p.grad.detach().mul_(coef)
    return total


def _block_modules(model: nn.Module) -> list[nn.Module]:
    """Children of the outermost ``nn.ModuleList`` s (transformer blocks in HF and nanoGPT-style
    models): the FSDP2 units under the root."""
    found: list[nn.Module] = []
    inside: set[str] = set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, nn.ModuleList):
            inside.add(name)
            found.extend(m)
    return found


def wrap_model(
    model: nn.Module,
    mode: str,
    info: DistInfo | None = None,
    *,
    units: Iterable[nn.Module] | None = None,
    mesh=None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """Wrap ``model`` (already on its device: the device of its parameters picks the mesh /
    DDP device) for data-parallel training. ``info`` is accepted for symmetry and unused.

    * ``"none"``: returned as is.
    * ``"ddp"``: ``DistributedDataParallel`` (``device_ids=[local_rank]`` on CUDA). Build the
      optimizer with :func:`build` (it plans the inner module).
    * ``"fsdp2"``: ``fully_shard`` on each block (``units``; default: the children of the
      outermost ``nn.ModuleList`` s, i.e. the transformer layers), then on the root. Parameters
      become ``DTensor`` s sharded on dim 0; build the optimizer *after* this call.
      ``param_dtype`` / ``reduce_dtype`` set a ``MixedPrecisionPolicy`` (e.g. bf16 / fp32 on GPU).
    """
    if mode in (None, "none"):
        return model
    # the model's own device decides (a CPU model on a CUDA machine stays on CPU / gloo)
    dev = next(model.parameters()).device
    if mode == "ddp":
        dev_ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=dev_ids, find_unused_parameters=find_unused_parameters
        )
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if mesh is None:  # fully_shard's default mesh would take the accelerator even for a CPU model
            mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
        kw: dict = {"reshard_after_forward": reshard_after_forward, "mesh": mesh}
        if param_dtype is not None or reduce_dtype is not None:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for unit in list(units) if units is not None else _block_modules(model):
            fully_shard(unit, **kw)
        fully_shard(model, **kw)
        return model
    raise ValueError(f"wrap_model: mode must be 'none', 'ddp' or 'fsdp2', got {mode!r}")


def plan(model: nn.Module, preset: str = "paper", **kwargs):
    """:func:`equiopt.plan`, which plans DDP (``.module``) and FSDP2 models (global shapes,
    entries holding the DTensor parameters) as they are; kept for existing callers."""
    return _plan(model, preset, **kwargs)


def build(model: nn.Module, preset: str | None = None, **kwargs):
    """:func:`equiopt.build` for DDP / FSDP2 models (see :func:`plan`). With
    ``spread=True`` (DDP only) the spectral maps are spread over ranks (:func:`spread_spectral`)."""
    spread = kwargs.pop("spread", False)
    pl = plan(model, preset or "paper", **kwargs)
    opt = EquiOptimizer(pl.param_groups(), layouts=pl.layouts(), names=pl.names())
    if spread:
        spread_spectral(opt)
    return opt


# -- distributed checkpointing ------------------------------------------------------------
_EXTRA = "extra.pt"
_RANK_EXTRA = "rank{}.pt"


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer=None,
    extra: Mapping | None = None,
    rank_extra: Mapping | None = None,
) -> Path:
    """Save model and optimizer with ``torch.distributed.checkpoint`` into directory ``path``.

    Works for a plain model (one process), DDP and FSDP2 alike (each rank writes its own
    shards; tensors are stored under their unwrapped parameter names, so a checkpoint loads
    into another world size or wrapping). ``extra`` (picklable; step, scheduler and data
    state, config) is written once by rank 0; ``rank_extra`` (e.g. this rank's RNG state) is
    written by each rank to ``rank{r}.pt``. Every rank must call it.

    Atomic for a reader: everything is written to ``<path>.tmp``; after all ranks finished,
    rank 0 swaps it in (the previous checkpoint survives a crash during the save). ``path``
    must be on a filesystem every rank sees (one node, or a shared filesystem). Returns ``path``.
    """
    import torch.distributed.checkpoint as dcp  # heavy (pulls the planner stack): only for a save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    rank, world = _world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    dcp.save(state, checkpoint_id=str(tmp))
    if rank == 0 and extra is not None:
        torch.save(dict(extra), tmp / _EXTRA)
    if rank_extra is not None:
        torch.save(dict(rank_extra), tmp / _RANK_EXTRA.format(rank))
    barrier()
    if rank == 0:
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def _saved_only(osd: dict, path: Path) -> dict:
    """Drop optimizer-state entries the checkpoint does not hold. ``get_state_dict`` fills a
    fresh optimizer's state by a zero-gradient step over *every* parameter, while a parameter
    that never had a gradient (unused in the forward) has no state in the saved run."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    states = osd.get("state", {})
    for fqn in list(states):
        entry = states[fqn]
        for key in list(entry):
            if f"optim.state.{fqn}.{key}" not in saved:
                del entry[key]
        if not entry:
            del states[fqn]
    return osd


def has_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete :func:`save_checkpoint` (also after a crash between
    the two renames of the swap: then the previous one is at ``<path>.old``, see
    :func:`load_checkpoint`)."""
    path = Path(path)
    return (path / ".metadata").exists() or (path.with_name(path.name + ".old") / ".metadata").exists()


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer=None) -> tuple[dict, dict]:
    """Load a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``), which must
    be wrapped and built exactly as when training (DDP / FSDP2, optimizer built after
    wrapping). Returns ``(extra, rank_extra)`` (empty dicts when absent)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    path = Path(path)
    if not (path / ".metadata").exists() and (path.with_name(path.name + ".old") / ".metadata").exists():
        path = path.with_name(path.name + ".old")  # a crash between the two renames of the swap
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": _saved_only(osd, path)}
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"])
    else:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(model, state["model"])
        # strict=False: parameters that never had a gradient have no saved state
        set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(strict=False))
    rank, _ = _world()
    extra = torch.load(path / _EXTRA, weights_only=False) if (path / _EXTRA).exists() else {}
    rfile = path / _RANK_EXTRA.format(rank)
    rank_extra = torch.load(rfile, weights_only=False) if rfile.exists() else {}
    return extra, rank_extra
