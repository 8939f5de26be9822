"""The DDC experiments of issue #15: over-training collapse with the dead-direction readout
(``equiopt ddc-collapse``) and grokking depth (``equiopt ddc-grok``).

``ddc-collapse`` trains with the harness's :class:`~equiopt.train.loop.Trainer` (same run
directory, checkpoints, ``metrics.jsonl`` with the ``gauge`` orbit-drift entry), on a
truncated training slice, and adds at every evaluation a ``readout.jsonl`` record: the
eval-mode loss on a fixed subset of the training slice and the dead-direction observables
(:mod:`equiopt.deadread`) on a fixed probe batch. ``ddc-grok`` is a small full-batch loop
(a + b mod p is not an LM corpus) on a deep narrow residual ReLU MLP, with the harness's
optimizers (:func:`~equiopt.train.loop.make_optimizer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import deadread as R
from . import data as D
from .config import OPTIMIZERS, TrainConfig, check_grid
from .loop import Trainer, TrainingDiverged, _open_run, _StopSignals, evaluate, git_revision, make_optimizer
from .options import csv_list, float_list, option, positive_int
from .rundir import FINAL, RunDir, write_json, write_text
from .stats import welch_p

# ----------------------------------------------------------------------------- options


@dataclass
class CollapseOptions:
    """``equiopt ddc-collapse``: the grid and the experiment's own settings."""

    optimizers: list[str] = option(
        default_factory=lambda: ["adamw", "muon", "paper", "ddc_adam", "ddc_muon"],
        parse=csv_list,
        help=f"comma-separated, from {','.join(OPTIMIZERS)}",
    )
    seeds: int = option(3, parse=positive_int, help="seeds 0..N-1 per optimizer")
    train_tokens: int = option(300_000, parse=positive_int, help="tokens of the training slice (its first tokens)")
    train_eval_tokens: int = option(8192, parse=positive_int, help="tokens of the fixed train subset evaluated")
    probe_seqs: int = option(16, parse=positive_int, help="sequences in the readout's fixed probe batch")
    probe_len: int = option(64, parse=positive_int, help="tokens per probe sequence")
    lr_scales: list[float] = option(
        default_factory=lambda: [0.5, 1.0, 2.0], parse=float_list, help="the per-optimizer LR sweep (lr_scale grid)"
    )
    sweep_steps: int = option(300, parse=positive_int, help="steps of each sweep run (seed 1000)")
    fit_from: float = option(0.1, help="the readout fit uses checkpoints at step >= this fraction of the steps")
    jobs: int = option(2, parse=positive_int, help="runs at once, one process and one thread each")


@dataclass
class GrokOptions:
    """``equiopt ddc-grok``: a + b mod p on a deep narrow residual ReLU MLP."""

    optimizers: list[str] = option(
        default_factory=lambda: ["muon", "ddc_muon", "adamw", "ddc_adam"],
        parse=csv_list,
        help="comma-separated optimizers",
    )
    seeds: int = option(8, parse=positive_int, help="seeds 0..N-1 per optimizer")
    modulus: int = option(97, parse=positive_int, help="p in a + b mod p")
    train_fraction: float = option(0.4, help="share of the p^2 pairs used for training")
    depth: int = option(24, parse=positive_int, help="residual ReLU blocks")
    width: int = option(64, parse=positive_int, help="residual width")
    hidden: int = option(128, parse=positive_int, help="hidden neurons per block")
    steps: int = option(3000, parse=positive_int, help="the step budget (full-batch steps)")
    eval_every: int = option(50, parse=positive_int, help="steps between validation-accuracy checks")
    lr_scale: float = option(1.0, help="multiplier of every optimizer's preset learning rates")
    decay_rate: float = option(
        0.0,
        help="per-step weight shrink lr*wd, the same for every optimizer: each param group that decays "
        "(weight_decay > 0 in its preset) gets weight_decay = decay_rate / lr; 0 keeps the presets' decay",
    )
    target_acc: float = option(0.99, help="generalised: validation accuracy above this")
    jobs: int = option(2, parse=positive_int, help="runs at once, one process and one thread each")
    out: str = option("runs/ddc-grok", help="output directory")


# ----------------------------------------------------------------------------- collapse: trainer


