"""Grids of runs: ``compare`` (archs x optimizers x seeds, then a report) and ``sweep`` (LR choice).

Both are restartable: a run whose ``final.json`` exists with the same configuration is
reused, a run with a checkpoint is resumed, anything else starts fresh.

``jobs > 1`` runs that many training runs at once in worker processes, each on one torch
thread (``threads`` is then forced to 1 and recorded). On small CPU models this beats one
process on several threads, and it does not collapse when other work shares the cores
(oversubscribed OpenMP threads spin). Results do not depend on ``jobs``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from . import data as D
from .config import ROUTER_ONLY, SweepOptions, TrainConfig, check_grid, config_diff
from .loop import TrainingDiverged, train
from .models import MOE_ARCHS
from .report import write_report
from .rundir import FINAL, RunDir, write_json, write_text


def load_lrs(paths: str | Path) -> dict:
    """``best.json`` files written by :func:`sweep` (comma-separated; later files win per cell):
    {arch: {optimizer: {"lr_scale", "role_lr_scale", ...}}}."""
    merged: dict = {}
    for part in str(paths).split(","):
        p = Path(part)
        if not p.exists():
            raise FileNotFoundError(f"--lr-from {p}: no such file (run `equiopt sweep` first)")
        d = json.loads(p.read_text())
        if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
            raise ValueError(f"--lr-from {p}: expected {{arch: {{optimizer: {{lr_scale: ...}}}}}}")
        for arch, cells in d.items():
            merged.setdefault(arch, {}).update(cells)
    return merged


def _lr_for(lrs: dict | None, arch: str, opt: str, base: TrainConfig) -> tuple[float, dict]:
    if lrs is None:
        return base.lr_scale, dict(base.role_lr_scale)
    try:
        e = lrs[arch][opt]
    except KeyError:
        raise KeyError(
            f"--lr-from has no learning rate for arch {arch!r}, optimizer {opt!r}; "
            f"sweep it (equiopt sweep --archs {arch} --optimizers {opt}) or drop --lr-from"
        ) from None
    return float(e["lr_scale"]), dict(e.get("role_lr_scale", {}))


def _run_one(cfg: TrainConfig, overwrite: bool, log, prepared, progress: bool = True) -> dict:
    """Train ``cfg`` unless an identical finished run exists; diverged runs are recorded, not raised."""
    run = RunDir(cfg.out)
    final = None if overwrite else run.read_json(FINAL)
    if final is not None:
        diff = config_diff(final["config"], cfg.to_dict())
        if not diff:
            return final
        raise FileExistsError(
            f"{run.path} holds a run with another configuration (differs in {diff}); pass --overwrite or change --out"
        )
    try:
        return train(cfg, resume=not overwrite, overwrite=overwrite, log=log, prepared=prepared, progress=progress)
    except TrainingDiverged as e:
        log(f"[diverged] {e}")
        diverged = run.read_json(FINAL)
        assert diverged is not None  # train() writes the divergence record before it raises
        return diverged


def grid_configs(
    base: TrainConfig,
    archs: list[str],
    optimizers: list[str],
    seeds: list[int],
    out: Path,
    lrs: dict | None = None,
    log=print,
) -> list[TrainConfig]:
    cfgs = []
    for arch in archs:
        for opt in optimizers:
            if opt in ROUTER_ONLY and arch not in MOE_ARCHS:
                log(f"[compare] skipping {opt} on {arch}: a dense model has no router")
                continue
            lr_scale, role = _lr_for(lrs, arch, opt, base)
            for seed in seeds:
                cfgs.append(
                    dataclasses.replace(
                        base,
                        arch=arch,
                        optimizer=opt,
                        seed=seed,
                        lr_scale=lr_scale,
                        role_lr_scale=role,
                        out=str(out / "runs" / arch / opt / f"seed{seed}"),
                    )
                )
    return cfgs


def _worker(cfg_dict: dict, overwrite: bool) -> dict:
    """One run in a worker process (spawned): data come from the cache the parent filled."""
    cfg = TrainConfig.from_dict(cfg_dict)
    torch.set_num_threads(max(1, cfg.threads))
    prepared = D.prepare(cfg.data, log=lambda m: None)
    return _run_one(cfg, overwrite, log=print, prepared=prepared, progress=False)


def run_many(
    cfgs: list[TrainConfig],
    *,
    jobs: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    prepared: D.Prepared | None = None,
    desc: str = "runs",
) -> list[dict]:
    """Run every config (reusing finished identical runs); the final records in ``cfgs`` order."""
    # tqdm: an optional dependency of the harness extra, imported where the bar is made
    from tqdm import tqdm

    t0 = time.time()
    results: list[dict | None] = [None] * len(cfgs)
    bar = tqdm(total=len(cfgs), desc=desc, disable=not progress, dynamic_ncols=True)

    def done(i: int, final: dict, t1: float) -> None:
        results[i] = final
        bar.update(1)
        if not progress:
            c = cfgs[i]
            val = f"{final['val_loss']:.4f}" if final["status"] == "done" else final["status"]
            log(
                f"[{desc} {sum(r is not None for r in results)}/{len(cfgs)}] {c.arch}/{c.variant or c.optimizer} "
                f"seed {c.seed} "
                f"lr_scale {c.lr_scale:g}: val loss {val} ({time.time() - t1:.0f} s; {time.time() - t0:.0f} s total)"
            )

    if jobs <= 1:
        for i, cfg in enumerate(cfgs):
            t1 = time.time()
            done(i, _run_one(cfg, overwrite, log=log, prepared=prepared, progress=progress), t1)
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_worker, c.to_dict(), overwrite): (i, time.time()) for i, c in enumerate(cfgs)}
            try:
                for f in as_completed(futures):
                    i, t1 = futures[f]
                    done(i, f.result(), t1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    bar.close()
    return results  # type: ignore[return-value]


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def edge_extension(losses: dict[float, float]) -> float | None:
    """The next learning-rate multiplier to try when the best of ``losses`` (multiplier -> final
    validation loss, inf = diverged) sits on the edge of the tried grid: one step past that edge
    by the grid's end ratio (``s_max**2 / s_prev`` or ``s_min**2 / s_next``; below the grid when
    every point diverged); None when the best is interior or fewer than two points were tried."""
    tried = sorted(losses)
    if len(tried) < 2:
        return None
    best = min(tried, key=lambda s: losses[s])  # the smallest multiplier when all are inf
    if best == tried[-1] and math.isfinite(losses[best]):
        return _round(tried[-1] * tried[-1] / tried[-2])
    if best == tried[0]:
        return _round(tried[0] * tried[0] / tried[1])
    return None


def _for_jobs(base: TrainConfig, jobs: int) -> TrainConfig:
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and base.threads not in (0, 1):
        raise ValueError(f"--jobs {jobs} runs each run on one thread; --threads {base.threads} contradicts it")
    return dataclasses.replace(base, threads=1) if jobs > 1 else base


def compare(
    base: TrainConfig,
    archs: list[str],
    optimizers: list[str],
    seeds: list[int],
    out: Path,
    *,
    lrs: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    jobs: int = 1,
    command: str | None = None,
    title: str = "equiopt comparison",
) -> dict:
    check_grid(archs, optimizers)
    base = _for_jobs(base, jobs)
    for a in archs:  # validate every cell before spending time
        dataclasses.replace(base, arch=a)  # validates every cell's config
    t0 = time.time()
    prepared = D.prepare(base.data, log=log)
    cfgs = grid_configs(base, archs, optimizers, seeds, out, lrs, log)
    run_many(cfgs, jobs=jobs, overwrite=overwrite, progress=progress, log=log, prepared=prepared, desc="compare")
    notes = [
        f"{len(cfgs)} runs; wall time of this invocation {time.time() - t0:.0f} s with {jobs} job(s) "
        f"(reused finished runs cost nothing)",
        f"model size preset {base.size!r}, {base.steps} steps x {base.batch_size} x {base.seq_len} tokens, "
        f"schedule {base.schedule} (warmup {base.warmup_steps}), data {base.data.source!r} "
        f"(BPE vocab {prepared.vocab_size})",
    ]
    if lrs is not None:
        notes.append("learning rates from --lr-from (lr_scale column: multiplier of the preset learning rates)")
    rep = write_report([Path(c.out) for c in cfgs], out, title=title, command=command, notes=notes)
    return rep


class _Sweep:
    """The runs of one sweep: every point tried, by (arch, optimizer, lr_scale, roles)."""

    def __init__(self, base: TrainConfig, out: Path, seed: int, run_kw: dict):
        self.base, self.out, self.seed, self.run_kw = base, out, seed, run_kw
        self.points: list[dict] = []

    def cfg_for(self, arch: str, opt: str, scale: float, roles: dict) -> TrainConfig:
        tag = f"lr{scale:g}" + "".join(f"_{r}{v:g}" for r, v in sorted(roles.items()))
        return dataclasses.replace(
            self.base,
            arch=arch,
            optimizer=opt,
            seed=self.seed,
            lr_scale=scale,
            role_lr_scale=roles,
            keep_checkpoint=False,
            out=str(self.out / "runs" / arch / opt / tag),
        )

    def run(self, specs: list[tuple]) -> list[float]:
        """specs: (arch, opt, scale, roles); all run at once (in parallel with jobs > 1)."""
        finals = run_many([self.cfg_for(*sp) for sp in specs], desc="sweep", **self.run_kw)
        losses = []
        for (arch, opt, scale, roles), final in zip(specs, finals):
            loss = final["val_loss"] if final["status"] == "done" else math.inf
            self.points.append(
                {
                    "arch": arch,
                    "optimizer": opt,
                    "lr_scale": scale,
                    "role_lr_scale": roles,
                    "val_loss": loss,
                    "status": final["status"],
                }
            )
            losses.append(loss)
        return losses

    def scales(self, pairs: list[tuple], lr_scales: list[float], extend_edges: int, log) -> tuple[dict, dict]:
        """Stage 1, the global scale of every (pair, scale) at once, then the grid widened past an
        edge that wins (up to ``extend_edges`` times, by the grid's end ratio): (losses, tried)."""
        specs: list[tuple[str, str, float, dict]] = [(a, o, s, {}) for a, o in pairs for s in lr_scales]
        losses = dict(zip([(a, o, s) for a, o, s, _ in specs], self.run(specs)))
        tried = {pair: sorted(lr_scales) for pair in pairs}
        for _ in range(extend_edges if len(lr_scales) > 1 else 0):
            specs = []
            for a, o in pairs:
                nxt = edge_extension({s: losses[(a, o, s)] for s in tried[(a, o)]})
                if nxt is not None:
                    specs.append((a, o, nxt, {}))
            if not specs:
                break
            log(
                f"[sweep] best lr_scale on the grid's edge for {len(specs)} pair(s): trying "
                + ", ".join(f"{a}/{o} x{s:g}" for a, o, s, _ in specs)
            )
            for (a, o, sc, _), loss in zip(specs, self.run(specs)):
                losses[(a, o, sc)] = loss
                tried[(a, o)] = sorted(tried[(a, o)] + [sc])
        return losses, tried

    def roles(self, state: dict, pairs: list[tuple], role_grid: dict[str, list[float]]) -> None:
        """Stages 2..: coordinate descent over the role multipliers, one role at a time, every pair at once."""
        for role, vals in role_grid.items():
            vals = [v for v in vals if v != 1.0]
            specs = [
                (a, o, state[(a, o)]["scale"], {**state[(a, o)]["roles"], role: v}) for a, o in pairs for v in vals
            ]
            for (a, o, _, roles), loss in zip(specs, self.run(specs)):
                if loss < state[(a, o)]["loss"]:
                    state[(a, o)].update(roles=roles, loss=loss)

    def report(self, best: dict, command: str | None) -> str:
        md = ["# equiopt sweep\n"]
        if command:
            md.append(f"Command: `{command}`\n")
        md.append(
            f"Validation loss after {self.base.steps} steps (seed {self.seed}); lr_scale multiplies the "
            "preset's learning rate of every role; role multipliers apply on top. inf = diverged.\n"
        )
        md.append("| arch | optimizer | lr_scale | role multipliers | val_loss | chosen |")
        md.append("|---|---|---|---|---|---|")
        for p in self.points:
            b = best[p["arch"]][p["optimizer"]]
            chosen = "**yes**" if (p["lr_scale"] == b["lr_scale"] and p["role_lr_scale"] == b["role_lr_scale"]) else ""
            rl = ", ".join(f"{r}x{v:g}" for r, v in sorted(p["role_lr_scale"].items())) or "-"
            md.append(f"| {p['arch']} | {p['optimizer']} | {p['lr_scale']:g} | {rl} | {p['val_loss']:.4f} | {chosen} |")
        return "\n".join(md)


def _best_record(st: dict, tried: list[float], seed: int, steps: int, label: str, log) -> dict:
    """The ``best.json`` entry of one (arch, optimizer); warns when the scale sits at the grid's edge."""
    edge = st["scale"] in (tried[0], tried[-1]) and len(tried) > 1
    if edge:
        log(f"[sweep] {label}: best lr_scale {st['scale']:g} is still at the edge of the tried scales {tried}")
    return {
        "lr_scale": st["scale"],
        "role_lr_scale": st["roles"],
        "val_loss": st["loss"],
        "seed": seed,
        "steps": steps,
        "at_grid_edge": edge,
    }


def sweep(
    base: TrainConfig,
    archs: list[str],
    optimizers: list[str],
    lr_scales: list[float],
    role_grid: dict[str, list[float]],
    out: Path,
    *,
    seed: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    jobs: int = 1,
    extend_edges: int = 2,
    command: str | None = None,
) -> dict:
    """Pick each (arch, optimizer)'s best global ``lr_scale`` on validation loss, then (coordinate
    descent) each role multiplier in ``role_grid`` at that scale. Writes ``best.json``/``sweep.md``.

    When the best scale is the grid's largest (smallest), the grid is extended by its end ratio,
    up to ``extend_edges`` times, so that a chosen learning rate is an interior optimum."""
    SweepOptions(
        archs=archs,
        optimizers=optimizers,
        jobs=jobs,
        lr_scales=lr_scales,
        role_grid=list(role_grid.items()),
        extend_edges=extend_edges,
    )  # validates
    base = _for_jobs(base, jobs)
    for a in archs:
        dataclasses.replace(base, arch=a)  # validates every cell's config
    prepared = D.prepare(base.data, log=log)
    out.mkdir(parents=True, exist_ok=True)
    best_path = out / "best.json"
    best = json.loads(best_path.read_text()) if best_path.exists() else {}
    pairs = [(a, o) for a in archs for o in optimizers if not (o in ROUTER_ONLY and a not in MOE_ARCHS)]
    sw = _Sweep(base, out, seed, dict(jobs=jobs, overwrite=overwrite, progress=progress, log=log, prepared=prepared))
    losses, tried = sw.scales(pairs, lr_scales, extend_edges, log)
    state = {}
    for a, o in pairs:
        scale = min(tried[(a, o)], key=lambda s: losses[(a, o, s)])
        state[(a, o)] = {"scale": scale, "roles": {}, "loss": losses[(a, o, scale)]}
    sw.roles(state, pairs, role_grid)
    for a, o in pairs:
        best.setdefault(a, {})[o] = _best_record(state[(a, o)], tried[(a, o)], seed, base.steps, f"{a}/{o}", log)
    write_json(best_path, best, "the sweep's best learning rates")
    table = sw.report(best, command)
    write_text(out / "sweep.md", table + "\n", "the sweep's report")
    write_text(out / "sweep.json", json.dumps(sw.points, indent=1) + "\n", "the sweep's points")
    return {"best": best, "points": sw.points, "table": table}
