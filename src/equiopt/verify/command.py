"""``equiopt audit --arch qwen3``: the audit of a harness model from the command line."""

from __future__ import annotations

import torch
from torch import nn

from ..planner import plan as make_plan
from ..train import models
from .audit import audit
from .report import AuditError, downgrade_rules

__all__ = ["ARCH_CHOICES", "add_arguments", "build_audit_model", "run"]

ARCH_CHOICES = ("qwen3", "gemma3", "olmoe", "gptoss")


def add_arguments(parser) -> None:
    """Options of ``equiopt audit`` (an ``argparse`` (sub)parser)."""
    parser.add_argument(
        "--arch", choices=ARCH_CHOICES, required=True, help="model family (built from its HF config class, no download)"
    )
    parser.add_argument("--size", default="tiny", help="size preset of equiopt.train.models (default tiny)")
    parser.add_argument("--vocab", type=int, default=128, help="vocabulary size (default 128)")
    parser.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    parser.add_argument("--tied", choices=("preset", "yes", "no"), default="preset", help="tie embedding and LM head")
    parser.add_argument("--softcap", type=float, default=None, help="final_logit_softcapping (gemma3)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="paper", help="optimizer preset whose maps are audited")
    parser.add_argument("--no-grads", action="store_true", help="skip the gradient comparison")
    parser.add_argument("--markdown", default=None, help="write the table as markdown to this path")
    parser.add_argument("--json", default=None, help="write the report as JSON to this path")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a symmetry the plan relies on is broken (see equiopt.audit)"
    )


def build_audit_model(
    arch: str,
    size: str = "tiny",
    vocab: int = 128,
    layers: int | None = None,
    tied: str = "preset",
    softcap: float | None = None,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised model of the harness families (``equiopt.train.models``)."""
    cfg = models.preset(arch, size)
    cfg.vocab_size = vocab
    if layers is not None:
        cfg.num_layers = layers
        if cfg.layer_types is not None:
            cfg.layer_types = (cfg.layer_types * layers)[:layers]
            cfg.layer_types[-1] = "full_attention"
    if tied != "preset":
        cfg.tie_embeddings = tied == "yes"
    if softcap is not None:
        if arch != "gemma3":
            raise AuditError(f"--softcap: final_logit_softcapping is a gemma3 option, not {arch}")
        cfg.extra = {**cfg.extra, "final_logit_softcapping": softcap}
    return models.build_model(cfg, seed=seed)


def run(args) -> int:
    """Run ``equiopt audit`` with parsed ``args``; prints the table, returns the exit code."""
    model = build_audit_model(args.arch, args.size, args.vocab, args.layers, args.tied, args.softcap, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    report = audit(model, ids, plan=make_plan(model, args.preset), seed=args.seed, grads=not args.no_grads)
    print(report)
    rules = downgrade_rules(report)
    print(f"downgrade_rules: {rules}" if rules else "downgrade_rules: {} (every assumed shift symmetry holds)")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.to_markdown())
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json(indent=1))
    return 1 if args.strict and (rules or report.relied_on_broken()) else 0
