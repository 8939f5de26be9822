"""Norm-channel scale gauges of equiopt.ddc (issue #14): discovery by hooks and a float64
probe, trajectory equivariance with the norm scales together with the neuron scales, head
shift and rotations, the overlap of a neuron gauge (rows) and a norm gauge (columns), the
orbit coordinate, fast == reference, state_dict.

Oracles are independent of equiopt.ddc: the gauge transformations are written out on named
parameters; AdamW is torch.optim.AdamW, Muon is equiopt's ``muon`` preset. float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_ddc import (
    FAIL,
    OPTS,
    TOL,
    _ns,
    batches,
    bf16_rounded_steps,
    llama,
    load,
    qwen3,
    qwen_elements,
    qwen_loss,
    qwen_transform,
    rel_err,
    snapshot,
    trajectory,
)
from torch import nn

import equiopt
from equiopt import ddc
from equiopt.ddc import NormGauge, balance, configure, ddc_optimizer, describe, gauge_table, norm_readers, probe_norm
from equiopt.groups import Factor
from equiopt.polar import newton_schulz


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------
class LNBlock(nn.Module):
    """pre-LayerNorm (gain + bias) residual block read by two Linears: a ReLU MLP whose
    in-projection (no bias) is in a neuron gauge (rows) and the norm gauge (columns), and a
    side projection with a bias (columns only)."""

    def __init__(self, d, h):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, h, bias=False)
        self.fc2 = nn.Linear(h, d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        y = self.ln(x)
        return x + self.fc2(torch.relu(self.fc1(y))) + self.proj(y)


class LNLM(nn.Module):
    def __init__(self, V=32, d=16, h=24, L=2, tied=False):
        super().__init__()
        self.embed = nn.Embedding(V, d)
        self.blocks = nn.ModuleList([LNBlock(d, h) for _ in range(L)])
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, V, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.norm(x))

    def loss(self, ids):
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def ln_lm(seed=0, **kw):
    torch.manual_seed(seed)
    m = LNLM(**kw).double()
    with torch.no_grad():  # non-trivial gains and biases (LayerNorm starts at 1 and 0)
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return m


def gpt2(seed=0):
    """Tiny Hugging Face GPT-2 (float64, untied head, no dropout): LayerNorms read by Conv1D
    weights stored ``[in, out]`` (c_attn, c_fc), the final LayerNorm by the nn.Linear head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(cfg).double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    m.loss = lambda ids: qwen_loss(m, ids)
    return m


GPT2_NORMS = {"ln_1": "attn.c_attn", "ln_2": "mlp.c_fc"}


def gpt2_norm_transform(params, t, t_final, shift=None):
    """Norm-channel scales of GPT-2: gain and bias times ``t``, row ``j`` of the stored
    ``[in, out]`` Conv1D reader divided by ``t_j``; the final norm against the head's columns
    (after the head's logit shift ``shift``, if given)."""
    out = dict(params)
    for i, ts in enumerate(t):
        for (norm, reader), tj in zip(GPT2_NORMS.items(), ts):
            p = f"transformer.h.{i}."
            for side in ("weight", "bias"):
                out[p + norm + "." + side] = params[p + norm + "." + side] * tj
            out[p + reader + ".weight"] = params[p + reader + ".weight"] / tj[:, None]
    for side in ("weight", "bias"):
        out["transformer.ln_f." + side] = params["transformer.ln_f." + side] * t_final
    head = params["lm_head.weight"] + (shift[None, :] if shift is not None else 0)
    out["lm_head.weight"] = head / t_final[None, :]
    return out


# ----------------------------------------------------------------------------------------
# gauge elements written out on named parameters (the oracle)
# ----------------------------------------------------------------------------------------
QWEN_NORMS = {"input_layernorm": ("q_proj", "k_proj", "v_proj"), "post_attention_layernorm": ("gate_proj", "up_proj")}


