"""Command line: ``equiopt <command> [options]`` (also ``python -m equiopt``).

Commands live in :data:`COMMANDS`, ``name -> (add_arguments, run)``: ``add_arguments(parser)``
declares the options, ``run(args) -> int`` does the work and returns the exit status. The
first line of ``run``'s docstring is the command's help. To add a command, add one entry.

The options of ``train``, ``compare`` and ``sweep`` are generated from the fields of the
config dataclasses (:mod:`equiopt.train.config`, :class:`equiopt.train.data.DataConfig`):
each option is declared once, with its type, default and help, as a dataclass field. A
command only chooses which dataclasses it takes, which fields it leaves out and which
defaults it changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import audit, ddc
from .planner import plan as make_plan
from .presets import DDC_PRESETS, PRESETS
from .train.config import CompareOptions, RunOptions, SweepOptions, TrainConfig
from .train.data import DataError
from .train.ddc_experiments import CollapseOptions, GrokOptions, collapse, grok
from .train.experiments import _lr_for, compare, load_lrs, sweep
from .train.loop import TrainingDiverged, TrainingInterrupted, train
from .train.options import add_dataclass_options, from_namespace, option
from .train.recipes import FIGURES, ReproduceOptions, reproduce
from .train.report import write_report
from .train.rundir import RunDirError

# The project's main job: `equiopt compare` with no arguments. Sized to finish in <= 10 minutes
# on 2 CPU cores including the corpus fetch and BPE training on a fresh machine.
MAIN_JOB = dict(
    archs=["qwen3", "olmoe"],
    optimizers=["adamw", "muon", "paper"],
    seeds=2,
    steps=80,
    batch_size=8,
    eval_every=20,
    eval_tokens=8192,
    warmup=-1,
    out="runs/compare",
    jobs=2,
)
# `equiopt sweep`'s defaults where they differ from the dataclasses'.
SWEEP_DEFAULTS = dict(steps=100, batch_size=8, eval_every=50, eval_tokens=8192, seed=1000, out="runs/sweep", jobs=2)

# Fields a grid command sets per cell itself (not options of compare / sweep).
_PER_CELL = ("arch", "optimizer", "dist")


def _command_line() -> str:
    return "equiopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _options(p: argparse.ArgumentParser, *specs: tuple[type, tuple[str, ...]], defaults: dict | None = None) -> None:
    groups: dict = {}
    for cls, exclude in specs:
        add_dataclass_options(p, cls, defaults=defaults, exclude=exclude, groups=groups)


# ----------------------------------------------------------------------------- train


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    _options(p, (TrainConfig, ()), (RunOptions, ()))


def run_train(args) -> int:
    """Train one model and log metrics, checkpoints and run records to --out."""
    cfg = from_namespace(TrainConfig, args)
    opts = from_namespace(RunOptions, args)
    if opts.lr_from:
        scale, roles = _lr_for(load_lrs(opts.lr_from), cfg.arch, cfg.optimizer, cfg)
        cfg = dataclasses.replace(cfg, lr_scale=scale, role_lr_scale={**roles, **cfg.role_lr_scale})
    try:
        final = train(
            cfg, resume=opts.resume, overwrite=opts.overwrite, progress=opts.progress, stop_after=opts.stop_after
        )
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if cfg.dist != "none" and os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return 0
    if final["status"] == "stopped":
        print(f"stopped at step {final['step']} (--stop-after); continue with --resume")
        return 0
    last = final["last"]
    print(
        f"{cfg.arch}/{cfg.optimizer} seed {cfg.seed}: final val loss {final['val_loss']:.4f} "
        f"(train {last['train_loss']:.4f}) after {cfg.steps} steps; run in {cfg.out}"
    )
    return 0


# ----------------------------------------------------------------------------- compare


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    _options(
        p,
        (CompareOptions, ()),
        (TrainConfig, _PER_CELL + ("seed",)),
        (RunOptions, ("resume", "stop_after")),
        defaults=MAIN_JOB,
    )


def run_compare(args) -> int:
    """Train a grid (archs x optimizers x seeds) and write summary.md/csv/json and plots."""
    grid = from_namespace(CompareOptions, args)
    base = from_namespace(TrainConfig, args)
    opts = from_namespace(RunOptions, args)
    lrs = load_lrs(opts.lr_from) if opts.lr_from else None
    rep = compare(
        base,
        grid.archs,
        grid.optimizers,
        list(range(grid.seeds)),
        Path(base.out),
        lrs=lrs,
        overwrite=opts.overwrite,
        progress=opts.progress,
        jobs=grid.jobs,
        command=_command_line(),
    )
    print()
    print(rep["table"])
    print("Ordering by mean final validation loss (best first):")
    print("\n".join(rep["ordering"]))
    print(f"\nReport: {Path(base.out) / 'summary.md'} (+ summary.csv, summary.json, *.png)")
    return 0


# ----------------------------------------------------------------------------- sweep


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    _options(
        p,
        (SweepOptions, ()),
        (TrainConfig, _PER_CELL),
        (RunOptions, ("resume", "stop_after", "lr_from")),
        defaults=SWEEP_DEFAULTS,
    )


def run_sweep(args) -> int:
    """Pick each optimizer's best learning-rate scale (and role multipliers) on validation loss."""
    grid = from_namespace(SweepOptions, args)
    base = from_namespace(TrainConfig, args)
    opts = from_namespace(RunOptions, args)
    res = sweep(
        base,
        grid.archs,
        grid.optimizers,
        grid.lr_scales,
        dict(grid.role_grid),
        Path(base.out),
        seed=base.seed,
        overwrite=opts.overwrite,
        progress=opts.progress,
        jobs=grid.jobs,
        extend_edges=grid.extend_edges,
        command=_command_line(),
    )
    print(res["table"])
    print(f"\nBest learning rates: {Path(base.out) / 'best.json'} (use with --lr-from)")
    return 0


