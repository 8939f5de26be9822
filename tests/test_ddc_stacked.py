"""DDC's neuron rescale inside stacked / fused MLP weights (equiopt.ddc.StackedRescaleGauge):
views, the whole-model probe, trajectory equivariance under per-(expert, neuron) scales, orbit
coordinates, state round trip.

Oracles are independent of equiopt.ddc: the gauge action is written out with explicit slices of
the stored tensors (``gate_up[e, h + i, :] * s``, ``down[e, :, i] / s``), AdamW is
torch.optim.AdamW, Muon is equiopt's ``muon`` preset. Everything runs in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_ddc import (  # the oracles' helpers; TOL 1e-10 after 10 float64 steps, FAIL 1e-3
    FAIL,
    OPTS,
    TOL,
    assert_drift_orders,
    bf16_rounded_steps,
    load,
    rel_err,
    snapshot,
    trajectory,
)
from torch import nn

import equiopt
from equiopt import ddc
from equiopt.ddc import StackedRescaleGauge, ddc_optimizer, part_rows
from equiopt.layouts import Layout

V = 48


class SwiGLUExperts(nn.Module):
    """E experts stored ``gate_up [E, 2h, d]`` (gate rows, then up rows) and ``down [E, d, h]``,
    ``silu(gate) * (up + up_shift)``; softmax top-k routing, all in the parameters' dtype (HF
    routers softmax in float32). ``up_shift != 0`` (gpt-oss's ``up + 1``) breaks the rescale."""

    def __init__(self, d: int, h: int, e: int, k: int, up_shift: float = 0.0):
        super().__init__()
        self.up_shift = up_shift
        self.router = nn.Linear(d, e, bias=False)
        self.gate_up = nn.Parameter(torch.randn(e, 2 * h, d) / d**0.5)
        self.down = nn.Parameter(torch.randn(e, d, h) / h**0.5)
        self.k = k

    def forward(self, x):
        B, T, d = x.shape
        x = x.reshape(-1, d)
        probs = self.router(x).softmax(-1)
        w, idx = probs.topk(self.k, dim=-1)
        gate, up = torch.einsum("nd,ehd->neh", x, self.gate_up).chunk(2, dim=-1)
        y = torch.einsum("neh,edh->ned", nn.functional.silu(gate) * (up + self.up_shift), self.down)  # [N, E, d]
        sel = torch.zeros_like(probs).scatter(1, idx, w)
        return (sel[:, :, None] * y).sum(1).reshape(B, T, d)


class TransposedExperts(SwiGLUExperts):
    """gpt-oss's storage with a homogeneous SwiGLU: ``gate_up [E, d, 2h]`` (columns alternate
    gate, up) and ``down [E, h, d]``, both transposed against the Linear convention."""

    def __init__(self, d: int, h: int, e: int, k: int, up_shift: float = 0.0):
        super().__init__(d, h, e, k, up_shift)
        self.gate_up = nn.Parameter(torch.randn(e, d, 2 * h) / d**0.5)
        self.down = nn.Parameter(torch.randn(e, h, d) / h**0.5)

    def forward(self, x):
        B, T, d = x.shape
        x = x.reshape(-1, d)
        probs = self.router(x).softmax(-1)
        w, idx = probs.topk(self.k, dim=-1)
        gu = torch.einsum("nd,edh->neh", x, self.gate_up)
        gate, up = gu[..., 0::2], gu[..., 1::2]
        y = torch.einsum("neh,ehd->ned", nn.functional.silu(gate) * (up + self.up_shift), self.down)
        sel = torch.zeros_like(probs).scatter(1, idx, w)
        return (sel[:, :, None] * y).sum(1).reshape(B, T, d)


class MoELM(nn.Module):
    def __init__(self, d=16, h=12, e=4, k=2, layers=2, up_shift=0.0, transposed=False):
        super().__init__()
        self.embed = nn.Embedding(V, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        experts = TransposedExperts if transposed else SwiGLUExperts
        self.moes = nn.ModuleList(experts(d, h, e, k, up_shift) for _ in range(layers))
        self.lm_head = nn.Linear(d, V, bias=False)

    @property
    def transposed(self) -> bool:
        return isinstance(self.moes[0], TransposedExperts)

    def forward(self, ids):
        x = self.embed(ids)
        for n, m in zip(self.norms, self.moes):
            x = x + m(n(x))
        return self.lm_head(x)

    def loss(self, ids):
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))