def norm_scales(n_layers, n_norms, d, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [[Factor("scale").sample((1, d, 1), g)[0] for _ in range(n_norms)] for _ in range(n_layers)]


def qwen_norm_transform(params, t, t_final):
    out = dict(params)
    out["model.norm.weight"] = params["model.norm.weight"] * t_final
    out["lm_head.weight"] = params["lm_head.weight"] / t_final[None, :]  # after the shift, if any
    for i, ts in enumerate(t):
        for (norm, readers), tj in zip(QWEN_NORMS.items(), ts):
            p = f"model.layers.{i}."
            out[p + norm + ".weight"] = params[p + norm + ".weight"] * tj
            for r in readers:
                mod = "self_attn." if r.endswith(("q_proj", "k_proj", "v_proj")) else "mlp."
                name = p + mod + r + ".weight"
                out[name] = out[name] / tj[None, :]  # out: the neuron rescale may act on the rows too
    return out


def ln_transform(params, el, which):
    out = dict(params)
    for i, (s, t) in enumerate(zip(el["rescale"], el["norm"])):
        p = f"blocks.{i}."
        if "rescale" in which:
            out[p + "fc1.weight"] = out[p + "fc1.weight"] * s[:, None]
            out[p + "fc2.weight"] = out[p + "fc2.weight"] / s[None, :]
        if "norm" in which:
            out[p + "ln.weight"] = out[p + "ln.weight"] * t
            out[p + "ln.bias"] = out[p + "ln.bias"] * t
            out[p + "fc1.weight"] = out[p + "fc1.weight"] / t[None, :]
            out[p + "proj.weight"] = out[p + "proj.weight"] / t[None, :]
    if "shift" in which:
        out["lm_head.weight"] = out["lm_head.weight"] + el["shift"][None, :]
    if "norm" in which:  # the final LayerNorm, read by the (translated) head
        out["norm.weight"] = out["norm.weight"] * el["final"]
        out["norm.bias"] = out["norm.bias"] * el["final"]
        out["lm_head.weight"] = out["lm_head.weight"] / el["final"][None, :]
    return out


def norm_equivariance_error(kind, make_opt, which, seed=0):
    """max over 10 steps of ||T(theta_t) - theta'_t|| / ||theta'_t||, theta'_0 = T(theta_0)."""
    if kind in ("qwen3", "llama"):
        a = qwen3(seed) if kind == "qwen3" else llama(seed)
        el = qwen_elements(a)
        t = norm_scales(a.config.num_hidden_layers, 2, a.config.hidden_size)
        t_final = norm_scales(1, 1, a.config.hidden_size, seed=4)[0][0]

        def T(ps):
            ps = qwen_transform(ps, el, [w for w in which if w != "norm"], a.config)
            return qwen_norm_transform(ps, t, t_final) if "norm" in which else ps

        V = a.config.vocab_size
    elif kind == "gpt2":
        a = gpt2(seed)
        t = norm_scales(2, 2, 16)
        t_final = norm_scales(1, 1, 16, seed=4)[0][0]
        shift = Factor("shift", "rows").sample((1, 64, 16), torch.Generator().manual_seed(2))[0]
        T = lambda ps: gpt2_norm_transform(ps, t, t_final, shift if "shift" in which else None)  # noqa: E731
        V = 64
    else:
        a = ln_lm(seed)
        g = torch.Generator().manual_seed(2)
        el = {
            "rescale": [Factor("scale").sample((1, 24, 1), g)[0] for _ in a.blocks],
            "norm": [Factor("scale").sample((1, 16, 1), g)[0] for _ in a.blocks],
            "shift": Factor("shift", "rows").sample((1, 32, 16), g)[0],
            "final": Factor("scale").sample((1, 16, 1), g)[0],
        }
        T = lambda ps: ln_transform(ps, el, which)  # noqa: E731
        V = 32
    b = copy.deepcopy(a)
    if kind in ("qwen3", "llama", "gpt2"):
        b.loss = lambda ids: qwen_loss(b, ids)
    load(b, T(snapshot(a)))
    data = batches(V)
    with torch.no_grad():  # the transformation is a symmetry of the function
        assert abs(a.loss(data[0]).item() - b.loss(data[0]).item()) < 1e-12
    ta, tb = trajectory(a, make_opt, data), trajectory(b, make_opt, data)
    return max(rel_err(T(x), y) for x, y in zip(ta, tb))


# ----------------------------------------------------------------------------------------
# discovery: hooks find the direct readers, the float64 probe verifies the gauge
# ----------------------------------------------------------------------------------------
def test_hooks_find_the_readers_on_qwen3():
    m = qwen3()
    found = norm_readers(copy.deepcopy(m), torch.randint(0, 64, (2, 8)))
    p = "model.layers.0."
    assert found[p + "input_layernorm"] == [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"]
    assert found[p + "post_attention_layernorm"] == [p + "mlp.gate_proj", p + "mlp.up_proj"]
    assert found["model.norm"] == ["lm_head"]  # through HF's no-op slice hidden_states[:, 0:]
    assert found[p + "self_attn.q_norm"] == []  # read by RoPE / attention, not by a Linear
    ids = torch.randint(0, 64, (2, 8))
    for norm, readers in found.items():
        if readers:
            assert probe_norm(m, norm, readers, ids) < 1e-14, norm
    # a reader left out is caught by the probe
    assert probe_norm(m, p + "input_layernorm", [p + "self_attn.q_proj", p + "self_attn.k_proj"], ids) > 1e-3
    opt = ddc_optimizer(m, "adam")
    gauges = {g.name: g for g in opt.gauges if isinstance(g, NormGauge)}
    assert sorted(gauges) == sorted(
        [f"norm_scale:model.layers.{i}.{n}" for i in range(2) for n in QWEN_NORMS] + ["norm_scale:model.norm"]
    )
    assert gauges["norm_scale:model.norm"].names == ("model.norm.weight", "lm_head.weight")
    assert "no linear map (nn.Linear, a weight stored [in, out]) reads" in describe(opt)  # q_norm / k_norm


def test_probe_rejects_the_tied_head():
    """The final norm's only reader is the head, tied to the embedding: scaling its columns
    scales the embedding's too, so the probe fails and the gauge is not claimed (correct:
    with a tied head there is no norm-channel gauge on the final norm)."""
    m = ln_lm(tied=True)
    ids = torch.randint(0, 32, (2, 8))
    assert norm_readers(copy.deepcopy(m), ids)["norm"] == ["lm_head"]
    assert probe_norm(m, "norm", ["lm_head"], ids) > 1e-3
    opt = ddc_optimizer(m, "adam")
    names = {g.name for g in opt.gauges}
    assert "norm_scale:norm" not in names and "norm_scale:blocks.0.ln" in names
    row = next(line for line in describe(opt).splitlines() if line.startswith("norm.weight"))
    assert "norm-channel probe failed" in row


def test_conv1d_readers_found_and_probed_on_gpt2():
    """GPT-2's LayerNorms are read by Conv1D weights stored [in, out]: the hooks find them
    (the plan's layout marks them transposed), the probe scales their stored rows, and the
    gauges are claimed with the readers' rows as the scaled side."""
    m = gpt2()
    ids = torch.randint(0, 64, (2, 8))
    p = "transformer.h.0."
    conv = {p + "attn.c_attn", p + "mlp.c_fc", "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"}
    found = norm_readers(copy.deepcopy(m), ids, transposed=conv)
    assert found[p + "ln_1"] == [p + "attn.c_attn"] and found[p + "ln_2"] == [p + "mlp.c_fc"]
    assert found["transformer.ln_f"] == ["lm_head"]
    assert norm_readers(copy.deepcopy(m), ids)[p + "ln_1"] == []  # nn.Linear only
    assert probe_norm(m, p + "ln_1", [p + "attn.c_attn"], ids, transposed={p + "attn.c_attn"}) < 1e-14
    opt = ddc_optimizer(m, "adam")
    gauges = {g.name: g for g in opt.gauges if isinstance(g, NormGauge)}
    assert sorted(gauges) == sorted(
        [f"norm_scale:transformer.h.{i}.{n}" for i in range(2) for n in GPT2_NORMS] + ["norm_scale:transformer.ln_f"]
    )
    assert gauges[f"norm_scale:{p}ln_1"].reader_sides == ("row",)
    assert gauges["norm_scale:transformer.ln_f"].reader_sides == ("col",)


def test_muon_shape_factor_of_conv1d_weights_is_the_logical_one():
    """DDC-Muon on a Conv1D weight outside every gauge (GPT-2's mlp.c_proj, stored [64, 16],
    the logical [out, in] = [16, 64] matrix): Muon's factor sqrt(max(1, out/in)) = 1, as the
    ``muon`` preset reads the layout; the stored shape would give 2. Oracle: Newton-Schulz of
    the logical momentum by the test's own loop (test_ddc._ns), float64, one step."""
    m = gpt2()
    name = "transformer.h.0.mlp.c_proj.weight"
    w0 = m.get_parameter(name).detach().clone()
    opt = ddc_optimizer(m, "muon", lr=2e-2, weight_decay=1e-3)
    assert "none: base rule" in next(line for line in describe(opt).splitlines() if line.startswith(name))
    m.loss(batches(64, 1)[0]).backward()
    g = m.get_parameter(name).grad.detach().clone()
    opt.step()
    logical = _ns(g.T + 0.95 * g.T) * max(1.0, 16 / 64) ** 0.5  # Nesterov momentum after one step
    expected = w0 * (1 - 2e-2 * 1e-3) - 2e-2 * logical.T
    got = m.get_parameter(name).detach()
    assert ((got - expected).norm() / (expected - w0).norm()).item() < 1e-10
    stored = w0 * (1 - 2e-2 * 1e-3) - 2e-2 * 2.0 * logical.T  # the stored-shape factor: fails
    assert ((got - stored).norm() / (stored - w0).norm()).item() > 0.4


class OnePlusNorm(nn.Module):
    """Gemma-style RMSNorm with gain ``1 + w``: scaling ``w`` is not a channel scale."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.full((d,), 0.3))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_probe_rejects_a_one_plus_w_gain():
    m = ln_lm()
    m.norm = OnePlusNorm(16).double()
    opt = ddc_optimizer(m, "adam")
    assert "norm_scale:norm" not in {g.name for g in opt.gauges}
    assert "norm-channel probe failed" in describe(opt)


# ----------------------------------------------------------------------------------------
# trajectory equivariance (10 steps, float64), and optimizers that fail it
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", [("norm",), ("norm", "rescale", "shift")])
@pytest.mark.parametrize("opt", ["ddc_adam", "ddc_muon"])
def test_layernorm_model_equivariant(opt, which):
    """LayerNorm gain + bias, an overlapped reader (fc1: neuron rows, norm columns), a
    column-only reader with a bias, the final norm read by the translated head."""
    assert norm_equivariance_error("ln", OPTS[opt], which) < TOL


def test_qwen3_norm_gauges_equivariant():
    assert norm_equivariance_error("qwen3", OPTS["ddc_adam"], ("norm", "rescale", "shift")) < TOL
    assert norm_equivariance_error("qwen3", OPTS["ddc_muon"], ("norm", "rescale", "shift", "rotation")) < TOL


@pytest.mark.parametrize("opt", ["ddc_adam", "ddc_muon"])
def test_gpt2_conv1d_norm_gauges_equivariant(opt):
    """Norm-channel scales on Conv1D readers (stored rows) with the logit shift of the head."""
    assert norm_equivariance_error("gpt2", OPTS[opt], ("norm", "shift")) < TOL


def test_baselines_fail_norm_gauges():
    for kind in ("ln", "qwen3", "gpt2"):
        assert norm_equivariance_error(kind, OPTS["adamw"], ("norm",)) > FAIL
        assert norm_equivariance_error(kind, OPTS["muon"], ("norm",)) > FAIL


def test_rotation_rows_with_norm_columns():
    """V rows (V/O rotation) and Q/K rows (RoPE-plane rotation) with columns in the input
    norm's gauge (tiny Llama, no q/k norm): per-column radii are invariant under the left
    orthogonal action, so x = G diag(c) rotates with G and the polar map stays equivariant."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 8, generator=g, dtype=torch.float64)
    G = torch.randn(16, 8, generator=g, dtype=torch.float64)
    R = Factor("orth").sample((2, 8, 1), g)  # two heads of 8 rows
    Q = torch.block_diag(R[0], R[1])
    t = Factor("scale").sample((1, 8, 1), g)[0]
    W2, G2 = Q @ W / t[None, :], Q @ G * t[None, :]
    x, x2 = G * W.norm(dim=0), G2 * W2.norm(dim=0)
    assert (x2 - Q @ x).norm() / x.norm() < 1e-14
    assert (newton_schulz(x2, 5) - Q @ newton_schulz(x, 5)).norm() / x.norm() < 1e-12
    # the Lean per-row radius is not invariant under the column action
    rho, rho2 = W.norm(dim=1, keepdim=True), W2.norm(dim=1, keepdim=True)
    assert ((rho2 * G2) - Q @ (rho * G)).norm() / (rho * G).norm() > 1e-2
    names = {g.name for g in ddc_optimizer(llama(), "muon").gauges}
    assert {"qk_rope_rotation:model.layers.0.self_attn", "norm_scale:model.layers.0.input_layernorm"} <= names
    which = ("norm", "rescale", "shift", "rotation", "qk")
    assert norm_equivariance_error("llama", OPTS["ddc_muon"], which) < TOL
    assert norm_equivariance_error("llama", OPTS["ddc_adam"], ("norm", "rescale", "shift")) < TOL
    assert norm_equivariance_error("llama", OPTS["ddc_adam"], ("norm", "qk")) > FAIL  # Adam: no rotations


# ----------------------------------------------------------------------------------------
# orbit coordinate
# ----------------------------------------------------------------------------------------
def norm_orbit_drift(make_opt, steps=20):
    """max |psi_j(t) - psi_j(0)| over the input norms' channels and the final norm's, with
    psi_j = log|g_j| - 1/k sum_r log||W_r[:, j]|| (k readers; the head's columns centered):
    the gauge moves psi_j by 2 log t_j."""
    m = qwen3()

    def coord():
        out = []
        for i in range(2):
            p = f"model.layers.{i}."
            g = m.get_parameter(p + "input_layernorm.weight").detach()
            cols = [
                m.get_parameter(p + f"self_attn.{r}.weight").detach().norm(dim=0).log()
                for r in "qkv"
                for r in [r + "_proj"]
            ]
            out.append(g.abs().log() - sum(cols) / 3)
        head = m.lm_head.weight.detach()
        out.append(m.model.norm.weight.detach().abs().log() - (head - head.mean(0)).norm(dim=0).log())
        return torch.stack(out)

    c0 = coord()
    opt = make_opt(m)
    for ids in batches(64, steps):
        opt.zero_grad()
        m.loss(ids).backward()
        opt.step()
    return (coord() - c0).abs().max().item()


def test_norm_orbit_coordinate_conserved_to_second_order():
    """Weight decay scales every side alike and the radial step is orthogonal to the
    weighted orbit direction (gain 1, readers 1/k), so only the tangential steps move psi,
    O(lr^2) per step: halving lr divides the drift by ~4; under AdamW it is O(lr): ~2."""
    lr = 4e-3
    d1 = norm_orbit_drift(lambda m: ddc_optimizer(m, "adam", lr=lr))
    d2 = norm_orbit_drift(lambda m: ddc_optimizer(m, "adam", lr=lr / 2))
    a1 = norm_orbit_drift(lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.1))
    a2 = norm_orbit_drift(lambda m: torch.optim.AdamW(m.parameters(), lr=lr / 2, weight_decay=0.1))
    assert 3.0 < d1 / d2 < 5.0, (d1, d2)
    assert 1.5 < a1 / a2 < 2.5, (a1, a2)
    assert a1 > 20 * d1, (a1, d1)


def overlap_orbit_drift(make_opt, steps=20):
    """The post-attention norms of Qwen3 (readers gate and up; up's rows in the neuron gauge):
    psi_j = log|g_j| - 1/2 (log||gate[:, j]|| + mean_i log R_ij - mean_i log||down[:, i]||) with
    R = r c^T the balanced radius of up; subtracting the down columns removes the neuron
    gauge's radial motion (it moves up's rows and down's columns alike)."""
    m = qwen3()

    def coord():
        out = []
        for i in range(2):
            p = f"model.layers.{i}."
            g = m.get_parameter(p + "post_attention_layernorm.weight").detach()
            gate, up, down = (m.get_parameter(p + f"mlp.{n}_proj.weight").detach() for n in ("gate", "up", "down"))
            r, c = balance(up)
            side = (r[:, None] * c[None, :]).log().mean(0) - down.norm(dim=0).log().mean()
            out.append(g.abs().log() - (gate.norm(dim=0).log() + side) / 2)
        return torch.cat(out)

    c0 = coord()
    opt = make_opt(m)
    for ids in batches(64, steps):
        opt.zero_grad()
        m.loss(ids).backward()
        opt.step()
    return (coord() - c0).abs().max().item()


def test_overlapped_orbit_coordinate_without_weight_decay():
    """Without weight decay the overlapped coordinate moves O(lr^2) (measured ratio 3.8 at
    lr/2, AdamW 1.9 and ~900x larger). With weight decay the shrink of ``up`` counts once for
    the matrix but in both gauges' bookkeeping, so this weight-only coordinate then moves by
    lr wd / 2 per step: a prescribed motion, the same at every point of the orbit (still
    equivariant), measured 4.4e-3 over 20 steps at lr 4e-3, wd 0.1 (docs/ddc.md)."""
    lr = 4e-3
    d1 = overlap_orbit_drift(lambda m: ddc_optimizer(m, "adam", lr=lr, weight_decay=0.0))
    d2 = overlap_orbit_drift(lambda m: ddc_optimizer(m, "adam", lr=lr / 2, weight_decay=0.0))
    a1 = overlap_orbit_drift(lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0))
    assert 3.0 < d1 / d2 < 5.0, (d1, d2)
    assert a1 > 100 * d1, (a1, d1)


