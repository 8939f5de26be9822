"""Does Polar Express need all 5 iterations? Schedules, sup errors and real momentum spectra.

    python benchmarks/polar_steps.py [--steps 30] [--out FILE]

1. The paper's schedule (``equiopt.polar.POLAR_EXPRESS_COEFFS``, safety factor included)
   truncated at k steps: sup |P_k(x) - 1| over normalized singular values x in [l, 1].
2. Greedy minimax schedules (the Polar Express construction: at each step the odd quintic
   minimizing max |1 - p| on the current interval, found by linear programming on a fine
   grid) designed for [l, 1]: how many steps reach the 5-step paper accuracy for a larger l.
3. Real inputs of the polar maps: the (row-normalized for hybrid) momenta of a short
   paper-preset run of the tiny Qwen3 and OLMoE models on the Shakespeare corpus (cached
   token shard; random tokens if absent): the smallest normalized singular value
   s_min / (1.01 ||X||_F) per role, and the actual max deviation of the k-step outputs from
   the exact polar factor U V^T (SVD) on those matrices.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from equiopt.polar import POLAR_EXPRESS_COEFFS, POLAR_EXPRESS_SAFETY, polar_express  # noqa: E402

GRID = np.unique(np.concatenate([np.logspace(-4, 0, 4000), np.linspace(0, 1, 2001)[1:]]))


def compose(coeffs, x):
    for a, b, c in coeffs:
        x = a * x + b * x**3 + c * x**5
    return x


def sup_err(coeffs, lo, hi=1.0):
    g = GRID[(GRID >= lo) & (GRID <= hi)]
    return float(np.abs(compose(coeffs, g) - 1).max())


def minimax_quintic(lo, hi):
    """argmin_{a,b,c} max_{x in [lo, hi]} |1 - (a x + b x^3 + c x^5)| (LP on a grid)."""
    from scipy.optimize import linprog

    x = np.unique(np.concatenate([np.geomspace(lo, hi, 1500), np.linspace(lo, hi, 1500)]))
    P = np.stack([x, x**3, x**5], 1)
    # variables a, b, c, E: minimize E s.t. 1 - P w <= E, P w - 1 <= E
    A = np.vstack([np.hstack([-P, -np.ones((len(x), 1))]), np.hstack([P, -np.ones((len(x), 1))])])
    b = np.concatenate([-np.ones(len(x)), np.ones(len(x))])
    res = linprog([0, 0, 0, 1], A_ub=A, b_ub=b, bounds=[(None, None)] * 3 + [(0, None)], method="highs")
    a, bb, c, E = res.x
    return (a, bb, c), E


def greedy_schedule(lo, steps, hi=1.0):
    out, lower, upper = [], lo, hi
    for _ in range(steps):
        (a, b, c), _ = minimax_quintic(lower, upper)
        out.append((a, b, c))
        g = np.linspace(lower, upper, 20001)
        v = a * g + b * g**3 + c * g**5
        lower, upper = float(v.min()), float(v.max())
    return out


def schedule_tables(lines):
    paper = list(POLAR_EXPRESS_COEFFS)
    los = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    # inputs are x / (1.01 ||x||_F): singular values in [l, 1/1.01]
    lines += [
        "## 1. The paper's schedule truncated at k steps",
        "",
        "sup |P_k(x) - 1| for normalized singular values x in [l, 1/1.01] (the safety factor's range).",
        "",
        "| k | " + " | ".join(f"l={lo:g}" for lo in los) + " |",
        "|---" * (len(los) + 1) + "|",
    ]
    for k in range(2, 9):
        lines.append(
            f"| {k} | " + " | ".join(f"{sup_err(paper[:k], lo, 1 / POLAR_EXPRESS_SAFETY):.3g}" for lo in los) + " |"
        )
    target = sup_err(paper[:5], 1e-3, 1 / POLAR_EXPRESS_SAFETY)
    lines += [
        "",
        f"5-step accuracy of the paper preset: {target:.3g} (on [1e-3, 1]).",
        "",
        "## 2. Greedy minimax schedules for [l, 1]",
        "",
        "Steps a schedule designed for [l, 1] needs to reach the 5-step paper accuracy on [l, 1], "
        "and its sup error after 3-5 steps.",
        "",
        "| l | steps to reach | 3 steps | 4 steps | 5 steps | first (a, b, c) |",
        "|---|---|---|---|---|---|",
    ]
    for lo in los:
        sch = greedy_schedule(lo, 6)
        errs = [sup_err(sch[:k], lo) for k in range(1, 7)]
        need = next((k + 1 for k, e in enumerate(errs) if e <= target), ">6")
        a, b, c = sch[0]
        lines.append(
            f"| {lo:g} | {need} | {errs[2]:.3g} | {errs[3]:.3g} | {errs[4]:.3g} | ({a:.3f}, {b:.3f}, {c:.3f}) |"
        )
    lines.append("")
    return target


def real_spectra(lines, steps: int, archs=("qwen3", "olmoe")):
    import transformers

    import equiopt
    from equiopt.train.models import build_model, preset

    transformers.logging.set_verbosity_error()
    shards = sorted(glob.glob("data_cache/corpora/shakespeare-*/bpe4096/train.bin"))
    tokens = np.fromfile(shards[0], dtype=np.uint16).astype(np.int64) if shards else None
    src = shards[0] if shards else "random tokens"
    lines += [
        "## 3. Real inputs of the polar maps",
        "",
        f"Paper preset, {steps} steps of batch 8 x 128 from `{src}`; inputs collected at the last step. "
        "x_min = smallest singular value / (1.01 ||X||_F) per logical matrix (min over matrices / median); "
        "dev_k = max over matrices of ||P_k(X) - U V^T||_2 (k Polar Express steps vs the exact polar factor; "
        "1.0 for rank-deficient inputs such as unrouted experts, whose null directions the SVD maps to 1 "
        "and the iterations to 0).",
        "",
        "| model | role | matrices | shape | x_min (min / median) | dev_3 | dev_4 | dev_5 | dev_6 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    from equiopt import maps

    for arch in archs:
        cfg = preset(arch, "tiny")
        model = build_model(cfg, seed=0)
        opt = equiopt.build(model, preset="paper")
        g = torch.Generator().manual_seed(0)
        V = cfg.vocab_size
        for _step in range(steps):
            if tokens is not None:
                starts = torch.randint(0, len(tokens) - 130, (8,), generator=g).numpy()
                batch = torch.from_numpy(np.stack([tokens[s : s + 129] for s in starts])) % V
            else:
                batch = torch.randint(0, V, (8, 129), generator=g)
            opt.zero_grad()
            model(input_ids=batch[:, :-1], labels=batch[:, 1:].contiguous()).loss.backward()
            opt.step()
        for group in opt.param_groups:
            if group["map"] not in ("polar", "scaled_polar", "hybrid"):
                continue
            xs = []
            for p in group["params"]:
                x = opt._layout(group, p).to_logical(opt.state[p]["momentum_buffer"])
                if group["column_aware"]:
                    x = x.mT
                if group["map"] == "hybrid":
                    x = maps.row_norm(x)
                xs.append(x.double())
            by_shape = {}
            for x in xs:
                by_shape.setdefault(tuple(x.shape[-2:]), []).append(x)
            for group_xs in by_shape.values():
                X = torch.cat(group_xs)
                s = torch.linalg.svdvals(X)
                xmin = (s[:, -1] / (POLAR_EXPRESS_SAFETY * s.norm(dim=-1))).numpy()
                U, S, Vh = torch.linalg.svd(X, full_matrices=False)
                exact = U @ Vh
                devs = []
                for k in (3, 4, 5, 6):
                    d = torch.linalg.matrix_norm(polar_express(X, steps=k) - exact, ord=2)
                    devs.append(float(d.max()))
                lines.append(
                    f"| {arch} | {group['role']} | {X.shape[0]} | {X.shape[1]}x{X.shape[2]} | "
                    f"{xmin.min():.2e} / {np.median(xmin):.2e} | " + " | ".join(f"{d:.3f}" for d in devs) + " |"
                )
    lines.append("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None, help="also write the report to this file")
    a = ap.parse_args()
    t0 = time.time()
    lines = [
        "# Polar Express: how many iterations?",
        "",
        f"Command: `python benchmarks/polar_steps.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    schedule_tables(lines)
    real_spectra(lines, a.steps)
    lines.append(f"({time.time() - t0:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
