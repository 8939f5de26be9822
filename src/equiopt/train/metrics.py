"""Metrics of the paper (design note section 4) as pure functions, plus streaming accumulators.

Routing (one MoE layer; ``logits`` [tokens, E], top-k routing):

* f_i = share of the top-k assignments that go to expert i (sums to 1);
  P_i = mean router probability softmax(logits)_i over tokens;
* ``load_balance_loss`` = E * sum_i f_i P_i (1 for perfectly balanced routing, E when every
  token sends all its probability and assignments to one expert);
* ``load_cv`` = std(f) / mean(f) (population std); ``load_entropy`` = -sum f log f / log E;
  ``dead_frac`` = share of experts with f_i < 0.1 / E; ``top_load`` = max_i f_i;
* ``token_entropy`` = mean over tokens of the router distribution's entropy / log E;
* ``z_loss`` = mean over tokens of logsumexp(logits)^2;
* ``logit_rms`` = sqrt(mean(logits^2)); ``logit_max`` = max |logit|.

Vocabulary logits (``logits`` [positions, V]): ``rms``, ``centered_rms`` (each position's
mean over the vocabulary removed), ``max_abs``, ``lse_mean``/``lse_max`` (logsumexp per
position), ``entropy`` (mean predictive entropy, nats), ``max_prob`` (mean top probability).

The accumulators keep only sufficient statistics, so metrics over many evaluation batches
equal the metrics of the concatenated logits without holding them in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

ROUTING_KEYS = (
    "load_balance_loss",
    "load_cv",
    "load_entropy",
    "dead_frac",
    "top_load",
    "token_entropy",
    "z_loss",
    "logit_rms",
    "logit_max",
)
LOGIT_KEYS = ("rms", "centered_rms", "max_abs", "lse_mean", "lse_max", "entropy", "max_prob")


def _entropy_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs, probs, entropy per row) in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    return logp, p, ent


class RoutingStats:
    """Sufficient statistics of one router over any number of token batches."""

    def __init__(self, num_experts: int, top_k: int):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, E={num_experts}")
        self.E, self.k = num_experts, top_k
        self.counts = torch.zeros(num_experts, dtype=torch.float64)
        self.prob_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.tokens = 0
        self.entropy_sum = 0.0
        self.z_sum = 0.0
        self.sq_sum = 0.0
        self.max_abs = 0.0

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        logits = logits.detach().reshape(-1, logits.shape[-1]).double()
        if logits.shape[-1] != self.E:
            raise ValueError(f"router logits have {logits.shape[-1]} experts, expected {self.E}")
        _, p, ent = _entropy_rows(logits)
        idx = torch.topk(logits, self.k, dim=-1).indices
        self.counts += torch.bincount(idx.reshape(-1), minlength=self.E).double().cpu()
        self.prob_sum += p.sum(0).cpu()
        self.tokens += logits.shape[0]
        self.entropy_sum += float(ent.sum())
        self.z_sum += float(torch.logsumexp(logits, -1).square().sum())
        self.sq_sum += float(logits.square().sum())
        if logits.numel():
            self.max_abs = max(self.max_abs, float(logits.abs().max()))

    def compute(self) -> dict[str, float]:
        if self.tokens == 0:
            raise ValueError("no router logits were recorded")
        E = self.E
        f = self.counts / self.counts.sum()
        P = self.prob_sum / self.tokens
        nz = f[f > 0]
        logE = math.log(E) if E > 1 else 1.0
        return {
            "load_balance_loss": float(E * (f * P).sum()),
            "load_cv": float(f.std(unbiased=False) / f.mean()),
            "load_entropy": float(-(nz * nz.log()).sum() / logE),
            "dead_frac": float((f < 0.1 / E).double().mean()),
            "top_load": float(f.max()),
            "token_entropy": self.entropy_sum / self.tokens / logE,
            "z_loss": self.z_sum / self.tokens,
            "logit_rms": math.sqrt(self.sq_sum / (self.tokens * E)),
            "logit_max": self.max_abs,
        }


def routing_metrics(logits: torch.Tensor, top_k: int) -> dict[str, float]:
    """Routing metrics of one layer's router logits [..., E] (see the module docstring)."""
    s = RoutingStats(logits.shape[-1], top_k)
    s.update(logits)
    return s.compute()


