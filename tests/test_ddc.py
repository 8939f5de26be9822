"""Dead-Direction Conditioners (equiopt.ddc): trajectory equivariance under the claimed
gauges, orbit-coordinate conservation, base-rule equality off the gauges, torch plumbing.

Oracles are independent of equiopt.ddc: the gauge transformations are written out on named
parameters, AdamW is torch.optim.AdamW, Muon is equiopt's ``muon`` preset or a loop here.
Everything runs in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import equiopt
from equiopt import ddc
from equiopt.ddc import DDCOptimizer, RescaleGauge, balance, configure, ddc_optimizer, probe_rescale
from equiopt.groups import Factor

STEPS = 10
TOL = 1e-10  # float64 trajectory after 10 steps; measured ~1e-14
FAIL = 1e-3


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------
class ReluMLP(nn.Module):
    def __init__(self, d, h, act=None):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.act = act or nn.ReLU()
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TinyLM(nn.Module):
    """embedding -> residual ReLU MLPs -> untied head: every gauge is disjoint."""

    def __init__(self, V=32, d=16, h=24, L=2, act=None, tied=False):
        super().__init__()
        self.embed = nn.Embedding(V, d)
        self.blocks = nn.ModuleList([ReluMLP(d, h, act) for _ in range(L)])
        self.lm_head = nn.Linear(d, V, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = x + b(x)
        return self.lm_head(x)

    def loss(self, ids):
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def relu_lm(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw).double()


def qwen3(seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    m = Qwen3ForCausalLM(cfg).double()
    m.loss = lambda ids: qwen_loss(m, ids)
    return m


def llama(seed=0):
    """RoPE attention without q/k norm gains: the RoPE-plane rotations are a gauge here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    m = LlamaForCausalLM(cfg).double()
    m.loss = lambda ids: qwen_loss(m, ids)
    return m


def qwen_loss(m, ids):
    """next-token CE in float64 (HF's loss_function upcasts logits to float32, which would
    put 1e-7 rounding into the shift-gauge comparison)."""
    logits = m(input_ids=ids[:, :-1]).logits
    assert logits.dtype == torch.float64
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batches(V, n=STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (4, 12), generator=g) for _ in range(n)]


# ----------------------------------------------------------------------------------------
# gauge transformations written out on named parameters (the oracle)
# ----------------------------------------------------------------------------------------
def relu_elements(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    h = model.blocks[0].fc1.out_features
    V, d = model.lm_head.weight.shape
    return {
        "rescale": [Factor("scale").sample((1, h, 1), g)[0] for _ in model.blocks],
        "shift": Factor("shift", "rows").sample((1, V, d), g)[0],
    }


def relu_transform(params, el, which):
    out = dict(params)
    if "rescale" in which:
        for i, s in enumerate(el["rescale"]):
            p = f"blocks.{i}."
            out[p + "fc1.weight"] = params[p + "fc1.weight"] * s[:, None]
            out[p + "fc1.bias"] = params[p + "fc1.bias"] * s
            out[p + "fc2.weight"] = params[p + "fc2.weight"] / s[None, :]
    if "shift" in which:
        out["lm_head.weight"] = params["lm_head.weight"] + el["shift"][None, :]
    return out


def qwen_elements(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    L, h, hd, hkv = cfg.num_hidden_layers, cfg.intermediate_size, cfg.head_dim, cfg.num_key_value_heads
    return {
        "rescale": [Factor("scale").sample((1, h, 1), g)[0] for _ in range(L)],
        "shift": Factor("shift", "rows").sample((1, cfg.vocab_size, cfg.hidden_size), g)[0],
        "rotation": [Factor("orth").sample((hkv, hd, 1), g) for _ in range(L)],
        "qk": [Factor("rope_rotation").sample((hkv, hd, 1), g) for _ in range(L)],
    }


def qwen_transform(params, el, which, cfg):
    out = dict(params)
    hd, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        if "rescale" in which:
            s = el["rescale"][i]
            out[p + "mlp.up_proj.weight"] = params[p + "mlp.up_proj.weight"] * s[:, None]
            out[p + "mlp.down_proj.weight"] = params[p + "mlp.down_proj.weight"] / s[None, :]
        if "rotation" in which:
            R = el["rotation"][i]
            v = params[p + "self_attn.v_proj.weight"].clone()
            o = params[p + "self_attn.o_proj.weight"].clone()
            for j in range(hkv):
                v[j * hd : (j + 1) * hd] = R[j] @ v[j * hd : (j + 1) * hd]
            for q in range(hq):
                j = q // (hq // hkv)
                o[:, q * hd : (q + 1) * hd] = o[:, q * hd : (q + 1) * hd] @ R[j].T
            out[p + "self_attn.v_proj.weight"] = v
            out[p + "self_attn.o_proj.weight"] = o
        if "qk" in which:  # same RoPE-plane rotation on every query head of kv group j and on K_j
            R = el["qk"][i]
            q = params[p + "self_attn.q_proj.weight"].clone()
            k = params[p + "self_attn.k_proj.weight"].clone()
            for j in range(hkv):
                k[j * hd : (j + 1) * hd] = R[j] @ k[j * hd : (j + 1) * hd]
            for h in range(hq):
                j = h // (hq // hkv)
                q[h * hd : (h + 1) * hd] = R[j] @ q[h * hd : (h + 1) * hd]
            out[p + "self_attn.q_proj.weight"] = q
            out[p + "self_attn.k_proj.weight"] = k
    if "shift" in which:
        out["lm_head.weight"] = params["lm_head.weight"] + el["shift"][None, :]
    return out


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def load(model, params):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])


