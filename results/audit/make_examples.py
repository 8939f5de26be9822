"""Regenerate the example audit tables and the diagnostics plot of results/audit/.

    PYTHONPATH=src python results/audit/make_examples.py            # ~2-4 min on 2 CPU cores

Writes, next to this script:

* ``audit_<arch>.md`` / ``.json``: the symmetry audit of the harness' tiny model of each
  family (``equiopt.train.models``, vocabulary 128, 2 layers, random init), with the
  ``paper`` preset's maps; ``audit_gemma3_softcap.md``: Gemma-3 with an untied head and
  ``final_logit_softcapping=30`` (the broken-shift example) and its ``downgrade_rules``;
* ``audit_summary.md``: per family and group kind, the verdicts and the largest errors;
* ``diagnostics.png`` / ``diagnostics.json``: dead-direction diagnostics of short runs of
  the tiny OLMoE-style model (AdamW vs the paper preset) on a synthetic Zipf-bigram stream
  (self-contained: no tokenizer, no download).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import equiopt
from equiopt import audit as A
from equiopt.diagnostics import DiagnosticsTracker, plot_history

HERE = Path(__file__).resolve().parent
VOCAB = 128


def audits() -> None:
    rows = []
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    cases = [(arch, {}) for arch in A.ARCH_CHOICES] + [("gemma3", {"tied": "no", "softcap": 30.0})]
    for arch, kw in cases:
        name = arch + ("_softcap" if kw else "")
        model = A.build_audit_model(arch, "tiny", VOCAB, layers=2, **kw)
        t = time.time()
        report = A.audit(model, ids)
        rules = A.downgrade_rules(report)
        md = report.to_markdown() + f"\n`downgrade_rules(report)` = `{rules}`\n"
        (HERE / f"audit_{name}.md").write_text(md)
        (HERE / f"audit_{name}.json").write_text(report.to_json(indent=1))
        print(f"[audit] {name}: {len(report.checks)} checks in {time.time() - t:.1f}s; rules {rules}", flush=True)
        for r in report.summary():
            rows.append((name, r))
    out = ["# Symmetry audit of the four families (tiny harness models, 2 layers, vocab 128)", "", *grid(rows), "",
           "Largest relative error per group kind, at the generic point (trainable vectors perturbed) and at the "
           "weights as given (initialisation: unit norm gains, zero biases). exact <= 2.2e-13 (1e3 float64 eps).", "",
           "| model | kind | checks | exact | approx. | broken | max error | max error (as given) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        out.append(f"| {name} | {r['kind']} | {r['checks']} | {r['exact']} | {r['approximate']} | {r['broken']} | "
                   f"{r['max_error']:.1e} | {r['max_error_as_given']:.1e} |")
    (HERE / "audit_summary.md").write_text("\n".join(out) + "\n")


KINDS = ["vocab_perm", "tied_perm", "head_perm", "logit_shift", "residual_rotation", "vo_rotation", "qk_rotation",
         "qk_rope_rotation", "neuron_perm", "neuron_rescale", "expert_perm", "router_shift"]


def grid(rows) -> list[str]:
    """One line per group kind, one column per model: verdict and largest error."""
    by = {}
    for name, r in rows:
        by.setdefault(name, {})[r["kind"]] = r
    lines = ["Verdict (largest relative error at the generic point; 'as given' = at the initial weights):", "",
             "| group | " + " | ".join(by) + " |", "|---|" + "---|" * len(by)]
    for k in KINDS:
        cells = []
        for r in by.values():
            x = r.get(k)
            if x is None:
                cells.append("n/a")
            elif x["exact"] == x["checks"]:
                cells.append(f"exact ({x['max_error']:.0e})")
            elif x["broken"] == x["checks"]:
                cells.append(f"broken ({x['max_error']:.0e}; as given {x['max_error_as_given']:.0e})")
            else:
                cells.append(f"{x['exact']}/{x['checks']} exact, max {x['max_error']:.0e}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def zipf_bigram_stream(vocab: int, n: int, seed: int) -> torch.Tensor:
    """Tokens of a random sparse bigram chain with Zipf-distributed successors: learnable
    structure, and rare tokens that are absent from most batches."""
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    succ = torch.stack([torch.multinomial(zipf, 4, generator=g) for _ in range(vocab)])  # 4 successors per token
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05], dtype=torch.float64)
    out = torch.empty(n, dtype=torch.long)
    tok = 0
    choice = torch.multinomial(probs, n, replacement=True, generator=g)
    for i in range(n):
        tok = int(succ[tok, choice[i]])
        out[i] = tok
    return out


def diagnostics_run(steps: int = 200, every: int = 20, B: int = 8, T: int = 64) -> None:
    from equiopt.train import models

    torch.set_num_threads(1)
    stream = zipf_bigram_stream(VOCAB, steps * B * T + T + 1, seed=0)
    histories = {}
    for preset in ("adamw", "paper"):
        cfg = models.preset("olmoe", "tiny")
        cfg.vocab_size = VOCAB
        model = models.build_model(cfg, seed=0)
        plan = equiopt.plan(model, preset=preset)
        opt = equiopt.build(plan)
        tracker = DiagnosticsTracker(model, plan, optimizer=opt)
        g = torch.Generator().manual_seed(1)
        t = time.time()
        for step in range(steps):
            starts = torch.randint(0, stream.numel() - T - 1, (B,), generator=g)
            x = torch.stack([stream[s : s + T] for s in starts])
            y = torch.stack([stream[s + 1 : s + T + 1] for s in starts])
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tracker.step()
            if (step + 1) % every == 0:
                rec = tracker.record(step + 1)
                rec["train_loss"] = float(loss.detach())
                print(f"[diag] {preset} step {step + 1} loss {float(loss):.3f} dead_update {rec.get('dead_update', 0):.3f} "
                      f"dead_experts {rec.get('dead_experts', 0):.3f} stale {rec.get('stale_rows', 0):.3f} "
                      f"head_mean_row {rec['head_mean_row']:.3f}", flush=True)
        tracker.close()
        histories[preset] = tracker.history
        print(f"[diag] {preset}: {steps} steps in {time.time() - t:.0f}s", flush=True)
    plot_history(histories, HERE / "diagnostics.png",
                 title=f"tiny OLMoE-style model, Zipf-bigram stream, {steps} steps (B={B}, T={T}): AdamW vs paper preset")
    (HERE / "diagnostics.json").write_text(json.dumps(histories, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared CPU
    which = sys.argv[1:] or ["audit", "diagnostics"]
    if "audit" in which:
        audits()
    if "diagnostics" in which:
        diagnostics_run()