# ----------------------------------------------------------------------------------------
# plumbing: fast path == reference path, state_dict, state size
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "muon"])
@pytest.mark.parametrize("kind", ["ln", "qwen3", "gpt2"])
def test_fast_path_equals_reference_with_norms(base, kind):
    make = {"ln": ln_lm, "qwen3": qwen3, "gpt2": gpt2}[kind]
    a, b = make(), make()
    oa = configure(ddc_optimizer(a, base, lr=1e-2), stack_adam_gauges=True)
    ob = configure(ddc_optimizer(b, base, lr=1e-2), batched=False)
    assert any(isinstance(g, NormGauge) for g in oa.gauges)
    for ids in batches(32 if kind == "ln" else 64, 6):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m.loss(ids).backward()
            o.step()
    assert rel_err(snapshot(a), snapshot(b)) < 1e-12
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.allclose(sa[i][k], sb[i][k], rtol=1e-9, atol=1e-12), (i, k)


@pytest.mark.parametrize("base", ["adam", "muon"])
def test_fast_path_in_row_chunks_equals_reference(base, monkeypatch):
    """The fast path's two-pass row-chunked Adam units (and chunked AdamW) with chunks of 40
    elements, so every weight is split: equal to the reference to 1e-12 (float64, Qwen3)."""
    monkeypatch.setattr(ddc, "_CHUNK", 40)
    a, b = qwen3(), qwen3()
    oa, ob = ddc_optimizer(a, base, lr=1e-2), configure(ddc_optimizer(b, base, lr=1e-2), batched=False)
    for ids in batches(64, 4):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m.loss(ids).backward()
            o.step()
    assert rel_err(snapshot(a), snapshot(b)) < 1e-12
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.allclose(sa[i][k], sb[i][k], rtol=1e-9, atol=1e-12), (i, k)