class CollapseTrainer(Trainer):
    """The harness's trainer on a training slice, with a train-subset eval and the readout."""

    extra: dict = {}

    def _build_data(self, prep: D.Prepared) -> None:
        x = self.extra
        tokens = np.concatenate([np.asarray(s) for s in prep.train])[: x["train_tokens"]]
        prep = dataclasses.replace(prep, train=[tokens])
        super()._build_data(prep)
        self.train_w = D.Windows(prep.train, self.cfg.seq_len)
        self.train_eval_idx = D.eval_windows(self.train_w, x["train_eval_tokens"])
        pw = D.Windows(prep.train, x["probe_len"])
        n = min(len(pw), x["probe_seqs"])
        t = pw.get(np.linspace(0, len(pw) - 1, n).round().astype(np.int64))
        self.probe_x, self.probe_y = t[:, :-1], t[:, 1:]

    def evaluate_and_log(self, done: int) -> float:
        val = super().evaluate_and_log(done)
        ev = evaluate(
            self.eval_model,
            self.train_w,
            self.train_eval_idx,
            self.cfg.batch_size,
            None,
            self.device,
            self.cfg.autocast,
        )
        t0 = time.perf_counter()
        obs = R.observe(self.inner, self.probe_x.to(self.device), self.probe_y.to(self.device))
        rec = {
            "step": done,
            "train_eval_loss": ev["val_loss"],
            "val_loss": val,
            "gap": val - ev["val_loss"],
            "gauge": (self.last or {}).get("gauge", {}),
            "obs": obs,
            "readout_s": time.perf_counter() - t0,
        }
        if self.rank0:
            with open(self.run.path / "readout.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        return val


def _train_collapse(cfg: TrainConfig, extra: dict, overwrite: bool, log=print, prepared=None) -> dict:
    """:func:`equiopt.train.loop.train` for one process, with :class:`CollapseTrainer`."""
    run = RunDir(cfg.out)
    final = None if overwrite else run.read_json(FINAL)
    if final is not None and final.get("extra") == extra:
        return final
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with contextlib.ExitStack() as stack:
        stack.enter_context(run.lock(log))
        state = _open_run(run, cfg, True, not overwrite, overwrite or final is not None, log)
        prep = prepared or D.prepare(cfg.data, log=log)
        trainer_cls = type("_T", (CollapseTrainer,), {"extra": extra})
        trainer = trainer_cls(cfg, None, run, prep, log)
        if state is not None:
            start = trainer.resume(state)
        else:
            (run.path / "readout.jsonl").unlink(missing_ok=True)
            trainer.start()
            start = 0
        trainer.open_events(start)
        stack.callback(trainer.close_events)
        with _StopSignals(enabled=True) as signals:
            out = trainer.fit(start, None, False, signals)
    out["extra"] = extra
    run.write_json(FINAL, out)
    return out


def _collapse_worker(cfg_dict: dict, extra: dict, overwrite: bool) -> dict:
    cfg = TrainConfig.from_dict(cfg_dict)
    torch.set_num_threads(max(1, cfg.threads))
    prep = D.prepare(cfg.data, log=lambda m: None)
    t0 = time.time()
    try:
        final = _train_collapse(cfg, extra, overwrite, log=lambda m: None, prepared=prep)
    except (TrainingDiverged, FloatingPointError) as e:  # a diverged run is a result, a bug is not
        final = {"status": f"failed: {e}", "config": cfg.to_dict(), "extra": extra}
    final["run_wall_s"] = time.time() - t0
    print(
        f"[ddc-collapse] {cfg.optimizer} seed {cfg.seed} lr_scale {cfg.lr_scale:g}: {final.get('status')} "
        f"val {final.get('val_loss', float('nan')):.4f} ({final['run_wall_s']:.0f} s)",
        flush=True,
    )
    return final


def _run_pool(fn, argss: list[tuple], jobs: int) -> list:
    if jobs <= 1:
        return [fn(*a) for a in argss]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futs = [pool.submit(fn, *a) for a in argss]
        return [f.result() for f in futs]


def _read_jsonl(p: Path) -> list[dict]:
    if not p.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in p.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            r = json.loads(line)
            by_step[r["step"]] = r  # a resumed run re-logs steps: the last wins
    return [by_step[s] for s in sorted(by_step)]


def _ms(v: list[float]) -> str:
    v = [x for x in v if math.isfinite(x)]
    if not v:
        return "-"
    return f"{np.mean(v):.3f} +- {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def _fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}"


# ----------------------------------------------------------------------------- collapse: driver


def run_metrics(run_dir: Path, fit_from_step: float) -> dict:
    """Per-run summary: gap, min val and its step, collapse, orbit drift, readout fits."""
    rs = _read_jsonl(run_dir / "readout.jsonl")
    if not rs:
        return {}
    vals = [r["val_loss"] for r in rs]
    i = int(np.argmin(vals))
    g = rs[-1]["gauge"]
    fits = R.fit_trajectory(rs, t_min=fit_from_step)
    reads = {c.name: R.count_read(fits, c)[0] for c in R.CRITERIA}
    slopes_read = [f["slope"] for o in fits.values() for f in o.values() if f["read"]["main"]]
    return {
        "gap": rs[-1]["gap"],
        "val_final": vals[-1],
        "train_final": rs[-1]["train_eval_loss"],
        "val_min": vals[i],
        "val_min_step": rs[i]["step"],
        "collapse": vals[-1] - vals[i],
        "balance_mean": g.get("balance_mean", math.nan),
        "head_mean_row_change": g.get("head_mean_row_change", math.nan),
        "vo_angle": g.get("vo_angle", math.nan),
        "cells": R.count_read(fits)[1],
        "read": reads,
        "read_negative_slope": sum(s < 0 for s in slopes_read),
        "fits": fits,
        "history": [
            {k: r[k] for k in ("step", "gap", "val_loss", "train_eval_loss")}
            | {
                "balance_mean": r["gauge"].get("balance_mean"),
                "vo_angle": r["gauge"].get("vo_angle"),
                "head_mean_row_change": r["gauge"].get("head_mean_row_change"),
            }
            for r in rs
        ],
        "readout_s": float(np.mean([r["readout_s"] for r in rs])),
    }


def _collapse_sweep(base: TrainConfig, opts: CollapseOptions, out: Path, extra: dict, overwrite: bool) -> dict:
    """Each optimizer's learning-rate multiplier: the best minimum validation loss over
    ``opts.lr_scales`` (seed 1000, ``sweep_steps``); the single scale when only one is given."""
    best: dict[str, dict] = {}
    if len(opts.lr_scales) <= 1:
        return {o: {"lr_scale": opts.lr_scales[0], "tried": {}, "at_edge": None} for o in opts.optimizers}
    specs = [(o, s) for o in opts.optimizers for s in opts.lr_scales]
    args = [
        (
            dataclasses.replace(
                base,
                optimizer=o,
                lr_scale=s,
                seed=1000,
                steps=opts.sweep_steps,
                eval_every=max(1, opts.sweep_steps // 4),
                keep_checkpoint=False,
                out=str(out / "sweep" / o / f"lr{s:g}"),
            ).to_dict(),
            extra,
            overwrite,
        )
        for o, s in specs
    ]
    finals = _run_pool(_collapse_worker, args, opts.jobs)
    for (o, s), f in zip(specs, finals):
        rs = _read_jsonl(out / "sweep" / o / f"lr{s:g}" / "readout.jsonl")
        v = min((r["val_loss"] for r in rs), default=math.inf) if f.get("status") == "done" else math.inf
        best.setdefault(o, {"tried": {}})["tried"][f"{s:g}"] = v
    edges = (f"{min(opts.lr_scales):g}", f"{max(opts.lr_scales):g}")
    for o in opts.optimizers:
        tried = best[o]["tried"]
        s = min(tried, key=lambda k: tried[k])
        best[o].update(lr_scale=float(s), at_edge=s in edges)
    return best


def _collapse_runs(
    base: TrainConfig, opts: CollapseOptions, out: Path, extra: dict, overwrite: bool, best: dict
) -> dict[str, list[dict]]:
    """Every (optimizer, seed) run at its chosen rate; per optimizer, the runs' metrics."""
    cells = [(o, seed) for o in opts.optimizers for seed in range(opts.seeds)]
    args = [
        (
            dataclasses.replace(
                base, optimizer=o, seed=seed, lr_scale=best[o]["lr_scale"], out=str(out / "runs" / o / f"seed{seed}")
            ).to_dict(),
            extra,
            overwrite,
        )
        for o, seed in cells
    ]
    finals = _run_pool(_collapse_worker, args, opts.jobs)
    per: dict[str, list[dict]] = {o: [] for o in opts.optimizers}
    for (o, seed), f in zip(cells, finals):
        m = run_metrics(out / "runs" / o / f"seed{seed}", opts.fit_from * base.steps)
        if m:
            m.update(seed=seed, status=f.get("status"), wall_s=f.get("run_wall_s"))
            per[o].append(m)
    return per


def collapse(
    base: TrainConfig,
    opts: CollapseOptions,
    out: Path,
    *,
    overwrite: bool = False,
    log=print,
    command: str | None = None,
) -> dict:
    check_grid([base.arch], opts.optimizers)
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    base = dataclasses.replace(base, threads=1 if opts.jobs > 1 else base.threads, tensorboard=False)
    D.prepare(base.data, log=log)  # fill the cache once, before the workers
    extra = {k: getattr(opts, k) for k in ("train_tokens", "train_eval_tokens", "probe_seqs", "probe_len")}
    best = _collapse_sweep(base, opts, out, extra, overwrite)
    write_json(out / "lr.json", best, "the sweep's learning rates")
    t_sweep = time.time() - t_start
    per = _collapse_runs(base, opts, out, extra, overwrite, best)
    t_runs = time.time() - t_start - t_sweep
    summary = _collapse_summary(per, opts)
    summary["load_average"] = list(os.getloadavg())
    summary.update(
        wall_s={"sweep": t_sweep, "runs": t_runs, "total": time.time() - t_start},
        lr=best,
        config=base.to_dict(),
        options=dataclasses.asdict(opts),
        commit=git_revision(),
        command=command,
    )
    write_json(
        out / "summary.json",
        {**summary, "per_run": {o: [{k: v for k, v in m.items() if k != "fits"} for m in ms] for o, ms in per.items()}},
        "summary",
    )
    write_json(out / "fits.json", {o: [m["fits"] for m in ms] for o, ms in per.items()}, "the readout's fits")
    md = _collapse_markdown(summary, opts, base)
    write_text(out / "summary.md", md, "the report")
    _collapse_plots(per, out)
    log(md)
    return summary


METRICS = (
    "gap",
    "val_min",
    "val_min_step",
    "collapse",
    "val_final",
    "train_final",
    "balance_mean",
    "head_mean_row_change",
    "vo_angle",
)


def _collapse_summary(per: dict[str, list[dict]], opts: CollapseOptions) -> dict:
    rows: dict[str, dict] = {}
    for o, ms in per.items():
        row: dict = {"n": len(ms)}
        for k in METRICS:
            row[k] = [m[k] for m in ms]
        for c in R.CRITERIA:
            row[f"read_{c.name}"] = [m["read"][c.name] for m in ms]
        row["cells"] = ms[0]["cells"] if ms else 0
        row["read_negative_slope"] = [m["read_negative_slope"] for m in ms]
        for ref in ("adamw", "muon"):
            if ref in per and ref != o:
                row[f"p_vs_{ref}"] = {
                    k: welch_p([m[k] for m in per[ref]], row[k]) for k in ("gap", "collapse", "val_min", "balance_mean")
                } | {"read_main": welch_p([m["read"]["main"] for m in per[ref]], row["read_main"])}
        rows[o] = row
    return {"rows": rows}


def _collapse_markdown(s: dict, opts: CollapseOptions, base: TrainConfig) -> str:
    rows = s["rows"]
    L = ["# ddc-collapse: over-training collapse and the dead-direction readout\n"]
    L.append(f"Commit `{s['commit']}`. Command: `{s.get('command')}`\n")
    L.append(
        f"{base.arch}/{base.size} {base.model or ''}, training slice {opts.train_tokens} tokens "
        f"(BPE vocab {base.data.vocab_size}), {base.steps} steps x {base.batch_size} x {base.seq_len} tokens "
        f"(= {base.steps * base.batch_size * base.seq_len / opts.train_tokens:.1f} epochs), schedule {base.schedule}, "
        f"eval every {base.eval_every}; seeds 0..{opts.seeds - 1}. Wall: sweep {s['wall_s']['sweep']:.0f} s, "
        f"runs {s['wall_s']['runs']:.0f} s, total {s['wall_s']['total']:.0f} s; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in s.get('load_average', []))}.\n"
    )
    L.append(
        "Learning rates (lr_scale; sweep = min val loss over a "
        f"{opts.sweep_steps}-step run, seed 1000): "
        + ", ".join(f"{o} {v['lr_scale']:g}{' (edge)' if v.get('at_edge') else ''}" for o, v in s["lr"].items())
        + "\n"
    )
    L.append(
        "Mean +- std over seeds (eval mode, fixed train / val subsets; gap = L_val - L_train at the end; "
        "collapse = L_val(final) - min L_val). Welch p against AdamW / Muon.\n"
    )
    L.append(
        "| optimizer | gap | p vs adamw | p vs muon | min L_val | at step | collapse | p vs adamw | p vs muon "
        "| final L_train | balance drift | head mean-row drift | V/O angle |"
    )
    L.append("|---|" + "---|" * 12)
    for o, r in rows.items():
        pa, pm = r.get("p_vs_adamw", {}), r.get("p_vs_muon", {})
        L.append(
            f"| {o} | {_ms(r['gap'])} | {_fmt_p(pa.get('gap'))} | {_fmt_p(pm.get('gap'))} | {_ms(r['val_min'])} | "
            f"{_ms(r['val_min_step'])} | {_ms(r['collapse'])} | {_fmt_p(pa.get('collapse'))} | "
            f"{_fmt_p(pm.get('collapse'))} | {_ms(r['train_final'])} | {_ms(r['balance_mean'])} | "
            f"{_ms(r['head_mean_row_change'])} | {_ms(r['vo_angle'])} |"
        )
    L.append(
        "\nDead-direction readout (docs/dead_directions.md; criterion fixed before these runs). Cells read "
        "per run, mean +- std over seeds, under the main criterion and the two sensitivity variants:\n"
    )
    L.append(
        "| optimizer | cells | read (main) | p vs adamw | p vs muon | read (loose) | read (strict) | "
        "of main reads, slope < 0 |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for o, r in rows.items():
        L.append(
            f"| {o} | {r['cells']} | {_ms(r['read_main'])} | {_fmt_p(r.get('p_vs_adamw', {}).get('read_main'))} | "
            f"{_fmt_p(r.get('p_vs_muon', {}).get('read_main'))} | {_ms(r['read_loose'])} | "
            f"{_ms(r['read_strict'])} | {_ms(r['read_negative_slope'])} |"
        )
    L.append(
        "\nPlots: `gap.png` (gap over training), `drift.png` (orbit drift), `readout_heatmap.png` "
        "(fraction of seeds reading each cell). Per-run numbers: `summary.json`; every fit: `fits.json`.\n"
    )
    return "\n".join(L) + "\n"


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib (plots are then skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _collapse_plots(per: dict[str, list[dict]], out: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for o, ms in per.items():
        if not ms:
            continue
        steps = [h["step"] for h in ms[0]["history"]]
        for j, key in enumerate(("gap", "val_loss")):
            arr = np.array(
                [[h[key] for h in m["history"]][: len(steps)] for m in ms if len(m["history"]) >= len(steps)]
            )
            ax[j].plot(steps, arr.mean(0), label=o)
            if len(arr) > 1:
                ax[j].fill_between(steps, arr.min(0), arr.max(0), alpha=0.2)
    ax[0].set(xlabel="step", ylabel="L_val - L_train (eval mode)", title="generalisation gap")
    ax[1].set(xlabel="step", ylabel="L_val", title="validation loss")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(out / "gap.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for j, key in enumerate(("balance_mean", "head_mean_row_change", "vo_angle")):
        for o, ms in per.items():
            if not ms:
                continue
            steps = [h["step"] for h in ms[0]["history"]]
            vals = np.array(
                [
                    [np.nan if h[key] is None else h[key] for h in m["history"]][: len(steps)]
                    for m in ms
                    if len(m["history"]) >= len(steps)
                ],
                float,
            )
            ax[j].plot(steps, np.nanmean(vals, 0), label=o)
        ax[j].set(xlabel="step", title=f"orbit drift: {key}")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=110)
    plt.close(fig)
    opts_ = [o for o, ms in per.items() if ms]
    if not opts_:
        return
    sites = list(per[opts_[0]][0]["fits"])
    fig, axes = plt.subplots(1, len(opts_), figsize=(3.2 * len(opts_) + 1, 0.35 * len(sites) + 2), squeeze=False)
    for ax, o in zip(axes[0], opts_):
        grid = np.full((len(sites), len(R.OBSERVABLES)), np.nan)
        for i, site in enumerate(sites):
            for j, ob in enumerate(R.OBSERVABLES):
                fl = [m["fits"].get(site, {}).get(ob) for m in per[o]]
                if fl[0] is not None:
                    grid[i, j] = np.mean([bool(f["read"]["main"]) for f in fl if f is not None])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(R.OBSERVABLES)), R.OBSERVABLES, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(sites)), sites, fontsize=7)
        ax.set_title(o, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="fraction of seeds reading the cell")
    fig.savefig(out / "readout_heatmap.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- grokking


class _Block(nn.Module):
    def __init__(self, d: int, h: int, depth: int):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(h, d)
        with torch.no_grad():
            self.fc2.weight.mul_(1.0 / math.sqrt(depth))  # keep the residual stream O(1) at depth

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GrokMLP(nn.Module):
    """tokens (a, p + b) -> summed embeddings -> ``depth`` residual ReLU blocks -> head (p logits)."""

    def __init__(self, p: int, d: int, h: int, depth: int):
        super().__init__()
        self.embed = nn.Embedding(2 * p, d)
        self.blocks = nn.ModuleList([_Block(d, h, depth) for _ in range(depth)])
        self.lm_head = nn.Linear(d, p, bias=False)

    def forward(self, ab: torch.Tensor) -> torch.Tensor:
        x = self.embed(ab).sum(-2)
        for b in self.blocks:
            x = x + b(x)
        return self.lm_head(x)


def grok_data(p: int, frac: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val): every pair (a, b) once; the split fixed by ``seed``."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.reshape(-1), p + b.reshape(-1)], 1)
    y = (a + b).reshape(-1) % p
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(p * p, generator=g)
    n = int(round(frac * p * p))
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


def set_decay_rate(opt: torch.optim.Optimizer, rate: float) -> None:
    """Give every decaying param group the per-step shrink ``rate`` (weight_decay = rate / lr); groups
    without decay in the preset (vectors, DDC's translation gauges) keep none. ``rate == 0``: no change."""
    if rate < 0:
        raise ValueError(f"decay_rate (--decay-rate) must be >= 0, got {rate}")
    if rate == 0:
        return
    for g in opt.param_groups:
        if g["weight_decay"] > 0:
            g["weight_decay"] = rate / g["lr"]


def grok_run(opts: dict, optimizer: str, seed: int) -> dict:
    torch.set_num_threads(1)
    t0 = time.time()
    p = opts["modulus"]
    xt, yt, xv, yv = grok_data(p, opts["train_fraction"], seed=0)  # one split for every run
    torch.manual_seed(seed)
    model = GrokMLP(p, opts["width"], opts["hidden"], opts["depth"])
    opt, _ = make_optimizer(model, optimizer, opts["lr_scale"])
    set_decay_rate(opt, opts["decay_rate"])
    hist, hit = [], None
    status = "done"
    for step in range(1, opts["steps"] + 1):
        loss = F.cross_entropy(model(xt), yt)
        if not math.isfinite(loss.item()):
            status = f"diverged at step {step}"
            break
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % opts["eval_every"] == 0 or step == opts["steps"]:
            with torch.no_grad():
                acc = float((model(xv).argmax(-1) == yv).float().mean())
                tacc = float((model(xt).argmax(-1) == yt).float().mean())
            hist.append({"step": step, "train_loss": loss.item(), "train_acc": tacc, "val_acc": acc})
            if hit is None and acc > opts["target_acc"]:
                hit = step
                break  # generalised: the step is what is measured
    return {
        "optimizer": optimizer,
        "seed": seed,
        "status": status,
        "grok_step": hit,
        "history": hist,
        "final_val_acc": hist[-1]["val_acc"] if hist else math.nan,
        "final_train_acc": hist[-1]["train_acc"] if hist else math.nan,
        "wall_s": time.time() - t0,
    }


#: GrokOptions fields that do not change a single run's result (a finished run is reused across them)
_GROK_RUN_INDEPENDENT = ("optimizers", "seeds", "jobs", "out")


def grok_cell(opts: dict, optimizer: str, seed: int) -> dict:
    """:func:`grok_run`, its result kept in ``<out>/runs/<optimizer>/seed<seed>.json`` as soon as
    it finishes; a kept result of the same run settings and code (the git commit, "+dirty" for
    a modified tree) is returned instead of training again (an interrupted ``ddc-grok`` resumes
    with the runs it had not finished). A kept result of other settings or other code is
    replaced, and the replacement is logged."""
    path = Path(opts["out"]) / "runs" / optimizer / f"seed{seed}.json"
    settings = {k: v for k, v in opts.items() if k not in _GROK_RUN_INDEPENDENT} | {"commit": git_revision()}
    if path.exists():
        kept = json.loads(path.read_text())
        if kept.get("settings") == settings:
            return kept["result"] | {"reused": True}
        print(f"[ddc-grok] {path}: kept for other settings, run again and replaced", flush=True)
    result = grok_run(opts, optimizer, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"settings": settings, "result": result}, "the run's result")
    return result


def _grok_rows(opts: GrokOptions, res: list[dict]) -> dict[str, dict]:
    rows = {}
    for o in opts.optimizers:
        rs = [r for r in res if r["optimizer"] == o]
        hits = [r["grok_step"] for r in rs if r["grok_step"] is not None]
        rows[o] = {
            "generalised": len(hits),
            "seeds": len(rs),
            "grok_steps": hits,
            "final_val_acc": [r["final_val_acc"] for r in rs],
            "final_train_acc": [r["final_train_acc"] for r in rs],
            "diverged": sum(r["status"] != "done" for r in rs),
        }
    return rows


def _grok_markdown(opts: GrokOptions, rows: dict[str, dict], summary: dict, command: str | None) -> str:
    from scipy.stats import fisher_exact  # heavy optional dependency: only when a report is written

    wall, load = summary["wall_s"], summary["load_average"]
    lines = [
        "# ddc-grok: a + b mod p on a deep narrow residual ReLU MLP\n",
        f"Commit `{summary['commit']}`. Command: `{command}`\n",
        f"p = {opts.modulus}, train fraction {opts.train_fraction}, depth {opts.depth}, width {opts.width}, "
        f"hidden {opts.hidden}, full-batch, budget {opts.steps} steps (val accuracy checked every "
        f"{opts.eval_every}), preset learning rates x {opts.lr_scale:g}, "
        + (
            f"per-step weight shrink lr*wd = {opts.decay_rate:g} on every decaying group"
            if opts.decay_rate
            else "presets' weight decay"
        )
        + f"; seeds 0..{opts.seeds - 1}. Wall "
        f"{wall:.0f} s with {opts.jobs} job(s); load average "
        f"{', '.join(f'{x:.2f}' for x in load)}; " + _grok_reuse_note(summary) + "\n",
        "| optimizer | generalised (val acc > "
        f"{opts.target_acc:.0%}) | steps when they did | final val acc (all seeds) | final train acc | diverged |",
        "|---|---|---|---|---|---|",
    ]
    for o, r in rows.items():
        lines.append(
            f"| {o} | {r['generalised']} / {r['seeds']} | {r['grok_steps'] or '-'} | "
            f"{_ms(r['final_val_acc'])} | {_ms(r['final_train_acc'])} | {r['diverged']} |"
        )
    for a, b in (("muon", "ddc_muon"), ("adamw", "ddc_adam")):
        if a in rows and b in rows:
            lines.append("\n" + _grok_pair(opts, rows[a], rows[b], a, b, fisher_exact))
    return "\n".join(lines) + "\n"


def _grok_pair(opts: GrokOptions, ra: dict, rb: dict, a: str, b: str, fisher_exact) -> str:
    """One comparison line: the fraction generalised (Fisher exact), the step to generalise
    with the seeds that did not counted beyond the budget (Mann-Whitney U, two-sided: a rank
    test that needs no value for them), and the mean step of those that did (Welch)."""
    from scipy.stats import mannwhitneyu

    table = [[ra["generalised"], ra["seeds"] - ra["generalised"]], [rb["generalised"], rb["seeds"] - rb["generalised"]]]
    line = (
        f"{b} vs {a}: {rb['generalised']}/{rb['seeds']} vs {ra['generalised']}/{ra['seeds']} "
        f"generalised, Fisher exact p = {fisher_exact(table).pvalue:.2g}"
    )
    beyond = opts.steps + opts.eval_every

    def steps(r: dict) -> list[int]:
        return r["grok_steps"] + [beyond] * (r["seeds"] - r["generalised"])

    if ra["seeds"] and rb["seeds"] and (ra["generalised"] or rb["generalised"]):
        line += f"; step to generalise, Mann-Whitney p = {mannwhitneyu(steps(rb), steps(ra)).pvalue:.2g}"
    if ra["generalised"] >= 2 and rb["generalised"] >= 2:
        line += (
            f"; mean step of those that did {np.mean(rb['grok_steps']):.0f} vs {np.mean(ra['grok_steps']):.0f}, "
            f"Welch p = {_fmt_p(welch_p(rb['grok_steps'], ra['grok_steps']))}"
        )
    return line + "."


def _grok_reuse_note(summary: dict) -> str:
    """How much of the report this invocation trained: runs kept from an earlier invocation are
    reused, so its wall time covers only the others; the runs' own time is their sum."""
    reused, total = summary["reused_runs"], summary["run_count"]
    run_s = summary["run_seconds"]
    if not reused:
        return f"{total} runs trained, {run_s:.0f} s of run time in total (1 thread each)."
    return (
        f"{reused} of {total} runs reused from an earlier invocation (wall above: the other runs only); "
        f"{run_s:.0f} s of run time in total over all {total} runs (1 thread each)."
    )


def _grok_plot(opts: GrokOptions, res: list[dict], out: Path) -> None:
    """``val_acc.png``: validation accuracy vs step, one panel per optimizer, one line per seed."""
    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(opts.optimizers), figsize=(3.2 * len(opts.optimizers), 3), squeeze=False)
    for ax, o in zip(axes[0], opts.optimizers):
        for r in (r for r in res if r["optimizer"] == o):
            ax.plot([h["step"] for h in r["history"]], [h["val_acc"] for h in r["history"]], lw=1)
        ax.axhline(opts.target_acc, color="k", ls=":", lw=0.8)
        ax.set_title(o, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("validation accuracy")
    fig.tight_layout()
    fig.savefig(out / "val_acc.png", dpi=110)
    plt.close(fig)


def grok(opts: GrokOptions, *, log=print, command: str | None = None) -> dict:
    for o in opts.optimizers:
        if o not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {o!r}; choose from {', '.join(OPTIMIZERS)}")
    if not 0 < opts.train_fraction < 1:
        raise ValueError(f"train_fraction (--train-fraction) must be in (0, 1), got {opts.train_fraction}")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    d = dataclasses.asdict(opts)
    cells = [(o, s) for o in opts.optimizers for s in range(opts.seeds)]
    res = _run_pool(grok_cell, [(d, o, s) for o, s in cells], opts.jobs)
    rows = _grok_rows(opts, res)
    summary = {
        "rows": rows,
        "options": d,
        "wall_s": time.time() - t0,
        "load_average": list(os.getloadavg()),
        "commit": git_revision(),
        "command": command,
        "run_count": len(res),
        "reused_runs": sum(bool(r.get("reused")) for r in res),
        "run_seconds": sum(r["wall_s"] for r in res),
    }
    write_json(out / "summary.json", {**summary, "runs": res}, "summary")
    md = _grok_markdown(opts, rows, summary, command)
    write_text(out / "summary.md", md, "the report")
    _grok_plot(opts, res, out)
    log(md)
    return summary
