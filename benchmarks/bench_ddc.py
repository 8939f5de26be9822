"""Step time of the Dead-Direction Conditioner against its base rules, side by side.

    python benchmarks/bench_ddc.py                   # tiny (4 families) + qwen3 medium (~59M)
    python benchmarks/bench_ddc.py --sizes tiny --repeats 5   # quicker
    python benchmarks/bench_ddc.py --archs qwen3 --threads 1 --out /tmp/ddc_bench   # the docs' numbers

In one process, on the harness's tiny models and one ~60M model (``benchmarks/bench.py``'s
``medium`` shapes; random weights, no download), fp32, 2 threads (``--threads``): fixed synthetic gradients,
only ``optimizer.step()`` timed, median over rounds. Variants are interleaved (one step of
each per round, in an order shuffled every round by a seeded RNG: the load of a shared machine
hits every variant alike, and no variant always runs after the same one, a position that moved
medians by ~10% in a fixed order) within their family (``--interleave family``, the default):
AdamW foreach / fused / DDC-Adam, then Muon / DDC-Muon, then the two reference paths, each set
on models built for it alone: a ratio compares a base and its lift with nothing else between
their steps or in memory. With all seven in one set (``--interleave all``, the design before
session 11) the 15-40 ms Muon and reference steps ran between the Adam steps, and on an idle
machine the DDC-Adam ratios moved run to run (tiny OLMoE x1.50-1.85, the 59M Qwen3 x0.94-1.76
in six runs); by family too (tiny OLMoE x1.41-1.77, 59M Qwen3 x0.95-1.19 in three runs): that
spread is the machine's (README, DDC cost; docs/ddc.md, session 11). The reference paths' ratios are
then across sets (informative only).

* ``torch_adamw``: ``torch.optim.AdamW(foreach=True)`` (wd 0.1 on 2-D weights), the base of
  ``ddc_adam`` (the multi-tensor implementation, torch's default on CUDA);
* ``torch_adamw_fused``: the same with ``fused=True`` (one kernel per tensor: on the CPU ~3x
  faster than foreach on these models), the second ratio of ``ddc_adam``;
* ``ddc_adam``: ``ddc.ddc_optimizer(model, "adam")`` on its default (fast) path;
  ``ddc_adam_ref``: the same optimizer on the per-gauge / per-parameter reference path;
* ``muon``: ``equiopt.build(model, preset="muon", foreach=True)``, the base of ``ddc_muon``;
* ``ddc_muon`` / ``ddc_muon_ref``.

Writes ``results/ddc_bench/bench.md`` and ``bench.json`` (medians, spread, ratios DDC / base,
optimizer state in bytes per parameter, load average before and after, torch version).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import bench as B  # noqa: E402  (the shared model shapes and gradient helpers)

import equiopt  # noqa: E402
from equiopt import ddc  # noqa: E402

VARIANTS = ("torch_adamw", "torch_adamw_fused", "ddc_adam", "ddc_adam_ref", "muon", "ddc_muon", "ddc_muon_ref")
FAMILIES = (("torch_adamw", "torch_adamw_fused", "ddc_adam"), ("muon", "ddc_muon"), ("ddc_adam_ref", "ddc_muon_ref"))
BASE_OF = {"ddc_adam": "torch_adamw", "ddc_adam_ref": "torch_adamw", "ddc_muon": "muon", "ddc_muon_ref": "muon"}


def make(variant: str, model):
    if variant == "torch_adamw":
        return B._torch_adamw(model)
    if variant == "torch_adamw_fused":
        return B._torch_adamw(model, fused=True)
    if variant == "muon":
        return equiopt.build(model, preset="muon", foreach=True)
    base = "adam" if variant.startswith("ddc_adam") else "muon"
    opt = ddc.ddc_optimizer(model, base)
    ddc.configure(opt, batched=not variant.endswith("_ref"))
    return opt


def timing_sets(variants: list[str], interleave: str) -> list[list[str]]:
    """The sets whose steps are interleaved with each other (one after another): every
    variant together (``all``) or each family of :data:`FAMILIES` (``family``)."""
    if interleave == "all":
        return [list(variants)]
    return [kept for kept in ([v for v in f if v in variants] for f in FAMILIES) if kept]


def time_set(arch: str, size: str, timed: list[str], reps: int) -> tuple[dict[str, list[float]], dict[str, float], int]:
    """Step times of the variants ``timed``, interleaved, each on its own model (the steps
    change the weights) built for this set only and freed on return (so no other set's
    models and state sit in memory meanwhile); with each variant's state bytes per parameter
    and the parameter count."""
    opts = {}
    for v in timed:
        model, _ = B._build(arch, size)
        B._set_grads(model)
        opts[v] = make(v, model)
        opts[v].step()  # warm-up (state allocated)
    n = sum(p.numel() for p in model.parameters())
    times: dict[str, list[float]] = {v: [] for v in timed}
    for order in B.shuffled_rounds(timed, reps):
        for v in order:
            t = time.perf_counter()
            opts[v].step()
            times[v].append(time.perf_counter() - t)
    return times, {v: B._state_bytes(o) / n for v, o in opts.items()}, n


def bench_model(arch: str, size: str, variants, reps: int, log, interleave: str = "family") -> dict:
    times: dict[str, list[float]] = {}
    state: dict[str, float] = {}
    for timed in timing_sets(variants, interleave):
        t, sb, n = time_set(arch, size, timed, reps)
        times.update(t)
        state.update(sb)
    res = {"arch": arch, "size": size, "params": n, "variants": {}}
    for v in variants:
        med = statistics.median(times[v])
        res["variants"][v] = {
            "median_s": med,
            "min_s": min(times[v]),
            "max_s": max(times[v]),
            "state_bytes_per_param": state[v],
        }
    for v, b in BASE_OF.items():
        if v in res["variants"] and b in res["variants"]:
            res["variants"][v]["ratio_to_base"] = res["variants"][v]["median_s"] / res["variants"][b]["median_s"]
        if v.startswith("ddc_adam") and v in res["variants"] and "torch_adamw_fused" in res["variants"]:
            fused = res["variants"]["torch_adamw_fused"]["median_s"]
            res["variants"][v]["ratio_to_fused"] = res["variants"][v]["median_s"] / fused
    log(
        f"{arch}/{size} ({n / 1e6:.1f}M): "
        + ", ".join(f"{v} {1e3 * res['variants'][v]['median_s']:.1f} ms" for v in variants)
    )
    return res


def _commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), for the results file."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# DDC optimizer step time",
        "",
        f"`python benchmarks/bench_ddc.py {results['args']}` at commit {results.get('commit', 'unknown')} on "
        f"{m['platform']}, torch {m['torch']}, "
        f"{m['threads']} threads, fp32; {results['when']}. Load average before {m['load_before']}, after "
        f"{m['load_after']} (a shared machine: the interleaving spreads the load over every variant alike). "
        f"Median over interleaved steps (interleaved: {results.get('interleave', 'all')}) on fixed synthetic "
        "gradients; ratio = DDC / its base rule "
        "(ddc_adam: torch.optim.AdamW foreach, then `of fused`: AdamW fused=True; ddc_muon: equiopt's "
        "muon preset). `_ref`: the per-gauge reference path.",
        "",
        "| model | params | "
        + " | ".join(results["variants"])
        + " | state B/param: AdamW / ddc_adam / muon / ddc_muon |",
        "|---|---|" + "---|" * len(results["variants"]) + "---|",
    ]
    for r in results["models"]:
        cells = []
        for v in results["variants"]:
            x = r["variants"][v]
            ratio = f" (x{x['ratio_to_base']:.2f})" if "ratio_to_base" in x else ""
            if "ratio_to_fused" in x:
                ratio = ratio[:-1] + f"; x{x['ratio_to_fused']:.2f} of fused)"
            cells.append(f"{1e3 * x['median_s']:.1f} ms{ratio}")
        sb = " / ".join(
            f"{r['variants'][v]['state_bytes_per_param']:.2f}"
            for v in ("torch_adamw", "ddc_adam", "muon", "ddc_muon")
            if v in r["variants"]
        )
        lines.append(f"| {r['arch']}/{r['size']} | {r['params'] / 1e6:.1f}M | " + " | ".join(cells) + f" | {sb} |")
    lines += [
        "",
        "Target: DDC step within 1.5x of its base rule's. `_ref`: the reference path "
        "(`ddc.configure(opt, batched=False)`), the same step up to rounding.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,medium")
    ap.add_argument("--archs", default=",".join(B.ARCHS), help="tiny models of these families")
    ap.add_argument("--medium-archs", default="qwen3")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--medium-repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--interleave", choices=("family", "all"), default="family", help="interleave within a family or all variants"
    )
    ap.add_argument("--out", default=str(HERE.parent / "results" / "ddc_bench"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    load0 = B._load()
    models = []
    sizes = args.sizes.split(",")
    for size in sizes:
        archs = args.archs.split(",") if size != "medium" else args.medium_archs.split(",")
        for arch in archs:
            reps = args.medium_repeats if size == "medium" else args.repeats
            models.append(bench_model(arch, size, variants, reps, print, args.interleave))
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": _commit(),
        "args": " ".join(argv if argv is not None else sys.argv[1:]),
        "variants": variants,
        "interleave": args.interleave,
        "models": models,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "load_before": load0,
            "load_after": B._load(),
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    (out / "bench.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