def average_layers(per_layer: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over layers of each routing metric (max for ``logit_max``)."""
    if not per_layer:
        return {}
    out = {}
    for k in ROUTING_KEYS:
        vals = [m[k] for m in per_layer.values()]
        out[k] = max(vals) if k == "logit_max" else sum(vals) / len(vals)
    return out


class LogitStats:
    """Sufficient statistics of vocabulary logits over any number of batches."""

    def __init__(self):
        self.n = 0
        self.count = 0  # n * V
        self.sq_sum = 0.0
        self.csq_sum = 0.0
        self.max_abs = 0.0
        self.lse_sum = 0.0
        self.lse_max = -math.inf
        self.ent_sum = 0.0
        self.maxp_sum = 0.0

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        flat = logits.detach().reshape(-1, logits.shape[-1])
        rows = max(1, (1 << 22) // flat.shape[-1])  # float64 chunks of ~32 MB, on the logits' device
        for a in range(0, flat.shape[0], rows):
            self._update(flat[a : a + rows].double())

    def _update(self, z: torch.Tensor) -> None:
        if z.shape[0] == 0:
            return
        logp, p, ent = _entropy_rows(z)
        lse = torch.logsumexp(z, -1)
        self.n += z.shape[0]
        self.count += z.numel()
        self.sq_sum += float(z.square().sum())
        self.csq_sum += float((z - z.mean(-1, keepdim=True)).square().sum())
        self.max_abs = max(self.max_abs, float(z.abs().max()))
        self.lse_sum += float(lse.sum())
        self.lse_max = max(self.lse_max, float(lse.max()))
        self.ent_sum += float(ent.sum())
        self.maxp_sum += float(p.max(-1).values.sum())

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no logits were recorded")
        return {
            "rms": math.sqrt(self.sq_sum / self.count),
            "centered_rms": math.sqrt(self.csq_sum / self.count),
            "max_abs": self.max_abs,
            "lse_mean": self.lse_sum / self.n,
            "lse_max": self.lse_max,
            "entropy": self.ent_sum / self.n,
            "max_prob": self.maxp_sum / self.n,
        }


def logit_metrics(logits: torch.Tensor) -> dict[str, float]:
    """Vocabulary-logit metrics of logits [..., V] (see the module docstring)."""
    s = LogitStats()
    s.update(logits)
    return s.compute()


def grad_norm(parameters) -> float:
    """Global L2 norm of the gradients (parameters without a gradient are skipped)."""
    seen, total = set(), 0.0
    for p in parameters:
        if p.grad is None or id(p) in seen:
            continue
        seen.add(id(p))
        total += float(p.grad.detach().double().square().sum())
    return math.sqrt(total)


@dataclass
class SpikeDetector:
    """Flags a loss (or grad-norm) spike: a value above (1 + rel) x its running EMA.

    The EMA (``beta``) starts after ``warmup`` observations; a spike does not enter the EMA,
    so a long excursion keeps being flagged. State is a plain dict for checkpoints.
    """

    rel: float = 0.25
    beta: float = 0.9
    warmup: int = 10
    ema: float | None = None
    seen: int = 0
    spikes: int = 0
    steps: list[int] = field(default_factory=list)

    def update(self, value: float, step: int) -> bool:
        self.seen += 1
        spike = (
            self.ema is not None
            and self.seen > self.warmup
            and math.isfinite(value)
            and value > (1 + self.rel) * self.ema
        )
        if spike:
            self.spikes += 1
            self.steps.append(step)
        elif math.isfinite(value):
            self.ema = value if self.ema is None else self.beta * self.ema + (1 - self.beta) * value
        return spike

    def state_dict(self) -> dict:
        return {
            "rel": self.rel,
            "beta": self.beta,
            "warmup": self.warmup,
            "ema": self.ema,
            "seen": self.seen,
            "spikes": self.spikes,
            "steps": list(self.steps),
        }

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, list(v) if k == "steps" else v)


def scalars(rec: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics record as flat ``{tag: value}`` ("logits/max_abs", "lr/embedding",
    "routing_layers/<module>/load_cv"); None, strings, lists and booleans are left out."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        tag = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(scalars(v, tag + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            out[tag] = float(v)
    return out
