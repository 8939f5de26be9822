"""The run configurations: one dataclass field per option, validated on construction.

:class:`TrainConfig` (one training run; its ``data`` is a :class:`~equiopt.train.data.DataConfig`)
is what a run directory records in ``config.json`` and in every checkpoint.
:class:`RunOptions` says how to treat the run directory (resume, overwrite, progress) and is
not recorded. :class:`CompareOptions` and :class:`SweepOptions` are the grids of
``equiopt compare`` / ``equiopt sweep``. The command line is generated from these fields
(:mod:`equiopt.train.options`); validation errors name the field and its flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..presets import PRESETS, ROLES
from .data import DataConfig
from .models import ARCHS, SIZES, ModelConfig, preset
from .options import (
    csv_list,
    float_list,
    option,
    option_name,
    positive_int,
    role_floats,
    role_grid,
)

# The muon preset's full spec (map, learning rate, momentum, scale) for the hidden-matrix roles.
_MUON_HIDDEN = {role: dict(PRESETS["muon"][role]) for role in ("mlp_in", "mlp_out", "expert_in", "expert_out")}

# optimizer name -> (equiopt preset, rules). Ablations are the paper stack with one block
# family changed: AdamW there (equiopt gives an "adamw" rule the AdamW preset's learning rate
# for that role), or Muon's map and hyperparameters on the MLP / expert matrices.
OPTIMIZERS: dict[str, tuple[str, Mapping[str, Any]]] = {
    "adamw": ("adamw", {}),
    "muon": ("muon", {}),
    "paper": ("paper", {}),
    "paper-adamw-embed-head": ("paper", {"embedding": "adamw", "lm_head": "adamw", "tied_embedding": "adamw"}),
    "paper-adamw-router": ("paper", {"router": "adamw"}),
    "paper-left-spectral-router": ("paper", {"router": "left_spectral"}),
    "paper-muon-mlp": ("paper", _MUON_HIDDEN),
    # Dead-Direction Conditioners (equiopt.ddc): their own optimizer class, one learning rate
    # per kind of group (lr_scale multiplies both), no per-role rules
    "ddc_adam": ("ddc_adam", {}),
    "ddc_muon": ("ddc_muon", {}),
}
DDC_OPTIMIZERS = ("ddc_adam", "ddc_muon")
ROUTER_ONLY = ("paper-adamw-router", "paper-left-spectral-router")  # no-ops on dense models
SCHEDULES = ("cosine", "constant", "wsd")
# Per-role schedule specs (``role_schedule``): the global ones above (with --warmup and
# --min-lr-ratio), or one of these with its argument:
#   stable_decay:F   constant, then linear decay to 0 over the last fraction F of the steps,
#                    no warm-up (the paper's matrix roles, F = 0.4)
#   warmup_cosine:W  linear warm-up from 0 over W steps, then cosine to 0 (the paper's AdamW
#                    roles, W = 100; transformers' get_cosine_schedule_with_warmup)
ROLE_SCHEDULE_KINDS = ("stable_decay", "warmup_cosine")
ROLE_SCHEDULE_DEFAULT = "*"  # role_schedule key for every role not named
DIST_MODES = ("none", "ddp", "fsdp2")
AUTOCAST_MODES = ("auto", "bf16", "none")
MODEL_OVERRIDES = (
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "num_experts",
    "top_k",
    "sliding_window",
    "vocab_size",
    "rope_theta",
    "tie_embeddings",
    "aux_loss_coef",
)

_MODEL, _EVAL, _DATA = "model and schedule", "evaluation, checkpoints, machine", "data"


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def parse_schedule(spec: str) -> tuple[str, float | None]:
    """``"stable_decay:0.4"`` -> ("stable_decay", 0.4); ``"cosine"`` -> ("cosine", None).
    ValueError naming the spec when it is not a known schedule."""
    name, sep, arg = spec.partition(":")
    if name in SCHEDULES and not sep:
        return name, None
    if name in ROLE_SCHEDULE_KINDS and sep:
        try:
            x = float(arg)
        except ValueError:
            x = math.nan
        if name == "stable_decay" and _finite(x) and 0.0 < x <= 1.0:
            return name, x
        if name == "warmup_cosine" and _finite(x) and x >= 0 and x == int(x):
            return name, x
    raise ValueError(
        f"role_schedule (--role-schedule): unknown schedule {spec!r}; use one of "
        f"{', '.join(SCHEDULES)}, stable_decay:F (0 < F <= 1) or warmup_cosine:W (W >= 0 steps)"
    )


def role_strings(s: str) -> dict[str, str]:
    """'vector=warmup_cosine:100,*=stable_decay:0.4' -> {'vector': ..., '*': ...}."""
    out = {}
    for item in csv_list(s):
        k, sep, v = item.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise argparse.ArgumentTypeError(f"expected ROLE=SCHEDULE[,ROLE=SCHEDULE...], got {s!r}")
        out[k.strip()] = v.strip()
    return out


def model_overrides(s: str) -> dict[str, Any]:
    """'hidden_size=256,rope_theta=1e6,tie_embeddings=false' -> typed values (int, float, bool)."""
    out: dict[str, Any] = {}
    for item in csv_list(s):
        k, sep, v = item.partition("=")
        v = v.strip()
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {s!r}")
        if v.lower() in ("true", "false"):
            out[k.strip()] = v.lower() == "true"
            continue
        try:
            out[k.strip()] = int(v)
        except ValueError:
            try:
                out[k.strip()] = float(v)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{k.strip()}={v}: expected a number or true/false") from None
    return out


@dataclass
class TrainConfig:
    """One training run (everything that determines its result)."""

    arch: str = option("qwen3", choices=ARCHS, help="architecture family")
    size: str = option(
        "tiny",
        choices=SIZES,
        group=_MODEL,
        help="model size preset: tiny (CPU, 1-3M params) or paper (the paper's shapes, 0.75B-6.9B "
        "total; the vocabulary always follows the data's tokenizer)",
    )
    optimizer: str = option("paper", choices=lambda: list(OPTIMIZERS), help="optimizer")
    lr_scale: float = option(1.0, group=_MODEL, help="multiplier of every role's preset learning rate")
    role_lr_scale: dict[str, float] = option(
        default_factory=dict,
        flag="--role-lr",
        parse=role_floats,
        metavar="ROLE=X,...",
        group=_MODEL,
        help="extra per-role learning-rate multipliers, e.g. embedding=2,router=0.5",
    )
    steps: int = option(200, parse=positive_int, group=_MODEL, help="training steps")
    batch_size: int = option(16, parse=positive_int, group=_MODEL, help="sequences per step")
    seq_len: int = option(128, parse=positive_int, group=_MODEL, help="tokens per sequence")
    warmup: int = option(-1, group=_MODEL, help="linear warm-up steps, -1 = 10% of --steps")
    schedule: str = option(
        "cosine",
        choices=SCHEDULES,
        group=_MODEL,
        help="LR schedule after warm-up: cosine decay to --min-lr-ratio, constant, or wsd "
        "(constant, then linear decay over the last 20%)",
    )
    min_lr_ratio: float = option(0.1, group=_MODEL, help="final LR / peak LR")
    grad_clip: float = option(0.0, group=_MODEL, help="global grad-norm clip, 0 = off")
    eval_every: int = option(50, parse=positive_int, group=_EVAL, help="steps between evaluations")
    eval_tokens: int = option(
        16384, parse=positive_int, group=_EVAL, help="validation tokens per evaluation (fixed subset)"
    )
    ckpt_every: int = option(100, group=_EVAL, help="steps between checkpoints, 0 = end only")
    keep_checkpoint: bool = option(True, cli=False, help="False: delete checkpoint.pt after a successful run")
    seed: int = option(0, help="model init and batch order seed")
    aux_loss: bool = option(
        False,
        group=_MODEL,
        help="add the MoE load-balancing auxiliary loss to the training loss (routing metrics are logged either way)",
    )
    threads: int = option(0, group=_EVAL, help="torch CPU threads, 0 = torch's default")
    device: str = option("cpu", group=_EVAL, help="cpu (float32) or cuda[:i] (float32 weights, bfloat16 autocast)")
    autocast: str = option(
        "auto",
        group=_EVAL,
        choices=AUTOCAST_MODES,
        help="bfloat16 autocast of forward and backward (weights and optimizer stay float32): auto = on CUDA "
        "only; bf16 = on CPU too (on CPUs with bf16 units forward+backward of the CPU-scale fig3 / fig5 "
        "models ran 1.9x / 1.3x faster: results/autocast_cpu.md); none = float32",
    )
    dist: str = option(
        "none",
        choices=DIST_MODES,
        help="multi-process data parallelism under torchrun (one process per device; gloo on CPU, "
        "nccl on GPUs): torchrun --nproc_per_node=N -m equiopt train --dist ddp|fsdp2 ...",
    )
    model: dict[str, Any] = option(
        default_factory=dict,
        parse=model_overrides,
        metavar="KEY=VALUE,...",
        group=_MODEL,
        help="override preset fields, e.g. hidden_size=256,num_layers=6,num_experts=16,"
        "rope_theta=1e6,tie_embeddings=false",
    )
    role_schedule: dict[str, str] = option(
        default_factory=dict,
        parse=role_strings,
        metavar="ROLE=SCHED,...",
        group=_MODEL,
        help="per-role LR schedules (one multiplier curve per param_group, chosen by its role; '*' = every role "
        "not named; roles not covered follow --schedule): cosine|constant|wsd (with --warmup, "
        "--min-lr-ratio), stable_decay:F (constant, linear decay to 0 over the last fraction F, no warm-up) "
        "or warmup_cosine:W (W warm-up steps from 0, cosine to 0); the paper's recipes: "
        "vector=warmup_cosine:100,*=stable_decay:0.4",
    )
    rules: dict[str, Any] = option(
        default_factory=dict,
        cli=False,
        help="per-role map rules on top of the optimizer's (equiopt.plan rules=): "
        "{role: map name or {hyperparameter: value}}",
    )
    role_lr: dict[str, float] = option(
        default_factory=dict,
        cli=False,
        help="absolute per-role learning rates (equiopt.plan lr=), before lr_scale and role_lr_scale",
    )
    roles: dict[str, str] = option(
        default_factory=dict, cli=False, help="role overrides, regex on parameter names (equiopt.plan roles=)"
    )
    layouts: dict[str, str] = option(
        default_factory=dict, cli=False, help="layout overrides, regex on parameter names (equiopt.plan layouts=)"
    )
    variant: str = option("", cli=False, help="a label for reports (a recipe's variant name); '' = the optimizer")
    tensorboard: bool = option(
        True, group=_EVAL, help="also write TensorBoard event files (OUT/tb) with every scalar of metrics.jsonl"
    )
    data: DataConfig = option(default_factory=DataConfig, help="the data (DataConfig)")
    out: str = option("runs/train", help="run directory (compare, sweep: the output directory)")

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        self.validate()

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{**d, "data": DataConfig(**d.get("data", {}))})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _err(self, name: str, msg: str) -> ValueError:
        return ValueError(f"{option_name(TrainConfig, name)} {msg}")

    def validate(self) -> None:
        """Raise ValueError naming the first bad option (called on construction)."""
        self._validate_names()
        self._validate_numbers()
        self._validate_roles_and_model()
        self.data.validate()

    def _validate_names(self) -> None:
        if self.arch not in ARCHS:
            raise self._err("arch", f"must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.dist not in DIST_MODES:
            raise ValueError(f"unknown dist mode {self.dist!r}; choose one of {', '.join(DIST_MODES)}")
        if self.optimizer in DDC_OPTIMIZERS and self.role_lr_scale:
            raise self._err(
                "role_lr_scale",
                f"is not supported by {self.optimizer!r} (its groups are gauge kinds, not roles); use --lr-scale",
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.autocast not in AUTOCAST_MODES:
            raise self._err("autocast", f"must be one of {', '.join(AUTOCAST_MODES)}, got {self.autocast!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise self._err("device", f"must be 'cpu' or 'cuda[:index]', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise self._err("device", f"{self.device!r}: torch sees no CUDA device on this machine")

    def _validate_numbers(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_tokens"):
            if not getattr(self, name) >= 1:
                raise self._err(name, f"must be >= 1, got {getattr(self, name)}")
        if not (self.warmup == -1 or 0 <= self.warmup <= self.steps):
            raise self._err(
                "warmup", f"must be -1 (auto: 10% of steps) or in [0, steps={self.steps}], got {self.warmup}"
            )
        for name in ("ckpt_every", "threads"):
            if not getattr(self, name) >= 0:
                raise self._err(name, f"must be >= 0, got {getattr(self, name)}")
        if not (_finite(self.grad_clip) and self.grad_clip >= 0):
            raise self._err("grad_clip", f"must be a finite number >= 0 (0 = off), got {self.grad_clip}")
        if not (_finite(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise self._err("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not (_finite(self.lr_scale) and self.lr_scale > 0):
            raise self._err("lr_scale", f"must be a positive number, got {self.lr_scale}")

    def _validate_roles_and_model(self) -> None:
        for role, v in self.role_lr_scale.items():
            if role not in ROLES:
                raise ValueError(f"role_lr_scale: unknown role {role!r}; roles: {', '.join(ROLES)}")
            if not (_finite(v) and v > 0):
                raise self._err("role_lr_scale", f"[{role!r}] must be a positive number, got {v}")
        for role, spec in self.role_schedule.items():
            if role != ROLE_SCHEDULE_DEFAULT and role not in ROLES:
                raise ValueError(
                    f"role_schedule: unknown role {role!r}; roles: {', '.join(ROLES)} "
                    f"(or {ROLE_SCHEDULE_DEFAULT!r} for every role not named)"
                )
            parse_schedule(spec)
        for name, table in (("rules", self.rules), ("role_lr", self.role_lr)):
            for role in table:
                if role not in ROLES:
                    raise ValueError(f"{name}: unknown role {role!r}; roles: {', '.join(ROLES)}")
        for role, v in self.role_lr.items():
            if not (_finite(v) and v >= 0):
                raise ValueError(f"role_lr[{role!r}] must be a finite number >= 0, got {v}")
        unknown = set(self.model) - set(MODEL_OVERRIDES)
        if unknown:
            raise ValueError(f"unknown model override(s) {sorted(unknown)}; valid: {', '.join(MODEL_OVERRIDES)}")
        self.model_config(vocab_size=self.model.get("vocab_size", 4096)).validate()

    @property
    def warmup_steps(self) -> int:
        return self.steps // 10 if self.warmup == -1 else self.warmup

    def model_config(self, vocab_size: int) -> ModelConfig:
        mc = preset(self.arch, self.size)
        mc = dataclasses.replace(
            mc,
            vocab_size=vocab_size,
            max_seq_len=self.seq_len,
            aux_loss=self.aux_loss,
            **{k: v for k, v in self.model.items() if k != "vocab_size"},
        )
        if mc.layer_types is not None and len(mc.layer_types) != mc.num_layers:
            pattern = mc.layer_types
            mc.layer_types = [pattern[i % len(pattern)] for i in range(mc.num_layers)]
            mc.layer_types[-1] = "full_attention"
        return mc


# Fields whose change does not make a checkpoint another run: "out" (where it lives) and
# "steps" (a run may be extended or shortened; the schedule follows the new length).
RESUMABLE_CHANGES = ("out", "steps")


def _as_recorded(config: dict) -> dict:
    """``config`` as a run directory's JSON gives it back (tuples become lists)."""
    return json.loads(json.dumps(config))