# ----------------------------------------------------------------------------- reproduce


def add_reproduce_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "figure",
        choices=FIGURES,
        help="the paper's figure: fig2 (gpt-oss routers), fig3 (Qwen3 "
        "embedding/head x MLP), fig4 (Gemma 3 embedding/head x MLP), fig5 (OLMoE routers)",
    )
    _options(p, (ReproduceOptions, ()), (RunOptions, ("resume", "stop_after", "lr_from")))


def run_reproduce(args) -> int:
    """Run one of the paper's block-wise comparisons (a figure's grid of recipe variants) and report it."""
    opts = from_namespace(ReproduceOptions, args, figure=args.figure)
    run = from_namespace(RunOptions, args)
    rep = reproduce(opts, overwrite=run.overwrite, progress=run.progress, command=_command_line())
    if not rep:  # a torchrun rank other than 0
        return 0
    print()
    print(rep["table"])
    print("\n".join(rep["ordering"]))
    if rep.get("contrasts"):
        print("\n".join(rep["contrasts"]))
    print(f"\nReport: {opts.out_dir() / 'summary.md'} (+ summary.csv, summary.json, *.png)")
    return 0


# ----------------------------------------------------------------------------- report


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", help="a compare --out directory (its runs/ are read) or any folder of run directories")
    p.add_argument("--out", default=None, help="where the report goes (default: the runs directory itself)")
    p.add_argument("--title", default="equiopt comparison", help="report title (default %(default)s)")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")


def run_report(args) -> int:
    """Rebuild summary.md/csv/json and plots from finished runs (e.g. of an interrupted compare)."""
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


# ----------------------------------------------------------------------------- plan


@dataclass
class PlanOptions:
    """``equiopt plan``: which model to plan (built from its config, no weights downloaded)."""

    config: str | None = option(
        None,
        metavar="CONFIG_JSON",
        help="a Hugging Face config.json (its model_type and architectures[0] pick the classes)",
    )
    model: str | None = option(
        None,
        metavar="CLASS",
        help="transformers model class, e.g. Qwen3ForCausalLM (default: the config's architectures[0])",
    )
    set: list[str] = option(
        default_factory=list,
        parse=str,
        repeat=True,
        metavar="KEY=VALUE",
        help="a config field, e.g. --set hidden_size=64 (values parsed as JSON when they can be)",
    )
    preset: str = option(
        "paper",
        choices=lambda: list(PRESETS) + list(DDC_PRESETS),
        help="optimizer preset whose maps the table shows; ddc_adam / ddc_muon: the gauges DDC claims "
        "(probed numerically: needs --device cpu)",
    )
    device: str = option(
        "meta",
        choices=("meta", "cpu"),
        help="meta: build without memory, a shrunk copy of the same architecture is traced; "
        "cpu: build and trace the model itself (small configs)",
    )

    def __post_init__(self) -> None:
        if self.config is None and self.model is None:
            raise ValueError("equiopt plan needs --config CONFIG_JSON or --model CLASS")
        for item in self.set:
            if "=" not in item:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        if self.preset in DDC_PRESETS and self.device == "meta":
            raise ValueError(
                f"--preset {self.preset}: DDC's rescale and norm-channel gauges are probed on the model's "
                "outputs, which a meta model has none of: pass --device cpu (a small config)"
            )


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_from_config(opts: PlanOptions) -> torch.nn.Module:
    """The model ``opts`` describes, on ``opts.device`` (meta: no parameter memory)."""
    import transformers  # the train extra; `equiopt plan` is a harness command

    fields = {}
    if opts.config is not None:
        with open(opts.config) as f:
            fields = json.load(f)
    fields.update({k: _value(v) for k, v in (item.split("=", 1) for item in opts.set)})
    cls_name = opts.model or (fields.get("architectures") or [None])[0]
    if cls_name is None:
        raise ValueError(f"{opts.config}: no architectures[] entry; pass --model CLASS")
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ValueError(f"--model {cls_name}: not a transformers class")
    fields.pop("architectures", None)
    if "model_type" in fields:
        config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        config = cls.config_class(**fields)
    with torch.device(opts.device):
        return cls(config)


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    _options(p, (PlanOptions, ()))


