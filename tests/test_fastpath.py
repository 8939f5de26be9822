"""The fast path (equiopt.fastpath) equals the simple reference path.

Every route is compared with ``EquiOptimizer._reference_update`` (view -> map -> Muon scale
-> inverse view, one parameter at a time) on the same float32 momenta, and both with a
float64 oracle (the reference path run on float64 copies):

* batched: equal logical shapes of several parameters stacked into one call;
* unstacked (``stack=False``): one call per parameter;
* Gram route: the Polar Express / Newton-Schulz polynomial evaluated on the eigenvalues of
  the smaller Gram matrix (float64 eigh) instead of by the iterations;
* in place: row-norm maps on a private buffer; inputs (the momentum buffers) untouched.

Tolerance. Both paths compute the same map in float32 and differ only by rounding. The
iterations amplify float32 rounding (6e-8) on the smallest singular directions by up to the
polynomial's slope at 0 (prod a_t ~ 1e3 for 5 Polar Express steps): ~6e-5 of the update's
max entry in the worst case; observed differences fast vs reference <= 1e-5 (max over the
cases below). So: |fast - ref| <= REL_TOL * max|ref| with REL_TOL = 1e-4, AND the fast path
is no further from the float64 oracle than 2x the reference's own distance (+1e-6), i.e.
it is as accurate as the reference, while a wrong map (say a missing scale, a transposed
head, a wrong expert order) is off by O(1).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import equiopt
from equiopt import fastpath, maps
from equiopt.layouts import parse_layout
from equiopt.optimizer import EquiOptimizer
from equiopt.polar import polar_express

from plain_gpt import FUSED_LAYOUTS, PlainGPT

REL_TOL = 1e-4
ORACLE_FACTOR, ORACLE_FLOOR = 2.0, 1e-6


def _err(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((a.double() - b.double()).abs().max()) / scale if a.numel() else 0.0


def compare_group(opt: EquiOptimizer, group: dict, momenta: list[torch.Tensor], where: str = "") -> float:
    """fast == reference (and no worse than the reference vs the float64 oracle); returns the
    worst relative difference fast vs reference."""
    params = group["params"]
    before = [x.clone() for x in momenta]
    ref = [opt._reference_update(group, p, x) for p, x in zip(params, momenta)]
    fast = fastpath.fast_updates(opt, group, params, momenta)
    oracle = [opt._reference_update(group, p, x.double()) for p, x in zip(params, momenta)]
    worst = 0.0
    for p, x, x0, r, f, o in zip(params, momenta, before, ref, fast, oracle):
        name = f"{where} {opt.name_of(p)} map={group['map']}"
        assert torch.equal(x, x0), f"{name}: the fast path modified its input"
        assert f.shape == p.shape and f.dtype == r.dtype, name
        assert torch.isfinite(f).all(), name
        scale = max(float(r.abs().max()), 1e-30) if r.numel() else 1.0
        e = _err(f, r, scale)
        worst = max(worst, e)
        assert e <= REL_TOL, f"{name}: fast vs reference {e:.2e}"
        e_f, e_r = _err(f, o, scale), _err(r, o, scale)
        assert e_f <= ORACLE_FACTOR * e_r + ORACLE_FLOOR, f"{name}: fast {e_f:.2e} vs reference {e_r:.2e} from float64"
    return worst


def set_grads(params, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype)


# ----------------------------------------------------------------------------------------
# real models: every role and layout of the four HF families
# ----------------------------------------------------------------------------------------

_HF = {}


def hf_model(arch: str):
    """A very small model of each family (same code paths as the tiny preset, smaller dims)."""
    if arch not in _HF:
        import transformers

        from equiopt.train.models import ModelConfig, build_model

        transformers.logging.set_verbosity_error()
        kw = dict(
            arch=arch,
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            max_seq_len=32,
        )
        if arch == "gemma3":
            kw.update(tie_embeddings=True, layer_types=["sliding_attention", "full_attention"], sliding_window=16)
        if arch in ("olmoe", "gptoss"):
            kw.update(intermediate_size=24, num_experts=4, top_k=2)
        if arch == "gptoss":
            kw.update(layer_types=["sliding_attention", "full_attention"], sliding_window=16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _HF[arch] = build_model(ModelConfig(**kw), seed=0)
    return _HF[arch]


@pytest.mark.parametrize("route", ["auto", "iterative", "gram"])
@pytest.mark.parametrize("preset", ["muon", "paper"])
@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "olmoe", "gptoss"])
def test_hf_families_every_role(arch, preset, route):
    model = hf_model(arch)
    opt = equiopt.build(model, preset=preset)
    fastpath.configure(opt, polar_route=route)
    set_grads(model.parameters(), seed=len(arch))
    seen = set()
    for group in opt.param_groups:
        if group["map"] == "adamw":
            continue
        seen.add(group["role"])
        compare_group(opt, group, [p.grad.float() for p in group["params"]], f"{arch}/{preset}/{route}")
    if arch in ("olmoe", "gptoss"):
        assert {"expert_in", "expert_out"} <= seen
    assert "attention" in seen


@pytest.mark.parametrize("stack,stack_bytes", [(True, 1 << 20), (True, 1), (False, 1 << 20)])
def test_plain_gpt_fused_layouts_and_unstacked(stack, stack_bytes):
    torch.manual_seed(0)
    model = PlainGPT(vocab=40, d=16, n_head=4, h=24, layers=2, moe_every=2)
    for preset in ("muon", "paper"):
        opt = equiopt.build(model, preset=preset, layouts=FUSED_LAYOUTS)
        fastpath.configure(opt, stack=stack, stack_bytes=stack_bytes)
        set_grads(model.parameters(), seed=3)
        for group in opt.param_groups:
            if group["map"] != "adamw":
                compare_group(opt, group, [p.grad.clone() for p in group["params"]], preset)


# ----------------------------------------------------------------------------------------
# every map x layout x option, mixed shapes in one group (stacking across parameters)
# ----------------------------------------------------------------------------------------

# (stored shape, layout): logical matrices of shapes 6x10, 10x6, 3x10, 12x5 ... several of
# them equal across parameters so that buckets hold more than one parameter.
MIXED = [
    ((6, 10), "matrix"),
    ((6, 10), "matrix"),
    ((10, 6), "matrix"),
    ((3, 6, 10), "stacked"),
    ((3, 10, 6), "stacked+transposed"),  # logical 6x10 as well
    ((2, 12, 10), "stacked+fused2:concat"),  # 4 x [6, 10]
    ((2, 10, 12), "stacked+transposed+fused2:interleaved"),  # 4 x [6, 10]
    ((12, 10), "heads2:out"),  # 2 x [6, 10]
    ((6, 20), "heads2:in"),  # 2 x [6, 10]
    ((5, 10), "heads5:out"),  # 5 x [1, 10]: one-row matrices
    ((7, 3), "matrix"),
]

MAP_CASES = [
    ("identity", {}),
    ("row_norm", {}),
    ("col_norm", {}),
    ("centered_row_norm", {}),
    ("polar", {}),
    ("polar", {"polar_method": "newton_schulz", "nesterov": True}),
    ("polar", {"polar_method": "gram_eigh"}),
    ("polar", {"polar_steps": 8}),
    ("polar", {"polar_steps": 0}),
    ("scaled_polar", {}),
    ("scaled_polar", {"alpha": 0.5}),
    ("scaled_polar", {"alpha": 0.0}),
    ("scaled_polar", {"polar_method": "gram_eigh"}),
    ("scaled_polar", {"polar_method": "svd"}),
    ("right_spectral", {}),
    ("left_spectral", {}),
    ("left_spectral", {"center": False, "alpha": 0.0}),
    ("hybrid", {}),
    ("hybrid", {"alpha": 0.0}),
    ("hybrid", {"order": "polar_then_row"}),
    ("hybrid", {"polar_method": "newton_schulz", "polar_steps": 3}),
]


def mixed_optimizer(spec: dict, dtype=torch.float32):
    torch.manual_seed(1)
    params = [nn.Parameter(torch.randn(s, dtype=dtype)) for s, _ in MIXED]
    layouts = {p: parse_layout(lay) for p, (_, lay) in zip(params, MIXED)}
    return EquiOptimizer([{"params": params, **spec}], layouts=layouts), params


@pytest.mark.parametrize("scale", ["none", "muon"])
@pytest.mark.parametrize("column_aware", [False, True])
@pytest.mark.parametrize("name,extra", MAP_CASES, ids=[f"{n}-{'-'.join(map(str, e.values()))}" for n, e in MAP_CASES])
def test_every_map_every_layout(name, extra, column_aware, scale):
    spec = {"map": name, "column_aware": column_aware, "scale": scale, "per_head": True, **extra}
    opt, params = mixed_optimizer(spec)
    set_grads(params, seed=7)
    for route in ("iterative", "gram"):
        fastpath.configure(opt, polar_route=route)
        compare_group(opt, opt.param_groups[0], [p.grad.clone() for p in params], f"{name} {extra} {route}")


def test_stacking_actually_batches():
    """Equal logical shapes of different parameters and layouts land in one bucket; the
    bucket is cut only at parameter boundaries (never inside one parameter's experts/heads)."""
    opt, params = mixed_optimizer({"map": "polar", "per_head": True})
    buckets = fastpath.plan_buckets(opt, opt.param_groups[0], params)
    by_shape = {b.shape: b for b in buckets}
    assert by_shape[(6, 10)].count == 1 + 1 + 3 + 3 + 4 + 4 + 2 + 2
    assert len(by_shape[(6, 10)].members) == 8
    assert sorted(by_shape) == [(1, 10), (6, 10), (7, 3), (10, 6)]
    b = by_shape[(6, 10)]
    assert [c.count for c in fastpath._chunks(b, True, 1 << 20)] == [20]
    assert [c.count for c in fastpath._chunks(b, True, 6 * 10 * 4 * 5)] == [5, 3, 4, 4, 4]  # cap: 5 matrices
    assert [c.count for c in fastpath._chunks(b, True, 1)] == [1, 1, 3, 3, 4, 4, 2, 2]
    assert [c.count for c in fastpath._chunks(b, False, 1 << 20)] == [1, 1, 3, 3, 4, 4, 2, 2]


# ----------------------------------------------------------------------------------------
# the Gram route on hard spectra, zero lines, scales
# ----------------------------------------------------------------------------------------


def spectrum_input(b, m, n, smin, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(b, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(b, n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, torch.log10(torch.tensor(smin)).item(), k, dtype=torch.float64)
    if rank is not None:
        s[rank:] = 0
    return (U * s) @ V.mT


@pytest.mark.parametrize("method", ["polar_express", "newton_schulz"])
@pytest.mark.parametrize("shape", [(3, 8, 40), (2, 32, 128), (2, 128, 32), (1, 48, 48)])
@pytest.mark.parametrize("kind", ["smin1e-2", "smin1e-6", "rank2"])
def test_gram_route_equals_iterations_on_hard_spectra(method, shape, kind):
    """float32 Gram route vs float32 iterations vs the float64 iterations (oracle): the Gram
    route (float64 eigh) is at least as accurate as the float32 iterations."""
    smin = {"smin1e-2": 1e-2, "smin1e-6": 1e-6, "rank2": 1e-1}[kind]
    x64 = spectrum_input(*shape, smin, seed=sum(shape), rank=2 if kind == "rank2" else None) * 3.0
    x = x64.float()
    oracle = fastpath.iterative_polar(x64, method, None)
    it = fastpath.iterative_polar(x, method, None)
    gr = fastpath.spectral_polar(x, method, None)
    e_it = _err(it, oracle, 1.0)
    e_gr = _err(gr, oracle, 1.0)
    assert e_it < 1e-4 and e_gr <= 2 * e_it + 1e-6, (e_it, e_gr)
    if method == "polar_express":  # the iteration is the library's own polar_express
        assert _err(polar_express(x), it, 1.0) < 1e-5


@pytest.mark.parametrize("alpha", [None, 1.0, 0.5])
def test_gram_route_nuclear_norm_and_scale(alpha):
    x = spectrum_input(4, 16, 64, 1e-3, seed=5).float()
    p = maps.polar(x)
    ref = p if alpha is None else maps.scale_by_nuclear(p, maps.nuclear_norm(x), alpha)
    for fn in (fastpath.spectral_polar, fastpath.iterative_polar):
        out = fn(x, "polar_express", None, alpha=alpha, scale=1.5)
        assert _err(out, 1.5 * ref, float(ref.abs().max()) * 1.5) < 2e-5, fn.__name__


@pytest.mark.parametrize("route", ["iterative", "gram"])
def test_zero_lines_and_zero_matrix_exact(route):
    x = torch.randn(3, 8, 20)
    x[0, 2] = 0  # zero row
    x[1, :, 5] = 0  # zero column
    x[2] = 0  # zero matrix
    for order in ("row_then_polar", "polar_then_row"):
        out = fastpath._polar_batch(
            x, "polar_express", None, None, 1.0 if order == "row_then_polar" else None, 1.0, route, False
        )
        assert torch.all(out[0, 2] == 0) and torch.all(out[1, :, 5] == 0) and torch.all(out[2] == 0)
        assert torch.isfinite(out).all()
    # polar_then_row: a zero row must not be blown up to a unit row by rounding noise
    u = fastpath.map_batch({"map": "hybrid"}, x, {"order": "polar_then_row"}, 1.0, route, False)
    assert torch.all(u[0, 2] == 0) and torch.all(u[2] == 0)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1e6, 1e30])
def test_extreme_scales_match(magnitude):
    x = torch.randn(4, 8, 24) * magnitude
    ref = polar_express(x)
    for route in ("iterative", "gram"):
        out = fastpath._polar_batch(x, "polar_express", None, None, None, 1.0, route, False)
        assert torch.isfinite(out).all(), route
        assert _err(out, ref, max(float(ref.abs().max()), 1e-30)) < 1e-4, route


def test_route_choice():
    """auto: Gram Newton-Schulz where it needs fewer product flops than the iterations (wide
    matrices), the iterations on square ones; non-CPU devices / half precision always iterate;
    the float64 eigh route only when asked for."""
    cpu = torch.device("cpu")
    assert fastpath.choose_polar_route(64, 4096, 5, True, device=cpu, cdt=torch.float32) == "gram_ns"
    assert fastpath.choose_polar_route(512, 1536, 5, False, device=cpu, cdt=torch.float64) == "gram_ns"
    assert fastpath.choose_polar_route(1024, 1024, 5, False, device=cpu, cdt=torch.float32) == "iterative"
    assert fastpath.choose_polar_route(512, 512, 5, True, device=cpu, cdt=torch.float32) == "iterative"
    assert fastpath.choose_polar_route(8, 512, 5, True, device=cpu, cdt=torch.bfloat16) == "iterative"
    assert fastpath.choose_polar_route(8, 512, 5, True, device=torch.device("meta"), cdt=torch.float32) == "iterative"
    assert fastpath.choose_polar_route(8, 512, 5, True, device=cpu, cdt=torch.float32, route="iterative") == "iterative"
    assert fastpath.choose_polar_route(8, 512, 5, True, device=cpu, cdt=torch.float32, route="gram") == "gram"
    assert fastpath.choose_polar_route(8, 512, 5, True, device=cpu, cdt=torch.bfloat16, route="gram") == "iterative"
    with pytest.raises(ValueError):
        fastpath.FastPathOptions(polar_route="fastest")


# ----------------------------------------------------------------------------------------
# whole optimizer: steps, state, switches
# ----------------------------------------------------------------------------------------


def lm_loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 40, (2, 10), generator=g)
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