@pytest.mark.parametrize("ncol", [12, 9])
def test_schur_by_conjugate_gradients_equals_the_dense_solve(ncol):
    """The fast path solves the overlap's Schur system by conjugate gradients; the
    coefficients equal the dense solve's to 1e-12 (float64; all columns gauged, null vector
    deflated, and a trailing ungauged column), also for a stack of matrices."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(20, 12, generator=g, dtype=torch.float64) * torch.rand(20, 1, generator=g, dtype=torch.float64)
    r, c = balance(W)
    Wh = W / (r[:, None] * c[None, :])
    U = torch.randn(20, 12, generator=g, dtype=torch.float64)
    a1, b1 = ddc._orbit_coeffs(U, Wh, ncol)
    a2, b2 = ddc._orbit_coeffs(U, Wh, ncol, iterative=True)
    assert rel_err({"a": a1, "b": b1}, {"a": a2, "b": b2}) < 1e-12
    # stacked (the fast path's equal-shape units): balance and the coefficients per member
    W3 = torch.stack([W, W.flip(0) * 3.0])
    r3, c3 = balance(W3)
    assert torch.allclose(r3[0][:, None] * c3[0][None, :], r[:, None] * c[None, :], rtol=1e-12, atol=0)
    Wh3 = W3 / (r3[..., :, None] * c3[..., None, :])
    U3 = torch.stack([U, U.flip(1)])
    a3, b3 = ddc._orbit_coeffs(U3, Wh3, ncol, iterative=True)
    for k in range(2):
        ak, bk = ddc._orbit_coeffs(U3[k], Wh3[k], ncol)
        assert rel_err({"a": ak, "b": bk}, {"a": a3[k], "b": b3[k]}) < 1e-12


def test_balance_tolerance_follows_the_dtype():
    """float32 weights are balanced to float32's epsilon (float64 ones to 1e-15): the
    factors agree with the float64 balancing to float32 rounding."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(30, 10, generator=g, dtype=torch.float64) * torch.rand(30, 1, generator=g, dtype=torch.float64)
    r64, c64 = balance(W)
    r32, c32 = balance(W.float())
    R64, R32 = r64[:, None] * c64[None, :], (r32[:, None] * c32[None, :]).double()
    assert ((R32 - R64).abs() / R64).max() < 1e-6


