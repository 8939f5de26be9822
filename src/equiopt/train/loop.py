"""One training entry for every architecture family: ``train(TrainConfig)``.

The run directory's files (config, metrics, checkpoints, lock) are read and written by
:mod:`equiopt.train.rundir`; the configuration is :class:`~equiopt.train.config.TrainConfig`.
A run holds its directory's lock from start to end. Checkpoints are written every
``ckpt_every`` steps, at the end, and when SIGINT/SIGTERM arrives (the step in progress
completes, a checkpoint is written, :class:`TrainingInterrupted` is raised). ``resume=True``
reloads the checkpoint (refused when its recorded config differs in anything but ``steps``),
truncates ``metrics.jsonl`` to the checkpointed step and continues; batches are a pure
function of (seed, step), so a resumed run logs the same metrics as an uninterrupted one
(timing fields aside). A non-finite loss (or gradient) stops the run with
:class:`TrainingDiverged`; the last good checkpoint stays.

Multi-process (``dist="ddp"|"fsdp2"``, started by torchrun, one process per device): every
rank builds the same model (same seed), wraps it (:func:`equiopt.distributed.wrap_model`) and
trains on its slice ``[r B/W, (r+1) B/W)`` of the same global batch, so the run matches one
process with batch ``B``. Logged losses and gradient norms are global (collectives), every
rank evaluates the full eval set, only rank 0 writes files, logs and holds the lock. The
checkpoint is a ``torch.distributed.checkpoint`` directory ``checkpoint/`` (per-rank RNG
state inside); resume needs the same world size. Single-process runs keep ``checkpoint.pt``.
Signals are not intercepted under torchrun (the ranks would stop at different steps); such a
run keeps its last periodic checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import equiopt

from .. import ddc
from .. import distributed as Dd
from . import data as D
from . import metrics as M
from .config import (
    DDC_OPTIMIZERS,
    DIST_MODES,
    MODEL_OVERRIDES,
    OPTIMIZERS,
    RESUMABLE_CHANGES,
    ROLE_SCHEDULE_DEFAULT,
    ROUTER_ONLY,
    SCHEDULES,
    TrainConfig,
    config_diff,
    parse_schedule,
)
from .models import build_model
from .rundir import (
    CONFIG,
    DIST_CKPT,
    FINAL,
    PLAN,
    RUN_DIRS,
    RUN_FILES,
    EventLog,
    RunDir,
    RunDirError,
    read_metrics,
    save_checkpoint,
)

__all__ = [
    "DIST_CKPT",
    "DIST_MODES",
    "MODEL_OVERRIDES",
    "OPTIMIZERS",
    "ROUTER_ONLY",
    "RUN_DIRS",
    "RUN_FILES",
    "SCHEDULES",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "config_diff",
    "evaluate",
    "lr_lambda",
    "make_optimizer",
    "read_metrics",
    "role_lr_lambdas",
    "schedule_lambda",
    "save_checkpoint",
    "train",
]


class TrainingDiverged(RuntimeError):
    """The loss (or a gradient) became non-finite; the run's last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run after a checkpoint at ``step``; ``--resume`` continues it."""

    def __init__(self, message: str, step: int, signum: int):
        super().__init__(message, step, signum)
        self.step, self.signum = step, signum

    def __str__(self) -> str:
        return self.args[0]


# ----------------------------------------------------------------------------- optimizer


