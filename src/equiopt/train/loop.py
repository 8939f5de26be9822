"""One training entry for every architecture family: ``train(TrainConfig)``.

A run directory holds::

    config.json     the resolved configuration (every default filled in)
    env.json        git revision, package versions, threads, platform
    plan.txt        the optimizer plan (role, map, lr, weight decay per parameter)
    metrics.jsonl   one JSON record per evaluation (and one "diverged" record if it diverged)
    checkpoint.pt   model, optimizer, scheduler, sampler, RNG and metric-window state
    final.json      status ("done" | "diverged") and the last evaluation

Checkpoints are written to a temporary file and renamed, every ``ckpt_every`` steps and at
the end. ``resume=True`` reloads the checkpoint, truncates ``metrics.jsonl`` to the
checkpointed step and continues; batches are a pure function of (seed, step), so a resumed
run logs the same metrics as an uninterrupted one (timing fields aside). A non-finite loss
(or gradient) stops the run with :class:`TrainingDiverged`; the last good checkpoint stays.

Multi-process (``dist="ddp"|"fsdp2"``, started by torchrun, one process per device): every
rank builds the same model (same seed), wraps it (:func:`equiopt.distributed.wrap_model`) and
trains on its slice ``[r B/W, (r+1) B/W)`` of the same global batch, so the run matches one
process with batch ``B``. Logged losses and gradient norms are global (collectives), every
rank evaluates the full eval set, only rank 0 writes files and logs. The checkpoint is a
``torch.distributed.checkpoint`` directory ``checkpoint/`` (per-rank RNG state inside);
resume needs the same world size. Single-process runs keep ``checkpoint.pt``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed as Dd
from ..presets import PRESETS
from . import data as D
from . import metrics as M
from .models import ModelConfig, build_model, preset

# The muon preset's full spec (map, learning rate, momentum, scale) for the hidden-matrix roles.
_MUON_HIDDEN = {role: dict(PRESETS["muon"][role]) for role in ("mlp_in", "mlp_out", "expert_in", "expert_out")}

# optimizer name -> (equiopt preset, rules). Ablations are the paper stack with one block
# family changed: AdamW there (equiopt gives an "adamw" rule the AdamW preset's learning rate
# for that role), or Muon's map and hyperparameters on the MLP / expert matrices.
OPTIMIZERS: dict[str, tuple[str, dict[str, str | dict]]] = {
    "adamw": ("adamw", {}),
    "muon": ("muon", {}),
    "paper": ("paper", {}),
    "paper-adamw-embed-head": ("paper", {"embedding": "adamw", "lm_head": "adamw",
                                         "tied_embedding": "adamw"}),
    "paper-adamw-router": ("paper", {"router": "adamw"}),
    "paper-left-spectral-router": ("paper", {"router": "left_spectral"}),
    "paper-muon-mlp": ("paper", _MUON_HIDDEN),
}
ROUTER_ONLY = ("paper-adamw-router", "paper-left-spectral-router")  # no-ops on dense models
SCHEDULES = ("cosine", "constant", "wsd")
DIST_MODES = ("none", "ddp", "fsdp2")
MODEL_OVERRIDES = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                   "head_dim", "num_experts", "top_k", "sliding_window", "vocab_size")


class TrainingDiverged(RuntimeError):
    """The loss (or a gradient) became non-finite; the run's last good checkpoint is kept."""


