"""The README's DDC equivariance table, measured by the tests' own helpers.

Each row: a model, the gauge elements applied to its start (random per-neuron / per-channel
scales in [0.5, 2], a head shift, random rotations), and the max relative parameter error
over 10 float64 steps between the run from the transformed start and the transformed run
(``equivariance_error`` of tests/test_ddc.py, ``norm_equivariance_error`` of
tests/test_ddc_norm.py, the stacked-expert one of tests/test_ddc_stacked.py), for DDC-Adam,
DDC-Muon, AdamW and Muon. The tests assert the same quantities (claimed gauges < 1e-10, the
baselines > 1e-3); this prints their values. Not collected by pytest (no ``test_`` prefix).

    python tests/ddc_equivariance_table.py        # ~1 minute on 2 cores
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import test_ddc  # noqa: E402  (the helpers the tests use)
import test_ddc_norm  # noqa: E402
import test_ddc_stacked  # noqa: E402

OPTIMIZERS = ("ddc_adam", "ddc_muon", "adamw", "muon")

# (model label, gauge label, helper, kind, gauge elements applied); "not claimed" marks
# gauges the optimizer does not claim (DDC-Adam has no rotation gauges).
ROWS = (
    ("ReLU LM", "neuron rescale", "plain", "relu", ("rescale",)),
    ("ReLU LM", "logit shift", "plain", "relu", ("shift",)),
    ("LayerNorm LM", "norm channel (gain + bias)", "norm", "ln", ("norm",)),
    ("MoE LM (fused `gate_up [E, 2h, d]`, 4 experts top-2)", "per-(expert, neuron) up/down rescale", "stacked", "", ()),
    ("LayerNorm LM", "norm + rescale (overlap on `fc1`) + shift", "norm", "ln", ("norm", "rescale", "shift")),
    ("Qwen3", "up/down rescale", "plain", "qwen3", ("rescale",)),
    ("Qwen3", "logit shift", "plain", "qwen3", ("shift",)),
    ("Qwen3", "norm channel (5 norms)", "norm", "qwen3", ("norm",)),
    ("Qwen3", "norm + rescale (overlap on `up`) + shift", "norm", "qwen3", ("norm", "rescale", "shift")),
    ("Qwen3", "V/O rotation", "plain", "qwen3", ("rotation",)),
    ("Qwen3", "norm + rescale + shift + V/O", "norm", "qwen3", ("norm", "rescale", "shift", "rotation")),
    ("Llama", "Q/K RoPE rotation", "plain", "llama", ("qk",)),
    ("Llama", "norm + rescale + shift + V/O + Q/K", "norm", "llama", ("norm", "rescale", "shift", "rotation", "qk")),
)


def error(helper: str, kind: str, which: tuple[str, ...], opt: str) -> float:
    if helper == "plain":
        return test_ddc.equivariance_error(kind, test_ddc.OPTS[opt], which)
    if helper == "norm":
        return test_ddc_norm.norm_equivariance_error(kind, test_ddc.OPTS[opt], which)
    return test_ddc_stacked.equivariance_error(test_ddc.OPTS[opt])


def main() -> int:
    print("| model | gauge | DDC-Adam | DDC-Muon | AdamW | Muon |")
    print("|---|---|---|---|---|---|")
    for model, gauge, helper, kind, which in ROWS:
        cells = []
        for opt in OPTIMIZERS:
            e = error(helper, kind, which, opt)
            unclaimed = opt == "ddc_adam" and ("rotation" in which or "qk" in which)
            cells.append(f"{e:.1e}" + (" (not claimed)" if unclaimed else ""))
        print(f"| {model} | {gauge} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
