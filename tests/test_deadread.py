"""The dead-direction readout: each observable against an independent oracle, the rate fit on
known power laws, and the criterion's rejection of noise."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from equiopt import deadread as R


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1 = nn.Linear(d, h, bias=False)
        self.fc2 = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Tiny(nn.Module):
    def __init__(self, V=11, d=6, h=9, L=2):
        super().__init__()
        self.embed = nn.Embedding(V, d)
        self.blocks = nn.ModuleList([Block(d, h) for _ in range(L)])
        self.lm_head = nn.Linear(d, V, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


def _model_and_batch(seed=0, N=5, T=4, V=11):
    torch.manual_seed(seed)
    m = Tiny(V=V).double()
    ids = torch.randint(0, V, (N, T + 1))
    return m, ids[:, :-1], ids[:, 1:]


def test_sites_of_a_residual_mlp():
    m, _, _ = _model_and_batch()
    names = [s.name for s in R.find_sites(m)]
    assert names == ["L0.mlp_in", "L0.mlp_out", "L0.block", "L1.mlp_in", "L1.mlp_out", "L1.block", "head"]
    assert len(R.cells(R.find_sites(m))) == 2 * (3 + 4 + 1) + 3


def _per_sample_grads(m, x, y, pname):
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, xi, yi):
        logits = functional_call(m, p, (xi[None],))
        return nn.functional.cross_entropy(logits[0], yi)

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return g[pname].reshape(x.shape[0], -1)


def test_fisher_gram_matches_torch_func_per_sample_gradients():
    m, x, y = _model_and_batch()
    obs_sites = {s.name: s for s in R.find_sites(m)}
    for site, pname in (
        ("L0.mlp_in", "blocks.0.fc1.weight"),
        ("L1.mlp_out", "blocks.1.fc2.weight"),
        ("head", "lm_head.weight"),
    ):
        g = _per_sample_grads(m, x, y, pname)
        k_oracle = g @ g.T
        ev = torch.linalg.eigvalsh(k_oracle)
        pos = ev[ev > 1e-10 * ev.max()]
        got = R.observe(m, x, y, [obs_sites[site]])[site]
        assert math.isclose(got["fisher_lmin"], float(pos.min()), rel_tol=1e-8)
        assert math.isclose(got["fisher_logdet"], float(torch.log(pos).mean()), rel_tol=1e-8, abs_tol=1e-10)
        assert got["fisher_rank"] == pos.numel()


def test_gram_forms_agree():
    torch.manual_seed(1)
    a, d = torch.randn(4, 7, 5, dtype=torch.float64), torch.randn(4, 7, 3, dtype=torch.float64)
    g = torch.einsum("nto,nti->noi", d, a).reshape(4, -1)
    torch.testing.assert_close(R.fisher_gram(a, d), g @ g.T)
    torch.testing.assert_close(R.fisher_gram_kernel(a, d), g @ g.T)


def test_activation_smin_and_dead_count_against_direct_computation():
    m, x, y = _model_and_batch()
    with torch.no_grad():
        m.blocks[1].fc1.weight[:3] = -10.0 * m.blocks[1].fc1.weight[:3].abs()  # 3 neurons negative everywhere?
        h0 = m.embed(x)
        h1 = m.blocks[0](h0)
        pre = m.blocks[1].fc1(h1)
        hid = torch.relu(pre)
        out1 = m.blocks[1](h1)
    obs = R.observe(m, x, y)
    s_np = np.linalg.svd(h1.reshape(-1, h1.shape[-1]).numpy(), compute_uv=False)
    assert math.isclose(obs["L1.mlp_in"]["act_smin"], float(s_np[-1]), rel_tol=1e-9)
    s_out = np.linalg.svd(out1.reshape(-1, out1.shape[-1]).numpy(), compute_uv=False)
    assert math.isclose(obs["L1.block"]["act_smin"], float(s_out[-1]), rel_tol=1e-9)
    mean_abs = hid.abs().reshape(-1, hid.shape[-1]).mean(0).numpy()
    expect = int((mean_abs < 1e-3 * np.median(mean_abs)).sum())
    assert obs["L1.mlp_out"]["dead"] == expect
    assert R.dead_count(torch.tensor([[0.0, 1.0, 2.0, 0.0, 3.0]])) == 2


def test_observe_leaves_the_model_alone():
    m, x, y = _model_and_batch()
    m = m.float()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    R.observe(m, x, y)
    assert all(v.dtype == torch.float32 for v in m.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


def test_fit_recovers_a_known_power_law():
    t = np.array([100, 200, 400, 800, 1600, 3200], float)
    y = 3.0 * t**-1.2 * np.exp(np.random.default_rng(0).normal(0, 0.01, t.size))
    f = R.fit_rate(t, y)
    assert abs(f["slope"] + 1.2) < 0.03 and abs(f["k"] - (1 - 0.6)) < 0.02
    assert f["r2"] > 0.99 and R.is_read(f)
    f2 = R.fit_rate(t, -0.7 * np.log(t) + 2.0, log_y=False)  # a mean log-eigenvalue
    assert abs(f2["slope"] + 0.7) < 1e-12 and R.is_read(f2)


def test_criterion_rejects_noise_and_constants():
    rng = np.random.default_rng(0)
    t = np.geomspace(100, 5000, 8)
    reads = sum(R.is_read(R.fit_rate(t, np.exp(rng.normal(0, 0.5, t.size)))) for _ in range(200))
    assert reads <= 4  # pure noise: at most ~2% false reads
    assert not R.is_read(R.fit_rate(t, np.full(t.size, 5.0)))  # constant (e.g. dead = 0)
    assert not R.is_read(R.fit_rate(t[:4], t[:4] ** -1.0))  # too few points
    # a power law only in the last points (a kink): unstable under dropping the first point
    y = np.where(t < 1000, 1.0, (t / 1000) ** -2.0)
    assert not R.is_read(R.fit_rate(t, y))


def test_fit_trajectory_counts_cells():
    hist = [
        {"step": s, "obs": {"a": {"act_smin": max(s, 1) ** -0.5, "dead": 0}}} for s in (0, 10, 20, 40, 80, 160, 320)
    ]
    fits = R.fit_trajectory(hist)
    assert fits["a"]["act_smin"]["read"] == {"main": True, "loose": True, "strict": True}
    assert R.count_read(fits) == (1, 2)