def config_diff(saved: dict, mine: dict, ignore: tuple[str, ...] = ("out",)) -> list[str]:
    """Keys (``data.*`` spelled out) whose values differ, ``ignore`` aside; a field the saved
    config predates counts as holding its default, so runs recorded by an older harness match.
    Both sides are compared in their recorded (JSON) form: a tuple in ``mine`` (AdamW ``betas``)
    equals the list that ``config.json`` gives back."""
    saved, mine = _as_recorded(saved), _as_recorded(mine)
    defaults = _as_recorded({**TrainConfig().to_dict(), "data": dataclasses.asdict(DataConfig())})
    diff = []
    for k in sorted(set(saved) | set(mine)):
        if k in ignore:
            continue
        a, b = saved.get(k, defaults.get(k)), mine.get(k, defaults.get(k))
        if k == "data" and isinstance(a, dict) and isinstance(b, dict):
            dd = defaults["data"]
            a, b = {**dd, **a}, {**dd, **b}
            diff += [f"data.{x}" for x in sorted(set(a) | set(b)) if a.get(x) != b.get(x)]
        elif a != b:
            diff.append(k)
    return diff


@dataclass
class RunOptions:
    """How ``equiopt train`` treats its run directory (not part of the recorded config)."""

    resume: bool = option(False, help="continue the run in --out from its checkpoint")
    overwrite: bool = option(False, help="discard existing runs in --out instead of refusing/reusing them")
    progress: bool = option(True, help="progress bars")
    lr_from: str | None = option(
        None,
        metavar="BEST_JSON",
        help="per (arch, optimizer) lr_scale and role multipliers from sweeps' best.json "
        "files (comma-separated; later files win)",
    )
    stop_after: int | None = option(
        None, parse=positive_int, hidden=True, help="stop after N steps as a kill would (tests)"
    )

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise ValueError("resume (--resume) and overwrite (--overwrite) contradict each other; pass one")


