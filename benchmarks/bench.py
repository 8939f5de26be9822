"""``python benchmarks/bench.py``: the optimizer step of every preset, side by side, at the hardware limit.

One process, one run. For each architecture family (Qwen3, Gemma3, OLMoE, gpt-oss; built
from Hugging Face config classes, random weights, no download) and each size preset
(``tiny`` = the harness's ~1-3M-parameter models; ``medium`` = ~55-80M parameters), it
times the ``step()`` of

* ``torch_adamw``   torch.optim.AdamW (foreach);
* ``torch_muon``    torch.optim.Muon on the 2-D hidden matrices + torch AdamW (foreach) on
  the rest (embedding, head, vectors, router, and the 3-D stacked experts, which
  torch.optim.Muon rejects: it takes 2-D parameters only);
* ``adamw``, ``muon``, ``paper``  equiopt presets (fast path, AdamW groups with foreach);
* ``muon_ref``, ``paper_ref``  the same presets on the simple reference path
  (``batched=False``), to show what the fast path buys.

on fixed synthetic gradients (only the optimizer is timed), interleaved (one step of each
variant per round, the order shuffled every round by a seeded RNG) so that the load of a
shared machine hits every variant alike; it reports the median and spread, the
ratio to torch AdamW, optimizer-state bytes per parameter, the analytic FLOPs and bytes of
every map, the roofline time of those FLOPs and bytes against this machine's own measured
fp32/fp64 matrix-product rates and copy bandwidth, and the forward+backward time of the same
model. Results go to ``results/bench.md`` and ``results/bench.json`` (with the command).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a clone: python benchmarks/bench.py

__all__ = ["add_arguments", "run", "run_bench", "machine_rates", "step_cost", "MEDIUM"]

ARCHS = ("qwen3", "gemma3", "olmoe", "gptoss")
SIZES = ("tiny", "medium", "micro")  # micro: smoke tests only
CPU = torch.device("cpu")
VARIANTS = ("torch_adamw", "torch_muon", "adamw", "muon", "paper", "muon_ref", "paper_ref")

# ~55-80M-parameter shapes of each family (the "medium" preset of the benchmark).
MEDIUM = {
    "qwen3": dict(
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
    ),
    "gemma3": dict(
        vocab_size=65536,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        tie_embeddings=True,
        sliding_window=64,
        layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention", "full_attention"],
    ),
    "olmoe": dict(
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=256,
        num_layers=6,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
        num_experts=16,
        top_k=4,
    ),
    "gptoss": dict(
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=256,
        num_layers=6,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        num_experts=16,
        top_k=4,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * 3,
    ),
}


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test (seconds): a 'micro' qwen3 (2 layers, d=64), 2 timed steps, no torch Muon, "
        "no profiling, no files unless --out-* given",
    )
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated families (default: all four)")
    parser.add_argument("--sizes", default="tiny,medium", help="comma-separated: tiny, medium (micro: smoke tests)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}"
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per variant on tiny models (default 15)")
    parser.add_argument(
        "--medium-repeats", type=int, default=5, help="timed steps per variant on medium models (default 5)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="seconds of timed steps per variant and model at most (slow variants get fewer repeats, >= 1)",
    )
    parser.add_argument(
        "--fwd-batch",
        type=int,
        default=16,
        help="batch size of the forward+backward timing (seq 128) on tiny models (default 16, the harness's)",
    )
    parser.add_argument("--medium-fwd-batch", type=int, default=8, help="the same on medium models (default 8)")
    parser.add_argument(
        "--medium-variants",
        default="torch_adamw,torch_muon,adamw,muon,paper,paper_ref",
        help="variants timed on medium models",
    )
    parser.add_argument(
        "--full-torch-muon",
        action="store_true",
        help="time torch Muon on medium models step by step (minutes per step) instead of estimating it",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda[:i] (default cpu). On CUDA the polar iterations run in bf16 (the presets' "
        "default), the roofline counts them at the measured bf16 rate, forward+backward uses bf16 "
        "autocast, torch Muon is timed step by step, and the report goes to results/bench_cuda.*",
    )
    parser.add_argument(
        "--table",
        metavar="JSON",
        default=None,
        help="print the README performance table from an existing results JSON and exit (no timing)",
    )
    parser.add_argument(
        "--render",
        metavar="JSON",
        default=None,
        help="rewrite the markdown report (--out-md, default results/bench.md) from an existing "
        "results JSON and exit (no timing)",
    )
    parser.add_argument("--out-md", default=None, help="markdown report (default results/bench.md; none in --quick)")
    parser.add_argument("--out-json", default=None, help="JSON results (default results/bench.json; none in --quick)")


def run(args: argparse.Namespace) -> int:
    """Time the optimizer step of every preset side by side; write results/bench.{md,json}."""
    if getattr(args, "table", None):
        print(readme_table(json.loads(Path(args.table).read_text())))
        return 0
    if getattr(args, "render", None):
        out_md = args.out_md or "results/bench.md"
        Path(out_md).write_text(render_markdown(json.loads(Path(args.render).read_text())))
        print(f"wrote {out_md}")
        return 0
    run_bench(args)
    return 0


def readme_table(results: dict) -> str:
    """The README's performance table: step time per preset and model, ratios, state."""
    m = results["machine"]
    lines = [
        f"Optimizer step on {m['cpus']} CPU cores ({m['threads']} threads, torch {m['torch']}), median of "
        f"interleaved steps; `python benchmarks/bench.py` ({results['when']}; "
        f"load average {m['load_before'][0] if m['load_before'] else '?'}). "
        "Ratios are to torch.optim.AdamW (foreach) on the same model.",
        "",
        "| model | params | torch AdamW | torch Muon+AdamW | equiopt adamw | equiopt muon | equiopt paper "
        "| paper / fwd+bwd | state B/param (paper) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        v = r["variants"]

        def cell(k, v=v):  # v bound now (B023); cell is only called in this iteration
            e = v.get(k)
            if not e:
                return "-"
            ratio = e.get("vs_torch_adamw")
            return f"{_ms(e['median_s'])} ms (x{ratio:.1f})" if ratio else f"{_ms(e['median_s'])} ms"

        p = v.get("paper")
        lines.append(
            f"| {r['arch']}/{r['size']} | {r['params'] / 1e6:.1f}M | {cell('torch_adamw')} | {cell('torch_muon')} | "
            f"{cell('adamw')} | {cell('muon')} | {cell('paper')} | "
            f"{_f(p and 100 * p['frac_fwd_bwd'], '{:.1f}%')} | {_f(p and p['state_bytes_per_param'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


# ----------------------------------------------------------------------------------------
# machine
# ----------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shuffled_rounds(names, rounds: int, seed: int = 0):
    """``rounds`` orders of ``names``, one per round of interleaved steps, each a fresh seeded
    shuffle: in a fixed (or rotated) order every variant always steps after the same one, a
    position that moved medians by ~10% (docs/ddc.md, session 10)."""
    order, rng = list(names), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        yield list(order)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _median_time(fn, reps: int, warmup: int = 1, device: torch.device = CPU) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    ts = [_timed(fn, device) for _ in range(reps)]
    return statistics.median(ts), ts


def machine_rates(quick: bool = False, device: torch.device = CPU) -> dict:
    """The device's fp32/fp64 (CUDA: also bf16, ``mm16``) matrix-product rate (FLOP/s), copy
    bandwidth (B/s) and (CPU) eigh times, measured now (best of several: the hardware limit,
    not the load's). ``mm_polar``: the rate of the polar iterations' dtype (fp32 on CPU, bf16
    on CUDA, the presets' ``polar_dtype`` default)."""
    reps = 3 if quick else 9
    out = {}
    big = device.type == "cuda"
    kinds = [
        ("mm32", torch.float32, 256 if quick else (8192 if big else 1024)),
        ("mm64", torch.float64, 192 if quick else (4096 if big else 768)),
    ]
    if big:
        kinds.append(("mm16", torch.bfloat16, 256 if quick else 8192))
    for name, dt, n in kinds:
        a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
        _, ts = _median_time(lambda a=a, b=b: torch.mm(a, b), reps, device=device)
        out[name] = 2 * n**3 / min(ts)
        out[name + "_median"] = 2 * n**3 / statistics.median(ts)
    out["mm_polar"] = out["mm16"] if big else out["mm32"]
    # batched small products as the maps issue them ([48, 32, 128] x [48, 128, 32])
    x = torch.randn(48, 32, 128, device=device)
    _, ts = _median_time(lambda: torch.bmm(x, x.mT), reps * 4, device=device)
    out["bmm_small32"] = 2 * 48 * 32 * 32 * 128 / min(ts)
    n = (1 if quick else (256 if big else 32)) * 2**20  # floats: 4 MiB / 128 MiB (CPU) / 1 GiB (CUDA) per buffer
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    _, ts = _median_time(lambda: dst.copy_(src), reps, device=device)
    out["copy_bw"] = 2 * 4 * n / min(ts)  # read + write
    out["copy_bw_median"] = 2 * 4 * n / statistics.median(ts)
    if big:
        return out
    for m in (32,) if quick else (32, 64, 128, 512):
        g = torch.randn(8, m, 2 * m, dtype=torch.float64)
        g = g @ g.mT
        _, ts = _median_time(lambda g=g: torch.linalg.eigh(g), reps)
        out[f"eigh64_{m}_s"] = min(ts) / 8
    return out


def _command_line() -> str:
    argv = list(sys.argv)
    prog = Path(argv[0]).name if argv else "equiopt"
    if prog.endswith(".py"):
        head = ["python", os.path.relpath(argv[0])]
    elif prog in ("equiopt", "__main__.py"):
        head = ["equiopt"]
    else:
        head = [prog]
    return " ".join(shlex.quote(a) for a in head + argv[1:])


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ----------------------------------------------------------------------------------------
# models, gradients, optimizers
# ----------------------------------------------------------------------------------------


def _model_config(arch: str, size: str):
    from equiopt.train.models import ModelConfig, preset

    if size == "tiny":
        return preset(arch, "tiny")
    if size == "medium":
        kw = dict(MEDIUM[arch])
        return ModelConfig(arch=arch, size="tiny", max_seq_len=128, **kw)
    if size == "micro":  # smoke tests only
        cfg = preset(arch, "tiny")
        return ModelConfig(
            **{
                **cfg.to_dict(),
                "vocab_size": 512,
                "hidden_size": 64,
                "num_layers": 2,
                "head_dim": 16,
                "intermediate_size": cfg.intermediate_size // 2,
                "layer_types": (cfg.layer_types or [])[-2:] or None,
            }
        )
    raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")


def _build(arch: str, size: str, device: torch.device = CPU):
    import transformers

    from equiopt.train.models import build_model

    transformers.logging.set_verbosity_error()
    cfg = _model_config(arch, size)
    return build_model(cfg, seed=0).to(device), cfg


def _set_grads(model, seed: int = 1) -> None:
    """Fixed gradients, drawn on the CPU (the same numbers on every device)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = (torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-2).to(p.device)


class _Pair:
    """Two optimizers stepped as one (torch Muon + torch AdamW)."""

    def __init__(self, *opts):
        self.opts = opts
        self.state = {}
        for o in opts:
            self.state.update(o.state)

    def step(self):
        for o in self.opts:
            o.step()

    def all_state(self):
        for o in self.opts:
            yield from o.state.values()


def _torch_adamw(model, fused: bool = False):
    """torch.optim.AdamW (wd 0.1 on 2-D weights): multi-tensor (``foreach``), or ``fused``."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=not fused,
        fused=fused or None,
    )


def _new_torch_muon(params: list) -> torch.optim.Muon:
    """torch.optim.Muon with the hyperparameters of equiopt's ``muon`` preset (its
    sqrt(max(1, rows/cols)) scale is torch's ``adjust_lr_fn="original"``)."""
    from equiopt.presets import DEFAULTS, PRESETS

    spec = {**DEFAULTS, **PRESETS["muon"]["mlp_in"]}
    return torch.optim.Muon(
        params,
        lr=spec["lr"],
        weight_decay=spec["weight_decay"],
        momentum=spec["momentum"],
        nesterov=spec["nesterov"],
        adjust_lr_fn="original",
    )


def _torch_muon(model, plan):
    """torch.optim.Muon on the roles the equiopt ``muon`` preset orthogonalizes that are 2-D;
    everything else (and 3-D stacked experts: torch Muon takes 2-D parameters only) on AdamW."""
    muon, rest = [], []
    for e in plan.entries:
        if e.role in ("attention", "mlp_in", "mlp_out", "expert_in", "expert_out", "matrix") and e.param.ndim == 2:
            muon.append(e.param)
        else:
            rest.append(e.param)
    opts = [_new_torch_muon(muon)]
    if rest:
        decay = [p for p in rest if p.ndim >= 2]
        vec = [p for p in rest if p.ndim < 2]
        opts.append(
            torch.optim.AdamW(
                [{"params": decay, "weight_decay": 0.1}, {"params": vec, "weight_decay": 0.0}],
                lr=3e-3,
                betas=(0.9, 0.95),
                eps=1e-8,
                foreach=True,
            )
        )
    return _Pair(*opts), sum(p.numel() for p in muon)


def _estimate_torch_muon(model, plan, note: str, log, device: torch.device = CPU) -> tuple[list[float], str]:
    """torch.optim.Muon + AdamW step time from per-shape timings: one torch Muon instance on
    one matrix of each distinct shape (2 timed steps after a warm-up), times the number of
    matrices of that shape (one step each: a bf16 step takes seconds), plus the AdamW part
    timed as a whole. Returns ([estimate], note)."""
    opt, _ = _torch_muon(model, plan)
    muon_params = list(opt.opts[0].param_groups[0]["params"])
    by_shape: dict = {}
    for p in muon_params:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    total = 0.0
    for shape, ps in by_shape.items():
        one = _new_torch_muon([ps[0]])
        ts = [_timed(one.step, device)]  # one step: bf16 Newton-Schulz dominates; state allocation is negligible
        total += min(ts) * len(ps)
        log(f"      torch Muon {shape}: {min(ts) * 1e3:.0f} ms x {len(ps)}")
    if len(opt.opts) > 1:
        adamw = opt.opts[1]
        adamw.step()
        total += _median_time(adamw.step, 3, warmup=0, device=device)[0]
    return (
        [total],
        note + "; on medium models ESTIMATED: one torch Muon step per distinct matrix shape x the number of matrices "
        "of that shape + the AdamW part",
    )


def _equiopt(model, preset: str, batched: bool = True):
    from equiopt import build, fastpath

    opt = build(model, preset=preset, foreach=True)
    fastpath.configure(opt, batched=batched)
    return opt


def _state_bytes(opt) -> int:
    states = opt.all_state() if isinstance(opt, _Pair) else opt.state.values()
    total = 0
    for s in states:
        for v in s.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                total += v.numel() * v.element_size()
    return total


# ----------------------------------------------------------------------------------------
# analytic cost of one step
# ----------------------------------------------------------------------------------------

F32 = 4


def step_cost(opt) -> dict:
    """Analytic FLOPs and essential memory traffic of one EquiOptimizer step.

    Bytes (fp32 state, per element): finiteness check 4; AdamW 28 (read p, g, m, v; write
    p, m, v); matrix groups: momentum EMA 12 (read g, M; write M), Nesterov +12, the map's
    input read + output write 8 (+4 for a row/column norm pass, +8 per centering), weight
    decay 8, apply 12. FLOPs per wide [m, n] logical matrix from
    :func:`equiopt.fastpath.polar_flops` for the route the fast path takes (or would take on
    the reference path: iterative + a separate Gram for the nuclear norm).
    Returns totals and one row per (role, shape) for the report.
    """
    from equiopt import fastpath
    from equiopt.optimizer import map_kwargs

    rows, tot = [], {"mm32": 0, "mm64": 0, "eig": 0, "bytes": 0}
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        n_el = sum(p.numel() for p in params)
        if group["map"] == "adamw":
            b = n_el * F32 * (1 + 7)
            tot["bytes"] += b
            rows.append(
                {
                    "role": group.get("role", "?"),
                    "map": "adamw",
                    "shape": "-",
                    "count": len(params),
                    "route": "-",
                    "flops": 0,
                    "bytes": b,
                }
            )
            continue
        per_el = 1 + 3 + (3 if group["nesterov"] else 0) + 2 + (2 if group["weight_decay"] else 0) + 3
        name = group["map"]
        if name in ("row_norm", "col_norm"):
            per_el += 1
        elif name == "centered_row_norm":
            per_el += 1 + 4
        elif name == "hybrid":
            per_el += 1
        tot["bytes"] += n_el * F32 * per_el
        o = fastpath.options_of(opt, group)
        for bucket in fastpath.plan_buckets(opt, group, params):
            m, n = bucket.shape
            kw = map_kwargs(group, params[bucket.members[0][0]])
            method = kw.get("method", "polar_express")
            polar_maps = ("polar", "scaled_polar", "hybrid")
            flops = {"mm32": 0, "mm64": 0, "eig": 0}
            route = "-"
            if name in polar_maps and method in ("polar_express", "newton_schulz"):
                steps = len(fastpath.polar_coeffs(method, kw.get("steps")))
                nuclear = (
                    name == "scaled_polar" or (name == "hybrid" and kw.get("order") == "row_then_polar")
                ) and float(kw.get("alpha", 1.0)) != 0.0
                wm, wn = min(m, n), max(m, n)
                if o.batched:
                    route = fastpath.choose_polar_route(
                        wm, wn, steps, nuclear, device=bucket.device, cdt=bucket.dtype, route=o.polar_route
                    )
                else:
                    route = "iterative"
                flops = fastpath.polar_flops(route, wm, wn, steps, nuclear)
                if route == "iterative" and nuclear and not o.batched:
                    flops["mm32"] += 2 * wm * wm * wn  # the reference forms the Gram a second time
            elif name in ("right_spectral", "left_spectral") or (name in polar_maps and method == "gram_eigh"):
                wm, wn = min(m, n), max(m, n)
                route = "gram-exact"
                flops = {"mm32": 4 * wm * wm * wn + 2 * wm**3, "mm64": 0, "eig": 9 * wm**3}
            cnt = bucket.count
            for k in flops:
                tot[k] += flops[k] * cnt
            rows.append(
                {
                    "role": group.get("role", "?"),
                    "map": name,
                    "shape": f"{m}x{n}",
                    "count": cnt,
                    "route": route,
                    "flops": sum(flops.values()) * cnt,
                    "bytes": sum(params[i].numel() for i, _ in bucket.members) * F32 * per_el,
                }
            )
    return {"total": tot, "rows": rows}


def _adamw_cost(n_params: int) -> dict:
    return {"total": {"mm32": 0, "mm64": 0, "eig": 0, "bytes": n_params * F32 * 7}, "rows": []}


def _torch_muon_cost(model, n_muon: int, muon_params: list) -> dict:
    tot = {"mm32": 0, "mm64": 0, "eig": 0, "bytes": 0}
    n_all = sum(p.numel() for p in model.parameters())
    tot["bytes"] = (n_all - n_muon) * F32 * 7 + n_muon * F32 * (3 + 3 + 2 + 2 + 3)
    for p in muon_params:
        m, n = min(p.shape), max(p.shape)
        tot["mm32"] += 5 * (4 * m * m * n + 2 * m**3)  # bf16 on CPU in fact: far below the fp32 rate
    return {"total": tot, "rows": []}


def roofline_seconds(total: dict, rates: dict) -> float:
    """FLOPs at the polar iterations' matrix-product rate (fp32 on CPU, bf16 on CUDA) and the
    fp64 rate + bytes at the copy bandwidth (the phases of a step run one after the other,
    so the times add). eigh counts 9 m^3 flops at the fp64 product rate (LAPACK reaches far
    less: an optimistic bound)."""
    return (
        total["mm32"] / rates.get("mm_polar", rates["mm32"])
        + (total["mm64"] + total["eig"]) / rates["mm64"]
        + total["bytes"] / rates["copy_bw"]
    )


_MATMUL_OPS = (
    "aten::bmm",
    "aten::baddbmm",
    "aten::mm",
    "aten::addmm",
    "aten::matmul",
    "aten::_linalg_eigh",
    "aten::linalg_eigvalsh",
    "aten::_linalg_svd",
    "aten::linalg_eigh",
)


def _profile_split(step) -> tuple[float, float]:
    """(seconds in matrix products / eigh, seconds in everything else) of one step (profiler
    self times)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    mat = other = 0.0
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total / 1e6
        if ev.key in _MATMUL_OPS:
            mat += t
        elif ev.key.startswith("aten::") or ev.key.startswith("Optimizer"):
            other += t
    return mat, other


# ----------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------


def _fwd_bwd_seconds(model, batch: int, reps: int, device: torch.device = CPU) -> float:
    """Forward + backward of ``batch`` x 128 tokens as the harness runs it (CUDA: bf16 autocast)."""
    from equiopt.train.loop import _autocast

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, 128), generator=g).to(device)

    def fb():
        for p in model.parameters():
            p.grad = None
        with _autocast(device.type):
            out = model(input_ids=x, labels=x)
        out.loss.backward()

    model.train()
    med, _ = _median_time(fb, reps, warmup=1, device=device)
    return med


def _bench_model(arch: str, size: str, variants: list[str], args, rates: dict, log, device: torch.device = CPU) -> dict:
    from equiopt import plan as make_plan
    from equiopt.train.models import count_parameters

    quick = args.quick
    model, cfg = _build(arch, size, device)
    n_params = count_parameters(model)
    reps = args.repeats if size == "tiny" else args.medium_repeats
    if quick:
        reps = 2
    res = {"arch": arch, "size": size, "params": n_params, "config": cfg.to_dict(), "variants": {}}
    t0 = time.perf_counter()
    fb = 2 if quick else (args.fwd_batch if size != "medium" else args.medium_fwd_batch)
    fwd = _fwd_bwd_seconds(model, fb, 1 if quick else (3 if size != "medium" else 1), device)
    res["fwd_bwd_s"] = fwd
    res["fwd_bwd_tokens"] = fb * 128
    log(f"  {arch}/{size}: {n_params / 1e6:.2f}M params, fwd+bwd {fwd * 1e3:.0f} ms ({time.perf_counter() - t0:.0f} s)")
    _set_grads(model)
    plan = make_plan(model, "muon")

    opts, costs, notes = {}, {}, {}
    # torch.optim.Muon runs Newton-Schulz in bf16, ~100x slower than fp32 on a CPU without
    # bf16 units: on the medium models one step takes minutes, so it is estimated there
    estimate_muon = size == "medium" and device.type == "cpu" and "torch_muon" in variants and not args.full_torch_muon
    for v in variants:
        if v == "torch_adamw":
            opts[v] = _torch_adamw(model)
            costs[v] = _adamw_cost(n_params)
        elif v == "torch_muon":
            opt, n_muon = _torch_muon(model, plan)
            muon_params = list(opt.opts[0].param_groups[0]["params"])
            opts[v] = opt
            costs[v] = _torch_muon_cost(model, n_muon, muon_params)
            costs[v]["state_bytes"] = 4 * n_muon + 8 * (n_params - n_muon)  # momentum; AdamW m, v
            n3 = sum(p.numel() for p in model.parameters() if p.ndim == 3)
            notes[v] = (
                f"torch.optim.Muon on {len(muon_params)} 2-D matrices ({n_muon / n_params:.0%} of the parameters), "
                "Newton-Schulz in bf16 (hard-coded); AdamW on the rest"
                + (
                    f", including the 3-D stacked experts ({n3 / n_params:.0%} of the parameters) "
                    "that torch.optim.Muon rejects"
                    if n3
                    else ""
                )
            )
        elif v in ("adamw", "muon", "paper"):
            opts[v] = _equiopt(model, v)
        elif v in ("muon_ref", "paper_ref"):
            opts[v] = _equiopt(model, v[:-4], batched=False)
        else:
            raise ValueError(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")
        if v not in costs:
            costs[v] = step_cost(opts[v])

    # warm-up (state allocation) and a first timing to size the repeats
    first = {}
    for v, opt in list(opts.items()):
        if v == "torch_muon" and estimate_muon:
            continue
        _timed(opt.step, device)
        first[v] = _timed(opt.step, device)
    # every variant gets at least min(3, reps) timed steps; slow ones stop at the budget
    n_reps = {v: max(min(3, reps), min(reps, int(args.budget / max(first[v], 1e-6)))) for v in first}
    samples = {v: [] for v in first}
    for order in shuffled_rounds(first, max(n_reps.values(), default=0)):
        for v in order:
            if len(samples[v]) >= n_reps[v]:
                continue
            samples[v].append(_timed(opts[v].step, device))
    if estimate_muon:
        samples["torch_muon"], notes["torch_muon"] = _estimate_torch_muon(model, plan, notes["torch_muon"], log, device)

    # the machine's rates again, right after this model's steps (a shared machine's load
    # drifts): the roofline uses the best of the run-start and these measurements
    now = machine_rates(quick, device)
    rates = {**rates, **{k: max(rates[k], now[k]) for k in ("mm32", "mm64", "mm_polar", "copy_bw")}}
    res["rates"] = {**rates, "load": _load()}
    base = statistics.median(samples["torch_adamw"]) if "torch_adamw" in samples else None
    base_best = min(samples["torch_adamw"]) if "torch_adamw" in samples else None
    tmuon = statistics.median(samples["torch_muon"]) if "torch_muon" in samples else None
    for v, opt in opts.items():
        ts = samples[v]
        if not ts:
            continue
        med = statistics.median(ts)
        roof = roofline_seconds(costs[v]["total"], rates)
        entry = {
            "median_s": med,
            "min_s": min(ts),
            "max_s": max(ts),
            "iqr_s": (statistics.quantiles(ts, n=4)[2] - statistics.quantiles(ts, n=4)[0]) if len(ts) >= 4 else None,
            "repeats": len(ts),
            "samples_s": ts,
            "vs_torch_adamw": med / base if base else None,
            "vs_torch_adamw_best": min(ts) / base_best if base_best else None,
            "torch_muon_over_this": tmuon / med if tmuon else None,
            "frac_fwd_bwd": med / fwd,
            "state_bytes_per_param": (
                _state_bytes(opt) if not (v == "torch_muon" and estimate_muon) else costs[v]["state_bytes"]
            )
            / n_params,
            "flops": costs[v]["total"],
            "roofline_s": roof,
            "roofline_ratio": med / roof if roof > 0 else None,
        }
        if v in notes:
            entry["note"] = notes[v]
        if v in ("muon", "paper", "muon_ref", "paper_ref"):
            entry["maps"] = costs[v]["rows"]
        if not quick and v not in ("torch_muon",) and size != "medium" and device.type == "cpu":
            mat, other = _profile_split(opt.step)
            tot = costs[v]["total"]
            entry["profile_matrix_s"], entry["profile_other_s"] = mat, other
            flops = tot["mm32"] + tot["mm64"] + tot["eig"]
            entry["achieved_flops"] = flops / mat if mat > 0 and flops else None
            entry["achieved_bytes_per_s"] = tot["bytes"] / other if other > 0 else None
        res["variants"][v] = entry
        log(
            f"    {v:14s} median {med * 1e3:9.2f} ms  ({len(ts)} reps, min {min(ts) * 1e3:.2f})  "
            f"x{entry['vs_torch_adamw'] or float('nan'):.2f} AdamW  "
            f"roofline x{entry['roofline_ratio'] or float('nan'):.2f}"
        )
    del opts
    del model
    gc.collect()
    return res


def run_bench(args: argparse.Namespace, log=None) -> dict:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); returns the results."""
    log = log or (lambda s: print(s, flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = [a for a in args.archs.split(",") if a]
    sizes = [s for s in args.sizes.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    if args.quick:
        archs, sizes = archs[:1], ["micro"]
        variants = [v for v in variants if v != "torch_muon"]
    for a in archs:
        if a not in ARCHS:
            raise ValueError(f"unknown arch {a!r}; valid: {', '.join(ARCHS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available in this torch build / machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device}: cpu or cuda[:i]")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    command = _command_line()
    t0 = time.perf_counter()
    load0 = _load()
    log(f"bench: torch {torch.__version__}, {device_name}, {torch.get_num_threads()} threads, load {load0}")
    rates = machine_rates(args.quick, device)
    log(
        f"  machine: fp32 matmul {rates['mm32'] / 1e9:.1f} GFLOP/s, fp64 {rates['mm64'] / 1e9:.1f} GFLOP/s, "
        f"copy {rates['copy_bw'] / 1e9:.1f} GB/s"
    )
    results = {
        "command": command,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": device_name,
            "load_before": load0,
            **rates,
        },
        "models": [],
    }
    for size in sizes:
        for arch in archs:
            vs = variants if size != "medium" else [v for v in args.medium_variants.split(",") if v]
            results["models"].append(_bench_model(arch, size, vs, args, rates, log, device))
    results["machine"]["load_after"] = _load()
    results["wall_s"] = time.perf_counter() - t0
    md = render_markdown(results)
    stem = "results/bench" if device.type == "cpu" else "results/bench_cuda"
    out_md = args.out_md if args.out_md is not None else (None if args.quick else stem + ".md")
    out_json = args.out_json if args.out_json is not None else (None if args.quick else stem + ".json")
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(results, indent=1, default=str))
    if out_md:
        Path(out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(out_md).write_text(md)
    log(md)
    log(f"bench: {results['wall_s']:.0f} s")
    return results


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------


def _ms(x):
    """Seconds -> a number of milliseconds (no unit)."""
    return "-" if x is None else (f"{x * 1e3:.1f}" if x < 1 else f"{x * 1e3:.0f}")


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def _targets(results: dict) -> list[str]:
    """The issue's targets, measured: one row per model."""
    out = [
        "## Targets",
        "",
        "paper preset: step <= 1.15x the roofline time of its own FLOPs and bytes; <= 5% of forward+backward "
        "(tiny models); >= 30x faster than torch.optim.Muon + AdamW; state = 1 buffer (4 B) per matrix parameter, "
        "AdamW 2 (8 B). Median (best).",
        "",
        "| model | paper / roofline | paper / fwd+bwd | torch Muon / paper | torch Muon / muon | paper vs paper_ref "
        "| state B/param paper, muon, adamw | roofline rates: fp32 GFLOP/s, copy GB/s, load after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        v = r["variants"]
        p = v.get("paper")
        if not p:
            continue
        tm = v.get("torch_muon")

        def ratio(a, b, key="median_s"):
            return a[key] / b[key] if a and b else None

        ref = v.get("paper_ref")
        out.append(
            f"| {r['arch']}/{r['size']} | {_f(p['roofline_ratio'])}x ({_f(p['min_s'] / p['roofline_s'])}x) | "
            f"{_f(100 * p['frac_fwd_bwd'], '{:.1f}%')} ({_f(100 * p['min_s'] / r['fwd_bwd_s'], '{:.1f}%')}) | "
            f"{_f(ratio(tm, p), '{:.1f}x')} ({_f(ratio(tm, p, 'min_s'), '{:.1f}x')}) | "
            f"{_f(ratio(tm, v.get('muon')), '{:.1f}x')} | "
            f"{_f(ratio(ref, p), '{:.2f}x faster')} | "
            + ", ".join(f"{v[k]['state_bytes_per_param']:.2f}" if k in v else "-" for k in ("paper", "muon", "adamw"))
            + f" | {r['rates']['mm32'] / 1e9:.1f}, {r['rates']['copy_bw'] / 1e9:.1f}, {r['rates']['load']} |"
        )
    out += [
        "",
        "What bounds each target, from the same measurements: `floor` = the paper step at its roofline "
        "(its own FLOPs at the measured fp32 matmul rate + its bytes at the copy bandwidth), i.e. the best any "
        "implementation of these maps with these FLOPs could do here.",
        "",
        "| model | roofline ms | floor of paper / fwd+bwd | tokens/step for a 5% floor | ceiling of torch Muon / paper "
        "| matrix work: achieved GFLOP/s (of peak) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        p, tm = r["variants"].get("paper"), r["variants"].get("torch_muon")
        if not p or not p.get("roofline_s"):
            continue
        floor = p["roofline_s"] / r["fwd_bwd_s"]
        tokens = r["fwd_bwd_tokens"] * floor / 0.05
        ach = p.get("achieved_flops")
        peak = r["rates"].get("mm_polar", r["rates"]["mm32"])
        out.append(
            f"| {r['arch']}/{r['size']} | {_ms(p['roofline_s'])} | {100 * floor:.1f}% | {tokens:,.0f} "
            f"({r['fwd_bwd_tokens']} measured) | {_f(tm and tm['median_s'] / p['roofline_s'], '{:.1f}x')} | "
            f"{_f(ach and ach / 1e9, '{:.1f}')}{_f(ach and 100 * ach / peak, ' ({:.0f}%)')} |"
        )
    out += [""] + _verdicts(results)
    out.append("")
    return out


def _verdicts(results: dict) -> list[str]:
    """One line per target: the models that meet it and the measured range of those that do not."""
    rows = [
        (f"{r['arch']}/{r['size']}", r, r["variants"]["paper"]) for r in results["models"] if "paper" in r["variants"]
    ]

    def line(name, values, ok, fmt):
        met = [m for m, v in values if v is not None and ok(v)]
        missed = [(m, v) for m, v in values if v is not None and not ok(v)]
        text = f"- **{name}**: met on {', '.join(met) if met else 'none'}"
        if missed:
            text += "; missed on " + ", ".join(f"{m} ({fmt.format(v)})" for m, v in missed)
        return text + "."

    tm = {m: r["variants"].get("torch_muon") for m, r, _ in rows}
    return [
        "Verdict (medians):",
        "",
        line(
            "step <= 1.15x its roofline", [(m, p["roofline_ratio"]) for m, _, p in rows], lambda v: v <= 1.15, "{:.2f}x"
        ),
        "  The fast path picks the faster route per shape, not the one nearest its roofline: the iterative "
        "reference path (`paper_ref`) sits at "
        + ", ".join(
            f"{m} {r['variants']['paper_ref']['roofline_ratio']:.2f}x"
            for m, r, _ in rows
            if "paper_ref" in r["variants"]
        )
        + " of its own (larger) roofline while the Gram route's eigh counts at the fp64 matmul rate, which LAPACK's "
        "tridiagonalization does not reach.",
        line(
            "step <= 5% of forward+backward (tiny)",
            [(m, p["frac_fwd_bwd"]) for m, r, p in rows if r["size"] != "medium"],
            lambda v: v <= 0.05,
            "{:.1%}",
        ),
        line(
            ">= 30x faster than torch Muon + AdamW",
            [(m, tm[m]["median_s"] / p["median_s"] if tm[m] else None) for m, _, p in rows],
            lambda v: v >= 30,
            "{:.1f}x",
        ),
        line(
            "one state buffer per matrix parameter (<= 4 B/param plus AdamW's vectors)",
            [(m, p["state_bytes_per_param"]) for m, _, p in rows],
            lambda v: v < 4.1,
            "{:.2f} B",
        ),
    ]


def render_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Optimizer step benchmark",
        "",
        f"Command: `{results['command']}`  ",
        f"Run: {results['when']}, {results.get('wall_s', 0):.0f} s; torch {m['torch']}, {m['threads']} threads, "
        f"{m['cpus']} CPUs ({m['processor']}), device {m['device']}; load average before {m['load_before']}, "
        f"after {m.get('load_after')}.",
        "",
        "On a machine shared with other jobs (load average above the core count), multi-threaded timings "
        "are dominated by scheduling: every parallel region waits for a descheduled worker thread (measured "
        "here: one `mul_` on 196k floats 0.026 ms quiet vs 7.9 ms under load with 2 threads). Use "
        "`--threads 1` there; all variants, the roofline rates and forward+backward then run on one core.",
        "",
        f"Machine (measured in the same process, best of repeats): fp32 matrix product "
        f"{m['mm32'] / 1e9:.1f} GFLOP/s (median {m['mm32_median'] / 1e9:.1f}), fp64 {m['mm64'] / 1e9:.1f} GFLOP/s, "
        + (f"bf16 {m['mm16'] / 1e9:.1f} GFLOP/s (the polar iterations' dtype here), " if "mm16" in m else "")
        + f"small batched fp32 bmm [48,32,128] {m['bmm_small32'] / 1e9:.1f} GFLOP/s, copy bandwidth "
        f"{m['copy_bw'] / 1e9:.1f} GB/s (read+write). Re-measured after each model; each model's roofline uses "
        "the best of the two (listed under Targets).",
        "",
        "Step times: median over interleaved repeats of `step()` on fixed synthetic gradients "
        "(best-worst: the spread; on a shared machine the best is the closest to the unloaded cost). "
        "`xAdamW` = median / torch AdamW median (best / best in parentheses); `torch Muon / this` = how many "
        "times faster than torch.optim.Muon + AdamW; `%fwd+bwd` = step / forward+backward of the "
        "same model (batch of `tokens`); `roofline` = measured / (FLOPs at the measured matmul rate "
        "+ bytes at the measured copy bandwidth); state = optimizer-state bytes per parameter.",
        "",
    ]
    for size in ("micro", "tiny", "medium"):
        models = [r for r in results["models"] if r["size"] == size]
        if not models:
            continue
        lines += [
            f"## {size} models",
            "",
            "| model | params | fwd+bwd (tokens) | optimizer | median ms | best-worst ms | reps | xAdamW (best) "
            "| torch Muon / this | %fwd+bwd | roofline x (best) | state B/param | GFLOP | MB moved |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in models:
            first = True
            for v, e in r["variants"].items():
                fl = e["flops"]
                gfl = (fl["mm32"] + fl["mm64"] + fl["eig"]) / 1e9
                lines.append(
                    f"| {r['arch'] if first else ''} | {r['params'] / 1e6:.1f}M | "
                    f"{_ms(r['fwd_bwd_s']) + ' ms' if first else ''}"
                    f"{(' (' + str(r['fwd_bwd_tokens']) + ')') if first else ''} | "
                    f"{v} | {_ms(e['median_s'])} | {_ms(e['min_s'])}-{_ms(e['max_s'])} | {e['repeats']} | "
                    f"{_f(e['vs_torch_adamw'])} ({_f(e.get('vs_torch_adamw_best'))}) | "
                    f"{_f(e['torch_muon_over_this'], '{:.1f}')} | "
                    f"{_f(100 * e['frac_fwd_bwd'], '{:.1f}%')} | {_f(e['roofline_ratio'])} "
                    f"({_f(e['min_s'] / e['roofline_s'] if e['roofline_s'] else None)}) | "
                    f"{e['state_bytes_per_param']:.2f} | {gfl:.3f} | {fl['bytes'] / 1e6:.1f} |"
                )
                first = False
        lines.append("")
    lines += _targets(results)
    # achieved rates
    rows = []
    for r in results["models"]:
        for v, e in r["variants"].items():
            if e.get("achieved_flops") or e.get("achieved_bytes_per_s"):
                bw = e.get("achieved_bytes_per_s")
                rows.append(
                    f"| {r['arch']}/{r['size']} | {v} | "
                    f"{_f(e.get('profile_matrix_s') and e['profile_matrix_s'] * 1e3, '{:.1f}')} | "
                    f"{_f(e.get('achieved_flops') and e['achieved_flops'] / 1e9, '{:.1f}')} | "
                    f"{_f(e.get('achieved_flops') and 100 * e['achieved_flops'] / m['mm32'], '{:.0f}%')} | "
                    f"{_f(e.get('profile_other_s') and e['profile_other_s'] * 1e3, '{:.1f}')} | "
                    f"{_f(e.get('achieved_bytes_per_s') and e['achieved_bytes_per_s'] / 1e9, '{:.1f}')} | "
                    f"{_f(bw and 100 * bw / m['copy_bw'], '{:.0f}%')} |"
                )
    if rows:
        lines += [
            "## Achieved rates (one profiled step)",
            "",
            "Matrix work = matrix products and eigh (profiler self time); its FLOPs are the analytic counts. "
            "Elementwise work = every other op; its bytes are the essential traffic (see `step_cost`).",
            "",
            "| model | optimizer | matrix ms | GFLOP/s | of fp32 peak | elementwise ms | GB/s | of copy bw |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += rows
        lines.append("")
    # maps
    lines += [
        "## FLOPs per map (fast path, per step)",
        "",
        "Wide [m, n] orientation (m <= n); `route`: iterative = the polynomial iterations on stacked batches; "
        "gram = the same polynomial evaluated on the eigenvalues of the m x m Gram (float64 eigh).",
        "",
        "| model | preset | role | map | logical shape | matrices | route | GFLOP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        for v in ("muon", "paper"):
            e = r["variants"].get(v)
            if not e:
                continue
            for row in e.get("maps", []):
                if row["map"] == "adamw":
                    continue
                lines.append(
                    f"| {r['arch']}/{r['size']} | {v} | {row['role']} | {row['map']} | {row['shape']} | "
                    f"{row['count']} | {row['route']} | {row['flops'] / 1e9:.4f} |"
                )
    lines.append("")
    notes = sorted({e["note"] for r in results["models"] for e in r["variants"].values() if e.get("note")})
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
