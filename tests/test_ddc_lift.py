"""The paper's maps lifted into DDC-Muon's conditioning (``ddc_optimizer(..., rules=)``,
docs/ddc.md "Lifting the paper's maps"): trajectory equivariance of the lifted step (the
paper preset, which runs the same maps on raw gradients, fails it), the lifted direction
against ``equiopt.maps`` called directly, refusals, plumbing. Everything runs in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_ddc import (
    FAIL,
    TOL,
    batches,
    configure,
    equivariance_error,
    qwen3,
    qwen_loss,
    rel_err,
    relu_lm,
    snapshot,
)
from test_ddc_norm import norm_equivariance_error
from torch import nn

import equiopt
from equiopt.ddc import ddc_optimizer, describe
from equiopt.maps import column_aware, hybrid
from equiopt.train.loop import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

LIFT = {"mlp_in": "hybrid", "mlp_out": "hybrid"}


def lifted(batched=True):
    return lambda m: configure(ddc_optimizer(m, "muon", rules=LIFT), batched=batched)


def paper(m):
    return equiopt.build(m, preset="paper")


# ----------------------------------------------------------------------------------------
# trajectory equivariance (neuron rescales + logit shift; Qwen3 also the V/O rotations)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [True, False])
def test_lifted_ddc_muon_relu_equivariant(batched):
    assert equivariance_error("relu", lifted(batched), ("rescale", "shift")) < TOL


def test_lifted_ddc_muon_qwen3_equivariant():
    # gate (norm reader), up (neuron + norm gauge: balanced radius) and down all lifted
    assert equivariance_error("qwen3", lifted(), ("rescale", "shift", "rotation")) < TOL


def test_lifted_with_the_papers_alpha_equivariant():
    # alpha = 1 (the paper's nuclear-norm factor): ~16x larger steps here, rounding grows to ~2e-13
    rules = {r: {"map": "hybrid", "alpha": 1.0} for r in LIFT}
    assert equivariance_error("relu", lambda m: ddc_optimizer(m, "muon", rules=rules), ("rescale", "shift")) < TOL


def test_lifted_with_norm_channels_equivariant():
    assert norm_equivariance_error("ln", lifted(), ("norm", "rescale", "shift")) < TOL
    assert norm_equivariance_error("qwen3", lifted(), ("norm", "rescale", "shift", "rotation")) < TOL


def test_paper_preset_fails_the_same_test():
    assert equivariance_error("relu", paper, ("rescale", "shift")) > FAIL
    assert equivariance_error("qwen3", paper, ("rescale", "shift")) > FAIL


def test_build_passes_rules_through():
    m = relu_lm()
    opt = equiopt.build(m, preset="ddc_muon", rules=LIFT)
    want = {id(p) for n, p in m.named_parameters() if n.endswith(("fc1.weight", "fc2.weight"))}
    assert set(opt.lifts) == want
    assert "hybrid (lifted)" in describe(opt)


# ----------------------------------------------------------------------------------------
# the lifted direction against equiopt.maps (a gauge-free MLP: GELU has no rescale gauge)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("batched", [True, False])
def test_gauge_free_direction_is_hybrid_of_nesterov_momentum(batched, alpha):
    m = relu_lm(act=nn.GELU(), tied=True)  # no rescale, no logit shift: fc1 / fc2 step as plain Muon
    lr, wd, mu = 2e-2, 1e-3, 0.95
    rules = {r: {"map": "hybrid", "alpha": alpha} for r in LIFT}
    opt = configure(ddc_optimizer(m, "muon", lr=lr, weight_decay=wd, rules=rules), batched=batched)
    assert not opt.gauges
    mats = {n: p for n, p in m.named_parameters() if n.endswith(("fc1.weight", "fc2.weight"))}
    bufs = {n: torch.zeros_like(p) for n, p in mats.items()}
    col_hybrid = column_aware(hybrid)
    for ids in batches(32, 4):
        opt.zero_grad()
        m.loss(ids).backward()
        expect = {}
        for n, p in mats.items():
            g = p.grad
            bufs[n] = mu * bufs[n] + g
            upd = g + mu * bufs[n]
            u = hybrid(upd, alpha=alpha) if n.endswith("fc1.weight") else col_hybrid(upd, alpha=alpha)
            expect[n] = p.detach() * (1 - lr * wd) - lr * u
        opt.step()
        for n, p in mats.items():
            assert rel_err({n: p.detach()}, {n: expect[n]}) < 1e-13, n


def _first_rescale_step(W1, g1, W2, g2, lr, wd, eps, mu):
    """docs/ddc.md "One step" written out for a neuron gauge's first step (Adam / momentum
    state zero) with hybrid in place of the polar map; ``W1``, ``g1``: ``[W_in | b_in]``."""
    W1, W2 = W1 * (1 - lr * wd), W2 * (1 - lr * wd)
    n1, n2 = (W1 * W1).sum(1), (W2 * W2).sum(0)
    gh1, gh2 = (g1 * W1).sum(1), (g2 * W2).sum(0)
    x1 = n1.sqrt()[:, None] * (g1 - (gh1 / n1)[:, None] * W1)
    x2 = (g2 - (gh2 / n2)[None, :] * W2) * n2.sqrt()[None, :]
    gU = (gh1 + gh2) / 2**0.5
    dlog = -lr * gU / (gU.abs() + eps) / 2**0.5  # bias-corrected Adam, first step
    u1 = hybrid((1 + mu) * x1, alpha=0.0)  # Nesterov momentum of a zero buffer: (1 + mu) x
    u2 = column_aware(hybrid)((1 + mu) * x2, alpha=0.0)
    u1 = u1 - ((u1 * W1).sum(1) / n1)[:, None] * W1
    u2 = u2 - ((u2 * W2).sum(0) / n2)[None, :] * W2
    W1 = dlog.exp()[:, None] * W1 - lr * n1.sqrt()[:, None] * u1
    return W1, dlog.exp()[None, :] * W2 - lr * u2 * n2.sqrt()[None, :]


@pytest.mark.parametrize("batched", [True, False])
def test_gauged_direction_is_hybrid_of_the_conditioned_momentum(batched):
    m = relu_lm()
    lr, wd, mu = 4e-2, 1e-3, 0.95
    opt = configure(ddc_optimizer(m, "muon", lr=lr, weight_decay=wd, rules=LIFT), batched=batched)
    m.loss(batches(32, 1)[0]).backward()
    fc1, fc2 = m.blocks[0].fc1, m.blocks[0].fc2
    W1 = torch.cat([fc1.weight, fc1.bias[:, None]], 1).detach()
    g1 = torch.cat([fc1.weight.grad, fc1.bias.grad[:, None]], 1)
    e1, e2 = _first_rescale_step(W1, g1, fc2.weight.detach(), fc2.weight.grad, lr, wd, 1e-8, mu)
    opt.step()
    got = {"in": torch.cat([fc1.weight, fc1.bias[:, None]], 1).detach(), "out": fc2.weight.detach()}
    assert rel_err(got, {"in": e1, "out": e2}) < 1e-13


def test_polar_rule_and_no_rules_are_the_default_bitwise():
    data = batches(64, 3)
    ms = [qwen3() for _ in range(3)]
    opts = [
        ddc_optimizer(ms[0], "muon"),
        ddc_optimizer(ms[1], "muon", rules={}),
        ddc_optimizer(ms[2], "muon", rules={"mlp_in": "polar", "mlp_out": "polar", "attention": "polar"}),
    ]
    assert not any(o.lifts for o in opts)
    for m, o in zip(ms, opts):
        for ids in data:
            o.zero_grad()
            m.loss(ids).backward()
            o.step()
    for m in ms[1:]:
        for p, q in zip(ms[0].parameters(), m.parameters()):
            assert torch.equal(p, q)


# ----------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "base, rules, match",
    [
        ("adam", LIFT, "base='adam'"),
        ("muon", {"attention": "row_norm"}, "'attention'.*rotation"),
        ("muon", {"attention": "hybrid"}, "'attention'.*rotation"),
        ("muon", {"embedding": "row_norm"}, "'embedding'.*AdamW"),
        ("muon", {"embedding": "polar"}, "'embedding'.*AdamW"),
        ("muon", {"lm_head": "centered_row_norm"}, "'lm_head'.*translation"),
        ("muon", {"router": "left_spectral"}, "'router'.*translation"),
        ("muon", {"expert_in": "hybrid"}, "'expert_in'.*experts"),
        ("muon", {"vector": "hybrid"}, "'vector'"),
        ("muon", {"matrix": "hybrid"}, "'matrix'.*O\\(out\\)"),
        ("muon", {"mlp_in": "row_norm"}, "'mlp_in'.*only the paper's map 'hybrid'"),
        ("muon", {"mlp_out": "adamw"}, "'mlp_out'.*only the paper's map 'hybrid'"),
        ("muon", {"mlp_in": {"map": "hybrid", "lr": 1e-3}}, "'mlp_in'.*\\['lr'\\] mean nothing"),
        ("muon", {"mlp": "hybrid"}, "unknown role 'mlp'"),
    ],
)
def test_refusals(base, rules, match):
    with pytest.raises(ValueError, match=match):
        ddc_optimizer(relu_lm(), base, rules=rules)


def test_make_optimizer_passes_rules_and_refuses_role_lrs():
    m = relu_lm()
    opt, _ = make_optimizer(m, "ddc_muon", rules=LIFT)
    assert len(opt.lifts) == 4
    with pytest.raises(ValueError, match="per-role learning rates"):
        make_optimizer(m, "ddc_muon", role_lr={"mlp_in": 1e-3})
    with pytest.raises(ValueError, match="base='adam'"):
        make_optimizer(m, "ddc_adam", rules=LIFT)


def test_hybrid_options_reach_the_map():
    m = relu_lm(act=nn.GELU(), tied=True)
    rules = {"mlp_in": {"map": "hybrid", "alpha": 1.0, "order": "polar_then_row"}, "mlp_out": "hybrid"}
    opt = ddc_optimizer(m, "muon", rules=rules)
    lift = opt.lifts[id(m.blocks[0].fc1.weight)]
    assert (lift.alpha, lift.order, lift.column_aware) == (1.0, "polar_then_row", False)
    lift = opt.lifts[id(m.blocks[0].fc2.weight)]  # the paper's MLP options, alpha 0
    assert (lift.alpha, lift.order, lift.polar_method, lift.column_aware) == (
        0.0,
        "row_then_polar",
        "polar_express",
        True,
    )
    opt = ddc_optimizer(m, "muon", rules={"mlp_out": "hybrid"})
    assert id(m.blocks[0].fc1.weight) not in opt.lifts and id(m.blocks[0].fc2.weight) in opt.lifts


# ----------------------------------------------------------------------------------------
# plumbing
# ----------------------------------------------------------------------------------------
def test_state_dict_round_trip_bitwise():
    data = batches(64, 6)
    m = qwen3()
    opt = ddc_optimizer(m, "muon", rules=LIFT)
    for ids in data[:3]:
        opt.zero_grad()
        m.loss(ids).backward()
        opt.step()
    m2 = copy.deepcopy(m)
    m2.loss = lambda ids: qwen_loss(m2, ids)
    opt2 = ddc_optimizer(m2, "muon", rules=LIFT)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for mm, oo in ((m, opt), (m2, opt2)):
        for ids in data[3:]:
            oo.zero_grad()
            mm.loss(ids).backward()
            oo.step()
    for (n, p), q in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
    assert rel_err(snapshot(m), snapshot(m2)) == 0.0


def test_a_checkpoint_with_other_lifts_is_refused():
    m = qwen3()
    lifted, plain = ddc_optimizer(m, "muon", rules=LIFT), ddc_optimizer(m, "muon")
    sd = lifted.state_dict()
    assert sd["ddc_lifts"] and plain.state_dict()["ddc_lifts"] == {}
    with pytest.raises(ValueError, match="lifted maps"):
        plain.load_state_dict(copy.deepcopy(sd))  # would silently fall back to the polar map
    with pytest.raises(ValueError, match="lifted maps"):
        lifted.load_state_dict(copy.deepcopy(plain.state_dict()))
    other = ddc_optimizer(m, "muon", rules={"mlp_in": {"map": "hybrid", "alpha": 1.0}, "mlp_out": "hybrid"})
    with pytest.raises(ValueError, match="lifted maps"):
        other.load_state_dict(copy.deepcopy(sd))
    lifted.load_state_dict(copy.deepcopy(sd))  # the same rules: accepted


def test_lifted_fast_path_with_norms_equals_reference():
    """Qwen3 with norm gauges (the scaling-gauge fast path, its units stacked): lifted maps on
    the fast path equal the reference path to 1e-12 (float64, 4 steps, weights)."""
    a, b = qwen3(), qwen3()
    oa = ddc_optimizer(a, "muon", lr=1e-2, rules=LIFT)
    ob = configure(ddc_optimizer(b, "muon", lr=1e-2, rules=LIFT), batched=False)
    assert oa.lifts and any(g.kind == "norm" for g in oa.gauges)
    for ids in batches(64, 4):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m.loss(ids).backward()
            o.step()
    assert rel_err(snapshot(a), snapshot(b)) < 1e-12