def make_optimizer(
    model: torch.nn.Module,
    name: str,
    lr_scale: float = 1.0,
    role_lr_scale: dict[str, float] | None = None,
    *,
    rules: dict | None = None,
    role_lr: dict[str, float] | None = None,
    roles: dict[str, str] | None = None,
    layouts: dict[str, str] | None = None,
    replica: torch.nn.Module | None = None,
):
    """(optimizer, plan) for one of ``OPTIMIZERS``; learning rates = preset (or ``role_lr``, absolute)
    x lr_scale x role scale. ``rules`` (per role) replace the optimizer's rules for those roles;
    ``roles`` / ``layouts`` are the planner's overrides (recipes set all four). ``replica``: an
    unsharded copy of an FSDP2 model, on which DDC plans and probes its gauges."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    preset_name, base_rules = OPTIMIZERS[name]
    if preset_name in equiopt.DDC_PRESETS:  # roles for the harness (router probe); DDC finds the gauges
        if role_lr_scale or role_lr or roles or layouts:
            raise ValueError(
                f"{name}: per-role learning rates and overrides do not apply (DDC groups are gauge kinds); "
                "per-role rules lift the paper's maps (ddc_muon, docs/ddc.md)"
            )
        plan = equiopt.plan(model, "adamw")
        base = equiopt.DDC_PRESETS[preset_name]
        if replica is not None:  # FSDP2: gauges from the replica, mapped onto the DTensor parameters
            opt = ddc.ddc_optimizer(Dd.unwrap(model), base, model=replica, lr_scale=lr_scale, rules=rules or None)
        else:
            opt = ddc.ddc_optimizer(plan, base, model=Dd.unwrap(model), lr_scale=lr_scale, rules=rules or None)
        return opt, plan
    merged = {**base_rules, **(rules or {})}
    scale = {r: lr_scale * (role_lr_scale or {}).get(r, 1.0) for r in equiopt.ROLES}
    plan = equiopt.plan(
        model,
        preset_name,
        rules=merged or None,
        lr=role_lr or None,
        lr_scale=scale,
        roles=roles or None,
        layouts=layouts or None,
    )
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


def schedule_lambda(cfg: TrainConfig, spec: str) -> Callable[[int], float]:
    """The multiplier curve of one schedule spec (see ``config.ROLE_SCHEDULE_KINDS``)."""
    kind, arg = parse_schedule(spec)
    n = cfg.steps
    if kind == "stable_decay":  # the paper's matrix roles: 1, then (1 - s/N) / F over the last F of the run
        frac = float(arg)  # type: ignore[arg-type]

        def stable_decay(step: int) -> float:
            left = max(1.0 - step / n, 1e-12)
            return 1.0 if left >= frac else left / frac

        return stable_decay
    if kind == "warmup_cosine":  # the paper's AdamW roles: s / W, then cosine from 1 to 0
        warm = int(arg)  # type: ignore[arg-type]

        def warmup_cosine(step: int) -> float:
            if step < warm:
                return step / max(1, warm)
            t = (step - warm) / max(1, n - warm)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * t)))

        return warmup_cosine
    return lr_lambda(dataclasses.replace(cfg, schedule=kind))


def role_lr_lambdas(cfg: TrainConfig, groups: list[dict]) -> list[Callable[[int], float]]:
    """One multiplier curve per param_group, chosen by its role from ``cfg.role_schedule``
    (``"*"`` for roles not named; without either, the global ``cfg.schedule``)."""
    table = cfg.role_schedule
    out = []
    for g in groups:
        spec = table.get(g.get("role", ""), table.get(ROLE_SCHEDULE_DEFAULT))
        out.append(lr_lambda(cfg) if spec is None else schedule_lambda(cfg, spec))
    return out


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
        self._handles: list = []

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
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True
        )
    except FileNotFoundError:
        return "unknown (git not installed)"
    if rev.returncode != 0:
        return "unknown (not a git checkout)"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    versions: dict[str, str | None] = {}
    for pkg in ("equiopt", "torch", "transformers", "tokenizers", "numpy", "scipy", "matplotlib", "tqdm"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "git_revision": git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
    }


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"].cpu())
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


# ----------------------------------------------------------------------------- the loop


class _Window:
    """Training statistics between two evaluations."""

    def __init__(self):
        self.loss_sum = self.aux_sum = 0.0
        self.steps = self.tokens = 0
        self.train_time = self.opt_time = 0.0
        self.gnorm_sum, self.gnorm_max = 0.0, 0.0

    def add(self, loss: float, aux: float | None, tokens: int, gnorm: float, opt_time: float) -> None:
        self.loss_sum += loss
        if aux is not None:
            self.aux_sum += aux
        self.steps += 1
        self.tokens += tokens
        self.gnorm_sum += gnorm
        self.gnorm_max = max(self.gnorm_max, gnorm)
        self.opt_time += opt_time

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        self.__dict__.update(d)


def _autocast(device: str, mode: str = "auto"):
    """bfloat16 autocast (``TrainConfig.autocast``): ``auto`` on CUDA only, ``bf16`` on CPU too,
    ``none`` never. CPU runs are float32 unless asked: recorded CPU runs keep their numerics."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if mode == "bf16" or (mode == "auto" and kind == "cuda"):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model,
    windows: D.Windows,
    idx: np.ndarray,
    batch_size: int,
    probe: RouterProbe | None,
    device: str = "cpu",
    autocast: str = "auto",
) -> dict:
    model.eval()
    total, count = 0.0, 0
    lstats = M.LogitStats()
    ctx = probe if probe is not None and probe.modules else None
    if ctx:
        ctx.__enter__()
    try:
        for a in range(0, len(idx), batch_size):
            t = windows.get(idx[a : a + batch_size]).to(device)
            with _autocast(device, autocast):
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
    if ctx and probe is not None:
        per_layer, avg = probe.compute()
        out["routing"] = avg
        out["routing_layers"] = per_layer
    return out


