"""equiopt's `muon` and `paper` steps against peer Muon implementations, same gradients (issue #16).

For each benchmark model it times the whole optimizer step (median over rounds interleaved
across the optimizers in one process, each round in a seeded shuffled order, the warm-up step excluded; parameters and
gradients restored before every step, so every optimizer sees the same numbers) of

* ``equiopt_muon``, ``equiopt_paper``: the presets (fast path, the default route per shape:
  Gram Newton-Schulz where it needs fewer product flops, else the iterations);
  ``equiopt_muon_iterative``, ``equiopt_paper_iterative``: the same with
  ``polar_route="iterative"`` (the standard iterations on every shape: what the route buys);
  ``equiopt_muon_bf16``, ``equiopt_paper_bf16``: with ``polar_dtype=torch.bfloat16`` (the peers'
  shipped dtype; on CPU the presets iterate in float32 unless told);
* ``textbook_fp32``: :class:`TextbookMuon`, torch.optim.Muon's algorithm in float32, one
  matrix at a time (the logical matrices of equiopt's plan: experts one by one, a fused
  gate/up weight as its parts);
* ``torch_muon``: torch.optim.Muon as shipped (Newton-Schulz in bfloat16; its
  ``_zeropower_via_newtonschulz`` casts to bfloat16 unconditionally, so there is no float32
  variant: ``textbook_fp32`` is its algorithm in float32). It rejects 3-D (expert) tensors;
* ``heavyball`` / ``heavyball_fp32``: heavyball's Muon as shipped (``zeropower_via_newtonschulz5``:
  its own 5-step coefficient schedule, same cost as Muon's, iterate rounded stochastically to
  bfloat16) / with its one-argument ``stochastic_round_`` patched to keep float32 during that
  variant's step. torch.compile is switched off (``heavyball.utils.compile_mode = None``):
  every variant here runs eagerly. It flattens [E, m, n] experts to one [E, m*n] matrix;
* ``pto`` / ``pto_fp32``: pytorch-optimizer's Muon as shipped (``zero_power_via_newton_schulz_5``,
  ``dtype=torch.bfloat16``) / with that function wrapped to ``dtype=torch.float32`` during the
  variant's step. It reshapes [E, m, n] experts to one [E, m*n] matrix.

Peers orthogonalize the matrices equiopt's ``muon`` preset orthogonalizes; the rest (embedding,
head, norms, router) goes to torch.optim.AdamW (foreach) beside them, as equiopt's AdamW
groups. Peers that cannot run experts as per-expert matrices are marked in the table, not
silently compared. Beside each time: the numerics of the variant's Newton-Schulz on one
gradient matrix of the model (its first MLP input matrix): the singular values of the
update over their mean, the distance to the same polynomial in float64 and to U V^T; and a
FLOP floor: the minimum product FLOPs of the map (:func:`floor_flops`) over the machine's
product rate measured here in the variant's Newton-Schulz dtype (fp32 or bf16), and a roofline
floor: that plus the whole step's minimum memory traffic (:func:`step_bytes`) over the copy
bandwidth measured here (AdamW on embeddings and heads is bandwidth-bound and has no
product FLOPs). Writes
``--out``.md/.json. Run on an idle machine::

    PYTHONPATH=src python benchmarks/peers.py            # --threads 1,2, all models, ~15-25 min idle
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench import ARCHS, SIZES, _load, _model_config, _sync, shuffled_rounds  # the step benchmark's (same folder)

import equiopt
from equiopt import fastpath, maps
from equiopt.functional import map_kwargs
from equiopt.polar import NEWTON_SCHULZ_COEFFS, newton_schulz, svd_polar
from equiopt.presets import DEFAULTS, PRESETS, resolve
from equiopt.train.loop import git_revision
from equiopt.train.models import ModelConfig, build_model

MUON_ROLES = ("attention", "mlp_in", "mlp_out", "expert_in", "expert_out", "matrix")
# peer -> pip requirement (bounded: the benchmark's set-up installs them; see pyproject's `bench` extra).
# emerging-optimizers is only tried: its 0.3.0 needs Python >= 3.12, and the benchmark has no variant for it.
PEERS = {
    "heavyball": "heavyball>=3.2,<4",
    "pto": "pytorch-optimizer>=4.1,<5",
    "emerging": "emerging-optimizers>=0.3,<1",
}
VARIANTS = (
    "equiopt_muon",
    "equiopt_paper",
    "equiopt_muon_iterative",
    "equiopt_paper_iterative",
    "equiopt_muon_bf16",
    "equiopt_paper_bf16",
    "textbook_fp32",
    "torch_muon",
    "heavyball",
    "heavyball_fp32",
    "pto",
    "pto_fp32",
)
MODELS = ("qwen3/tiny", "olmoe/tiny", "qwen3/medium", "dense1024")
DENSE1024 = dict(
    vocab_size=4096,
    hidden_size=1024,
    intermediate_size=3072,
    num_layers=4,
    num_heads=16,
    num_kv_heads=8,
    head_dim=64,
)
MUON_SPEC = {**DEFAULTS, **PRESETS["muon"]["mlp_in"]}


# ----------------------------------------------------------------------------------------
# set-up: the peers (optional extra `bench`), installed with pip when missing
# ----------------------------------------------------------------------------------------


def ensure_peers(install: bool) -> dict[str, str]:
    """Import the peers, pip-installing missing ones when ``install``; {peer: version or why skipped}."""
    status = {}
    for key, req in PEERS.items():
        module = {"pto": "pytorch_optimizer", "emerging": "emerging_optimizers"}.get(key, key)
        status[key] = _import_or_install(module, req, install)
    if not status["heavyball"].startswith("skipped"):
        import heavyball.utils as hu

        hu.compile_mode = None  # eager, as every other variant here
    return status


def _import_or_install(module: str, req: str, install: bool) -> str:
    dist = req.split(">")[0].split("=")[0].split("<")[0]
    for attempt in (0, 1):
        try:
            __import__(module)
            return importlib.metadata.version(dist)
        except ImportError as e:
            if attempt or not install:
                return f"skipped: {e}"
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", req], capture_output=True, text=True)
        if r.returncode:
            lines = r.stderr.strip().splitlines() or ["?"]
            why = next((ln for ln in lines if "Requires-Python" in ln or "python version" in ln), lines[-1])
            return f"skipped: pip install '{req}' failed ({why.strip()})"
        importlib.invalidate_caches()
    return "skipped"


# ----------------------------------------------------------------------------------------
# the textbook loop
# ----------------------------------------------------------------------------------------


def textbook_ns(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz on one 2-D matrix, in ``dtype``."""
    a, b, c = NEWTON_SCHULZ_COEFFS
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = torch.addmm(x, torch.addmm(A, A, A, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class TextbookMuon:
    """torch.optim.Muon's algorithm (EMA momentum, Nesterov, 5 Newton-Schulz steps, decoupled
    weight decay, lr * sqrt(max(1, rows/cols))), one matrix at a time: ``parts[i]`` is the
    number of fused parts of parameter i (split along its rows); a 3-D parameter is one matrix
    per expert."""

    def __init__(self, params, parts, lr, momentum, weight_decay, dtype=torch.float32):
        self.params, self.parts, self.dtype = list(params), list(parts), dtype
        self.lr, self.mu, self.wd = lr, momentum, weight_decay
        self.bufs = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        for p, k, buf in zip(self.params, self.parts, self.bufs):
            buf.lerp_(p.grad, 1 - self.mu)
            u = p.grad.lerp(buf, self.mu)
            p.mul_(1 - self.lr * self.wd)
            for x, out in zip(_matrices(u, k), _matrices(p, k)):
                rows, cols = x.shape
                out.add_(textbook_ns(x, dtype=self.dtype).to(p.dtype), alpha=-self.lr * max(1, rows / cols) ** 0.5)


def _matrices(t: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Views of the logical matrices of ``t``: experts one by one, each split into ``parts``."""
    mats = list(t) if t.dim() == 3 else [t]
    return [piece for m in mats for piece in m.chunk(parts, dim=0)]


# ----------------------------------------------------------------------------------------
# optimizers
# ----------------------------------------------------------------------------------------


def _split(model, plan):
    """(muon params, their fused part counts, the rest)."""
    muon, parts, rest = [], [], []
    for e in plan.entries:
        p = e.tensor()
        if e.role in MUON_ROLES:
            assert not e.layout.interleaved, e.name  # the textbook loop splits fused parts by rows
            muon.append(p)
            parts.append(e.layout.fused)
        else:
            rest.append(p)
    return muon, parts, rest


class _Pair:
    """Two optimizers stepped as one (a Muon and torch AdamW on the rest)."""

    def __init__(self, *opts):
        self.opts = opts

    def step(self):
        for o in self.opts:
            o.step()


def _adamw(rest):
    decay = [p for p in rest if p.ndim >= 2]
    vec = [p for p in rest if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": vec, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)


@contextlib.contextmanager
def patched(patches: list[tuple[object, str, object]]):
    """Module attributes replaced inside the block (the fp32 peer variants)."""
    old = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in old:
            setattr(owner, name, value)


class _Patched:
    """An optimizer whose step runs with module attributes replaced."""

    def __init__(self, opt, patches: list[tuple[object, str, object]]):
        self.opt, self.patches = opt, patches

    def step(self):
        with patched(self.patches):
            self.opt.step()


def _keep_fp32_round(orig):
    """heavyball's stochastic_round_ with the one-argument form (the iterate's cast to bf16) a no-op."""

    def fn(ref, source=None):
        return ref if source is None else orig(ref, source)

    return fn


def make_optimizer(name: str, model, plan, device: torch.device):
    """(stepper with .step(), note) for variant ``name``; stepper None with the reason when it cannot run."""
    muon, parts, rest = _split(model, plan)
    has3d = any(p.ndim == 3 for p in muon)
    lr, mu, wd = MUON_SPEC["lr"], MUON_SPEC["momentum"], MUON_SPEC["weight_decay"]
    half = device.type == "cuda"
    if name.startswith("equiopt_"):
        preset = name.split("_")[1]
        kw = {"polar_dtype": "bfloat16"} if name.endswith("_bf16") else {}
        opt = equiopt.build(model, preset=preset, foreach=True, **kw)
        fastpath.configure(opt, polar_route="iterative" if name.endswith("_iterative") else "auto")
        return opt, ""
    if name == "textbook_fp32":
        dt = torch.bfloat16 if half else torch.float32
        return _Pair(TextbookMuon(muon, parts, lr, mu, wd, dt), _adamw(rest)), "bf16 on cuda" if half else ""
    if name == "torch_muon":
        if has3d:
            return None, "rejects 3-D expert tensors (2-D parameters only)"
        return _Pair(
            torch.optim.Muon(muon, lr=lr, weight_decay=wd, momentum=mu, adjust_lr_fn="original"), _adamw(rest)
        ), ""
    return _peer_optimizer(name, muon, rest, has3d, half)


def _peer_optimizer(name: str, muon, rest, has3d: bool, half: bool):
    lr, mu, wd = MUON_SPEC["lr"], MUON_SPEC["momentum"], MUON_SPEC["weight_decay"]
    fp32 = name.endswith("_fp32")
    if fp32 and half:
        return None, "float32 variant not run on cuda"
    note = "flattens [E, m, n] experts to one [E, m*n] matrix (a different map)" if has3d else ""
    try:
        if name.startswith("heavyball"):
            import heavyball
            import heavyball.utils as hu

            opt = heavyball.Muon(muon, lr=lr, betas=(mu, 0.99), weight_decay=wd, nesterov=True)
            patches = [(hu, "stochastic_round_", _keep_fp32_round(hu.stochastic_round_))] if fp32 else []
            note = "; ".join(filter(None, ["own 5-step coefficients and momentum form (same cost)", note]))
        elif name.startswith("pto"):
            import pytorch_optimizer.optimizer.muon.base as pbase
            from pytorch_optimizer import Muon as PtoMuon

            opt = PtoMuon([{"params": muon, "use_muon": True}], lr=lr, momentum=mu, weight_decay=wd, nesterov=True)
            ns32 = functools.partial(pbase.zero_power_via_newton_schulz_5, dtype=torch.float32)
            patches = [(pbase, "zero_power_via_newton_schulz_5", ns32)] if fp32 else []
        else:
            raise ValueError(f"unknown variant {name!r}")
    except ImportError as e:
        return None, f"not installed ({e})"
    return _Pair(_Patched(opt, patches), _adamw(rest)), note


# ----------------------------------------------------------------------------------------
# models, gradients, timing
# ----------------------------------------------------------------------------------------


def _known_model(name: str) -> bool:
    """Whether :func:`build` knows ``name``: ``dense1024`` or ``ARCH/SIZE``."""
    arch, _, size = name.partition("/")
    return name == "dense1024" or (arch in ARCHS and size in SIZES)


def build(name: str, device: torch.device):
    """The benchmark model ``name`` (bench.py's builders; qwen3/tiny with a 24576 vocabulary: 7.1M)."""
    import transformers  # the train extra's; slow to import, as in bench.py

    transformers.logging.set_verbosity_error()
    if name == "dense1024":
        cfg = ModelConfig(arch="qwen3", size="tiny", max_seq_len=128, **DENSE1024)
    elif name == "qwen3/tiny":
        cfg = dataclasses.replace(_model_config("qwen3", "tiny"), vocab_size=24576)
    else:
        cfg = _model_config(*name.split("/"))
    return build_model(cfg, seed=0).to(device)


def fixed_grads(model, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=g) * 1e-2).to(p.device, p.dtype) for p in model.parameters()]


def time_steps(model, steppers: dict, grads, rounds: int, budget: float, device, log, check=()):
    """({variant: step times}, {variant: first-step agreement}). A warm-up step each (state
    allocation; its time sets how many of the ``rounds`` fit in ``budget`` seconds, at least
    one), then rounds interleaved, the order shuffled every round (seeded); parameters
    and gradients restored before every step. Agreement: max over the parameters in ``check``
    of max |delta - delta_ref| / max |delta_ref|, the warm-up (first) step's parameter change
    against equiopt_muon's (the same map gives ~1e-6 in float32, bf16 ~1e-2)."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    idx = [i for i, p in enumerate(params) if any(p is c for c in check)]

    def one(opt) -> float:
        with torch.no_grad():
            for p, s, g in zip(params, saved, grads):
                p.copy_(s)
                p.grad = g.clone()  # some peers write into .grad (Nesterov in place)
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    names = sorted(steppers, key=lambda k: k != "equiopt_muon")  # the reference first
    warm, agree, ref = {}, {}, None
    for k in names:
        warm[k] = one(steppers[k])
        with torch.no_grad():
            delta = [params[i] - saved[i] for i in idx]
            ref = delta if k == "equiopt_muon" else ref
            if ref is not None and delta:
                agree[k] = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(delta, ref))
    n = {k: max(1, min(rounds, int(budget // max(warm[k], 1e-9)))) for k in names}
    log("    warm-up: " + ", ".join(f"{k} {warm[k] * 1e3:.0f} ms (x{n[k]})" for k in names))
    times: dict[str, list[float]] = {k: [] for k in names}
    for order in shuffled_rounds(names, max(n.values(), default=0)):
        for k in order:
            if len(times[k]) < n[k]:
                times[k].append(one(steppers[k]))
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return times, agree


def mm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one large square product (best of 5 after a warm-up)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------------------
# FLOP floor
# ----------------------------------------------------------------------------------------


def floor_flops(m: int, n: int, steps: int, nuclear: bool, symmetric: bool = True) -> int:
    """Minimum product FLOPs of ``steps`` quintic polar steps on one [m, n] matrix: the cheaper of
    the standard iteration (per step X X^T, A^2, B X) and Gram Newton-Schulz without restarts
    (X X^T, R X, per step A^2, R Q, A Q, (A Q) Q), both on the small side, 2 FLOPs per
    multiply-add; ``symmetric``: every symmetric result (X X^T, and products of commuting
    symmetric matrices) at half the cost of a general product, as a symmetric BLAS routine
    would need (torch does not reach one on CPU: ``symmetric=False`` is the floor of general
    products). Plus 4/3 m^3 for the Gram's eigenvalues (nuclear-norm factor) counted at the
    product rate. A lower bound, not what any variant runs."""
    m, n = min(m, n), max(m, n)
    h = 1 if symmetric else 2  # cost of a symmetric m x m result per m^2 * inner dimension
    std = steps * ((h + 2) * m * m * n + h * m**3)
    gram = (h + 2) * m * m * n + (4 * steps - 3) * h * m**3 if steps else 0
    return min(std, gram) + ((4 * m**3) // 3 if nuclear else 0)


#: float32 values a step must read and write per parameter at least: AdamW reads the parameter,
#: gradient and two moments and writes three; a momentum map (polar, hybrid, row norms) reads
#: the parameter, gradient and momentum and writes two. The update itself may stay in cache.
STEP_FLOATS = {"adamw": 7, "momentum": 5}


def step_bytes(model, preset: str) -> int:
    """Minimum bytes the preset's whole step moves (:data:`STEP_FLOATS`, float32 state)."""
    opt = equiopt.build(model, preset=preset)
    return sum(
        4 * STEP_FLOATS["adamw" if g["map"] == "adamw" else "momentum"] * sum(p.numel() for p in g["params"])
        for g in opt.param_groups
    )


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of one large copy (read + write; best of 5 after a warm-up)."""
    n = 32 * 2**20  # floats: 128 MiB per buffer, well beyond the caches
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * 4 * n / best


def map_floor(model, preset: str, symmetric: bool = True) -> int:
    """Floor FLOPs of the preset's polar maps over the whole model (row norms: bandwidth, not counted)."""
    opt = equiopt.build(model, preset=preset)
    total = 0
    for group in opt.param_groups:
        if group["map"] not in ("polar", "scaled_polar", "hybrid"):
            continue
        steps = len(fastpath.polar_coeffs(group["polar_method"], group["polar_steps"]))
        nuclear = group["map"] != "polar" and float(group["alpha"]) != 0.0
        for b in fastpath.plan_buckets(opt, group, group["params"]):
            total += b.count * floor_flops(*b.shape, steps, nuclear, symmetric)
    return total


# ----------------------------------------------------------------------------------------
# numerics of each variant's map on one gradient matrix
# ----------------------------------------------------------------------------------------


def _equiopt_map(preset: str, route: str, **overrides):
    """The preset's map for an MLP input matrix (in the map's orientation), as the fast path runs it."""
    group = resolve(preset, **overrides)["mlp_in"]

    def fn(x):
        return fastpath.map_batch(group, x[None], map_kwargs(group, x), 1.0, route, False)[0]

    return fn, group


def ns_functions(device: torch.device) -> dict:
    """{variant: (map in the benchmarked dtype, the same map in float64)} on a 2-D matrix."""
    out = {}
    for preset in ("muon", "paper"):
        for route, suffix, kw in (
            ("auto", "", {}),
            ("iterative", "_iterative", {}),
            ("auto", "_bf16", {"polar_dtype": "bfloat16"}),
        ):
            fn, _ = _equiopt_map(preset, route, **kw)
            out[f"equiopt_{preset}{suffix}"] = (fn, _equiopt_map(preset, "iterative")[0])
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    out["textbook_fp32"] = (functools.partial(textbook_ns, dtype=half), newton_schulz)
    out["torch_muon"] = (
        lambda g: torch.optim._muon._zeropower_via_newtonschulz(g, NEWTON_SCHULZ_COEFFS, 5, 1e-7),
        newton_schulz,
    )
    with contextlib.suppress(ImportError):
        import heavyball.utils as hu

        keep = _keep_fp32_round(hu.stochastic_round_)
        out["heavyball"] = (hu.zeropower_via_newtonschulz5, hu.zeropower_via_newtonschulz5)

        def hb32(g):
            with patched([(hu, "stochastic_round_", keep)]):
                return hu.zeropower_via_newtonschulz5(g)

        out["heavyball_fp32"] = (hb32, hu.zeropower_via_newtonschulz5)
    with contextlib.suppress(ImportError):
        from pytorch_optimizer.optimizer.utils.matrix import zero_power_via_newton_schulz_5 as pns

        out["pto"] = (pns, functools.partial(pns, dtype=torch.float64))
        out["pto_fp32"] = (functools.partial(pns, dtype=torch.float32), functools.partial(pns, dtype=torch.float64))
    return out


def numerics(model, plan, grads, device: torch.device, names) -> dict[str, dict]:
    """Per variant, on the model's first MLP input matrix (expert 0's gate part on MoE): the
    singular values of the update over their mean (min, max), the relative Frobenius distance
    to the same map evaluated in float64, and to U V^T of the polar map's input (after the
    row normalization of the `paper` hybrid map), the update rescaled by its mean singular value."""
    params = list(model.parameters())
    e = next(e for e in plan.entries if e.role in ("mlp_in", "expert_in"))
    g = _matrices(grads[[id(p) for p in params].index(id(e.tensor()))], e.layout.fused)[0].float()
    res = {}
    uvs: dict[bool, torch.Tensor] = {}  # U V^T of the polar map's input (paper: row-normalized, map orientation)
    for name, (fn, fn64) in ns_functions(device).items():
        if name not in names:
            continue
        paper = name.startswith("equiopt_paper")
        x = g.T if paper and resolve("paper")["mlp_in"]["column_aware"] else g
        x64 = x.double()
        u = fn(x).double()
        ref = fn64(x64).double()
        s = torch.linalg.svdvals(u)
        if paper not in uvs:
            uvs[paper] = svd_polar(maps.row_norm(x64) if paper else x64).to(u.device)
        uv = uvs[paper]
        res[name] = {
            "sv_min": float(s.min() / s.mean()),
            "sv_max": float(s.max() / s.mean()),
            "to_fp64": float((u - ref).norm() / ref.norm()),
            "to_uvt": float((u / s.mean() - uv).norm() / uv.norm()),
            "shape": list(x.shape),
        }
    return res


# ----------------------------------------------------------------------------------------
# the run and its report
# ----------------------------------------------------------------------------------------


def ns_dtype(variant: str, device: torch.device) -> str:
    if variant in ("torch_muon", "pto") or variant.endswith("_bf16"):
        return "bf16"
    if variant == "heavyball":
        return "bf16 (stochastic rounding)"
    return "bf16" if device.type == "cuda" and not variant.endswith("_fp32") else "fp32"


def bench_model(name: str, args, device: torch.device, log) -> list[dict]:
    """Numerics once, then the interleaved timing at each thread count."""
    model = build(name, device)
    plan = equiopt.plan(model, "muon")
    grads = fixed_grads(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{name}: {n_params / 1e6:.1f}M parameters")
    num = numerics(model, plan, grads, device, args.variant_list)
    floors = {k: map_floor(model, k) for k in ("muon", "paper")}
    floors_gemm = {k: map_floor(model, k, symmetric=False) for k in ("muon", "paper")}
    nbytes = {k: step_bytes(model, k) for k in ("muon", "paper")}
    rows = []
    for threads in args.thread_list:
        torch.set_num_threads(threads)
        rate = mm_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        rate16 = rate if device.type == "cuda" else mm_rate(device, torch.bfloat16)
        bw = copy_bandwidth(device)
        steppers, notes = {}, {}
        for v in args.variant_list:
            opt, notes[v] = make_optimizer(v, model, plan, device)
            if opt is not None:
                steppers[v] = opt
        rounds = args.rounds if n_params < 20e6 else args.big_rounds
        log(f"  threads {threads}: product rate {rate / 1e9:.1f} GFLOP/s (bf16 {rate16 / 1e9:.1f}); {rounds} rounds")
        muon_params = _split(model, plan)[0]
        times, agree = time_steps(model, steppers, grads, rounds, args.budget, device, log, muon_params)
        variants = {}
        for v in args.variant_list:
            flat = "flattens" in notes[v]
            r = rate16 if ns_dtype(v, device).startswith("bf16") else rate  # the floor at the variant's dtype
            key = "paper" if "paper" in v else "muon"
            fl, fl_gemm = (None, None) if flat else (floors[key] / r, floors_gemm[key] / r)
            # roofline floor: the map's FLOP floor plus the step's minimum traffic at the copy bandwidth
            # (a sum: the products and the bandwidth-bound parts touch different tensors one after another)
            roof = None if fl is None else fl + nbytes[key] / bw
            variants[v] = {
                "median_s": statistics.median(times[v]) if v in times else None,
                "times_s": times.get(v, []),
                "ran": v in steppers,
                "note": notes[v],
                "ns_dtype": ns_dtype(v, device),
                "floor_s": fl,
                "floor_gemm_s": fl_gemm,
                "roofline_s": roof,
                "first_step_vs_muon": agree.get(v),
                "numerics": num.get(v),
            }
        row = {
            "model": name,
            "params": n_params,
            "threads": threads,
            "mm_rate": rate,
            "mm_rate_bf16": rate16,
            "copy_bw": bw,
            "step_bytes": nbytes,
        }
        rows.append({**row, "variants": variants})
        log(render_rows([rows[-1]]))
        del steppers
    return rows


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def render_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        v = r["variants"]
        base = {k: (v.get(k) or {}).get("median_s") for k in ("equiopt_muon", "equiopt_paper")}
        lines += [
            "",
            f"### {r['model']} ({r['params'] / 1e6:.1f}M parameters), {r['threads']} threads, "
            f"product rate {r['mm_rate'] / 1e9:.0f} GFLOP/s (bf16 {r['mm_rate_bf16'] / 1e9:.0f}), "
            f"copy bandwidth {r.get('copy_bw', 0) / 1e9:.1f} GB/s",
            "",
            "| variant | NS dtype | step (median) | / equiopt muon | / equiopt paper | floor (gemm) | floor / step "
            "| roofline | roofline / step | sv / mean sv | to fp64 | to UV^T | 1st step vs muon | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, x in v.items():
            t = x["median_s"]
            nm = x["numerics"] or {}
            sv = f"{nm['sv_min']:.2f}-{nm['sv_max']:.2f}" if nm else "-"
            cells = [
                name,
                x["ns_dtype"],
                f"{t * 1e3:.1f} ms (n={len(x['times_s'])})" if t else "not run",
                _ratio(t, base["equiopt_muon"]),
                _ratio(t, base["equiopt_paper"]),
                f"{x['floor_s'] * 1e3:.1f} ({x['floor_gemm_s'] * 1e3:.1f}) ms" if x["floor_s"] else "-",
                _ratio(x["floor_s"], t),
                f"{x['roofline_s'] * 1e3:.1f} ms" if x.get("roofline_s") else "-",
                _ratio(x.get("roofline_s"), t),
                sv,
                f"{nm['to_fp64']:.1e}" if nm else "-",
                f"{nm['to_uvt']:.2f}" if nm else "-",
                f"{x['first_step_vs_muon']:.1e}" if x.get("first_step_vs_muon") is not None else "-",
                x["note"],
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per model and thread count: the fastest float32 peer at the same map (textbook loop
    included; heavyball: its own coefficients at the same cost; peers that flatten experts and
    bf16 variants excluded) against equiopt, and the fraction of the FLOP floor reached."""
    lines = [
        "| threads | model | fastest fp32 peer | peer / equiopt muon | peer / equiopt paper "
        "| muon: floor / step | paper: floor / step | muon: roofline / step | paper: roofline / step "
        "| fastest bf16 peer | peer / equiopt muon bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = r["variants"]
        t = {k: x["median_s"] for k, x in v.items()}
        best, bt = _fastest(v, "fp32")
        best16, bt16 = _fastest(v, "bf16")
        mu, pa = t.get("equiopt_muon"), t.get("equiopt_paper")
        fl = [_ratio(v.get(k, {}).get("floor_s"), t.get(k)) for k in ("equiopt_muon", "equiopt_paper")]
        fl += [_ratio(v.get(k, {}).get("roofline_s"), t.get(k)) for k in ("equiopt_muon", "equiopt_paper")]
        cells = [str(r["threads"]), r["model"], best or "-", _ratio(bt, mu), _ratio(bt, pa), *fl]
        cells += [best16 or "-", _ratio(bt16, t.get("equiopt_muon_bf16"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fastest(v: dict, dtype: str) -> tuple[str | None, float | None]:
    """The fastest peer (not equiopt) whose Newton-Schulz dtype starts with ``dtype`` and that
    keeps experts as per-expert matrices."""
    peers = {
        k: x["median_s"]
        for k, x in v.items()
        if not k.startswith("equiopt")
        and x["median_s"]
        and x["ns_dtype"].startswith(dtype)
        and "flattens" not in x["note"]
    }
    best = min(peers, key=lambda k: peers[k]) if peers else None
    return best, peers.get(best) if best else None


def render_markdown(res: dict) -> str:
    head = [
        "# Optimizer step: equiopt against peer Muon implementations (issue #16)",
        "",
        f"`{res['command']}` at commit {res['commit']}, {res['when']}; torch {res['torch']}, "
        f"device {res['device']}, {res['cpus']} CPUs, threads {res['threads']}; load average "
        f"{res['load_start']} at start, {res['load_end']} at end.",
        "",
        "Peers: " + "; ".join(f"{k} {v}" for k, v in res["peers"].items()) + ".",
        "",
        "Step: median over interleaved rounds (warm-up excluded), same parameters and gradients "
        "for every variant; peers run Muon on the matrices equiopt's `muon` preset orthogonalizes "
        "and torch AdamW (foreach) on the rest. Ratios: this row's time / equiopt's (>1: equiopt "
        "faster). Floor: minimum product FLOPs of the map (`floor_flops`; symmetric results at half cost, "
        "in parentheses with general products only) at the product rate "
        "measured here. Roofline: that floor plus the step's minimum memory traffic (`STEP_FLOATS`: 7 "
        "float32 values per AdamW parameter, 5 per momentum-map parameter) at the copy bandwidth "
        "measured here. Numerics on one MLP input matrix of the model: singular values of the "
        "update over their mean, relative distance to the same map in float64 and (rescaled) to "
        "U V^T. 1st step vs muon: the first step's change of the matrix parameters against equiopt "
        "`muon`'s (max |difference| / max |change|, worst parameter): ~1e-6 is the same map in float32.",
    ]
    return (
        "\n".join([*head, "", "## Summary", "", summary(res["runs"]), "", "## Per model"])
        + render_rows(res["runs"])
        + "\n"
    )


def cpu_name() -> str:
    """The CPU model and its bf16 / AMX instruction flags (bf16 products are fast where they exist)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "cpu"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "cpu")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    bf16 = sorted(f for f in set(flags) if "bf16" in f or f.startswith("amx"))
    return f"{name} ({', '.join(bf16) or 'no bf16 instructions'})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated: dense1024 or ARCH/SIZE, ARCH one of {', '.join(ARCHS)}, SIZE one of "
        f"{', '.join(SIZES)} (micro: smoke tests; default {','.join(MODELS)})",
    )
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 iterations everywhere, as the peers)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds on models under 20M parameters")
    ap.add_argument("--big-rounds", type=int, default=4, help="timed rounds on larger models")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timed steps per variant, model, threads")
    ap.add_argument("--no-install", action="store_true", help="do not pip-install missing peers")
    ap.add_argument("--out", default=None, help="results prefix (default results/bench_peers[_cuda])")
    args = ap.parse_args(argv)
    for name in args.models.split(","):
        if not _known_model(name):
            choices = f"dense1024 or ARCH/SIZE ({'/'.join(ARCHS)} x {'/'.join(SIZES)})"
            ap.error(f"--models: unknown model {name!r}; {choices}")
    device = torch.device(args.device)
    args.thread_list = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    args.variant_list = args.variants.split(",")
    out = Path(args.out or ("results/bench_peers_cuda" if device.type == "cuda" else "results/bench_peers"))
    res = {
        "command": "PYTHONPATH=src python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "commit": git_revision(),  # "+dirty" for a modified tree
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpus": os.cpu_count(),
        "threads": args.thread_list,
        "load_start": _load(),
        "peers": ensure_peers(not args.no_install),
    }
    res["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    res["runs"] = [r for name in args.models.split(",") for r in bench_model(name, args, device, print)]
    res["load_end"] = _load()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(render_markdown(res))
    print(f"wrote {out}.md and {out}.json; load average {res['load_start']} -> {res['load_end']}")


if __name__ == "__main__":
    main()