@pytest.mark.parametrize("base", ["adam", "muon"])
def test_state_dict_round_trip_with_norms(base):
    data = batches(64, 6)
    m = qwen3()
    opt = ddc_optimizer(m, base)
    for ids in data[:3]:
        opt.zero_grad()
        m.loss(ids).backward()
        opt.step()
    m2 = copy.deepcopy(m)
    m2.loss = lambda ids: qwen_loss(m2, ids)
    opt2 = ddc_optimizer(m2, base)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for model, o in ((m, opt), (m2, opt2)):
        for ids in data[3:]:
            o.zero_grad()
            model.loss(ids).backward()
            o.step()
    for (n, p), q in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
    gain = opt.state[m.model.norm.weight]
    assert gain["radial_exp_avg"].shape == (32,) and "col_radial_exp_avg" in opt.state[m.lm_head.weight]


@pytest.mark.parametrize("base", ["adam", "muon"])
def test_stacked_state_views_survive_reloading(base):
    """The fast path keeps the moments of a stack of units as one buffer with the parameters'
    state entries as views of it (no per-step stacking): reloading an optimizer's own state
    mid-run, or replacing its entries by copies (new tensors: re-stacked at the next step),
    leaves the trajectory and the state bitwise unchanged."""
    data = batches(64, 6)
    a, b = qwen3(), qwen3()
    oa, ob = ddc_optimizer(a, base), ddc_optimizer(b, base)
    for i, ids in enumerate(data):
        if i == 3:
            ob.load_state_dict(copy.deepcopy(ob.state_dict()))
        if i == 4:  # entries replaced in the same state dicts
            for st in ob.state.values():
                st.update({k: t.clone() for k, t in st.items()})
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m.loss(ids).backward()
            o.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert any(t._base is not None for s in ob.state.values() for t in s.values())  # views of stacks