def check_grid(archs: list[str], optimizers: list[str]) -> None:
    """The archs and optimizers of a grid: non-empty, known, no repeats."""
    if not archs:
        raise ValueError(f"archs (--archs) names no architecture; give a comma-separated list from {','.join(ARCHS)}")
    if not optimizers:
        raise ValueError(
            f"optimizers (--optimizers) names no optimizer; give a comma-separated list from {','.join(OPTIMIZERS)}"
        )
    for a in archs:
        if a not in ARCHS:
            raise ValueError(f"unknown arch {a!r}; choose from {', '.join(ARCHS)}")
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {o!r}; choose from {', '.join(OPTIMIZERS)}")
    if len(set(archs)) != len(archs) or len(set(optimizers)) != len(optimizers):
        raise ValueError("--archs and --optimizers must not repeat a name")


@dataclass
class GridOptions:
    archs: list[str] = option(
        default_factory=lambda: ["qwen3"], parse=csv_list, help=f"comma-separated, from {','.join(ARCHS)}"
    )
    optimizers: list[str] = option(
        default_factory=lambda: ["adamw", "muon", "paper"],
        parse=csv_list,
        help=f"comma-separated, from {','.join(OPTIMIZERS)}",
    )
    jobs: int = option(
        1,
        parse=positive_int,
        help="runs trained at once, each in its own process on one thread (1 = in this process, on --threads threads)",
    )

    def __post_init__(self) -> None:
        check_grid(self.archs, self.optimizers)


