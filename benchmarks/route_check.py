"""Does the polar-route choice pay for itself? (issue #16)

Times the `paper` and `muon` optimizer steps of the benchmark models with the route
``fastpath.choose_polar_route`` picks per shape (`auto`: Gram Newton-Schulz where it needs fewer
product flops, else the iterations) and with each route forced for every shape (`iterative`,
`gram` = float64 eigh, `gram_ns`), interleaved in one process on fixed synthetic gradients, at
the given thread counts; prints a table and writes it to ``--out``. Run on an idle machine::

    PYTHONPATH=src python benchmarks/route_check.py --threads 1,2 --out results/route_check.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
from bench import MEDIUM  # the step benchmark's ~60M shapes (this folder is on sys.path when run as a script)

import equiopt
from equiopt import fastpath
from equiopt.train.models import ModelConfig, build_model, preset

ROUTES = ("auto", "iterative", "gram", "gram_ns")


def model_of(name: str) -> torch.nn.Module:
    if name == "qwen3/medium":
        cfg: ModelConfig = dataclasses.replace(preset("qwen3", "tiny"), **MEDIUM["qwen3"])
    else:
        arch, _ = name.split("/")
        cfg = dataclasses.replace(preset(arch, "tiny"), vocab_size=4096)
    return build_model(cfg, seed=0)


def step_times(model: torch.nn.Module, preset_name: str, repeats: int) -> dict[str, float]:
    """Median step time per route, rounds interleaved (route order rotated every round)."""
    opts = {}
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in model.parameters()]
    for route in ROUTES:
        opt = equiopt.build(model, preset=preset_name)
        fastpath.configure(opt, polar_route=route)
        opts[route] = opt
    times: dict[str, list[float]] = {r: [] for r in ROUTES}
    with torch.no_grad():
        saved = [p.detach().clone() for p in model.parameters()]
    for i in range(repeats + 1):
        k = i % len(ROUTES)
        order = ROUTES[k:] + ROUTES[:k]
        for route in order:
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            t0 = time.perf_counter()
            opts[route].step()
            dt = time.perf_counter() - t0
            if i:  # the first round warms up
                times[route].append(dt)
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)
    return {r: statistics.median(ts) for r, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3/tiny,olmoe/tiny,qwen3/medium")
    ap.add_argument("--presets", default="paper,muon")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="results/route_check.md")
    args = ap.parse_args()
    load0 = os.getloadavg()
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name in args.models.split(","):
            model = model_of(name)
            for pre in args.presets.split(","):
                med = step_times(model, pre, args.repeats if "medium" not in name else max(3, args.repeats // 2))
                best_forced = min(med[r] for r in ROUTES if r != "auto")
                rows.append((threads, name, pre, med, med["auto"] / best_forced))
                print(
                    f"threads {threads} {name} {pre}: "
                    + ", ".join(f"{r} {v * 1e3:.1f} ms" for r, v in med.items())
                    + f"; auto / best forced {med['auto'] / best_forced:.3f}",
                    flush=True,
                )
    load1 = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Polar route: the choice (auto) against each route forced",
        "",
        f"`PYTHONPATH=src python benchmarks/route_check.py` at commit {commit}, torch {torch.__version__}; "
        f"medians of interleaved optimizer steps on fixed synthetic gradients; load average "
        f"{load0[0]:.2f} at start, {load1[0]:.2f} at end.",
        "",
        "auto: per shape, `gram_ns` where it needs fewer product flops than the iterations, else "
        "`iterative`; forced: one route for every shape. auto / best forced: against the fastest forced "
        "route (<= 1: the choice pays; > 1: a forced route would be faster).",
        "",
        "| threads | model | preset | auto | iterative | gram | gram_ns | auto / best forced |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for threads, name, pre, med, ratio in rows:
        cells = " | ".join(f"{med[r] * 1e3:.1f} ms" for r in ROUTES)
        lines.append(f"| {threads} | {name} | {pre} | {cells} | {ratio:.3f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