@pytest.mark.parametrize("base", ["adam", "muon"])
def test_stacked_state_views_when_a_bucket_changes(base):
    """A stacked member without a gradient on one step is stepped alone (its bucket changes,
    the others are re-stacked): fast == reference to 1e-12, and stale kept stacks are dropped."""
    a, b = qwen3(), qwen3()
    oa, ob = ddc_optimizer(a, base, lr=1e-2), configure(ddc_optimizer(b, base, lr=1e-2), batched=False)
    counts = []
    for i, ids in enumerate(batches(64, 6)):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m.loss(ids).backward()
            if i in (2, 3):
                m.model.layers[0].self_attn.k_proj.weight.grad = None
            o.step()
        counts.append(len(oa._stacks))
    assert rel_err(snapshot(a), snapshot(b)) < 1e-12
    assert counts[-1] == counts[1] and max(counts) <= counts[1] + 1, counts


def test_state_size_counts_every_side():
    m = ln_lm()
    opt = ddc_optimizer(m, "adam")
    for ids in batches(32, 1):
        m.loss(ids).backward()
        opt.step()
    radial = sum(t.numel() for s in opt.state.values() for k, t in s.items() if "radial_" in k)
    # 2 neuron gauges x 24 modes; 2 block norms x 16 channels x (gain + fc1 + proj); final norm x (gain + head)
    assert radial == opt.state_modes() == 2 * (2 * 24 + 2 * 16 * 3 + 16 * 2)


