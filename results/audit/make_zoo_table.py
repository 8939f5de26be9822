"""The audit of every zoo architecture (tests/zoo.py): checks, broken symmetries
(informational / relied on) and the unchecked trainable tensors.

    PYTHONPATH=src python results/audit/make_zoo_table.py        # ~15 s on one CPU thread

Writes ``zoo_audit.md`` next to this script (the same audits as tests/test_zoo_audit.py:
float64, a [2, 8] id batch or [2, 3, 16, 16] images, the ``paper`` preset's plan).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import equiopt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests"))

from zoo import ZOO, ids_batch  # noqa: E402


def short(role: str, reason: str) -> str:
    """``("matrix", "low-rank factor: its output ...")`` -> ``"matrix (low-rank factor)"``."""
    return f"{role} ({reason.split(':')[0].split(' (')[0]})"


def main() -> None:
    torch.set_num_threads(1)
    out = [
        "# Symmetry audit of the model zoo (tests/zoo.py, 22 architectures)",
        "",
        "float64, the `paper` preset's plan, input ids [2, 8] (vision towers: pixel_values [2, 3, 16, 16]; models "
        "without logits read out through a fixed random matrix of the last hidden state). 'relied on' = checks the "
        "plan needs exact (a centering map projects the orbit out, or a map uses the rows / heads / experts the check "
        "witnesses); 'informational' = measured, not needed (norm gains, RoPE, QK norms, activations, positions, "
        "a sigmoid router's shift). Unchecked: trainable tensors no measured check acted on (vectors: norm gains "
        "and other vectors no check moves; the others are named).",
        "",
        "| model | checks | relied on (exact / all) | relied-on broken | informational broken | unchecked | "
        "unchecked matrices (reason) |",
        "|---|---|---|---|---|---|---|",
    ]
    for z in ZOO:
        torch.manual_seed(0)
        m = z.build()
        batch = z.batch(m) if z.batch is not None else ids_batch(m, with_labels=False)
        t = time.time()
        plan = equiopt.plan(m, example=batch if z.batch is not None else None)
        r = equiopt.audit(m, batch, plan=plan)
        relied = [c for c in r.checks if c.relied_on]
        exact = sum(c.verdict == "exact" for c in relied)
        bad = ", ".join(f"{c.kind} {c.scope}" for c in r.relied_on_broken()) or "none"
        info = sorted({c.kind for c in r.broken(relied_on=False)})
        mats = {}
        for u in r.unchecked:
            if u["role"] != "vector":
                mats.setdefault(short(u["role"], u["reason"]), []).append(u["name"])
        vectors = sum(u["role"] == "vector" for u in r.unchecked)
        shown = "; ".join(f"{len(v)} {k}" for k, v in mats.items()) or "-"
        out.append(
            f"| {z.name} | {len(r.checks)} | {exact} / {len(relied)} | {bad} | {', '.join(info) or '-'} | "
            f"{len(r.unchecked)} ({vectors} vectors) | {shown} |"
        )
        print(f"{z.name}: {time.time() - t:.1f}s", flush=True)
    (HERE / "zoo_audit.md").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
