"""Recipes: the paper's figure runs as typed configurations, and their block-wise grids.

A :class:`Recipe` pins a whole run: the model (the family's ``paper`` size preset plus
overrides), the optimizer per role (``equiopt.plan`` ``rules=`` and absolute ``lr=``), the
per-role learning-rate schedules, sequence length, global batch, steps, evaluation and data.
Its :class:`Variant` s are the figure's comparison: one block's rule changed at a time,
everything else fixed. ``Recipe.train_config(variant, seed, out, scale)`` is the
:class:`~equiopt.train.config.TrainConfig` of one run; :func:`reproduce` runs a figure's grid
(``equiopt reproduce fig3 --scale cpu``).

Sources of the numbers: issue #13's table (read from the authors' released training scripts
and README commands, GitHub timlautk/equivariant_optimizers): per-role learning rates and weight
decays of the figure runs, 20/18/12/12 layers, rope theta 1e6 (Qwen3), untied Gemma 3, OLMoE
32 experts top-8, gpt-oss d 2048 / expert width 2048 / 16 experts top-4, router aux-loss
coefficient 0, sequence length 1024, global batch 224/144/160/64, 30k/50k/30k/60k steps. The
embedding / LM-head learning rates of the hybrid and AdamW variants come from the same
README commands. Schedules as in the authors' scripts: every role of a symmetry-compatible or
Muon optimizer (AdamW on an embedding, head or router included: the scripts schedule by
optimizer *role*, and only the "other" role — gains, biases — gets the cosine) holds its rate,
then decays linearly to 0 over the last 40% of steps, no warm-up; the vector role (AdamW,
betas 0.9/0.95) warms up over 100 steps from 0 and follows a cosine to 0.

Known differences from the authors' runs (documented, not hidden):

* data: fineweb-edu 10B tokenized with each model's own tokenizer; equiopt reads headerless
  ``.bin`` shards (``--data DIR``): the authors' shards carry a 1 KiB header to strip first;
* the LM head's maps are centered here (equiopt's convention for a block with the softmax
  shift); the released scripts pass ``center_rows=False`` for the head (the router is centered);
* Polar Express: equiopt's 5-step coefficients, not the authors' (each ~9% from the exact polar);
* Muon's shape factor on stacked experts uses each expert's logical (out, in); the authors'
  uses the storage shape (a factor sqrt(2) on OLMoE's down projections; ours is consistent);
* gpt-oss: the expert width equals d, so the planner cannot read the expert layouts from
  shapes; the recipe passes them (``roles=`` / ``layouts=``);
* the Gemma 3 hybrid-MLP runs used a ``train_gemma3_1b_swiglu.py`` script that the repository
  does not contain (its MLP activation is not known); the recipe keeps Gemma's GeGLU;
* the authors evaluate every 500 steps on ~10.5M tokens (the recipe does the same).

CPU scale (``scale="cpu"``), rules applied to every figure recipe (:func:`cpu_model`):
d = 128, 4 layers, 4 heads of 32 (KV heads in the paper's ratio, at least 1), MLP / expert
width in the paper's ratio to d, number of experts and top-k unchanged, sliding windows
in the paper's ratio to the sequence length, rope theta unchanged; sequence length 128,
global batch 32 (4,096 tokens per step), 640 steps (2.6M tokens), the AdamW warm-up in the
paper's fraction of the run (at least 1 step), the same per-role learning rates times a
per-variant ``lr_scale`` (chosen by ``--lr-scales``), evaluation every 40 steps on 16,384
tokens, data ``shakespeare+kjv`` (BPE 4096). The role structure (every block, its map, its
schedule shape) is the figure's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data as D
from .config import AUTOCAST_MODES, TrainConfig
from .data import DataConfig
from .experiments import _for_jobs, edge_extension, run_many
from .models import preset
from .options import csv_list, float_list, option, positive_int
from .report import write_report
from .rundir import write_json

__all__ = ["Recipe", "Variant", "RECIPES", "FIGURES", "CPU_TUNED", "ReproduceOptions", "cpu_model", "reproduce"]

SCALES = ("cpu", "paper")

# -- the roles' optimizers, as equiopt rules ------------------------------------------

MATRIX_WD = 1e-3
# Muon as the authors run it (MuonHeadsPolarExpress): Polar Express, Nesterov, momentum 0.95,
# sqrt(max(1, out/in)); on the stored [out, in] matrix (not column-aware), per expert.
MUON_RULE = {
    "map": "polar",
    "polar_method": "polar_express",
    "nesterov": True,
    "momentum": 0.95,
    "scale": "muon",
    "per_head": False,
    "column_aware": False,
    "weight_decay": MATRIX_WD,
}
HYBRID_RULE = {
    "map": "hybrid",
    "order": "row_then_polar",
    "alpha": 1.0,
    "momentum": 0.95,
    "nesterov": False,
    "weight_decay": MATRIX_WD,
}
ROW_NORM_RULE = {"map": "row_norm", "momentum": 0.95, "weight_decay": 0.0}
CENTERED_ROW_NORM_RULE = {"map": "centered_row_norm", "momentum": 0.95, "weight_decay": 0.0}
LEFT_SPECTRAL_RULE = {"map": "left_spectral", "alpha": 1.0, "momentum": 0.95, "weight_decay": 0.0}
EMBED_HYBRID_RULE = {**HYBRID_RULE, "weight_decay": 0.0}


def adamw_rule(weight_decay: float) -> dict:
    return {"map": "adamw", "betas": (0.9, 0.95), "adam_eps": 1e-8, "weight_decay": weight_decay}


ATTENTION_RULE = {**MUON_RULE, "per_head": True}  # per-head Muon on q/k/v/o
PAPER_SCHEDULE = {"vector": "warmup_cosine:100", "*": "stable_decay:0.4"}
PAPER_WARMUP = 100  # the AdamW (vector) roles' warm-up steps in the figure runs


@dataclass(frozen=True)
class Variant:
    """One cell of a figure's grid: rules and learning rates changed from the recipe's."""

    name: str
    rules: dict[str, Any] = field(default_factory=dict)
    lr: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Recipe:
    """A figure run of the paper: everything that determines it (see the module docstring)."""

    name: str
    figure: str
    arch: str
    title: str
    model: dict[str, Any]  # ModelConfig overrides of the family's "paper" preset
    rules: dict[str, Any]  # role -> rule (the recipe's base variant)
    lr: dict[str, float]  # role -> absolute learning rate
    variants: tuple[Variant, ...]
    baseline: str  # the variant the p-values are against
    contrasts: tuple[tuple[str, str], ...]  # the figure's block-wise comparisons (a, b)
    role_schedule: dict[str, str] = field(default_factory=lambda: dict(PAPER_SCHEDULE))
    seq_len: int = 1024
    global_batch: int = 0
    steps: int = 0
    eval_every: int = 500
    eval_tokens: int = 10_485_760
    data: dict[str, Any] = field(default_factory=dict)  # DataConfig fields
    roles: dict[str, str] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)
    vocab_size: int = 0  # the model's vocabulary (its tokenizer's); equiopt takes it from the data

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ValueError(f"{self.figure}: unknown variant {name!r}; choose from {', '.join(self.variant_names)}")

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def role_rules(self, variant: str) -> dict[str, Any]:
        """Per-role rules of one variant (full dicts: recipe's, then the variant's)."""
        v = self.variant(variant)
        return {**self.rules, **v.rules}

    def role_lrs(self, variant: str) -> dict[str, float]:
        return {**self.lr, **self.variant(variant).lr}

    def train_config(
        self, variant: str, seed: int = 0, out: str = "runs/recipe", scale: str = "paper", **overrides: Any
    ) -> TrainConfig:
        """The TrainConfig of one run of this recipe (``overrides``: TrainConfig fields that win)."""
        if scale not in SCALES:
            raise ValueError(f"scale (--scale) must be one of {', '.join(SCALES)}, got {scale!r}")
        kw: dict[str, Any] = dict(
            arch=self.arch,
            size="paper",
            optimizer="paper",
            seed=seed,
            out=out,
            variant=variant,
            rules=self.role_rules(variant),
            role_lr=self.role_lrs(variant),
            roles=dict(self.roles),
            layouts=dict(self.layouts),
            role_schedule=dict(self.role_schedule),
            schedule="constant",
            warmup=0,
            model=dict(self.model),
            seq_len=self.seq_len,
            batch_size=self.global_batch,
            steps=self.steps,
            eval_every=self.eval_every,
            eval_tokens=self.eval_tokens,
            ckpt_every=1000,
            data=DataConfig(**self.data),
        )
        if scale == "cpu":
            kw.update(cpu_overrides(self))
        kw.update(overrides)
        if "steps" in overrides and "role_schedule" not in overrides and scale == "cpu":
            kw["role_schedule"] = cpu_schedule(self, int(kw["steps"]))
        return TrainConfig(**kw)


# -- CPU scale -------------------------------------------------------------------------

CPU: dict[str, int] = dict(
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    head_dim=32,
    seq_len=128,
    global_batch=32,
    steps=640,
    eval_every=40,
    eval_tokens=16384,
)
CPU_DATA: dict[str, Any] = {"source": "shakespeare+kjv", "vocab_size": 4096}


def cpu_model(recipe: Recipe) -> dict[str, Any]:
    """The CPU-scale model overrides of a figure recipe (the rules of the module docstring)."""
    mc = dataclasses.replace(preset(recipe.arch, "paper"), **recipe.model)
    d, heads = CPU["hidden_size"], CPU["num_heads"]
    out: dict[str, Any] = dict(
        hidden_size=d,
        num_layers=CPU["num_layers"],
        num_heads=heads,
        head_dim=CPU["head_dim"],
        num_kv_heads=max(1, round(heads * mc.num_kv_heads / mc.num_heads)),
        intermediate_size=max(8, round(d * mc.intermediate_size / mc.hidden_size)),
    )
    if mc.num_experts:
        out.update(num_experts=mc.num_experts, top_k=mc.top_k)
    if mc.sliding_window:
        out["sliding_window"] = max(8, round(mc.sliding_window * CPU["seq_len"] / recipe.seq_len))
    for k in ("rope_theta", "tie_embeddings", "aux_loss_coef"):
        if k in recipe.model:
            out[k] = recipe.model[k]
    return out


def cpu_schedule(recipe: Recipe, steps: int) -> dict[str, str]:
    """The recipe's schedules with the AdamW warm-up in the figure run's fraction of the steps."""
    out = {}
    for role, spec in recipe.role_schedule.items():
        if spec.startswith("warmup_cosine:"):
            w = float(spec.partition(":")[2])
            spec = f"warmup_cosine:{max(1, round(w * steps / recipe.steps))}"
        out[role] = spec
    return out


def cpu_overrides(recipe: Recipe) -> dict[str, Any]:
    return dict(
        model=cpu_model(recipe),
        seq_len=CPU["seq_len"],
        batch_size=CPU["global_batch"],
        steps=CPU["steps"],
        eval_every=CPU["eval_every"],
        eval_tokens=CPU["eval_tokens"],
        role_schedule=cpu_schedule(recipe, CPU["steps"]),
        ckpt_every=200,
        data=DataConfig(**CPU_DATA),
    )


# -- the figure recipes ------------------------------------------------------------------


def _dense_variants(
    embed_head_lr: dict[str, dict[str, float]], mlp_lrs: dict[str, dict[str, dict[str, float]]] | None = None
) -> tuple[Variant, ...]:
    """Qwen3 / Gemma 3 grid: embedding/head rule in {row-norm, hybrid, AdamW} x MLP rule in {Muon, hybrid}.
    ``embed_head_lr[rule]`` = {"embedding": lr, "lm_head": lr}; ``mlp_lrs[mlp][rule]`` overrides it per MLP rule."""
    eh_rules = {
        "rownorm": {"embedding": ROW_NORM_RULE, "lm_head": CENTERED_ROW_NORM_RULE},
        "hybrid": {"embedding": EMBED_HYBRID_RULE, "lm_head": EMBED_HYBRID_RULE},
        "adamw": {"embedding": adamw_rule(0.0), "lm_head": adamw_rule(0.0)},
    }
    mlp_rules = {
        "hybrid": {"mlp_in": HYBRID_RULE, "mlp_out": HYBRID_RULE},
        "muon": {"mlp_in": MUON_RULE, "mlp_out": MUON_RULE},
    }
    out = []
    for mlp in ("hybrid", "muon"):
        for eh in ("rownorm", "hybrid", "adamw"):
            lr = dict(embed_head_lr[eh])
            lr.update(((mlp_lrs or {}).get(mlp) or {}).get(eh, {}))
            out.append(Variant(f"{eh}-embed-head/{mlp}-mlp", rules={**eh_rules[eh], **mlp_rules[mlp]}, lr=lr))
    return tuple(out)


def _dense_contrasts() -> tuple[tuple[str, str], ...]:
    pairs = []
    for mlp in ("hybrid", "muon"):
        for eh in ("rownorm", "hybrid"):
            pairs.append((f"{eh}-embed-head/{mlp}-mlp", f"adamw-embed-head/{mlp}-mlp"))
    for eh in ("rownorm", "hybrid", "adamw"):
        pairs.append((f"{eh}-embed-head/hybrid-mlp", f"{eh}-embed-head/muon-mlp"))
    return tuple(pairs)


def _dense_rules(lr_vector: float) -> tuple[dict, dict]:
    rules = {
        "embedding": ROW_NORM_RULE,
        "lm_head": CENTERED_ROW_NORM_RULE,
        "attention": ATTENTION_RULE,
        "matrix": MUON_RULE,
        "mlp_in": HYBRID_RULE,
        "mlp_out": HYBRID_RULE,
        "vector": adamw_rule(MATRIX_WD),
    }
    return rules, {"vector": lr_vector}


def _moe_variants(adamw_embed_head_lr: float) -> tuple[Variant, ...]:
    """OLMoE / gpt-oss grid: router rule in {centered row-norm, left-spectral, AdamW} + the AdamW
    reference (AdamW on embedding, LM head and router; Muon elsewhere, as in the authors' command)."""
    return (
        Variant("rownorm-router", rules={"router": CENTERED_ROW_NORM_RULE}),
        Variant("left-spectral-router", rules={"router": LEFT_SPECTRAL_RULE}),
        Variant("adamw-router", rules={"router": adamw_rule(0.0)}),
        Variant(
            "adamw-embed-head-router",
            rules={"embedding": adamw_rule(0.0), "lm_head": adamw_rule(0.0), "router": adamw_rule(0.0)},
            lr={"embedding": adamw_embed_head_lr, "lm_head": adamw_embed_head_lr},
            note="the figure's all-AdamW reference: AdamW on embedding, LM head and router",
        ),
    )


_MOE_CONTRASTS = (
    ("rownorm-router", "adamw-router"),
    ("left-spectral-router", "adamw-router"),
    ("rownorm-router", "left-spectral-router"),
    ("rownorm-router", "adamw-embed-head-router"),
)


def _moe_rules(lr_vector: float) -> dict:
    return {
        "embedding": ROW_NORM_RULE,
        "lm_head": CENTERED_ROW_NORM_RULE,
        "attention": ATTENTION_RULE,
        "matrix": MUON_RULE,
        "expert_in": MUON_RULE,
        "expert_out": MUON_RULE,
        "router": CENTERED_ROW_NORM_RULE,
        "vector": adamw_rule(MATRIX_WD),
    }


def _qwen3() -> Recipe:
    rules, lr = _dense_rules(5e-2)
    lr.update(embedding=5e-1, lm_head=5e-3, attention=2e-2, matrix=2e-2, mlp_in=2e-2, mlp_out=2e-2)
    return Recipe(
        name="qwen3-fig3",
        figure="fig3",
        arch="qwen3",
        title="Qwen3-0.6B-style, 20 layers (paper fig. 3)",
        model=dict(num_layers=20, rope_theta=1e6, tie_embeddings=False),
        rules=rules,
        lr=lr,
        variants=_dense_variants(
            {
                "rownorm": {"embedding": 5e-1, "lm_head": 5e-3},
                "hybrid": {"embedding": 1.0, "lm_head": 1e-2},
                "adamw": {"embedding": 1e-1, "lm_head": 1e-3},
            }
        ),
        baseline="rownorm-embed-head/hybrid-mlp",
        contrasts=_dense_contrasts(),
        global_batch=224,
        steps=30_000,
        eval_tokens=10_551_296,
        vocab_size=151936,
        data={"source": "data/fineweb_edu_10B_qwen3", "vocab_size": 151936, "token_dtype": "uint32"},
    )


def _gemma3() -> Recipe:
    rules, lr = _dense_rules(5e-2)
    lr.update(embedding=5e-3, lm_head=5e-3, attention=2e-2, matrix=2e-2, mlp_in=2e-2, mlp_out=2e-2)
    return Recipe(
        name="gemma3-fig4",
        figure="fig4",
        arch="gemma3",
        title="Gemma-3-1B-style, 18 layers, untied (paper fig. 4)",
        model=dict(num_layers=18, tie_embeddings=False),
        rules=rules,
        lr=lr,
        variants=_dense_variants(
            {
                "rownorm": {"embedding": 5e-3, "lm_head": 5e-3},
                "hybrid": {"embedding": 1e-2, "lm_head": 1e-2},
                "adamw": {"embedding": 5e-4, "lm_head": 5e-4},
            },
            {
                "muon": {
                    "rownorm": {"embedding": 2.5e-3, "lm_head": 2.5e-3},
                    "hybrid": {"embedding": 2.5e-3, "lm_head": 2.5e-3},
                }
            },
        ),
        baseline="rownorm-embed-head/hybrid-mlp",
        contrasts=_dense_contrasts(),
        global_batch=144,
        steps=50_000,
        eval_tokens=10_469_376,
        vocab_size=262144,
        data={"source": "data/fineweb_edu_10B_gemma3", "vocab_size": 262144, "token_dtype": "uint32"},
    )


def _olmoe() -> Recipe:
    lr = dict(
        embedding=5e-1,
        lm_head=5e-3,
        attention=5e-3,
        matrix=5e-3,
        expert_in=5e-3,
        expert_out=5e-3,
        router=7.5e-4,
        vector=1e-2,
    )
    return Recipe(
        name="olmoe-fig5",
        figure="fig5",
        arch="olmoe",
        title="OLMoE-1B-7B-style, 12 layers, 32 experts top-8 (paper fig. 5)",
        model=dict(num_layers=12, num_experts=32, top_k=8, aux_loss_coef=0.0, tie_embeddings=False),
        rules=_moe_rules(1e-2),
        lr=lr,
        variants=_moe_variants(5e-4),
        baseline="rownorm-router",
        contrasts=_MOE_CONTRASTS,
        global_batch=160,
        steps=30_000,
        vocab_size=50304,
        data={"source": "data/fineweb_edu_10B_olmoe", "vocab_size": 50304, "token_dtype": "uint16"},
    )


# gpt-oss with the expert width equal to d: the stacked expert weights are square per part, so
# their layout is given (HF GptOssExperts: gate_up [E, d, 2h] interleaved, down [E, h, d])
GPTOSS_ROLES = {r"experts\.gate_up_proj$": "expert_in", r"experts\.down_proj$": "expert_out"}
GPTOSS_LAYOUTS = {
    r"experts\.gate_up_proj$": "stacked+transposed+fused2:interleaved",
    r"experts\.down_proj$": "stacked+transposed",
}


def _gptoss() -> Recipe:
    lr = dict(
        embedding=1e-1,
        lm_head=1e-3,
        attention=1e-3,
        matrix=1e-3,
        expert_in=1e-3,
        expert_out=1e-3,
        router=7.5e-4,
        vector=5e-3,
    )
    return Recipe(
        name="gptoss-fig2",
        figure="fig2",
        arch="gptoss",
        title="downsized gpt-oss, 12 layers, d 2048, 16 experts top-4 (paper fig. 2)",
        model=dict(
            num_layers=12,
            hidden_size=2048,
            intermediate_size=2048,
            num_heads=64,
            num_kv_heads=8,
            head_dim=64,
            num_experts=16,
            top_k=4,
            sliding_window=128,
            aux_loss_coef=0.0,
            tie_embeddings=False,
        ),
        rules=_moe_rules(5e-3),
        lr=lr,
        variants=_moe_variants(5e-4),
        baseline="rownorm-router",
        contrasts=_MOE_CONTRASTS,
        roles=GPTOSS_ROLES,
        layouts=GPTOSS_LAYOUTS,
        global_batch=64,
        steps=60_000,
        vocab_size=201088,
        data={"source": "data/fineweb_edu_10B_gptoss", "vocab_size": 201088, "token_dtype": "uint32"},
    )


RECIPES: dict[str, Recipe] = {r.figure: r for r in (_gptoss(), _qwen3(), _gemma3(), _olmoe())}
FIGURES = tuple(sorted(RECIPES))

# Our CPU-tuned values (the `paper` preset, tuned by `equiopt sweep` on the tiny models, with
# the harness's default schedule: 10% warm-up, cosine to 0.1x): a documented separate recipe,
# ``TrainConfig(arch=..., optimizer="paper")`` with the tiny model. Listed here for reference.
CPU_TUNED = {
    "description": "equiopt's `paper` preset as tuned on the CPU-scale models (README 'Presets'): "
    "embedding row_norm 0.2, LM head centered_row_norm 0.02, attention per-head Muon 0.02, "
    "MLP/expert hybrid 1e-3, router centered_row_norm 0.01, vectors AdamW 3e-3 (wd 0); "
    "one schedule for every role: 10% linear warm-up, cosine to 0.1x",
    "train_config": {"optimizer": "paper", "size": "tiny", "schedule": "cosine", "warmup": -1, "min_lr_ratio": 0.1},
}


# -- equiopt reproduce -------------------------------------------------------------------


@dataclass
class ReproduceOptions:
    """``equiopt reproduce FIGURE``: a figure's block-wise grid at a scale."""

    figure: str = option(
        "fig3",
        cli=False,  # the command's positional argument
        help="fig2 (gpt-oss routers), fig3 (Qwen3 embedding/head x MLP), fig4 (Gemma 3 "
        "embedding/head x MLP), fig5 (OLMoE routers)",
    )
    scale: str = option(
        "cpu",
        choices=SCALES,
        help="cpu: the documented CPU shrink of the figure run (equiopt.train.recipes); paper: "
        "the figure run itself (GPUs; start under torchrun with --dist fsdp2)",
    )
    seeds: int = option(3, parse=positive_int, help="seeds 0..N-1 per variant")
    variants: list[str] = option(
        default_factory=list, parse=csv_list, help="comma-separated subset of the figure's variants (default: all)"
    )
    lr_scales: list[float] = option(
        default_factory=list,
        parse=float_list,
        help="sweep a global multiplier of the recipe's learning rates per variant "
        "(seed 1000, same horizon) and train the seeds at the best one; "
        "empty = the recipe's learning rates",
    )
    lr_from_sweep: str = option(
        "",
        metavar="BEST_JSON",
        help="train the seeds at the multipliers a previous sweep chose (its sweep/best.json), "
        "without sweeping (e.g. a longer horizon at the rates chosen at the shorter one)",
    )
    steps: int = option(0, help="training steps (0 = the scale's)")
    batch_size: int = option(0, help="global batch in sequences (0 = the scale's)")
    eval_every: int = option(0, help="steps between evaluations (0 = the scale's)")
    eval_tokens: int = option(0, help="validation tokens per evaluation (0 = the scale's)")
    data: str = option(
        "",
        flag="--data",
        metavar="SOURCE",
        help="data source (default: the scale's; paper scale: a folder of headerless .bin "
        "shards of fineweb-edu 10B in the model's tokenizer)",
    )
    extend_edges: int = option(
        2, metavar="N", help="when a variant's best sweep scale is on the grid's edge, extend past it, up to N times"
    )
    jobs: int = option(1, parse=positive_int, help="runs trained at once, one thread each (CPU)")
    threads: int = option(0, help="torch CPU threads per run, 0 = torch's default")
    device: str = option("cpu", help="cpu or cuda[:i]")
    autocast: str = option(
        "auto",
        choices=AUTOCAST_MODES,
        help="bfloat16 autocast of forward/backward: auto = on CUDA only, bf16 = on CPU too, none",
    )
    dist: str = option(
        "none",
        choices=("none", "ddp", "fsdp2"),
        help="under torchrun: every run of the grid is data-parallel over the processes",
    )
    out: str = option("", help="output directory (default runs/reproduce/FIGURE-SCALE)")

    def __post_init__(self) -> None:
        recipe = RECIPES.get(self.figure)
        if recipe is None:
            raise ValueError(f"figure must be one of {', '.join(FIGURES)}, got {self.figure!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale (--scale) must be one of {', '.join(SCALES)}, got {self.scale!r}")
        for v in self.variants:
            recipe.variant(v)
        for name in ("steps", "batch_size", "eval_every", "eval_tokens", "threads", "extend_edges"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 0, got {getattr(self, name)}")
        if any(not (math.isfinite(s) and s > 0) for s in self.lr_scales):
            raise ValueError(f"lr_scales (--lr-scales) must be positive numbers, got {self.lr_scales}")
        if self.lr_from_sweep and self.lr_scales:
            raise ValueError("--lr-from-sweep and --lr-scales exclude each other: take a sweep's choice or sweep")

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.figure]

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/reproduce/{self.figure}-{self.scale}")

    def overrides(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "threads": self.threads,
            "device": self.device,
            "dist": self.dist,
            "autocast": self.autocast,
        }
        for name in ("steps", "batch_size", "eval_every", "eval_tokens"):
            if getattr(self, name):
                kw[name] = getattr(self, name)
        if self.data:
            base = self.recipe.data if self.scale == "paper" else CPU_DATA
            kw["data"] = DataConfig(**{**base, "source": self.data})
        return kw

    def configs(
        self, seeds: list[int], out: Path, lr_scales: dict[str, float] | None = None, tag: str = ""
    ) -> list[TrainConfig]:
        recipe, cfgs = self.recipe, []
        for v in self.variants or recipe.variant_names:
            for seed in seeds:
                scale = (lr_scales or {}).get(v, 1.0)
                d = out / "runs" / v.replace("/", "__") / (tag or f"seed{seed}")
                cfgs.append(
                    recipe.train_config(v, seed=seed, out=str(d), scale=self.scale, lr_scale=scale, **self.overrides())
                )
        return cfgs


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _sweep_round(opts: ReproduceOptions, out: Path, run: dict, points: dict, todo: list[tuple[str, float]]) -> None:
    """Train the (variant, lr_scale) pairs of ``todo`` at seed 1000 (runs under ``out/sweep``) and
    add their final validation losses (inf when diverged) to ``points[variant][lr_scale]``."""
    cfgs = []
    for v, s in todo:
        (c,) = dataclasses.replace(opts, variants=[v]).configs([1000], out / "sweep", tag=f"lr{s:g}")
        cfgs.append(_for_jobs(dataclasses.replace(c, lr_scale=s, keep_checkpoint=False), opts.jobs))
    for c, f in zip(cfgs, run_many(cfgs, desc="sweep", **run)):
        points.setdefault(c.variant, {})[c.lr_scale] = f["val_loss"] if f["status"] == "done" else math.inf


def _sweep_variants(opts: ReproduceOptions, out: Path, run: dict) -> dict[str, float]:
    """Each variant's best ``lr_scale`` over ``opts.lr_scales``, the grid extended past a winning
    edge up to ``opts.extend_edges`` times (seed 1000, runs under ``out/sweep``); writes
    ``out/sweep/best.json``."""
    variants = opts.variants or opts.recipe.variant_names
    points: dict[str, dict[float, float]] = {}
    todo = [(v, s) for s in opts.lr_scales for v in variants]
    for _ in range(opts.extend_edges + 1):
        _sweep_round(opts, out, run, points, todo)
        todo = [(v, nxt) for v in variants if (nxt := edge_extension(points[v])) is not None]
        if not todo:
            break
        run["log"]("[sweep] best lr_scale on the grid's edge: trying " + ", ".join(f"{v} x{s:g}" for v, s in todo))
    chosen, best = {}, {}
    for v in variants:
        pts = sorted(points[v].items())
        s, loss = min(pts, key=lambda p: p[1])
        chosen[v] = s
        best[v] = {
            "lr_scale": s,
            "val_loss": loss,
            "points": pts,
            "at_grid_edge": len(pts) > 1 and s in (pts[0][0], pts[-1][0]),
        }
    if _rank0():
        (out / "sweep").mkdir(parents=True, exist_ok=True)
        write_json(out / "sweep" / "best.json", best, "the sweep's best learning rates")
    return chosen


def _swept(opts: ReproduceOptions) -> dict[str, float]:
    """Each variant's multiplier from ``opts.lr_from_sweep`` (a ``sweep/best.json``), or {}."""
    if not opts.lr_from_sweep:
        return {}
    path = Path(opts.lr_from_sweep)
    if not path.is_file():
        raise FileNotFoundError(f"--lr-from-sweep {path}: no such file (a previous run's sweep/best.json)")
    best = json.loads(path.read_text())
    variants = opts.variants or opts.recipe.variant_names
    missing = [v for v in variants if not isinstance(best.get(v), dict) or "lr_scale" not in best[v]]
    if missing:
        raise ValueError(f"--lr-from-sweep {path}: no lr_scale for variant(s) {', '.join(missing)}")
    return {v: float(best[v]["lr_scale"]) for v in variants}


def reproduce(
    opts: ReproduceOptions, *, overwrite: bool = False, progress: bool = True, log=print, command: str | None = None
) -> dict:
    """Run a figure's grid (optionally after a per-variant LR sweep) and write its report
    (summary.md/csv/json, val_loss.png, routing.png, max_logit.png, contrasts) to ``opts.out_dir()``."""
    recipe, out = opts.recipe, opts.out_dir()
    t0 = time.time()
    probe = opts.configs([0], out)
    probe = [_for_jobs(c, opts.jobs) for c in probe]
    prepared = D.prepare(probe[0].data, log=log)
    run = dict(jobs=opts.jobs, overwrite=overwrite, progress=progress, log=log, prepared=prepared)
    chosen = _sweep_variants(opts, out, run) if opts.lr_scales else _swept(opts)
    cfgs = [_for_jobs(c, opts.jobs) for c in opts.configs(list(range(opts.seeds)), out, chosen)]
    run_many(cfgs, desc=opts.figure, **run)
    if not _rank0():
        return {}
    c0 = cfgs[0]
    tokens = c0.steps * c0.batch_size * c0.seq_len
    notes = [
        f"{recipe.title}; scale {opts.scale}: {c0.steps} steps x {c0.batch_size} x {c0.seq_len} tokens "
        f"({tokens / 1e6:.2f}M tokens per run), per-role schedules {c0.role_schedule}, data {c0.data.source!r}",
        f"model overrides {c0.model}",
        f"{len(cfgs)} runs; wall time of this invocation {time.time() - t0:.0f} s with {opts.jobs} job(s) "
        "(reused finished runs cost nothing)",
    ]
    if chosen:
        notes.append(
            f"lr_scale per variant from the sweep ({opts.lr_from_sweep or 'out/sweep/best.json'}): "
            + ", ".join(f"{v} x{s:g}" for v, s in chosen.items())
        )
    rep = write_report(
        [Path(c.out) for c in cfgs],
        out,
        title=f"equiopt reproduce {opts.figure} ({opts.scale})",
        command=command,
        notes=notes,
        reference=recipe.baseline,
        contrasts=list(recipe.contrasts),
    )
    (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=1, default=str) + "\n")
    return rep