def test_bf16_params_with_norm_gauges():
    """bf16 parameters: the scaling-gauge units work on float32 copies, state is float32, the
    parameters keep their dtype; equal to a float32 run that rounds to bf16 after each step."""
    torch.manual_seed(0)
    m16 = LNLM().to(torch.bfloat16)
    m32 = copy.deepcopy(m16).float()
    o16, o32 = ddc_optimizer(m16, "muon", lr=1e-2), ddc_optimizer(m32, "muon", lr=1e-2)
    assert any(isinstance(g, NormGauge) for g in o16.gauges)
    bf16_rounded_steps(m16, m32, o16, o32)
    for p16, p32 in zip(m16.parameters(), m32.parameters()):
        assert p16.dtype == torch.bfloat16 and torch.equal(p16.float(), p32)
    assert all(t.dtype == torch.float32 for st in o16.state.values() for k, t in st.items())


def test_biased_overlap_is_declined_with_a_reason():
    """A LayerNorm read by a ReLU in-projection with a bias: the norm gauge is not claimed
    (the balanced radius of [W | b] is undefined for a zero bias), the neuron gauge is kept."""
    m = ln_lm()
    for blk in m.blocks:
        blk.fc1 = nn.Linear(16, 24).double()
    opt = ddc_optimizer(m, "adam")
    names = {g.name for g in opt.gauges}
    assert "neuron_rescale:blocks.0" in names and "norm_scale:blocks.0.ln" not in names
    assert "norm_scale:norm" in names  # the final norm (head) is unaffected
    row = next(line for line in describe(opt).splitlines() if line.startswith("blocks.0.ln.weight"))
    assert "has a bias and its rows are in neuron_rescale:blocks.0" in row


def test_gauge_table_lists_norm_gauges():
    m = qwen3()
    text = gauge_table(equiopt.plan(m, "adamw"), m, "muon")
    assert "norm_scale:model.layers.0.input_layernorm (gain)" in text
    assert "neuron_rescale:model.layers.0.mlp (rows); norm_scale:model.layers.0.post_attention_layernorm (cols)" in text
    assert "norm_scale:model.norm (cols)" in text and "logit_shift (rows)" in text