@dataclass
class TrainConfig:
    arch: str = "qwen3"
    size: str = "tiny"
    optimizer: str = "paper"
    lr_scale: float = 1.0  # multiplies every role's preset learning rate
    role_lr_scale: dict[str, float] = field(default_factory=dict)  # per-role extra multipliers
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    warmup: int = -1  # linear warm-up steps; -1 = 10% of steps
    schedule: str = "cosine"  # cosine decay to min_lr_ratio; wsd: constant then linear decay (last 20%)
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0  # 0 = off
    eval_every: int = 50
    eval_tokens: int = 16384
    ckpt_every: int = 100  # 0 = only at the end
    keep_checkpoint: bool = True  # False: delete checkpoint.pt after a successful run
    seed: int = 0
    aux_loss: bool = False
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    device: str = "cpu"  # "cpu" (float32) or "cuda[:i]" (float32 weights, bfloat16 autocast)
    dist: str = "none"  # "ddp" | "fsdp2": multi-process under torchrun (cuda: this rank's local GPU)
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the size preset
    data: D.DataConfig = field(default_factory=D.DataConfig)
    out: str = "runs/train"

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["data"] = D.DataConfig(**d.get("data", {}))
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.dist not in DIST_MODES:
            raise ValueError(f"unknown dist mode {self.dist!r}; choose one of {', '.join(DIST_MODES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.warmup == -1 or 0 <= self.warmup <= self.steps):
            raise ValueError(f"warmup must be -1 (auto: 10% of steps) or in [0, steps={self.steps}], got {self.warmup}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:index]', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: torch sees no CUDA device on this machine")
        if self.ckpt_every < 0 or self.grad_clip < 0 or self.threads < 0:
            raise ValueError("ckpt_every, grad_clip and threads must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (self.lr_scale > 0 and math.isfinite(self.lr_scale)):
            raise ValueError(f"lr_scale must be a positive number, got {self.lr_scale}")
        import equiopt

        for role, v in self.role_lr_scale.items():
            if role not in equiopt.ROLES:
                raise ValueError(f"role_lr_scale: unknown role {role!r}; roles: {', '.join(equiopt.ROLES)}")
            if not v > 0:
                raise ValueError(f"role_lr_scale[{role!r}] must be positive, got {v}")
        unknown = set(self.model) - set(MODEL_OVERRIDES)
        if unknown:
            raise ValueError(f"unknown model override(s) {sorted(unknown)}; valid: {', '.join(MODEL_OVERRIDES)}")
        self.model_config(vocab_size=self.model.get("vocab_size", 4096)).validate()
        self.data.validate()

    @property
    def warmup_steps(self) -> int:
        return self.steps // 10 if self.warmup == -1 else self.warmup

    def model_config(self, vocab_size: int) -> ModelConfig:
        mc = preset(self.arch, self.size)
        mc = dataclasses.replace(mc, vocab_size=vocab_size, max_seq_len=self.seq_len, aux_loss=self.aux_loss,
                                 **{k: v for k, v in self.model.items() if k != "vocab_size"})
        if mc.layer_types is not None and len(mc.layer_types) != mc.num_layers:
            pattern = mc.layer_types
            mc.layer_types = [pattern[i % len(pattern)] for i in range(mc.num_layers)]
            mc.layer_types[-1] = "full_attention"
        return mc


def config_diff(saved: dict, mine: dict) -> list[str]:
    """Fields (but ``out``) whose values differ; a field the saved config predates counts as
    holding its default, so runs recorded by an older harness still match."""
    defaults = TrainConfig().to_dict()
    diff = []
    for k in sorted(set(saved) | set(mine)):
        if k == "out":
            continue
        a, b = saved.get(k, defaults.get(k)), mine.get(k, defaults.get(k))
        if isinstance(a, dict) and isinstance(b, dict) and k == "data":
            dd = D.DataConfig().__dict__
            a, b = {**dd, **a}, {**dd, **b}
        if a != b:
            diff.append(k)
    return diff


# ----------------------------------------------------------------------------- optimizer


def make_optimizer(model: torch.nn.Module, name: str, lr_scale: float = 1.0,
                   role_lr_scale: dict[str, float] | None = None):
    """(optimizer, plan) for one of ``OPTIMIZERS``; learning rates = preset x lr_scale x role scale."""
    import equiopt

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    preset_name, rules = OPTIMIZERS[name]
    scale = {r: lr_scale * (role_lr_scale or {}).get(r, 1.0) for r in equiopt.ROLES}
    plan = equiopt.plan(model, preset_name, rules=rules or None, lr_scale=scale)
    return equiopt.build(plan), plan


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """LR multiplier at ``step``: linear warm-up, then cosine / constant / warmup-stable-decay."""
    warm = cfg.warmup_steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        rest = max(1, cfg.steps - warm)
        t = min(1.0, (step - warm) / rest)
        if cfg.schedule == "cosine":
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        decay_start = 0.8  # wsd
        if t < decay_start:
            return 1.0
        return 1.0 - (1 - cfg.min_lr_ratio) * (t - decay_start) / (1 - decay_start)
    return f


# ----------------------------------------------------------------------------- routers


def _router_logits(output, num_experts: int, where: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor) and output.shape[-1] == num_experts:
        return output
    if isinstance(output, (tuple, list)):
        for o in output:
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.shape[-1] == num_experts:
                return o
    raise RuntimeError(f"router module {where!r}: no [..., {num_experts}] logits tensor in its output")


class RouterProbe:
    """Forward hooks on every router module of the plan (role "router"), recording logits."""

    def __init__(self, model: torch.nn.Module, plan, top_k: int):
        self.modules = {}
        for e in plan.entries:
            if e.role == "router":
                self.modules[e.module_name] = (dict(model.named_modules())[e.module_name], e.shape[0])
        if self.modules and top_k < 1:
            raise RuntimeError("the plan has routers but the model config has no num_experts_per_tok")
        self.top_k = top_k
        self.stats: dict[str, M.RoutingStats] = {}
        self._handles = []

    def __enter__(self):
        self.stats = {n: M.RoutingStats(E, self.top_k) for n, (_, E) in self.modules.items()}
        for n, (mod, E) in self.modules.items():
            def hook(module, args, output, n=n, E=E):
                self.stats[n].update(_router_logits(output, E, n))
            self._handles.append(mod.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def compute(self) -> tuple[dict, dict]:
        per_layer = {n: s.compute() for n, s in self.stats.items()}
        return per_layer, M.average_layers(per_layer)


# ----------------------------------------------------------------------------- run records


def git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True)
    except FileNotFoundError:
        return "unknown (git not installed)"
    if rev.returncode != 0:
        return "unknown (not a git checkout)"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    from importlib import metadata

    versions = {}
    for pkg in ("equiopt", "torch", "transformers", "tokenizers", "numpy", "scipy", "matplotlib", "tqdm"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"git_revision": git_revision(), "python": sys.version.split()[0], "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(), "packages": versions}


def _write_json(path: Path, obj) -> None:
    D._atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"].cpu())
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def save_checkpoint(path: Path, state: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the loop


class _Window:
    """Training statistics between two evaluations."""

    def __init__(self):
        self.loss_sum = self.aux_sum = 0.0
        self.steps = self.tokens = 0
        self.train_time = self.opt_time = 0.0
        self.gnorm_sum, self.gnorm_max = 0.0, 0.0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        self.__dict__.update(d)


def _autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, windows: D.Windows, idx: np.ndarray, batch_size: int, probe: RouterProbe | None,
             device: str = "cpu") -> dict:
    model.eval()
    total, count = 0.0, 0
    lstats = M.LogitStats()
    ctx = probe if probe is not None and probe.modules else None
    if ctx:
        ctx.__enter__()
    try:
        for a in range(0, len(idx), batch_size):
            t = windows.get(idx[a: a + batch_size]).to(device)
            with _autocast(device):
                logits = model(input_ids=t[:, :-1]).logits.float()
            y = t[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
            count += y.numel()
            lstats.update(logits)
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    model.train()
    out = {"val_loss": total / count, "val_tokens": count, "logits": lstats.compute()}
    if ctx:
        per_layer, avg = probe.compute()
        out["routing"] = avg
        out["routing_layers"] = per_layer
    return out


RUN_FILES = ("config.json", "env.json", "plan.txt", "metrics.jsonl", "checkpoint.pt", "final.json")
DIST_CKPT = "checkpoint"  # multi-process runs: a torch.distributed.checkpoint directory
RUN_DIRS = (DIST_CKPT, DIST_CKPT + ".old")


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Create ``out``; refuse to clobber a run unless ``resume`` or ``overwrite`` says what to do."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    if out.exists():
        foreign = [p.name for p in out.iterdir()
                   if p.name not in RUN_FILES + RUN_DIRS and not p.name.endswith(".tmp")]
        if foreign:
            raise FileExistsError(f"--out {out} holds files that are not an equiopt run ({foreign[:3]}); "
                                  "choose another directory")
        if (out / "config.json").exists():
            if overwrite:
                for name in RUN_FILES:
                    (out / name).unlink(missing_ok=True)
                for name in RUN_DIRS:
                    if (out / name).is_dir():
                        import shutil

                        shutil.rmtree(out / name)
            elif not resume:
                raise FileExistsError(
                    f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    out.mkdir(parents=True, exist_ok=True)


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, prepared: D.Prepared | None = None,
          stop_after: int | None = None) -> dict:
    """Run (or resume) one training run; returns the final record (also in ``final.json``).

    ``stop_after`` ends the process-equivalent of a kill after that many steps (tests):
    nothing is written beyond what a killed run would have written.

    With ``cfg.dist`` "ddp" or "fsdp2" every torchrun process calls this; the process group
    is initialized from torchrun's environment (and destroyed at the end if it was made here).
    """
    cfg.validate()
    if cfg.dist == "none":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"started by torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']} but dist='none': "
                             "pass --dist ddp or --dist fsdp2 (otherwise every rank would train the same run)")
        return _train(cfg, None, resume=resume, overwrite=overwrite, progress=progress, log=log,
                      prepared=prepared, stop_after=stop_after)
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(f"dist={cfg.dist!r} needs torchrun, e.g. torchrun --standalone --nproc_per_node=2 "
                         f"-m equiopt train --dist {cfg.dist} ...")
    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = Dd.init_from_env(timeout_s=float(os.environ.get("EQUIOPT_DIST_TIMEOUT", 1800)),
                            device="cpu" if cfg.device == "cpu" else None)
    try:
        if cfg.batch_size % info.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {info.world_size}: "
                             "each rank trains on batch_size / world_size sequences of the global batch")
        if info.rank != 0:
            log, progress = (lambda m: None), False
        return _train(cfg, info, resume=resume, overwrite=overwrite, progress=progress, log=log,
                      prepared=prepared, stop_after=stop_after)
    finally:
        if owned:
            Dd.cleanup()


def _rank0_first(info, fn: Callable[[], Any]):
    """Run ``fn`` on rank 0, then (after a barrier) on the other ranks; an exception on rank 0
    is raised on every rank (no rank waits for a collective that never comes)."""
    if info is None:
        return fn()
    err, result = None, None
    if info.rank == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            err = e
    flag = [None if err is None else f"{type(err).__name__}: {err}"]
    torch.distributed.broadcast_object_list(flag, src=0)
    if err is not None:
        raise err
    if flag[0] is not None:
        raise RuntimeError(f"rank 0 failed: {flag[0]}")
    if info.rank != 0:
        result = fn()
    return result


def _train(cfg: TrainConfig, info, *, resume: bool, overwrite: bool, progress: bool,
           log: Callable[[str], None], prepared: D.Prepared | None, stop_after: int | None) -> dict:
    """``train`` for one process (``info`` None) or one rank of a torchrun group."""
    rank0 = info is None or info.rank == 0
    world = 1 if info is None else info.world_size
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt" if info is None else out / DIST_CKPT
    resuming = False

    def setup():
        nonlocal resuming
        if rank0:
            _prepare_out(out, resume, overwrite)
        resuming = resume and (ckpt_path.exists() if info is None else Dd.has_checkpoint(ckpt_path))
        if resuming:
            saved = json.loads((out / "config.json").read_text())
            mine = cfg.to_dict()
            diff = config_diff(saved, mine)
            if diff:
                raise ValueError(f"--resume: the configuration differs from the checkpointed run in {diff}")
        return prepared or D.prepare(cfg.data, log=log)

    prep = _rank0_first(info, setup)
    device = cfg.device if info is None else str(info.device)
    train_w = D.Windows(prep.train, cfg.seq_len)
    val_w = D.Windows(prep.val, cfg.seq_len)
    sampler = D.BatchSampler(train_w, cfg.batch_size, cfg.seed)
    eval_idx = D.eval_windows(val_w, cfg.eval_tokens)

    mcfg = cfg.model_config(prep.vocab_size)
    model = build_model(mcfg, seed=cfg.seed).to(device)
    if info is not None:
        # MoE: an expert no token of this rank's slice reached has no gradient on this rank
        model = Dd.wrap_model(model, cfg.dist, find_unused_parameters=mcfg.is_moe)
    inner = Dd.unwrap(model)  # the model itself (its config, its module names)
    opt, plan = make_optimizer(model, cfg.optimizer, cfg.lr_scale, cfg.role_lr_scale)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    top_k = int(getattr(inner.config, "num_experts_per_tok", 0) or 0)
    probe = RouterProbe(inner, plan, top_k)
    eval_model = inner if cfg.dist == "ddp" else model  # FSDP2: forwards through the sharded root
    if mcfg.is_moe and not probe.modules:
        raise RuntimeError(f"{cfg.arch}: the plan found no router parameters in an MoE model")
    window, loss_spikes, gnorm_spikes = _Window(), M.SpikeDetector(), M.SpikeDetector(rel=4.0)

    def stateful() -> dict:  # looked up at call time: the window is replaced after every evaluation
        return {"scheduler": sched, "window": window, "loss_spikes": loss_spikes, "gnorm_spikes": gnorm_spikes}

    def run_state(step: int) -> dict:
        """What a checkpoint holds besides model, optimizer and RNG (same keys on both paths)."""
        return {"step": step, "sampler": sampler.state_dict(step), "config": cfg.to_dict(),
                **{k: obj.state_dict() for k, obj in stateful().items()}}

    def restore(state: dict) -> int:
        """Load :func:`run_state`'s part of a checkpoint; returns the step to continue from."""
        for k, obj in stateful().items():
            obj.load_state_dict(state[k])
        sampler.check_state(state["sampler"])
        return state["step"]

    def trim_metrics(start: int) -> None:
        """Drop the metrics logged after the checkpoint (they are recomputed on resume)."""
        kept = [r for r in read_metrics(out) if r.get("step", 0) <= start and "event" not in r]
        D._atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        (out / "final.json").unlink(missing_ok=True)

    start = 0
    if resuming and info is not None:
        extra, rank_extra = Dd.load_checkpoint(ckpt_path, model, opt)
        if extra.get("world_size") != world:
            raise ValueError(f"--resume: {ckpt_path} was written by {extra.get('world_size')} processes, "
                             f"this run has {world}; resume with --nproc_per_node x nodes = {extra.get('world_size')}")
        _set_rng_state(rank_extra["rng"])
        start = restore(extra)
        if rank0:
            trim_metrics(start)
        log(f"[train] resumed {out} at step {start} ({world} processes, {cfg.dist})")
    elif resuming:
        state = torch.load(ckpt_path, weights_only=False, map_location=cfg.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start = restore(state)
        trim_metrics(start)
        log(f"[train] resumed {out} at step {start}")
    elif rank0:
        (out / "metrics.jsonl").write_text("")
        _write_json(out / "config.json", cfg.to_dict())
        _write_json(out / "env.json", {**environment(), "model_config": mcfg.to_dict(), "data": prep.info,
                                       "parameters": sum(e.param.numel() for e in plan.entries),
                                       "world_size": world, "dist": cfg.dist,
                                       "backend": None if info is None else info.backend})
        D._atomic_write_text(out / "plan.txt", str(plan) + "\n")

    def checkpoint(step: int) -> None:
        if info is not None:
            Dd.save_checkpoint(ckpt_path, model, opt, extra={**run_state(step), "world_size": world, "dist": cfg.dist},
                               rank_extra={"rng": _rng_state()})
            return
        save_checkpoint(ckpt_path, {**run_state(step), "model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "rng": _rng_state()})

    def diverged(step: int, what: str) -> None:
        if info is not None:  # every rank gets here (global loss / finite flags); rank 0 writes
            extra = ckpt_path / "extra.pt"
            good = torch.load(extra, weights_only=False)["step"] if extra.exists() else None
        else:
            good = torch.load(ckpt_path, weights_only=False)["step"] if ckpt_path.exists() else None
        msg = (f"run {out} diverged: {what} at step {step} (optimizer {cfg.optimizer}, lr_scale "
               f"{cfg.lr_scale:g}). " + (f"The last good checkpoint (step {good}) is kept in {ckpt_path}."
                                         if good is not None else "No checkpoint had been written yet."))
        if rank0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"event": "diverged", "step": step, "message": msg}) + "\n")
            _write_json(out / "final.json", {"status": "diverged", "step": step, "message": msg,
                                             "val_loss": None, "config": cfg.to_dict()})
        raise TrainingDiverged(msg)

    from tqdm import tqdm

    wall0, cpu0 = time.time(), time.process_time()
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, leave=False, dynamic_ncols=True,
               desc=f"{cfg.arch}/{cfg.optimizer}/s{cfg.seed}")
    import equiopt

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    per_rank = cfg.batch_size // world
    lo, hi = (0, cfg.batch_size) if info is None else (info.rank * per_rank, (info.rank + 1) * per_rank)
    last = None
    model.train()
    for step in range(start, cfg.steps):
        if stop_after is not None and step - start >= stop_after:
            bar.close()
            return {"status": "stopped", "step": step}
        t0 = time.perf_counter()
        x, y = (t[lo:hi].to(device) for t in sampler.batch(step))
        with _autocast(device):
            outp = model(input_ids=x)
        logits = outp.logits
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss = ce
        aux = getattr(outp, "aux_loss", None)
        if cfg.aux_loss:
            if aux is None:
                raise RuntimeError(f"{cfg.arch}: aux_loss=True but the model returned no aux_loss")
            loss = ce + inner.config.router_aux_loss_coef * aux
        if info is None:
            lval, total = float(ce.detach()), float(loss.detach())
        else:  # means over ranks (equal slices: the global batch's mean); every rank decides alike
            lval = Dd.mean_over_ranks(ce.detach())
            total = lval if loss is ce else Dd.mean_over_ranks(loss.detach())
        if not math.isfinite(total):
            bar.close()
            diverged(step, f"non-finite loss {total}")
        loss.backward()
        if info is None:
            gn = M.grad_norm(model.parameters())
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        elif cfg.grad_clip:
            gn = Dd.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        else:
            gn = Dd.grad_norm(model.parameters())
        sync()
        t1 = time.perf_counter()
        try:
            opt.step()
        except equiopt.NonFiniteGradientError as e:
            bar.close()
            diverged(step, f"non-finite gradient ({e})")
        sync()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sched.step()
        window.loss_sum += lval
        if aux is not None:
            window.aux_sum += float(aux.detach()) if info is None else Dd.mean_over_ranks(aux.detach())
        window.steps += 1
        window.tokens += y.numel() * world
        window.gnorm_sum += gn
        window.gnorm_max = max(window.gnorm_max, gn)
        window.opt_time += t2 - t1
        loss_spikes.update(lval, step + 1)
        gnorm_spikes.update(gn, step + 1)
        window.train_time += time.perf_counter() - t0
        bar.update(1)
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            ev = evaluate(eval_model, val_w, eval_idx, cfg.batch_size, probe, device)
            rec = {
                "step": done, "tokens": done * cfg.batch_size * cfg.seq_len,
                "train_loss": window.loss_sum / window.steps, "val_loss": ev["val_loss"],
                "aux_loss": window.aux_sum / window.steps if mcfg.is_moe and cfg.aux_loss else None,
                "grad_norm_mean": window.gnorm_sum / window.steps, "grad_norm_max": window.gnorm_max,
                "loss_spikes": loss_spikes.spikes, "grad_norm_spikes": gnorm_spikes.spikes,
                "lr_factor": lr_lambda(cfg)(done - 1),
                "logits": ev["logits"], "routing": ev.get("routing"), "routing_layers": ev.get("routing_layers"),
                "tokens_per_s": window.tokens / window.train_time,
                "opt_step_s": window.opt_time / window.steps,
            }
            if rank0:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            last = rec
            window = _Window()
            bar.set_postfix(val=f"{ev['val_loss']:.3f}")
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps:
            checkpoint(done)
    bar.close()
    if last is None:  # resumed at the very end
        last = read_metrics(out)[-1]
    final = {"status": "done", "step": cfg.steps, "val_loss": last["val_loss"], "last": last,
             "loss_spikes": loss_spikes.spikes, "loss_spike_steps": loss_spikes.steps,
             # this invocation only (a resumed run counts from its resume)
             "wall_s": time.time() - wall0, "cpu_s": time.process_time() - cpu0, "config": cfg.to_dict()}
    if rank0:
        _write_json(out / "final.json", final)
        if not cfg.keep_checkpoint:
            if ckpt_path.is_dir():
                import shutil

                shutil.rmtree(ckpt_path)
            else:
                ckpt_path.unlink(missing_ok=True)
    if info is not None:
        Dd.barrier()  # final.json is on disk when any rank returns
    return final
