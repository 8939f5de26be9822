"""Gram Newton-Schulz (``polar_route="gram_ns"``): the polynomial iterations run on the small
Gram matrix equal the standard iterations.

Tolerances. float64: every iterate is the same polynomial in X X^T times X, so the two
evaluations differ by rounding only: <= 1e-10 relative (observed <= 1e-12 on spectra down to
1e-6 ||X||). float32: rounding of the Gram (~1e-7 ||A||) is amplified on the small singular
directions by the polynomial's slope at 0 (prod a_t ~ 5e2-1e3); with the restarts of
:func:`equiopt.fastpath.gram_ns_restart` the relative Frobenius distance to the float64
iterations was <= 7e-5 for 5 steps and <= 2e-4 for 8 on the spectra below (the float32
standard iterations: <= 1.4e-5 / 2.2e-4), so the float32 bound is GRAM32_TOL = 3e-4, and on a
well-conditioned (Gaussian) input the Gram route is within 3x of the standard iteration's own
float32 error.
"""

from __future__ import annotations

import pytest
import torch
from test_fastpath import hf_model, set_grads  # the fast-path tests' tiny HF models and gradients

import equiopt
from equiopt import fastpath

GRAM64_TOL = 1e-10
GRAM32_TOL = 3e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).norm(dim=(-2, -1)) / b.norm(dim=(-2, -1)).clamp(min=1e-300)).max())


def _spectrum(b, m, n, smin, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(b, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(b, n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, torch.log10(torch.tensor(smin)).item(), k, dtype=torch.float64)
    if rank is not None:
        s[rank:] = 1e-5
    return (U * s) @ V.mT


KINDS = {"gauss": None, "smin1e-3": 1e-3, "smin1e-6": 1e-6, "lowrank": 1e-1}


def _input(kind, shape, seed):
    if kind == "gauss":
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return _spectrum(*shape, KINDS[kind], seed, rank=shape[1] // 8 if kind == "lowrank" else None)


@pytest.mark.parametrize("method", ["newton_schulz", "polar_express"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("shape", [(3, 16, 48), (2, 48, 16), (1, 32, 32), (2, 1, 7)])
def test_float64_equals_iterations(method, steps, shape):
    x = _input("smin1e-6", shape, seed=steps + sum(shape))
    ref = fastpath.iterative_polar(x, method, steps)
    out = fastpath.iterative_polar(x, method, steps, gram_ns=True)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert _rel(out, ref) < GRAM64_TOL


@pytest.mark.parametrize("method,steps", [("newton_schulz", 5), ("polar_express", 5), ("polar_express", 8)])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape", [(4, 64, 192), (2, 128, 384), (2, 256, 64)])
def test_float32_close_to_float64_iterations(method, steps, kind, shape):
    x64 = _input(kind, shape, seed=sum(shape))
    oracle = fastpath.iterative_polar(x64, method, steps)
    x = x64.float()
    out = fastpath.iterative_polar(x, method, steps, gram_ns=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    e = _rel(out, oracle)
    assert e < GRAM32_TOL, e
    if kind == "gauss":
        assert e <= 3 * _rel(fastpath.iterative_polar(x, method, steps), oracle) + 1e-6


@pytest.mark.parametrize("alpha", [None, 1.0, 0.5])
def test_nuclear_factor_scale_and_3d_batches(alpha):
    """Batched [N, m, n] (experts), nuclear factor and scale: the same as the iterations."""
    x = _spectrum(6, 24, 80, 1e-3, seed=3)
    ref = fastpath.iterative_polar(x, "polar_express", None, alpha=alpha, scale=1.5)
    out = fastpath.iterative_polar(x, "polar_express", None, alpha=alpha, scale=1.5, gram_ns=True)
    assert _rel(out, ref) < GRAM64_TOL
    # float32: against the float32 iterations (both take the nuclear norm from the same
    # float32 eigvalsh of the first Gram, itself ~6e-4 from the float64 value on this spectrum)
    out32 = fastpath._polar_batch(x.float(), "polar_express", None, None, alpha, 1.5, "gram_ns", False)
    it32 = fastpath._polar_batch(x.float(), "polar_express", None, None, alpha, 1.5, "iterative", False)
    assert _rel(out32, it32) < GRAM32_TOL


def test_zero_matrix_and_route_choice():
    x = torch.zeros(2, 8, 24)
    out = fastpath._polar_batch(x, "newton_schulz", None, None, None, 1.0, "gram_ns", False)
    assert torch.equal(out, x)
    cpu = torch.device("cpu")
    for cdt in (torch.float32, torch.bfloat16):
        assert fastpath.choose_polar_route(64, 192, 5, False, device=cpu, cdt=cdt, route="gram_ns") == "gram_ns"
    # asked for, it is taken only where it needs fewer flops: not on square matrices
    assert (
        fastpath.choose_polar_route(128, 128, 5, False, device=cpu, cdt=torch.float32, route="gram_ns") == "iterative"
    )
    # auto takes it on CPU in float32/float64 where it needs fewer flops, never in bf16 or off CPU
    for m, n in ((64, 4096), (512, 1536)):
        assert fastpath.choose_polar_route(m, n, 5, False, device=cpu, cdt=torch.float32) == "gram_ns"
        assert fastpath.choose_polar_route(m, n, 5, False, device=cpu, cdt=torch.bfloat16) == "iterative"
        assert (
            fastpath.choose_polar_route(m, n, 5, False, device=torch.device("meta"), cdt=torch.float32) == "iterative"
        )
    assert fastpath.choose_polar_route(128, 128, 5, False, device=cpu, cdt=torch.float32) == "iterative"


def test_flop_count_below_iterations_for_wide_matrices():
    """The route's point: fewer product flops from n ~ 2 m on (5 steps, with the restart)."""
    assert fastpath.gram_ns_flops(512, 1536, 5) == 8 * 512**2 * 1536 + 28 * 512**3
    it = fastpath.polar_flops("iterative", 512, 1536, 5, False)["mm32"]
    assert fastpath.polar_flops("gram_ns", 512, 1536, 5, False)["mm32"] < 0.75 * it
    assert fastpath.gram_ns_flops(64, 64, 5) > fastpath.polar_flops("iterative", 64, 64, 5, False)["mm32"]


@pytest.mark.parametrize("preset", ["muon", "paper"])
def test_optimizer_step_with_gram_ns_route(preset):
    """A whole step of a model with 2-D and 3-D (expert) matrices: the forced route gives the
    updates of the iterative route within the float32 tolerance."""
    model = hf_model("olmoe")
    params = [p for p in model.parameters()]
    set_grads(params, seed=4)
    updates = {}
    for route in ("iterative", "gram_ns"):
        opt = equiopt.build(model, preset=preset)
        fastpath.configure(opt, polar_route=route)
        for group in opt.param_groups:
            if group["map"] in ("polar", "scaled_polar", "hybrid"):
                ps = group["params"]
                updates[route, id(group["params"][0])] = fastpath.fast_updates(
                    opt, group, ps, [p.grad.float() for p in ps]
                )
    keys = [k for k in updates if k[0] == "iterative"]
    assert keys
    for _, pid in keys:
        for a, b in zip(updates["gram_ns", pid], updates["iterative", pid]):
            scale = float(b.abs().max())
            assert float((a - b).abs().max()) <= 1e-4 * scale