class _StopSignals:
    """SIGINT/SIGTERM become a flag the loop checks between steps (a second one stops at once).
    Installed in the main thread of a single-process run only."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.received is not None:  # the second signal: stop now (atomic writes keep the files whole)
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> _StopSignals:
        if self.enabled:
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


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


# ----------------------------------------------------------------------------- opening a run


def _check_existing(run: RunDir, cfg: TrainConfig, resume: bool, log: Callable[[str], None]) -> None:
    """Refuse to start over a run's records unless that is what was asked (rank 0)."""
    have = run.holds_records()
    if not have:
        return
    if not resume:
        raise FileExistsError(
            f"{run.path} already holds a run; pass --resume to continue it or --overwrite to start over"
        )
    if run.has_checkpoint():
        return
    how = "Nothing was changed. Use a new --out, or remove the directory (or pass --overwrite) to start a new run there"
    final = run.read_json(FINAL)
    if final is not None:
        raise RunDirError(
            f"--resume: {run.path} holds a {final.get('status', 'finished')} run (step "
            f"{final.get('step')}) and no checkpoint ({run.ckpt.name}) to continue from. {how}"
        )
    saved = run.read_json(CONFIG)
    diff = ["config.json is missing"] if saved is None else config_diff(saved, cfg.to_dict())
    if diff:
        raise RunDirError(
            f"--resume: {run.path} holds another run ({', '.join(diff)} differ) and no "
            f"checkpoint to continue from. {how}"
        )
    log(f"[train] {run.path}: the run stopped before its first checkpoint; starting it again from step 0")


def _describe_diff(saved: dict, mine: dict, keys: list[str]) -> str:
    def get(d, k):
        return d.get("data", {}).get(k[5:]) if k.startswith("data.") else d.get(k)

    return "; ".join(f"{k}: {get(saved, k)!r} in the checkpoint, {get(mine, k)!r} now" for k in keys)


def _check_resume(run: RunDir, state: dict, cfg: TrainConfig, log: Callable[[str], None]) -> None:
    """A checkpoint continues only the run it was written by (``steps`` may change)."""
    saved, mine = state["config"], cfg.to_dict()
    diff = config_diff(saved, mine, ignore=RESUMABLE_CHANGES)
    if diff:
        raise ValueError(
            f"--resume: {run.ckpt} was written by a run with another configuration ("
            f"{_describe_diff(saved, mine, diff)}). Resume with the checkpoint's options, or start "
            "a new run (a new --out, or --overwrite)"
        )
    if state["step"] > cfg.steps:
        raise ValueError(f"--resume: {run.ckpt} is at step {state['step']}, past --steps {cfg.steps}")
    if saved.get("steps") != cfg.steps:
        log(f"[train] steps {saved.get('steps')} -> {cfg.steps}: the LR schedule follows the new length")
    rev, now = state.get("git_revision"), git_revision()
    if rev and rev != now:
        log(f"[train] warning: {run.ckpt} was written by code at {rev}; this is {now}")