def rel_err(a, b):
    num = sum(((a[n] - b[n]) ** 2).sum() for n in b)
    den = sum((b[n] ** 2).sum() for n in b)
    return math.sqrt(num / den)


def trajectory(model, make_opt, data, snap=True):
    opt = make_opt(model)
    traj = []
    for ids in data:
        opt.zero_grad()
        model.loss(ids).backward()
        opt.step()
        traj.append(snapshot(model))
    return traj


def bf16_rounded_steps(m16, m32, o16, o32, steps=3, seed=7):
    """``steps`` steps of a bf16 model and of its float32 copy on the same random bf16 gradients,
    the float32 weights rounded to bf16 after each step (the reference of a bf16 step)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p16, p32 in zip(m16.parameters(), m32.parameters()):
            gr = (torch.randn(p16.shape, generator=g) * 0.1).to(torch.bfloat16)
            p16.grad, p32.grad = gr, gr.float()
        o16.step()
        o32.step()
        with torch.no_grad():
            for p in m32.parameters():
                p.copy_(p.to(torch.bfloat16).float())


def equivariance_error(kind, make_opt, which, seed=0):
    """max over 10 steps of ||T(theta_t) - theta'_t|| / ||theta'_t|| where theta' starts at T(theta_0)."""
    if kind == "relu":
        a = relu_lm(seed)
        el = relu_elements(a)
        T = lambda ps: relu_transform(ps, el, which)  # noqa: E731
        V = a.lm_head.weight.shape[0]
    else:
        a = qwen3(seed) if kind == "qwen3" else llama(seed)
        el = qwen_elements(a)
        T = lambda ps: qwen_transform(ps, el, which, a.config)  # noqa: E731
        V = a.config.vocab_size
    b = copy.deepcopy(a)
    if kind != "relu":
        b.loss = lambda ids: qwen_loss(b, ids)
    load(b, T(snapshot(a)))
    data = batches(V)
    with torch.no_grad():  # the transformation is a symmetry of the function
        assert abs(a.loss(data[0]).item() - b.loss(data[0]).item()) < 1e-12
    ta, tb = trajectory(a, make_opt, data), trajectory(b, make_opt, data)
    return max(rel_err(T(x), y) for x, y in zip(ta, tb))


OPTS = {
    "ddc_adam": lambda m: ddc_optimizer(m, "adam", lr=1e-2),
    "ddc_muon": lambda m: ddc_optimizer(m, "muon"),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "muon": lambda m: equiopt.build(m, preset="muon"),
}