@pytest.mark.parametrize("preset", ["muon", "paper"])
def test_steps_equal_reference_and_one_buffer_per_matrix(preset):
    torch.manual_seed(0)
    a = PlainGPT(vocab=40, d=16, n_head=4, h=24, layers=2, moe_every=2)
    b = copy.deepcopy(a)
    fast = equiopt.build(a, preset=preset, layouts=FUSED_LAYOUTS)
    ref = equiopt.build(b, preset=preset, layouts=FUSED_LAYOUTS)
    fastpath.configure(ref, batched=False)
    for step in range(3):
        for m, o in ((a, fast), (b, ref)):
            o.zero_grad()
            lm_loss(m, step).backward()
            o.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-5), n
    for group in fast.param_groups:
        for p in group["params"]:
            keys = set(fast.state[p])
            if group["map"] == "adamw":
                assert keys == {"step", "exp_avg", "exp_avg_sq"}
            else:
                assert keys == {"momentum_buffer"}, keys
    # same state as the reference path (momenta are computed outside the fast path)
    for pa, pb in zip(a.parameters(), b.parameters()):
        for k, v in fast.state[pa].items():
            assert torch.allclose(v, ref.state[pb][k], atol=1e-5), k


def test_group_key_selects_reference_path(monkeypatch):
    opt, params = mixed_optimizer({"map": "polar"})
    set_grads(params, seed=2)
    calls = []
    real = fastpath.fast_updates
    monkeypatch.setattr(fastpath, "fast_updates", lambda *a, **k: calls.append(1) or real(*a, **k))
    opt.step()
    assert calls == [1]
    opt.param_groups[0]["batched"] = False  # the group key (DEFAULTS) selects the reference path
    opt.step()
    assert calls == [1]
    assert fastpath.options_of(opt, opt.param_groups[0]).batched is False
    fastpath.configure(opt, batched=True)  # an explicit configure() wins over the group key
    opt.step()
    assert calls == [1, 1]