@dataclass
class CompareOptions(GridOptions):
    seeds: int = option(2, parse=positive_int, help="seeds 0..N-1 per cell")


@dataclass
class SweepOptions(GridOptions):
    lr_scales: list[float] = option(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0],
        parse=float_list,
        help="global multipliers of the preset learning rates to try",
    )
    role_grid: list[tuple[str, list[float]]] = option(
        default_factory=list,
        parse=role_grid,
        repeat=True,
        metavar="ROLE=X,Y,...",
        help="after the global scale, try these multipliers for one role (coordinate descent in the given "
        "order), e.g. --role-grid embedding=0.5,2",
    )
    extend_edges: int = option(
        2, metavar="N", help="when the best scale is on the grid's edge, extend the grid past it, up to N times"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr_scales or any(not (_finite(s) and s > 0) for s in self.lr_scales):
            raise ValueError(f"lr_scales (--lr-scales) must be positive numbers, got {self.lr_scales}")
        if len(set(self.lr_scales)) != len(self.lr_scales):
            raise ValueError(f"lr_scales (--lr-scales) repeats a value: {self.lr_scales}")
        if self.role_grid and any(o in DDC_OPTIMIZERS for o in self.optimizers):
            raise ValueError(
                "--role-grid does not apply to the DDC optimizers (their groups are gauge kinds, not "
                "roles); sweep them with --lr-scales only"
            )
        for role, vals in self.role_grid:
            if role not in ROLES:
                raise ValueError(f"--role-grid: unknown role {role!r}; roles: {', '.join(ROLES)}")
            if not vals or any(not (_finite(v) and v > 0) for v in vals):
                raise ValueError(f"--role-grid {role}: multipliers must be positive, got {vals}")
        if self.extend_edges < 0:
            raise ValueError(f"extend_edges (--extend-edges) must be >= 0, got {self.extend_edges}")