# ----------------------------------------------------------------------------------------
# gauges found
# ----------------------------------------------------------------------------------------
def test_gauges_found_relu_and_qwen3():
    opt = ddc_optimizer(relu_lm(), "adam")
    kinds = sorted(g.name for g in opt.gauges)
    assert kinds == ["logit_shift:lm_head.weight", "neuron_rescale:blocks.0", "neuron_rescale:blocks.1"]
    r = next(g for g in opt.gauges if isinstance(g, RescaleGauge))
    assert r.in_bias is not None and r.names == ("blocks.0.fc1.weight", "blocks.0.fc1.bias", "blocks.0.fc2.weight")
    q = qwen3()
    opt = ddc_optimizer(q, "muon")
    names = {g.name: g for g in opt.gauges}
    # SwiGLU: the probe picks the linear up projection, never the gate
    assert names["neuron_rescale:model.layers.0.mlp"].names == (
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    )
    assert "vo_rotation:model.layers.1.self_attn" in names
    # Qwen3's per-channel q_norm/k_norm gains break the RoPE-plane rotations: not claimed
    assert not any(n.startswith("qk_rope_rotation") for n in names)
    assert not any(g.kind == "rotation" for g in ddc_optimizer(q, "adam").gauges)


def test_probe_rejects_non_homogeneous():
    assert probe_rescale(ReluMLP(4, 6).double(), "fc1.weight", "fc2.weight", "fc1.bias") < 1e-14
    assert probe_rescale(ReluMLP(4, 6, nn.LeakyReLU(0.1)).double(), "fc1.weight", "fc2.weight", "fc1.bias") < 1e-14
    assert probe_rescale(ReluMLP(4, 6, nn.GELU()).double(), "fc1.weight", "fc2.weight", "fc1.bias") > 1e-3
    assert not any(g.kind == "rescale" for g in ddc_optimizer(relu_lm(act=nn.GELU()), "adam").gauges)


def test_plan_without_model_claims_no_rescale():
    m = relu_lm()
    with pytest.warns(UserWarning, match="rescale"):
        opt = ddc_optimizer(equiopt.plan(m, "adamw"), "adam")
    assert [g.kind for g in opt.gauges] == ["shift"]
    assert {g.kind for g in ddc_optimizer(equiopt.plan(m, "adamw"), "adam", model=m).gauges} == {"shift", "rescale"}


# ----------------------------------------------------------------------------------------
# trajectory equivariance
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", [("rescale",), ("shift",), ("rescale", "shift")])
def test_ddc_adam_relu_equivariant(which):
    assert equivariance_error("relu", OPTS["ddc_adam"], which) < TOL


@pytest.mark.parametrize("which", [("rescale",), ("rescale", "shift")])
def test_ddc_muon_relu_equivariant(which):
    assert equivariance_error("relu", OPTS["ddc_muon"], which) < TOL


def test_baselines_fail_relu_rescale():
    assert equivariance_error("relu", OPTS["adamw"], ("rescale", "shift")) > FAIL
    assert equivariance_error("relu", OPTS["muon"], ("rescale", "shift")) > FAIL


def test_ddc_adam_qwen3_equivariant():
    assert equivariance_error("qwen3", OPTS["ddc_adam"], ("rescale", "shift")) < TOL


def test_ddc_muon_qwen3_equivariant_with_rotations():
    assert equivariance_error("qwen3", OPTS["ddc_muon"], ("rescale", "shift", "rotation")) < TOL


def test_ddc_muon_llama_equivariant_with_rope_rotations():
    names = {g.name for g in ddc_optimizer(llama(), "muon").gauges}
    assert "qk_rope_rotation:model.layers.0.self_attn" in names
    assert equivariance_error("llama", OPTS["ddc_muon"], ("rescale", "shift", "rotation", "qk")) < TOL
    assert equivariance_error("llama", OPTS["ddc_adam"], ("qk",)) > FAIL  # Adam is not rotation-equivariant


def test_baselines_fail_qwen3():
    assert equivariance_error("qwen3", OPTS["adamw"], ("rescale", "shift")) > FAIL
    assert equivariance_error("qwen3", OPTS["muon"], ("rescale", "shift", "rotation")) > FAIL
    # AdamW is not rotation-equivariant either (plain Muon is: polar maps commute with them)
    assert equivariance_error("qwen3", OPTS["adamw"], ("rotation",)) > FAIL