def run_plan(args) -> int:
    """Print the plan (role, layout, map per parameter) of a model built from its config, no weights;
    for a DDC preset the gauges each parameter is in."""
    opts = from_namespace(PlanOptions, args)
    model = build_from_config(opts)
    if opts.preset in DDC_PRESETS:
        print(ddc.gauge_table(make_plan(model, "adamw"), model, DDC_PRESETS[opts.preset]))
    else:
        print(make_plan(model, opts.preset).table())
    return 0


# ----------------------------------------------------------------------------- registry


def _audit_run(args) -> int:
    """Check numerically that the symmetries the plan assumes hold on a model."""
    return audit.run(args)


# ----------------------------------------------------------------------------- DDC experiments (issue #15)

# `equiopt ddc-collapse`'s defaults where they differ from the dataclasses' (the full run:
# ~10 epochs of a 300k-token slice; results/ddc/collapse/run.sh)
COLLAPSE_DEFAULTS = dict(
    steps=3000,
    batch_size=8,
    seq_len=128,
    eval_every=150,
    eval_tokens=8192,
    schedule="constant",
    out="runs/ddc-collapse",
)


def add_ddc_collapse_arguments(p: argparse.ArgumentParser) -> None:
    _options(
        p,
        (CollapseOptions, ()),
        (TrainConfig, ("optimizer", "seed", "dist", "lr_scale", "role_lr_scale")),
        (RunOptions, ("resume", "stop_after", "lr_from", "progress")),
        defaults=COLLAPSE_DEFAULTS,
    )


def run_ddc_collapse(args) -> int:
    """Over-training collapse and the dead-direction readout, per optimizer (issue #15)."""
    opts = from_namespace(CollapseOptions, args)
    base = from_namespace(TrainConfig, args)
    run_opts = from_namespace(RunOptions, args)
    collapse(base, opts, Path(base.out), overwrite=run_opts.overwrite, command=_command_line())
    print(f"Report: {Path(base.out) / 'summary.md'} (+ summary.json, fits.json, *.png)")
    return 0


def add_ddc_grok_arguments(p: argparse.ArgumentParser) -> None:
    _options(p, (GrokOptions, ()))


def run_ddc_grok(args) -> int:
    """Grokking depth: a + b mod p on a deep narrow MLP, seeds generalising per optimizer (issue #15)."""
    opts = from_namespace(GrokOptions, args)
    grok(opts, command=_command_line())
    print(f"Report: {Path(opts.out) / 'summary.md'} (+ summary.json)")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": (add_train_arguments, run_train),
    "compare": (add_compare_arguments, run_compare),
    "sweep": (add_sweep_arguments, run_sweep),
    "reproduce": (add_reproduce_arguments, run_reproduce),
    "report": (add_report_arguments, run_report),
    "audit": (audit.add_arguments, _audit_run),
    "plan": (add_plan_arguments, run_plan),
    "ddc-collapse": (add_ddc_collapse_arguments, run_ddc_collapse),
    "ddc-grok": (add_ddc_grok_arguments, run_ddc_grok),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="equiopt",
        description="Symmetry-compatible optimizers: training harness and tools. "
        "`equiopt compare` with no arguments runs the default comparison (~10 min on 2 CPU cores). "
        "The optimizer-step benchmark is `python benchmarks/bench.py`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add, run) in COMMANDS.items():
        doc = (run.__doc__ or "").strip().splitlines()
        help_ = doc[0] if doc else name
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(_run=run)
    return parser


# configuration / usage / run-directory errors: one line, not a traceback (EQUIOPT_DEBUG=1 shows it)
USAGE_ERRORS = (ValueError, KeyError, FileExistsError, FileNotFoundError, DataError, RunDirError)


def main(argv: list[str] | None = None) -> int:
    rc = _main(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ and argv is None:
        # a rank under torchrun leaves without the interpreter's teardown: after
        # destroy_process_group a gloo worker thread can still be joinable when C++ statics
        # are destroyed, and std::terminate then aborts a finished run (~1 run in 6 seen on
        # 2 CPU cores); everything was written and flushed by then
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("EQUIOPT_DEBUG"):
        return int(args._run(args) or 0)
    try:
        return int(args._run(args) or 0)
    except TrainingInterrupted as e:
        print(f"equiopt {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum  # 130 after SIGINT, 143 after SIGTERM
    except USAGE_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        parser.exit(2, f"equiopt {args.command}: error: {msg} [{type(e).__name__}; EQUIOPT_DEBUG=1 for a traceback]\n")
    except KeyboardInterrupt:
        parser.exit(128 + signal.SIGINT, "interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