def test_float64_parameters_use_float64():
    opt, params = mixed_optimizer({"map": "hybrid"}, dtype=torch.float64)
    set_grads(params, seed=4)
    group = opt.param_groups[0]
    xs = [p.grad.clone() for p in params]
    for route in ("iterative", "gram"):
        fastpath.configure(opt, polar_route=route)
        fast = fastpath.fast_updates(opt, group, params, xs)
        for p, x, f in zip(params, xs, fast):
            r = opt._reference_update(group, p, x)
            assert f.dtype == torch.float64
            assert _err(f, r, float(r.abs().max())) < 1e-11, route


def test_compile_option_is_gone():
    """The opt-in torch.compile path measured no gain (x0.98) and was removed (issue #16): the
    group key and the fast-path option are refused, naming them."""
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['compile'\]"):
        equiopt.EquiOptimizer([nn.Parameter(torch.zeros(3, 3))], map="polar", compile=True)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['compile'\]"):
        equiopt.build(nn.Linear(4, 4), preset="muon", compile=True)
    opt, _ = mixed_optimizer({"map": "polar"})
    with pytest.raises(TypeError, match="compile"):
        fastpath.configure(opt, compile=True)


def test_route_choice_is_a_flop_count_independent_of_threads():
    """The choice follows the flop counts alone: the same at 1, 2 and 16 threads, and
    gram_ns exactly where gram_ns_flops < the iterations' product flops."""
    cpu = torch.device("cpu")
    shapes = [(m, r * m) for m in (16, 32, 64, 128, 256, 512) for r in (1, 2, 4, 8, 16)]
    threads = torch.get_num_threads()
    try:
        picks = {}
        for t in (1, 2, 16):
            torch.set_num_threads(t)
            picks[t] = {s: fastpath.choose_polar_route(*s, 5, True, device=cpu, cdt=torch.float32) for s in shapes}
    finally:
        torch.set_num_threads(threads)
    assert picks[1] == picks[2] == picks[16]
    for (m, n), route in picks[1].items():
        fewer = fastpath.gram_ns_flops(m, n, 5) < fastpath.polar_flops("iterative", m, n, 5, False)["mm32"]
        assert route == ("gram_ns" if fewer else "iterative"), (m, n)
    assert (picks[1][(64, 64)], picks[1][(64, 256)]) == ("iterative", "gram_ns")