# ----------------------------------------------------------------------------------------
# orbit coordinate
# ----------------------------------------------------------------------------------------
def orbit_drift(make_opt, steps=20):
    m = relu_lm()

    def coord():
        return torch.stack(
            [
                b.fc1.weight.detach().pow(2).sum(1).add(b.fc1.bias.detach() ** 2).log() / 2
                - b.fc2.weight.detach().pow(2).sum(0).log() / 2
                for b in m.blocks
            ]
        )

    c0 = coord()
    opt = make_opt(m)
    for ids in batches(32, steps):
        opt.zero_grad()
        m.loss(ids).backward()
        opt.step()
    return (coord() - c0).abs().max().item()


def test_orbit_coordinate_conserved_to_second_order():
    """Weight decay and the radial step scale both sides alike; only the tangential step
    moves log||A_i|| - log||B_i||, by 1/2 log((e^{2 dl} + lr^2 ||u_A||^2) / (e^{2 dl} + lr^2 ||u_B||^2))
    = O(lr^2) per step: halving lr divides the drift by ~4. Under AdamW it is O(lr): ~2."""
    assert_drift_orders(orbit_drift)


def assert_drift_orders(drift, lr=4e-3):
    """``drift(make_opt)``: the orbit coordinate's largest change after a run. DDC-Adam's is
    O(lr^2) (halving lr divides it by 3-5), AdamW's O(lr) (1.5-2.5) and 20x larger."""
    d1 = drift(lambda m: ddc_optimizer(m, "adam", lr=lr))
    d2 = drift(lambda m: ddc_optimizer(m, "adam", lr=lr / 2))
    a1 = drift(lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.1))
    a2 = drift(lambda m: torch.optim.AdamW(m.parameters(), lr=lr / 2, weight_decay=0.1))
    assert 3.0 < d1 / d2 < 5.0, (d1, d2)
    assert 1.5 < a1 / a2 < 2.5, (a1, a2)
    assert a1 > 20 * d1, (a1, d1)