def moe_lm(seed=0, **kw):
    torch.manual_seed(seed)
    return MoELM(**kw).double()


def batches(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (4, 12), generator=g) for _ in range(n)]


def scales(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    E, h = model.moes[0].down.shape[0], model.moes[0].gate_up.shape[-1 if model.transposed else -2] // 2
    return [torch.exp((torch.rand(E, h, generator=g) * 2 - 1) * math.log(2)).double() for _ in model.moes]


def transform(params, s, transposed=False):
    """Up neuron i of expert e times s[e, i] (row h + i of gate_up[e]; transposed + interleaved:
    column 2i + 1), its down column (transposed: row) divided by it; explicit slices."""
    out = dict(params)
    for layer, sl in enumerate(s):
        gu, dn = params[f"moes.{layer}.gate_up"].clone(), params[f"moes.{layer}.down"].clone()
        E, h = sl.shape
        for e in range(E):
            for i in range(h):
                if transposed:
                    gu[e, :, 2 * i + 1] *= sl[e, i]
                    dn[e, i, :] /= sl[e, i]
                else:
                    gu[e, h + i, :] *= sl[e, i]
                    dn[e, :, i] /= sl[e, i]
        out[f"moes.{layer}.gate_up"], out[f"moes.{layer}.down"] = gu, dn
    return out


def equivariance_error(make_opt, transposed=False):
    a = moe_lm(transposed=transposed)
    s = scales(a)
    b = copy.deepcopy(a)
    load(b, transform(snapshot(a), s, transposed))
    data = batches()
    with torch.no_grad():  # the action is a symmetry of the function
        assert abs(a.loss(data[0]).item() - b.loss(data[0]).item()) < 1e-12
    ta, tb = trajectory(a, make_opt, data), trajectory(b, make_opt, data)
    return max(rel_err(transform(x, s, transposed), y) for x, y in zip(ta, tb))


# ----------------------------------------------------------------------------------------
# views
# ----------------------------------------------------------------------------------------
def test_part_rows_are_views_of_the_right_rows():
    E, h, d = 3, 4, 5
    t = torch.randn(E, 2 * h, d)
    up = part_rows(t, Layout(stacked=True, fused=2), 1)
    assert torch.equal(up, t[:, h:])
    up.mul_(2.0)  # a view: writes the stored tensor
    assert torch.equal(part_rows(t, Layout(stacked=True, fused=2), 1), t[:, h:])
    # gpt-oss: [E, d, 2h] transposed, gate/up interleaved on the neuron axis
    ti = torch.randn(E, d, 2 * h)
    lay = Layout(stacked=True, transposed=True, fused=2, interleaved=True)
    for part in (0, 1):
        v = part_rows(ti, lay, part)
        assert v.shape == (E, h, d) and torch.equal(v, ti[:, :, part::2].mT)
    assert torch.equal(part_rows(ti, Layout(stacked=True, transposed=True)), ti.mT)
    plain = torch.randn(h, d)
    assert torch.equal(part_rows(plain, Layout()), plain[None])
    with pytest.raises(ValueError, match="part_rows"):
        part_rows(torch.randn(8, d), Layout(heads=2))


# ----------------------------------------------------------------------------------------
# gauges found
# ----------------------------------------------------------------------------------------
def test_stacked_gauges_found_on_the_up_part():
    opt = ddc_optimizer(moe_lm(), "adam")
    st = [g for g in opt.gauges if isinstance(g, StackedRescaleGauge)]
    assert [(g.name, g.part, g.names) for g in st] == [
        (f"neuron_rescale:moes.{i}", 1, (f"moes.{i}.gate_up", f"moes.{i}.down")) for i in range(2)
    ]
    assert st[0].modes == 4 * 12
    text = ddc.describe(opt)
    assert "neuron_rescale:moes.0 (rows of part 1, per expert)" in text
    assert "neuron_rescale:moes.0 (cols, per expert)" in text


def test_probe_rejects_a_non_homogeneous_part():
    """The gate part (SiLU) always fails the probe; with ``silu(gate) * (up + 1)`` (gpt-oss) the up
    part fails too: no neuron gauge, and the table says why for each part."""
    m = moe_lm(up_shift=1.0)
    table = ddc.gauge_table(equiopt.plan(m), m)
    assert "neuron_rescale" not in table
    assert "rescale probe of part 1 failed" in table and "no in-projection part of its MLP passed" in table
    ok = ddc.gauge_table(equiopt.plan(moe_lm()), moe_lm())
    assert "neuron_rescale:moes.0 (rows of part 1, per expert)" in ok


# ----------------------------------------------------------------------------------------
# trajectory equivariance (float64, explicit slices as the oracle)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("transposed", [False, True], ids=["concat", "transposed_interleaved"])
@pytest.mark.parametrize("opt", ["ddc_adam", "ddc_muon"])
def test_ddc_is_equivariant_under_per_expert_rescale(opt, transposed):
    assert equivariance_error(OPTS[opt], transposed) < TOL


@pytest.mark.parametrize("transposed", [False, True], ids=["concat", "transposed_interleaved"])
@pytest.mark.parametrize("opt", ["adamw", "muon"])
def test_baselines_fail_per_expert_rescale(opt, transposed):
    assert equivariance_error(OPTS[opt], transposed) > FAIL


def test_reference_path_is_the_same_step():
    """``configure(batched=False)`` routes the stacked gauge through the same step: the
    experts' first step equal to float64 rounding (1e-13 of the step: the fast path takes
    Adam's direction from torch's fused Adam kernel, the reference path from the written-out
    moments) and over the trajectory (1e-12: the ungauged parameters likewise take the fused
    AdamW kernel against the single-tensor AdamW, the same arithmetic in another order)."""
    data = batches(4)
    one, ta, tb = [], [], []
    for batched, traj in ((True, ta), (False, tb)):
        m = moe_lm()
        opt = ddc.configure(ddc_optimizer(m, "adam", lr=1e-2), batched=batched)
        traj += trajectory(m, lambda _m, o=opt: o, data)
        one.append({n: t for n, t in traj[0].items() if n.endswith(("gate_up", "down"))})  # the experts
    init = dict(moe_lm().named_parameters())
    steps = [{n: t[n] - init[n].detach() for n in t} for t in one]  # the first step's change
    assert one[0] and rel_err(steps[0], steps[1]) < 1e-13
    assert rel_err(ta[-1], tb[-1]) < 1e-12


# ----------------------------------------------------------------------------------------
# orbit coordinate: log||up row|| - log||down col|| per (expert, neuron)
# ----------------------------------------------------------------------------------------
def orbit_drift(make_opt, steps=20):
    m = moe_lm()

    def coord():
        h = m.moes[0].down.shape[2]
        return torch.stack(
            [x.gate_up.detach()[:, h:].norm(dim=-1).log() - x.down.detach().norm(dim=-2).log() for x in m.moes]
        )

    c0 = coord()
    trajectory(m, make_opt, batches(steps))
    return (coord() - c0).abs().max().item()


def test_orbit_coordinate_conserved_to_second_order():
    """As tests/test_ddc.py: only the tangential step moves the coordinate, by O(lr^2) per step
    under DDC (halving lr divides the drift by ~4); AdamW moves it by O(lr) (~2)."""
    assert_drift_orders(orbit_drift)


# ----------------------------------------------------------------------------------------
# plumbing
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "muon"])
def test_state_dict_round_trip_bitwise(base):
    data = batches(6)
    m = moe_lm()
    opt = ddc_optimizer(m, base)
    trajectory(m, lambda _m: opt, data[:3])
    m2 = copy.deepcopy(m)
    opt2 = ddc_optimizer(m2, base)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    trajectory(m, lambda _m: opt, data[3:])
    trajectory(m2, lambda _m: opt2, data[3:])
    for (n, p), q in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
    gu = opt.state[m.moes[0].gate_up]
    assert gu["radial_exp_avg"].shape == (4, 12)  # one radial state per (expert, neuron)


