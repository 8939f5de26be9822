"""Metric functions of the training harness against hand-computed values."""

import math

import pytest
import torch

from equiopt.train import metrics as M


def test_balanced_routing():
    # E=4, top-1; 8 tokens, token t prefers expert t % 4 with logit 2 (others 0): f uniform
    E, N = 4, 8
    logits = torch.zeros(N, E)
    logits[torch.arange(N), torch.arange(N) % E] = 2.0
    m = M.routing_metrics(logits, top_k=1)
    p_top = math.exp(2) / (math.exp(2) + 3)
    p_other = 1 / (math.exp(2) + 3)
    # f_i = 1/4, P_i = mean prob = (2 * p_top + 6 * p_other) / 8 = 1/4 by symmetry
    assert m["load_balance_loss"] == pytest.approx(1.0)
    assert m["load_cv"] == pytest.approx(0.0, abs=1e-12)
    assert m["load_entropy"] == pytest.approx(1.0)
    assert m["dead_frac"] == 0.0
    assert m["top_load"] == pytest.approx(0.25)
    h = -(p_top * math.log(p_top) + 3 * p_other * math.log(p_other))
    assert m["token_entropy"] == pytest.approx(h / math.log(4))
    assert m["z_loss"] == pytest.approx(math.log(math.exp(2) + 3) ** 2)
    assert m["logit_rms"] == pytest.approx(math.sqrt(4 / 4))  # one 2 and three 0s per row
    assert m["logit_max"] == pytest.approx(2.0)


def test_collapsed_routing():
    # every token sends everything to expert 0 (logit 30): f = (1, 0, 0, 0), P ~ (1, 0, 0, 0)
    E, N = 4, 16
    logits = torch.zeros(N, E)
    logits[:, 0] = 30.0
    m = M.routing_metrics(logits, top_k=1)
    assert m["load_balance_loss"] == pytest.approx(E, rel=1e-9)
    assert m["load_cv"] == pytest.approx(math.sqrt(E - 1))  # std(f)/mean(f) with f=(1,0,0,0)
    assert m["load_entropy"] == pytest.approx(0.0, abs=1e-12)
    assert m["dead_frac"] == pytest.approx(3 / 4)
    assert m["top_load"] == 1.0
    assert m["token_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert m["z_loss"] == pytest.approx(30.0**2, rel=1e-9)
    assert m["logit_rms"] == pytest.approx(math.sqrt(900 / 4))
    assert m["logit_max"] == 30.0


def test_top2_shares_and_uniform_router():
    # uniform logits: probabilities 1/E; top-2 picks indices 0,1 (torch.topk ties) -> f=(.5,.5,0,0)
    E = 4
    logits = torch.zeros(10, E)
    m = M.routing_metrics(logits, top_k=2)
    assert m["token_entropy"] == pytest.approx(1.0)
    assert m["z_loss"] == pytest.approx(math.log(4) ** 2)
    assert m["top_load"] == pytest.approx(0.5)
    assert m["load_balance_loss"] == pytest.approx(E * (0.5 * 0.25 + 0.5 * 0.25))
    assert m["load_entropy"] == pytest.approx(math.log(2) / math.log(4))
    assert m["dead_frac"] == pytest.approx(0.5)


def test_routing_accumulates_like_concatenation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 6, generator=g) * 3, torch.randn(5, 6, generator=g)
    s = M.RoutingStats(6, 2)
    s.update(a)
    s.update(b)
    whole = M.routing_metrics(torch.cat([a, b]), 2)
    for k, v in s.compute().items():
        assert v == pytest.approx(whole[k], rel=1e-12), k


def test_dead_threshold_is_strict():
    # E=10: threshold 0.1/E = 0.01; an expert with exactly 1% of assignments is alive
    E = 10
    idx = [0] * 91 + list(range(1, 10))  # experts 1..9 get 1 token each of 100 -> f = 0.01
    logits = torch.zeros(100, E)
    logits[torch.arange(100), torch.tensor(idx)] = 5.0
    m = M.routing_metrics(logits, 1)
    assert m["dead_frac"] == 0.0
    logits[99] = 0
    logits[99, 0] = 5.0  # expert 9 now gets nothing
    assert M.routing_metrics(logits, 1)["dead_frac"] == pytest.approx(0.1)


def test_average_layers():
    per = {"a": dict.fromkeys(M.ROUTING_KEYS, 1.0), "b": dict.fromkeys(M.ROUTING_KEYS, 3.0)}
    avg = M.average_layers(per)
    assert avg["load_cv"] == 2.0 and avg["logit_max"] == 3.0


def test_uniform_vocab_logits():
    V = 50
    z = torch.full((3, 4, V), 2.0)
    m = M.logit_metrics(z)
    assert m["rms"] == pytest.approx(2.0)
    assert m["centered_rms"] == pytest.approx(0.0, abs=1e-12)
    assert m["max_abs"] == 2.0
    assert m["lse_mean"] == pytest.approx(2.0 + math.log(V))
    assert m["lse_max"] == pytest.approx(2.0 + math.log(V))
    assert m["entropy"] == pytest.approx(math.log(V))
    assert m["max_prob"] == pytest.approx(1 / V)


def test_peaked_vocab_logits():
    # one row [3, -1, -1, -1]: mean 0, centered = raw
    z = torch.tensor([[3.0, -1.0, -1.0, -1.0]])
    m = M.logit_metrics(z)
    assert m["rms"] == pytest.approx(math.sqrt((9 + 3) / 4))
    assert m["centered_rms"] == pytest.approx(math.sqrt((9 + 3) / 4))
    lse = math.log(math.exp(3) + 3 * math.exp(-1))
    assert m["lse_mean"] == pytest.approx(lse)
    p = [math.exp(3 - lse)] + [math.exp(-1 - lse)] * 3
    assert m["entropy"] == pytest.approx(-sum(q * math.log(q) for q in p))
    assert m["max_prob"] == pytest.approx(p[0])
    assert m["max_abs"] == 3.0
    # centering removes only the per-position mean: shifting the row changes rms, not centered_rms
    m2 = M.logit_metrics(z + 10)
    assert m2["centered_rms"] == pytest.approx(m["centered_rms"])
    assert m2["rms"] > m["rms"]


def test_grad_norm():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(3))
    c = torch.nn.Parameter(torch.zeros(1))  # no grad: skipped
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([0.0, 4.0, 12.0])
    assert M.grad_norm([a, b, c, a]) == pytest.approx(13.0)  # duplicates counted once


def test_spike_detector():
    d = M.SpikeDetector(rel=0.25, beta=0.5, warmup=3)
    for s in range(1, 6):
        assert not d.update(4.0, s)
    assert d.update(5.1, 6)  # > 1.25 * 4
    assert not d.update(4.9, 7)  # below 5.0
    assert d.spikes == 1 and d.steps == [6]
    assert not d.update(float("nan"), 8)  # non-finite values are the divergence check's job
    st = d.state_dict()
    e = M.SpikeDetector()
    e.load_state_dict(st)
    assert e.state_dict() == st
    # no spike can be flagged during warm-up
    w = M.SpikeDetector(warmup=10)
    assert not any(w.update(v, i) for i, v in enumerate([1.0, 100.0, 1.0, 100.0]))


def test_routing_errors():
    with pytest.raises(ValueError, match="top_k"):
        M.RoutingStats(4, 5)
    with pytest.raises(ValueError, match="no router logits"):
        M.RoutingStats(4, 1).compute()