# ----------------------------------------------------------------------------------------
# base rule off the gauges
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_no_gauge_is_adamw_bitwise(path):
    """Both paths are bit-identical to torch's AdamW: the reference path per tensor to the
    single-tensor AdamW, the fast path to the fused one (``fused=True``, the same kernel)."""
    m = relu_lm(act=nn.GELU(), tied=True)  # GELU: no rescale gauge; tied head: no shift
    ref = copy.deepcopy(m)
    opt = configure(ddc_optimizer(m, "adam", lr=1e-2), batched=path != "reference")
    assert opt.gauges == []
    mats = [p for p in ref.parameters() if p.ndim >= 2]
    vecs = [p for p in ref.parameters() if p.ndim < 2]
    torch_opt = torch.optim.AdamW(
        [{"params": mats, "weight_decay": 0.1}, {"params": vecs, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=False,
        fused=path == "fast",
    )
    for ids in batches(32):
        for model, o in ((m, opt), (ref, torch_opt)):
            o.zero_grad()
            model.loss(ids).backward()
            o.step()
        for (n, p), q in zip(m.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), n


def test_fused_adam_direction_is_adams_and_refuses_gapped_views():
    """The fast path's column-unit Adam (torch's fused kernel from ``p = 0``, ``lr = -1``)
    returns ``m_hat / (sqrt(v_hat) + eps)`` and updates the moments as Adam does (float64,
    explicit formula as the oracle); ``_fusable`` refuses row slices of a stack, which the
    kernel (it walks raw memory) would mix up, and takes contiguous and transposed tensors."""
    g = torch.Generator().manual_seed(0)
    x, m, v = (torch.randn(2, 6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    v = v.abs()
    group = {"betas": (0.9, 0.95), "eps": 1e-8}
    m_ref, v_ref = 0.9 * m + 0.1 * x, 0.95 * v + 0.05 * x * x
    u_ref = (m_ref / (1 - 0.9**3)) / ((v_ref / (1 - 0.95**3)).sqrt() + 1e-8)
    u = ddc._fused_adam_direction(x, m, v, torch.tensor(3.0), group)
    assert rel_err({"u": u, "m": m, "v": v}, {"u": u_ref, "m": m_ref, "v": v_ref}) < 1e-15
    assert ddc._fusable(x, m, v) and ddc._fusable(x.mT, m.mT, v.mT)
    assert not ddc._fusable(x[:, 1:4], m[:, 1:4], v[:, 1:4])
    assert not ddc._fusable(x, m.mT.contiguous().mT, v)  # equal values, another memory order


def _ns(x, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    X = x / x.norm().clamp_min(1e-7)
    t = X.shape[0] > X.shape[1]
    X = X.T if t else X
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if t else X


def test_no_gauge_muon_base_is_muon():
    m = relu_lm(act=nn.GELU(), tied=True)
    ref = copy.deepcopy(m)
    opt = ddc_optimizer(m, "muon", lr=2e-2, weight_decay=1e-3, adam_lr=3e-3, adam_weight_decay=0.1)
    bufs, adam = (
        {},
        torch.optim.AdamW(
            [
                {"params": [ref.embed.weight], "weight_decay": 0.1},
                {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=3e-3,
            betas=(0.9, 0.95),
            eps=1e-8,
            foreach=False,
        ),
    )
    muon_params = [p for n, p in ref.named_parameters() if p.ndim == 2 and n != "embed.weight"]
    for ids in batches(32):
        opt.zero_grad()
        m.loss(ids).backward()
        opt.step()
        adam.zero_grad()
        for p in muon_params:
            p.grad = None
        ref.loss(ids).backward()
        adam.step()
        with torch.no_grad():
            for p in muon_params:
                buf = bufs.setdefault(id(p), torch.zeros_like(p))
                buf.mul_(0.95).add_(p.grad)
                upd = _ns(p.grad + 0.95 * buf) * math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
                p.mul_(1 - 2e-2 * 1e-3).add_(upd, alpha=-2e-2)
        assert rel_err(snapshot(m), snapshot(ref)) < 1e-12


# ----------------------------------------------------------------------------------------
# torch plumbing
# ----------------------------------------------------------------------------------------
def _train(m, opt, data, sched=None):
    for ids in data:
        opt.zero_grad()
        m.loss(ids).backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("base", ["adam", "muon"])
def test_state_dict_round_trip_bitwise(base):
    data = batches(32, 6)
    m = relu_lm()
    opt = ddc_optimizer(m, base)
    _train(m, opt, data[:3])
    m2 = copy.deepcopy(m)
    opt2 = ddc_optimizer(m2, base)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(m, opt, data[3:])
    _train(m2, opt2, data[3:])
    for (n, p), q in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
    st = opt.state_dict()["state"]
    assert any("radial_exp_avg" in s for s in st.values())


@pytest.mark.parametrize("base", ["adam", "muon"])
def test_load_state_dict_refuses_another_models_state(base):
    """A checkpoint of another model with the same parameter count per group is refused by
    name before anything is loaded (torch's load_state_dict takes any shape; the step then
    failed far from the cause): a moment / momentum of another shape, a radial state with
    another number of gauge modes."""
    m, other = relu_lm(d=16), relu_lm(d=12)
    opt, opt_other = ddc_optimizer(m, base), ddc_optimizer(other, base)
    _train(other, opt_other, batches(32, 1))
    with pytest.raises(ValueError, match=r"load_state_dict: .*: saved (exp_avg|momentum_buffer) has shape"):
        opt.load_state_dict(opt_other.state_dict())
    _train(m, opt, batches(32, 1))
    sd = copy.deepcopy(opt.state_dict())
    i, st = next((i, st) for i, st in sd["state"].items() if "radial_exp_avg" in st)
    st["radial_exp_avg"] = st["radial_exp_avg"][:-1]
    with pytest.raises(ValueError, match=r"saved radial_exp_avg has shape \(\d+,\), expected \d+ gauge modes"):
        ddc_optimizer(copy.deepcopy(m), base).load_state_dict(sd)


@pytest.mark.parametrize("base", ["adam", "muon"])
def test_nonfinite_gradient_raises_or_skips_the_whole_step(base):
    """A NaN gradient (or one whose 2-norm overflows float32) raises NonFiniteGradientError
    naming the parameter, before anything moves (before: the weights silently became NaN);
    ``on_nonfinite="skip"`` skips the whole step (the gauges couple their members) and counts
    it, and the count survives a state_dict round trip; a finite step then runs."""
    m = relu_lm()
    data = batches(32, 2)
    for bad in (float("nan"), 1e200):
        opt = ddc_optimizer(m, base)
        opt.zero_grad()
        m.loss(data[0]).backward()
        m.blocks[0].fc1.weight.grad[0, 0] = bad
        before = snapshot(m)
        with pytest.raises(equiopt.NonFiniteGradientError, match=r"blocks\.0\.fc1\.weight"):
            opt.step()
        assert rel_err(snapshot(m), before) == 0
    opt = ddc_optimizer(m, base, on_nonfinite="skip")
    opt.step()
    assert rel_err(snapshot(m), before) == 0 and opt.nonfinite_skips == 1
    restored = ddc_optimizer(m, base, on_nonfinite="skip")
    restored.load_state_dict(opt.state_dict())
    assert restored.nonfinite_skips == 1
    _train(m, restored, data[1:])
    assert rel_err(snapshot(m), before) > 0 and restored.nonfinite_skips == 1
    with pytest.raises(ValueError, match="on_nonfinite must be 'raise' or 'skip'"):
        ddc_optimizer(m, base, on_nonfinite="ignore")


def test_state_memory_is_adamw_plus_gauge_scalars():
    m = relu_lm()
    opt = ddc_optimizer(m, "adam")
    _train(m, opt, batches(32, 1))
    extra = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k.startswith("radial_"))
    adam = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
    assert adam == 2 * sum(p.numel() for p in m.parameters())
    assert extra == opt.state_modes() == 2 * sum(g.modes for g in opt.gauges if g.kind == "rescale") == 2 * 2 * 24


def test_lr_scheduler_changes_the_step():
    data = batches(32, 3)
    runs = []
    for factor in (1.0, 0.0):
        m = relu_lm()
        opt = ddc_optimizer(m, "adam")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, f=factor: f)
        before = snapshot(m)
        _train(m, opt, data, sched)
        runs.append(rel_err(snapshot(m), before))
    assert runs[0] > 1e-3 and runs[1] == 0.0
    assert isinstance(opt, DDCOptimizer) and all("lr" in g for g in opt.param_groups)


def test_build_serves_the_ddc_presets():
    """equiopt.build(model, preset="ddc_adam"|"ddc_muon") returns the DDC optimizer."""
    for preset, base in (("ddc_adam", "adam"), ("ddc_muon", "muon")):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8))
        opt = equiopt.build(model, preset=preset)
        assert isinstance(opt, DDCOptimizer) and opt.base == base


@pytest.mark.parametrize(
    "option,value",
    [
        ("lr", "x"),
        ("lr", float("nan")),
        ("adam_lr", -1e-3),
        ("weight_decay", -0.1),
        ("adam_weight_decay", float("inf")),
        ("eps", True),
        ("lr_scale", "2"),
        ("probe_tol", -1.0),
        ("betas", (0.9,)),
        ("betas", (0.9, 1.0)),
        ("momentum", 1.0),
        ("ns_steps", 0),
        ("ns_steps", 2.5),
        ("gauges", "rescale"),
        ("gauges", ("rescale", "rot")),
    ],
)
def test_bad_hyperparameter_is_an_error_naming_it(option, value):
    """Every hyperparameter of the DDC presets is checked when the optimizer is built: a bad
    value is a ValueError that names it (before: ``betas=(0.9,)`` was accepted and failed at
    the first step, a string ``lr_scale`` was parsed, a bare string ``gauges`` read per letter)."""
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8))
    with pytest.raises(ValueError, match=f"ddc_optimizer: {option} must be"):
        equiopt.build(model, preset="ddc_adam", **{option: value})


def test_add_param_group_refuses_bad_groups_whole():
    """DDCOptimizer.add_param_group (and so a hand-built DDCOptimizer) checks a group as
    ddc_optimizer checks its arguments, naming the group; a refused group is not left in."""
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 16))
    opt = equiopt.build(model, preset="ddc_adam")
    n = len(opt.param_groups)
    for bad, message in (
        ({"betas": (0.9,)}, "betas must be two numbers"),
        ({"lr": -1.0}, "lr must be a finite number"),
        ({"rule": "sgd"}, "rule 'adam' or 'muon'"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be"),
    ):
        with pytest.raises(ValueError, match=rf"param_groups\[{n}\]: .*{message}"):
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))], **bad})
        assert len(opt.param_groups) == n
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))], "lr": 1e-3})
    assert len(opt.param_groups) == n + 1
    with pytest.raises(ValueError, match=r"param_groups\[0\]: momentum must be"):
        DDCOptimizer([{"params": [nn.Parameter(torch.zeros(2, 2))], "momentum": 1.0}], [])


