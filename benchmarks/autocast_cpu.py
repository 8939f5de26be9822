"""Forward + backward time of the reproduction's CPU-scale models in float32 and under bfloat16
autocast on the CPU (``TrainConfig.autocast``), side by side in one process.

    PYTHONPATH=src python benchmarks/autocast_cpu.py --out results/autocast_cpu.md

Per figure (``equiopt.train.recipes``, scale cpu, first variant's model): one training batch
(global batch x sequence length of the recipe), the loss as the harness computes it, rounds
interleaving the two modes, medians. One torch thread (as ``equiopt reproduce --jobs 2`` runs).
Also prints whether torch reports bf16 support of the CPU (oneDNN).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from equiopt.train.models import build_model
from equiopt.train.recipes import RECIPES


def fwd_bwd(model, x: torch.Tensor, bf16: bool) -> None:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        logits = model(input_ids=x[:, :-1]).logits
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1)).backward()
    model.zero_grad(set_to_none=True)


def measure(figure: str, rounds: int) -> tuple[str, float, float, int]:
    recipe = RECIPES[figure]
    cfg = recipe.train_config(recipe.variant_names[0], seed=0, out="unused", scale="cpu")
    model = build_model(cfg.model_config(cfg.data.vocab_size))
    x = torch.randint(
        0, cfg.data.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0)
    )
    times: dict[bool, list[float]] = {False: [], True: []}
    for bf16 in (False, True):  # warm-up
        fwd_bwd(model, x, bf16)
    for _ in range(rounds):
        for bf16 in (False, True):
            t0 = time.perf_counter()
            fwd_bwd(model, x, bf16)
            times[bf16].append(time.perf_counter() - t0)
    return recipe.title, statistics.median(times[False]), statistics.median(times[True]), cfg.batch_size * cfg.seq_len


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--figures", default="fig3,fig5")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, help="write the table here (refuses to overwrite)")
    args = ap.parse_args()
    if args.out is not None and args.out.exists():
        raise SystemExit(f"--out {args.out} exists; remove it or choose another path")
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    lines = [
        "# bfloat16 autocast on the CPU: forward + backward of the CPU-scale reproduction models\n",
        f"`python benchmarks/autocast_cpu.py` on {platform.platform()}, {platform.processor() or 'cpu'}, "
        f"torch {torch.__version__}, 1 thread; oneDNN bf16 supported: "
        f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}; {args.rounds} interleaved rounds, medians.\n",
        "| figure model | tokens per batch | float32 | bf16 autocast | speed-up |",
        "|---|---|---|---|---|",
    ]
    for fig in args.figures.split(","):
        title, f32, b16, tokens = measure(fig, args.rounds)
        lines.append(f"| {fig}: {title} | {tokens} | {f32 * 1e3:.0f} ms | {b16 * 1e3:.0f} ms | {f32 / b16:.2f}x |")
    lines.append(
        f"\nLoad average before {[round(v, 2) for v in load0]}, after {[round(v, 2) for v in os.getloadavg()]}."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