def _open_run(
    run: RunDir, cfg: TrainConfig, rank0: bool, resume: bool, overwrite: bool, log: Callable[[str], None]
) -> dict | None:
    """Prepare the directory (rank 0); the checkpoint's state to resume from, or None."""
    if rank0:
        run.check_foreign()
        if overwrite:
            run.clear()
        else:
            _check_existing(run, cfg, resume, log)
    if not (resume and run.has_checkpoint()):
        return None
    if run.dist:
        state = torch.load(run.ckpt / "extra.pt", weights_only=False, map_location="cpu")
    else:
        state = run.load_checkpoint(map_location=cfg.device)
    _check_resume(run, state, cfg, log)
    return state


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """The state of one run in this process (or rank) and the steps that advance it."""

    def __init__(self, cfg: TrainConfig, info, run: RunDir, prep: D.Prepared, log: Callable[[str], None]):
        self.cfg, self.info, self.run, self.log = cfg, info, run, log
        self.rank0 = info is None or info.rank == 0
        self.world = 1 if info is None else info.world_size
        self.device = cfg.device if info is None else str(info.device)
        self.sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        self.revision = git_revision()
        self._build_data(prep)
        self._build_model(prep.vocab_size)
        self.window, self.loss_spikes, self.gnorm_spikes = _Window(), M.SpikeDetector(), M.SpikeDetector(rel=4.0)
        self.last: dict | None = None
        self.saved_at: int | None = None  # step of the checkpoint this process wrote last
        self.events: EventLog | None = None  # the TensorBoard log (rank 0), opened by open_events

    def _build_data(self, prep: D.Prepared) -> None:
        cfg = self.cfg
        self.prep = prep
        self.val_w = D.Windows(prep.val, cfg.seq_len)
        self.sampler = D.BatchSampler(D.Windows(prep.train, cfg.seq_len), cfg.batch_size, cfg.seed)
        self.eval_idx = D.eval_windows(self.val_w, cfg.eval_tokens)
        per_rank = cfg.batch_size // self.world
        rank = 0 if self.info is None else self.info.rank
        self.rows = (rank * per_rank, (rank + 1) * per_rank)

    def _build_model(self, vocab_size: int) -> None:
        cfg = self.cfg
        self.mcfg = cfg.model_config(vocab_size)
        model = build_model(self.mcfg, seed=cfg.seed).to(self.device)
        # DDC under FSDP2 plans and probes on an unsharded copy (the same seed: the same weights)
        replica = (
            build_model(self.mcfg, seed=cfg.seed) if cfg.dist == "fsdp2" and cfg.optimizer in DDC_OPTIMIZERS else None
        )
        if self.info is not None:
            # MoE: an expert no token of this rank's slice reached has no gradient on this rank
            model = Dd.wrap_model(model, cfg.dist, find_unused_parameters=self.mcfg.is_moe)
        self.model, self.inner = model, Dd.unwrap(model)  # inner: the model itself (config, names)
        self.opt, self.plan = make_optimizer(
            model,
            cfg.optimizer,
            cfg.lr_scale,
            cfg.role_lr_scale,
            rules=cfg.rules,
            role_lr=cfg.role_lr,
            roles=cfg.roles,
            layouts=cfg.layouts,
            replica=replica,
        )
        # orbit drift of every gauge since init, logged under "gauge" for every optimizer (the
        # model is freshly built from the seed here, also when the run resumes)
        self.drift = equiopt.diagnostics.GaugeDrift(self.inner, self.plan)
        self.lr = lr_lambda(cfg)
        if cfg.role_schedule:  # one curve per param_group (by role); else today's single schedule
            self.lr_fns = role_lr_lambdas(cfg, self.opt.param_groups)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_fns)
        else:
            self.lr_fns = [self.lr] * len(self.opt.param_groups)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr)
        top_k = int(getattr(self.inner.config, "num_experts_per_tok", 0) or 0)
        self.probe = RouterProbe(self.inner, self.plan, top_k)
        self.eval_model = self.inner if cfg.dist == "ddp" else model  # FSDP2: forwards through the sharded root
        if self.mcfg.is_moe and not self.probe.modules:
            raise RuntimeError(f"{cfg.arch}: the plan found no router parameters in an MoE model")

    # ------------------------------------------------------------------ run records and checkpoints

    def _stateful(self) -> dict:  # looked up at call time: the window is replaced after every evaluation
        return {
            "scheduler": self.sched,
            "window": self.window,
            "loss_spikes": self.loss_spikes,
            "gnorm_spikes": self.gnorm_spikes,
        }

    def run_state(self, step: int) -> dict:
        """What a checkpoint holds besides model, optimizer and RNG (same keys on both paths)."""
        return {
            "step": step,
            "sampler": self.sampler.state_dict(step),
            "config": self.cfg.to_dict(),
            "git_revision": self.revision,
            **{k: obj.state_dict() for k, obj in self._stateful().items()},
        }

    def start(self) -> None:
        """A new run: its records (rank 0)."""
        if not self.rank0:
            return
        run, plan = self.run, self.plan
        run.start_metrics()
        run.write_json(CONFIG, self.cfg.to_dict())
        run.write_json(
            "env.json",
            {
                **environment(),
                "model_config": self.mcfg.to_dict(),
                "data": self.prep.info,
                "parameters": sum(e.param.numel() for e in plan.entries),
                "world_size": self.world,
                "dist": self.cfg.dist,
                "backend": None if self.info is None else self.info.backend,
            },
        )
        # DDC: every parameter with its gauge(s) or "none: base rule" and why, instead of the plan
        run.write_text(PLAN, (ddc.describe(self.opt) if isinstance(self.opt, ddc.DDCOptimizer) else str(plan)) + "\n")

    def resume(self, state: dict) -> int:
        """Load a checkpoint (``state``: the single-process checkpoint, or a multi-process run's
        extra state); returns the step to continue from."""
        if self.info is not None:
            state, rank_extra = Dd.load_checkpoint(self.run.ckpt, self.model, self.opt)
            if state.get("world_size") != self.world:
                raise ValueError(
                    f"--resume: {self.run.ckpt} was written by {state.get('world_size')} processes, "
                    f"this run has {self.world}; resume with --nproc_per_node x nodes = "
                    f"{state.get('world_size')}"
                )
            _set_rng_state(rank_extra["rng"])
        else:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"])
        for k, obj in self._stateful().items():
            obj.load_state_dict(state[k])
        self.sampler.check_state(state["sampler"])
        start = self.saved_at = state["step"]
        if self.rank0:
            self.run.trim_metrics(start, self.log)
            if state["config"].get("steps") != self.cfg.steps:
                self.run.write_json(CONFIG, self.cfg.to_dict())
        where = "" if self.info is None else f" ({self.world} processes, {self.cfg.dist})"
        self.log(f"[train] resumed {self.run.path} at step {start}{where}")
        return start

    def checkpoint(self, step: int) -> None:
        if self.info is not None:
            Dd.save_checkpoint(
                self.run.ckpt,
                self.model,
                self.opt,
                extra={**self.run_state(step), "world_size": self.world, "dist": self.cfg.dist},
                rank_extra={"rng": _rng_state()},
            )
        else:
            self.run.save_checkpoint(
                {
                    **self.run_state(step),
                    "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "rng": _rng_state(),
                }
            )
        self.saved_at = step

    def diverged(self, step: int, what: str) -> None:
        """Record the divergence (rank 0) and raise :class:`TrainingDiverged` (every rank gets
        here: losses and finite flags are global)."""
        cfg, good = self.cfg, self.run.checkpoint_step()
        msg = (
            f"run {self.run.path} diverged: {what} at step {step} (optimizer {cfg.optimizer}, lr_scale "
            f"{cfg.lr_scale:g}). "
            + (
                f"The last good checkpoint (step {good}) is kept in {self.run.ckpt}."
                if good is not None
                else "No checkpoint had been written yet."
            )
        )
        if self.rank0:
            self.run.append_metrics({"event": "diverged", "step": step, "message": msg})
            self.run.write_json(
                FINAL, {"status": "diverged", "step": step, "message": msg, "val_loss": None, "config": cfg.to_dict()}
            )
        raise TrainingDiverged(msg)

    # ------------------------------------------------------------------ one step

    def _global(self, t: torch.Tensor) -> float:
        """A scalar's value on one process, its mean over ranks (equal slices: the global batch's mean)."""
        return float(t.detach()) if self.info is None else Dd.mean_over_ranks(t.detach())

    def forward_backward(self, step: int) -> tuple[float, float | None, int]:
        """(cross-entropy, aux loss, tokens) of step ``step``'s batch; gradients accumulated."""
        cfg = self.cfg
        lo, hi = self.rows
        x, y = (t[lo:hi].to(self.device) for t in self.sampler.batch(step))
        with _autocast(self.device, cfg.autocast):
            outp = self.model(input_ids=x)
        logits = outp.logits
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss, aux = ce, getattr(outp, "aux_loss", None)
        if cfg.aux_loss:
            if aux is None:
                raise RuntimeError(f"{cfg.arch}: aux_loss=True but the model returned no aux_loss")
            model_config: Any = self.inner.config  # a transformers config (nn.Module types it loosely)
            loss = ce + float(model_config.router_aux_loss_coef) * aux
        lval = self._global(ce)
        total = lval if loss is ce else self._global(loss)
        if not math.isfinite(total):
            self.diverged(step, f"non-finite loss {total}")
        loss.backward()
        return lval, None if aux is None else self._global(aux), y.numel() * self.world

    def grad_norm(self) -> float:
        """The global gradient norm before clipping (and the clip, if configured)."""
        params, clip = self.model.parameters(), self.cfg.grad_clip
        if self.info is not None:
            return Dd.clip_grad_norm_(params, clip) if clip else Dd.grad_norm(params)
        gn = M.grad_norm(self.model.parameters())
        if clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        return gn

    def train_step(self, step: int) -> None:
        t0 = time.perf_counter()
        lval, aux, tokens = self.forward_backward(step)
        gn = self.grad_norm()
        self.sync()
        t1 = time.perf_counter()
        try:
            self.opt.step()
        except equiopt.NonFiniteGradientError as e:
            self.diverged(step, f"non-finite gradient ({e})")
        self.sync()
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.window.add(lval, aux, tokens, gn, t2 - t1)
        self.loss_spikes.update(lval, step + 1)
        self.gnorm_spikes.update(gn, step + 1)
        self.window.train_time += time.perf_counter() - t0

    def evaluate_and_log(self, done: int) -> float:
        cfg, w = self.cfg, self.window
        ev = evaluate(self.eval_model, self.val_w, self.eval_idx, cfg.batch_size, self.probe, self.device, cfg.autocast)
        rec = {
            "step": done,
            "tokens": done * cfg.batch_size * cfg.seq_len,
            "train_loss": w.loss_sum / w.steps,
            "val_loss": ev["val_loss"],
            "aux_loss": w.aux_sum / w.steps if self.mcfg.is_moe and cfg.aux_loss else None,
            "grad_norm_mean": w.gnorm_sum / w.steps,
            "grad_norm_max": w.gnorm_max,
            "loss_spikes": self.loss_spikes.spikes,
            "grad_norm_spikes": self.gnorm_spikes.spikes,
            "lr_factor": self.lr(done - 1),
            "logits": ev["logits"],
            "routing": ev.get("routing"),
            "routing_layers": ev.get("routing_layers"),
            "gauge": self.drift.record(),
            "tokens_per_s": w.tokens / w.train_time,
            "opt_step_s": w.opt_time / w.steps,
            "lr": self.role_lrs(done - 1),
        }
        if self.rank0:
            self.run.append_metrics(rec)
            if self.events is not None:
                self.events.write(rec)
        self.last, self.window = rec, _Window()
        return ev["val_loss"]

    def role_lrs(self, step: int) -> dict[str, float]:
        """The learning rate of each role at ``step`` (base LR x its group's multiplier)."""
        out: dict[str, float] = {}
        for g, base, fn in zip(self.opt.param_groups, self.sched.base_lrs, self.lr_fns):
            out.setdefault(str(g.get("role", "group")), float(base) * fn(step))
        return out

    def open_events(self, start: int) -> None:
        """TensorBoard event files beside metrics.jsonl (rank 0); a resumed run drops the
        events after its checkpoint (``purge_step``), as it truncates metrics.jsonl."""
        if self.rank0 and self.cfg.tensorboard:
            self.events = self.run.event_log(start, self.log)

    def close_events(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None

    # ------------------------------------------------------------------ the run

    def fit(self, start: int, stop_after: int | None, progress: bool, signals: _StopSignals) -> dict:
        """Steps ``start .. cfg.steps``; the final record (``{"status": "stopped"}`` after ``stop_after``)."""
        # tqdm: an optional dependency of the harness extra, imported where the bar is made
        from tqdm import tqdm

        cfg = self.cfg
        wall0, cpu0 = time.time(), time.process_time()
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
            desc=f"{cfg.arch}/{cfg.optimizer}/s{cfg.seed}",
        )
        self.model.train()
        try:
            for step in range(start, cfg.steps):
                if stop_after is not None and step - start >= stop_after:
                    return {"status": "stopped", "step": step}
                self.train_step(step)
                bar.update(1)
                self.after_step(step + 1, bar)
                if signals.received is not None:
                    self.interrupted(step + 1, signals.received)
        finally:
            bar.close()
        return self.finish(wall0, cpu0)

    def after_step(self, done: int, bar) -> None:
        cfg = self.cfg
        if done % cfg.eval_every == 0 or done == cfg.steps:
            bar.set_postfix(val=f"{self.evaluate_and_log(done):.3f}")
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps:
            self.checkpoint(done)

    def interrupted(self, done: int, signum: int) -> None:
        if self.saved_at != done:
            self.checkpoint(done)
        name = signal.Signals(signum).name
        raise TrainingInterrupted(
            f"{name}: stopped {self.run.path} at step {done} of {self.cfg.steps} after "
            f"writing its checkpoint; continue with --resume",
            done,
            signum,
        )

    def finish(self, wall0: float, cpu0: float) -> dict:
        cfg = self.cfg
        last = self.last or self.run.read_metrics()[-1]  # resumed at the very end: the logged record
        final = {
            "status": "done",
            "step": cfg.steps,
            "val_loss": last["val_loss"],
            "last": last,
            "loss_spikes": self.loss_spikes.spikes,
            "loss_spike_steps": self.loss_spikes.steps,
            # this invocation only (a resumed run counts from its resume)
            "wall_s": time.time() - wall0,
            "cpu_s": time.process_time() - cpu0,
            "config": cfg.to_dict(),
        }
        if self.rank0:
            self.run.write_json(FINAL, final)
            if not cfg.keep_checkpoint:
                self.run.remove_checkpoint()
        if self.info is not None:
            Dd.barrier()  # final.json is on disk when any rank returns
        return final