def test_good_hyperparameters_are_kept():
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 16))  # a head: shift
    opt = equiopt.build(model, preset="ddc_muon", lr=torch.tensor(0.02), betas=[0.8, 0.9], eps=0, gauges=["shift"])
    lrs = [g["lr"] for g in opt.param_groups if g["rule"] == "muon"]
    assert lrs and all(lr == pytest.approx(0.02) for lr in lrs)
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 0 for g in opt.param_groups)
    assert [g.kind for g in opt.gauges] == ["shift"]


def test_unknown_preset_names_both_kinds():
    """A misspelt preset lists the plan presets and the DDC ones; a DDC preset given to a plan
    says it belongs to equiopt.build."""
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    also = r"equiopt.build also takes \['ddc_adam', 'ddc_muon'\]"
    with pytest.raises(ValueError, match=r"unknown preset 'ddc_adamw'.*" + also):
        equiopt.build(model, preset="ddc_adamw")
    with pytest.raises(ValueError, match="'ddc_muon' is a preset of equiopt.build"):
        equiopt.plan(model, "ddc_muon")


# ----------------------------------------------------------------------------------------
# overlapping gauges (docs/ddc.md): the balanced radius
# ----------------------------------------------------------------------------------------
def test_overlap_radius_is_equivariant_and_per_side_norms_are_not():
    """W in a row gauge (neuron rescale s) and a column gauge (norm-channel scale t):
    W -> diag(s) W diag(1/t), G -> diag(1/s) G diag(t). The balanced radius R = r c^T
    transforms like W, so x = R * G is invariant; the Lean per-side radius (row norms) is not
    invariant under the column action."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(12, 7, generator=g, dtype=torch.float64)
    G = torch.randn(12, 7, generator=g, dtype=torch.float64)
    s = Factor("scale").sample((1, 12, 7), g)[0]
    t = Factor("scale", "cols").sample((1, 12, 7), g)[0]
    W2, G2 = s[:, None] * W / t[None, :], G / s[:, None] * t[None, :]
    r, c = balance(W)
    r2, c2 = balance(W2)
    R, R2 = r[:, None] * c[None, :], r2[:, None] * c2[None, :]
    Wn = W / R
    assert torch.allclose(Wn.pow(2).mean(1), torch.ones(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Wn.pow(2).mean(0), torch.ones(7, dtype=torch.float64), atol=1e-12)
    assert ((R2 - s[:, None] * R / t[None, :]).norm() / R2.norm()) < 1e-12
    assert (((R2 * G2) - (R * G)).norm() / (R * G).norm()) < 1e-12
    rho, rho2 = W.norm(dim=1), W2.norm(dim=1)
    assert ((rho2[:, None] * G2 - rho[:, None] * G).norm() / (rho[:, None] * G).norm()) > 1e-2


def test_router_shift_gauge_on_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    a = Qwen3MoeForCausalLM(cfg).double()
    opt = ddc_optimizer(a, "adam")
    routers = [g for g in opt.gauges if g.name.startswith("router_shift")]
    assert len(routers) == 1
    name = routers[0].names[0]
    c = Factor("shift", "rows").sample((1, 4, 32), torch.Generator().manual_seed(3))[0]
    b = copy.deepcopy(a)
    with torch.no_grad():
        dict(b.named_parameters())[name].add_(c[None, :])
    ta, tb = [], []
    for model, out in ((a, ta), (b, tb)):
        o = ddc_optimizer(model, "adam", lr=1e-2)
        for ids in batches(64, 5):
            o.zero_grad()
            qwen_loss(model, ids).backward()
            o.step()
            out.append(snapshot(model))
    T = lambda ps: {**ps, name: ps[name] + c[None, :]}  # noqa: E731
    # HF's router softmax (and the aux loss) run in float32 even for a float64 model: the
    # comparison is at float32 rounding (measured 2e-7), not float64's
    assert max(rel_err(T(x), y) for x, y in zip(ta, tb)) < 1e-5
    w = dict(a.named_parameters())[name].detach()
    assert torch.allclose(w.mean(0), ta[0][name].mean(0), atol=1e-14)  # the expert mean does not move


# ----------------------------------------------------------------------------------------
# bf16 parameters: fp32 state, the parameters keep their dtype
# ----------------------------------------------------------------------------------------
def _bf16_pair(base):
    """(bf16 model + DDC, fp32 model + DDC) from the same bf16-representable weights."""
    torch.manual_seed(0)
    m16 = TinyLM().to(torch.bfloat16)
    m32 = copy.deepcopy(m16).float()
    return (m16, ddc_optimizer(m16, base, lr=1e-2)), (m32, ddc_optimizer(m32, base, lr=1e-2))


@pytest.mark.parametrize("base", ["adam", "muon"])
def test_bf16_params_fp32_state(base, tmp_path):
    """With the same gradients, a bf16 model's step equals the fp32 step on the same values
    rounded to bf16 (the working copy is fp32, state is fp32); state_dict round trip through
    the harness checkpoint writer continues bit for bit."""
    from equiopt.train.rundir import save_checkpoint

    (m16, o16), (m32, o32) = _bf16_pair(base)
    assert {g.kind for g in o16.gauges} == {"rescale", "shift"}
    g = torch.Generator().manual_seed(7)

    def step(grads):
        for p16, p32, gr in zip(m16.parameters(), m32.parameters(), grads):
            p16.grad, p32.grad = gr.to(torch.bfloat16), gr.to(torch.bfloat16).float()
        o16.step()
        o32.step()
        with torch.no_grad():
            for p in m32.parameters():
                p.copy_(p.to(torch.bfloat16).float())  # the reference rounds like the bf16 model

    def grads():
        return [torch.randn(p.shape, generator=g) * 0.1 for p in m16.parameters()]

    for _ in range(3):
        step(grads())
    for p16, p32 in zip(m16.parameters(), m32.parameters()):
        assert p16.dtype == torch.bfloat16 and torch.equal(p16.float(), p32)
    for st in o16.state.values():
        for k, t in st.items():
            assert t.dtype == torch.float32, k
    save_checkpoint(tmp_path / "ckpt.pt", {"model": m16.state_dict(), "optimizer": o16.state_dict()})
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    m2 = copy.deepcopy(m16)
    m2.load_state_dict(ck["model"])
    o2 = ddc_optimizer(m2, base, lr=1e-2)
    o2.load_state_dict(ck["optimizer"])
    gs = grads()
    for p, q, gr in zip(m16.parameters(), m2.parameters(), gs):
        p.grad, q.grad = gr.to(torch.bfloat16), gr.to(torch.bfloat16)
    o16.step()
    o2.step()
    for p, q in zip(m16.parameters(), m2.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------------------
# the fast path (stacked gauges, multi-tensor AdamW, stacked Muon) against the reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "muon"])
@pytest.mark.parametrize("kind", ["relu", "qwen3"])
def test_fast_path_equals_reference(base, kind):

    make = (lambda: relu_lm(L=3)) if kind == "relu" else qwen3
    a, b = make(), make()
    oa = configure(ddc_optimizer(a, base, lr=1e-2), stack_adam_gauges=True)  # every stacked path
    ob = configure(ddc_optimizer(b, base, lr=1e-2), batched=False)
    assert oa.batched and not ob.batched
    V = 32 if kind == "relu" else 64
    for ids in batches(V, 6):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m.loss(ids).backward()
            o.step()
    assert rel_err(snapshot(a), snapshot(b)) < 1e-12
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(sa[i].keys() == sb[i].keys() for i in sa)
    for i in sa:
        for k in sa[i]:
            assert torch.allclose(sa[i][k], sb[i][k], rtol=1e-9, atol=1e-12), (i, k)