def test_state_memory_adds_two_scalars_per_mode():
    m = moe_lm()
    opt = ddc_optimizer(m, "adam")
    trajectory(m, lambda _m: opt, batches(1))
    base = sum(2 * p.numel() for p in m.parameters())
    extra = sum(t.numel() for st in opt.state.values() for k, t in st.items() if k.startswith("radial_"))
    assert extra == opt.state_modes() == 2 * 2 * 4 * 12
    assert sum(t.numel() for st in opt.state.values() for k, t in st.items() if k.startswith("exp_avg")) == base


def test_hf_olmoe_experts_equivariant_at_router_precision():
    """HF OLMoE: the per-expert rescale of ``experts.gate_up_proj`` (up rows) and ``down_proj``
    (columns). HF's router softmax runs in float32, so the bound is float32 rounding (as
    tests/test_ddc.py's router-shift test; measured here 6e-17 / 1e-16: no routing weight
    rounded differently), with AdamW and Muon failing by orders of magnitude."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        attn_implementation="eager",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    a = OlmoeForCausalLM(cfg).double()
    a.set_experts_implementation("eager")
    opt = ddc_optimizer(a, "adam")
    (g,) = [g for g in opt.gauges if isinstance(g, StackedRescaleGauge)]
    gu_name, dn_name = g.names
    assert gu_name.endswith("experts.gate_up_proj") and g.part == 1
    s = torch.exp((torch.rand(4, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1) * math.log(2)).double()

    def T(ps):
        out = dict(ps)
        out[gu_name] = torch.cat([ps[gu_name][:, :8], ps[gu_name][:, 8:] * s[:, :, None]], 1)
        out[dn_name] = ps[dn_name] / s[:, None, :]
        return out

    def run(model, make_opt):
        o, traj = make_opt(model), []
        for ids in batches(5):
            o.zero_grad()
            logits = model(input_ids=ids[:, :-1]).logits
            nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
            o.step()
            traj.append(snapshot(model))
        return traj

    errs = {}
    for name in OPTS:
        x, y = copy.deepcopy(a), copy.deepcopy(a)
        load(y, T(snapshot(x)))
        errs[name] = max(rel_err(T(p), q) for p, q in zip(run(x, OPTS[name]), run(y, OPTS[name])))
    assert errs["ddc_adam"] < 1e-5 and errs["ddc_muon"] < 1e-5, errs
    assert errs["adamw"] > FAIL and errs["muon"] > FAIL, errs


@pytest.mark.parametrize("base", ["adam", "muon"])
def test_bf16_params_step_like_fp32_rounded(base):
    """Same gradients: the bf16 model's step equals the fp32 step on the same values rounded to
    bf16 (fp32 working copy and state), the stacked gauge included."""
    torch.manual_seed(0)
    m16 = MoELM().to(torch.bfloat16)
    m32 = copy.deepcopy(m16).float()
    o16, o32 = ddc_optimizer(m16, base, lr=1e-2), ddc_optimizer(m32, base, lr=1e-2)
    assert sum(isinstance(g, StackedRescaleGauge) for g in o16.gauges) == 2
    bf16_rounded_steps(m16, m32, o16, o32)
    for (n, p16), p32 in zip(m16.named_parameters(), m32.parameters()):
        assert p16.dtype == torch.bfloat16 and torch.equal(p16.float(), p32), n
    gu = o16.state[m16.moes[0].gate_up]
    assert all(t.dtype == torch.float32 for k, t in gu.items() if k != "step")