# ----------------------------------------------------------------------------- entry


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    prepared: D.Prepared | None = None,
    stop_after: int | None = None,
) -> dict:
    """Run (or resume) one training run; returns the final record (also in ``final.json``).

    ``stop_after`` ends the process-equivalent of a kill after that many steps (tests):
    nothing is written beyond what a killed run would have written. SIGINT/SIGTERM write a
    checkpoint and raise :class:`TrainingInterrupted`.

    With ``cfg.dist`` "ddp" or "fsdp2" every torchrun process calls this; the process group
    is initialized from torchrun's environment (and destroyed at the end if it was made here).
    """
    cfg.validate()
    kw: dict[str, Any] = dict(
        resume=resume, overwrite=overwrite, progress=progress, log=log, prepared=prepared, stop_after=stop_after
    )
    if cfg.dist == "none":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                f"started by torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']} but dist='none': "
                "pass --dist ddp or --dist fsdp2 (otherwise every rank would train the same run)"
            )
        return _train(cfg, None, **kw)
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"dist={cfg.dist!r} needs torchrun, e.g. torchrun --standalone --nproc_per_node=2 "
            f"-m equiopt train --dist {cfg.dist} ..."
        )
    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = Dd.init_from_env(
        timeout_s=float(os.environ.get("EQUIOPT_DIST_TIMEOUT", 1800)), device="cpu" if cfg.device == "cpu" else None
    )
    try:
        if cfg.batch_size % info.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} is not divisible by the world size {info.world_size}: "
                "each rank trains on batch_size / world_size sequences of the global batch"
            )
        if info.rank != 0:
            kw.update(log=lambda m: None, progress=False)
        return _train(cfg, info, **kw)
    finally:
        if owned:
            Dd.cleanup()


def _train(
    cfg: TrainConfig,
    info,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    log: Callable[[str], None],
    prepared: D.Prepared | None,
    stop_after: int | None,
) -> dict:
    """``train`` for one process (``info`` None) or one rank of a torchrun group."""
    rank0 = info is None or info.rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.out, dist=info is not None)
    with contextlib.ExitStack() as stack:
        if rank0:
            stack.enter_context(run.lock(log))  # held until this function returns or raises

        def setup():
            return _open_run(run, cfg, rank0, resume, overwrite, log), prepared or D.prepare(cfg.data, log=log)

        state, prep = _rank0_first(info, setup)
        trainer = Trainer(cfg, info, run, prep, log)
        if state is not None:
            start = trainer.resume(state)
        else:
            trainer.start()
            start = 0
        trainer.open_events(start)
        stack.callback(trainer.close_events)
        with _StopSignals(enabled=info is None) as signals:
            return trainer.fit(start, stop_after, progress, signals)
