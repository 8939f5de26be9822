"""DDC in the training harness: every family trains with ddc_adam / ddc_muon, exact resume,
the gauge table in plan.txt, configuration errors, the orbit-drift metrics in metrics.jsonl."""

import math

import pytest
import torch

from equiopt.train import loop as L
from equiopt.train.config import SweepOptions
from equiopt.train.models import ARCHS

TINY = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
TIMING = ("tokens_per_s", "opt_step_s")
QUIET = dict(progress=False, log=lambda m: None)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(corpus, tmp_path, **kw):
    data, _ = corpus
    model = dict(TINY)
    if kw.get("arch") in ("olmoe", "gptoss"):
        model.update(num_experts=4, top_k=2)
    base = dict(
        steps=8,
        batch_size=4,
        seq_len=32,
        eval_every=4,
        eval_tokens=256,
        ckpt_every=4,
        warmup=2,
        model=model,
        data=data,
        out=str(tmp_path / "run"),
    )
    base.update(kw)
    return L.TrainConfig(**base)


def _strip(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


@pytest.mark.parametrize("opt", ["ddc_adam", "ddc_muon"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_trains(arch, opt, corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path, arch=arch, optimizer=opt)
    final = L.train(cfg, prepared=corpus[1], **QUIET)
    recs = L.read_metrics(cfg.out)
    assert final["status"] == "done" and [r["step"] for r in recs] == [4, 8]
    assert recs[-1]["val_loss"] < recs[0]["val_loss"] < math.log(320) + 0.2, [r["val_loss"] for r in recs]
    assert recs[0]["train_loss"] > recs[-1]["train_loss"]
    table = (tmp_path / "run" / "plan.txt").read_text()
    assert "gauges" in table and "none: base rule" in table and "role" in table
    if arch != "gemma3":  # gemma3's head is tied: no logit shift
        assert "logit_shift (rows)" in table
    if arch in ("qwen3", "gemma3"):
        assert "neuron_rescale:model.layers.0.mlp (rows)" in table
    elif arch == "olmoe":  # SwiGLU experts: the up rows of gate_up_proj, per expert
        assert "neuron_rescale:model.layers.0.mlp.experts (rows of part 1, per expert)" in table
    else:  # gpt-oss's (up + 1) * glu is not homogeneous in up: the probe rejects both parts
        assert "experts.gate_up_proj" in table and "rescale probe of part 1 failed" in table
    if arch in ("olmoe", "gptoss"):
        assert "router_shift (rows)" in table


@pytest.mark.parametrize("arch,opt", [("qwen3", "ddc_adam"), ("olmoe", "ddc_muon"), ("gemma3", "ddc_muon")])
def test_resume_after_kill_is_bit_identical(arch, opt, corpus, tmp_path):
    kw = dict(arch=arch, optimizer=opt, steps=8, eval_every=2, ckpt_every=3)
    ref = _cfg(corpus, tmp_path / "ref", **kw)
    L.train(ref, prepared=corpus[1], **QUIET)
    cut = _cfg(corpus, tmp_path / "cut", **kw)
    assert L.train(cut, prepared=corpus[1], stop_after=5, **QUIET)["status"] == "stopped"
    L.train(cut, resume=True, prepared=corpus[1], **QUIET)
    a, b = L.read_metrics(ref.out), L.read_metrics(cut.out)
    assert [r["step"] for r in b] == [2, 4, 6, 8]
    assert _strip(a) == _strip(b)
    ca = torch.load(tmp_path / "ref" / "run" / "checkpoint.pt", weights_only=False)
    cb = torch.load(tmp_path / "cut" / "run" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i])


def test_config_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="role_lr_scale"):
        _cfg(corpus, tmp_path, optimizer="ddc_muon", role_lr_scale={"embedding": 2.0})
    with pytest.raises(ValueError, match="role-grid"):
        SweepOptions(optimizers=["adamw", "ddc_adam"], role_grid=[("embedding", [0.5, 2.0])])
    SweepOptions(optimizers=["adamw", "ddc_adam", "ddc_muon"])  # in grids


def test_lr_scale_reaches_every_group():
    from equiopt.ddc import ADAM_LR, MUON_LR
    from equiopt.train.models import build_model, preset

    mc = preset("qwen3")
    mc.vocab_size = 300
    model = build_model(mc)
    opt, plan = L.make_optimizer(model, "ddc_muon", lr_scale=2.0)
    lrs = {(g["ddc"], g["rule"]): g["lr"] for g in opt.param_groups}
    assert lrs[("rescale", "muon")] == pytest.approx(2 * MUON_LR) and lrs[("none", "muon")] == pytest.approx(
        2 * MUON_LR
    )
    assert lrs[("shift", "adam")] == pytest.approx(2 * ADAM_LR)
    opt, _ = L.make_optimizer(model, "ddc_adam", lr_scale=0.5)
    assert all(g["lr"] == pytest.approx(0.5 * ADAM_LR) for g in opt.param_groups)


# ----------------------------------------------------------------------------------------
# gauge orbit drift (equiopt.diagnostics.GaugeDrift): hand-computed values
# ----------------------------------------------------------------------------------------
def test_gauge_drift_rescale_and_shift_hand_computed():
    from test_ddc import relu_lm

    import equiopt
    from equiopt.diagnostics import GaugeDrift

    m = relu_lm()
    drift = GaugeDrift(m, equiopt.plan(m, "adamw"))
    assert drift.record()["balance_max"] == 0.0 and drift.record()["head_mean_row_change"] == 0.0
    s = torch.linspace(0.5, 3.0, 24, dtype=torch.float64)  # neuron i of block 0 scaled by s_i
    c = torch.arange(16, dtype=torch.float64) / 10  # every head row shifted by c
    c0 = m.lm_head.weight.detach().mean(0).clone()
    with torch.no_grad():
        b = m.blocks[0]
        b.fc1.weight.mul_(s[:, None])
        b.fc1.bias.mul_(s)
        b.fc2.weight.div_(s[None, :])
        m.lm_head.weight.add_(c[None, :])
    r = drift.record()
    # log||s W1_i|| - log||W2_i / s|| moves by 2 log s_i; the biases are left out of the norms
    assert r["balance_mean/blocks.0"] == pytest.approx(float((2 * s.log()).abs().mean()), rel=1e-6)  # float32 norms
    assert r["balance_max/blocks.0"] == pytest.approx(2 * math.log(3.0), rel=1e-6)
    assert r["balance_mean/blocks.1"] == 0.0
    assert r["balance_mean"] == pytest.approx(r["balance_mean/blocks.0"] / 2, rel=1e-6)
    assert r["head_mean_row_change"] == pytest.approx(float(c.norm()), rel=1e-12)
    assert r["head_mean_row"] == pytest.approx(float((c0 + c).norm()), rel=1e-12)


def test_gauge_drift_vo_rotation_angle_hand_computed():
    """A rotation by alpha in one plane of kv head 0 (V_0 -> R V_0, O_q -> O_q R^T for the
    query heads reading it): Q = R, eigenvalues e^{+-i alpha} and hd - 2 ones, so the RMS
    angle is alpha sqrt(2 / hd); the other layer reads 0."""
    import equiopt
    from equiopt.diagnostics import GaugeDrift, rotation_angle
    from equiopt.train.models import ModelConfig, build_model

    mc = ModelConfig(
        "qwen3",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    m = build_model(mc).double()
    drift = GaugeDrift(m, equiopt.plan(m, "adamw"))
    alpha, hd = 0.3, 8
    R = torch.eye(hd, dtype=torch.float64)
    R[:2, :2] = torch.tensor([[math.cos(alpha), -math.sin(alpha)], [math.sin(alpha), math.cos(alpha)]])
    att = m.model.layers[0].self_attn
    with torch.no_grad():
        att.v_proj.weight[:hd] = R @ att.v_proj.weight[:hd]
        for q in (0, 1):  # GQA 4/2: query heads 0 and 1 read kv head 0
            att.o_proj.weight[:, q * hd : (q + 1) * hd] = att.o_proj.weight[:, q * hd : (q + 1) * hd] @ R.T
    r = drift.record()
    # kv head 0: alpha sqrt(2/8); kv head 1: 0; the layer's value is the mean over kv heads
    assert r["vo_angle/model.layers.0.self_attn"] == pytest.approx(alpha * math.sqrt(2 / hd) / 2, rel=1e-6)
    assert r["vo_angle/model.layers.1.self_attn"] == pytest.approx(0.0, abs=1e-6)
    assert r["vo_angle_max"] == pytest.approx(alpha * math.sqrt(2 / hd) / 2, rel=1e-6)
    assert float(rotation_angle(-torch.eye(2))) == pytest.approx(math.pi)


def test_gauge_drift_norm_channel_hand_computed():
    """psi_j = log|g_j| - (1/k) sum_r log||W_r[:, j]|| written out on Qwen3's named weights
    (the head centered; ``up``, whose rows are in the neuron gauge, by its balanced radius
    less the mean log column norm of ``down``). A norm-channel gauge ``t`` moves psi by
    ``2 log t``, the gain alone by ``log t``, the head shift by nothing; on an overlapped norm a
    neuron rescale ``s`` moves it by ``-mean_i log s_i`` (the coordinate is blind to the radial
    motion, ``up`` rows and ``down`` columns alike, not to the neuron orbit's mean)."""
    from test_ddc import qwen3

    import equiopt
    from equiopt.ddc import balance
    from equiopt.diagnostics import GaugeDrift

    m = qwen3()
    drift = GaugeDrift(m, equiopt.plan(m, "adamw"))
    assert {c.gain for c in drift.norms} == {
        *(f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")),
        "model.norm.weight",
    }
    at = m.model.layers[0].self_attn
    psi = (
        m.model.layers[0].input_layernorm.weight.detach().log()
        - sum(w.weight.detach().norm(dim=0).log() for w in (at.q_proj, at.k_proj, at.v_proj)) / 3
    )
    c0 = next(c for c in drift.norms if c.gain == "model.layers.0.input_layernorm.weight")
    torch.testing.assert_close(drift._norm_coordinate(c0), psi, rtol=0, atol=1e-12)
    mlp = m.model.layers[1].mlp
    r, c = balance(mlp.up_proj.weight.detach())
    side = (r[:, None] * c[None, :]).log().mean(0) - mlp.down_proj.weight.detach().norm(dim=0).log().mean()
    psi = m.model.layers[1].post_attention_layernorm.weight.detach().log()
    psi = psi - (mlp.gate_proj.weight.detach().norm(dim=0).log() + side) / 2
    c1 = next(c for c in drift.norms if c.gain == "model.layers.1.post_attention_layernorm.weight")
    torch.testing.assert_close(drift._norm_coordinate(c1), psi, rtol=0, atol=1e-12)
    assert drift.record()["norm_channel_drift_max"] == 0.0
    g = torch.Generator().manual_seed(3)
    t = torch.exp(torch.randn(32, generator=g, dtype=torch.float64) / 2)
    s = torch.exp(torch.randn(48, generator=g, dtype=torch.float64) / 2)
    with torch.no_grad():
        m.model.layers[0].input_layernorm.weight.mul_(t)  # the gain alone: psi + log t
        m.model.layers[1].post_attention_layernorm.weight.mul_(t)  # the gauge: psi + 2 log t
        mlp.gate_proj.weight.div_(t)
        mlp.up_proj.weight.div_(t)
        mlp.up_proj.weight.mul_(s[:, None])  # the neuron gauge: nothing
        mlp.down_proj.weight.div_(s)
        m.lm_head.weight.add_(torch.randn(32, generator=g, dtype=torch.float64))  # the head shift: nothing
    rec = drift.record()
    rms = float(t.log().pow(2).mean().sqrt())
    assert rec["norm_channel_drift/model.layers.0.input_layernorm.weight"] == pytest.approx(rms, rel=1e-9)
    post = float((2 * t.log() - s.log().mean()).pow(2).mean().sqrt())
    assert rec["norm_channel_drift/model.layers.1.post_attention_layernorm.weight"] == pytest.approx(post, rel=1e-9)
    assert rec["norm_channel_drift/model.norm.weight"] == pytest.approx(0.0, abs=1e-12)
    assert rec["norm_channel_drift/model.layers.1.input_layernorm.weight"] == 0.0
    assert rec["norm_channel_drift"] == pytest.approx((rms + post) / 5, rel=1e-9)
    assert rec["norm_channel_drift_max"] == pytest.approx(post, rel=1e-9)


def _norm_drift(make_opt, steps=20):
    from test_ddc import batches, qwen3

    import equiopt
    from equiopt.diagnostics import GaugeDrift

    m = qwen3()
    drift = GaugeDrift(m, equiopt.plan(m, "adamw"))
    opt = make_opt(m)
    for ids in batches(64, steps):
        opt.zero_grad()
        m.loss(ids).backward()
        opt.step()
    return drift.record()


def test_gauge_drift_norm_channel_second_order_under_ddc():
    """20 steps on tiny Qwen3 (float64). DDC-Adam's norm-channel step leaves psi in place up to
    its tangential steps, O(lr^2) per step, so halving lr divides the drift by ~4 (measured
    4.0 on every norm); AdamW moves it O(lr) (ratio ~2.4) and >100x more (measured 0.50 vs
    4.0e-3 at lr 6e-3). With weight decay the overlapped coordinate of the post-attention
    norms (reader ``up`` also in the neuron gauge) moves by the prescribed lr wd / 2 per step
    (docs/ddc.md): 20 x 6e-3 x 0.1 / 2 = 6e-3, hence the O(lr^2) check without it there."""
    from equiopt.ddc import ddc_optimizer

    lr, post = (
        6e-3,
        ("model.layers.0.post_attention_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"),
    )
    d1 = _norm_drift(lambda m: ddc_optimizer(m, base="adam", lr=lr))
    d2 = _norm_drift(lambda m: ddc_optimizer(m, base="adam", lr=lr / 2))
    a1 = _norm_drift(lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.1))
    a2 = _norm_drift(lambda m: torch.optim.AdamW(m.parameters(), lr=lr / 2, weight_decay=0.1))
    keys = [k for k in d1 if k.startswith("norm_channel_drift/")]
    assert len(keys) == 5
    for k in keys:
        if k.split("/", 1)[1] in post:
            assert abs(d1[k] - 20 * lr * 0.1 / 2) < 0.2 * 20 * lr * 0.1 / 2, (k, d1[k])
        else:
            assert 3.0 < d1[k] / d2[k] < 5.0, (k, d1[k], d2[k])
        assert 1.5 < a1[k] / a2[k] < 3.0, (k, a1[k], a2[k])
        assert a1[k] > 40 * d1[k], (k, a1[k], d1[k])
    assert d1["norm_channel_drift"] < 1e-2 and a1["norm_channel_drift"] > 10 * d1["norm_channel_drift"]
    w1 = _norm_drift(lambda m: ddc_optimizer(m, base="adam", lr=lr, weight_decay=0.0))
    w2 = _norm_drift(lambda m: ddc_optimizer(m, base="adam", lr=lr / 2, weight_decay=0.0))
    assert 3.0 < w1["norm_channel_drift"] / w2["norm_channel_drift"] < 5.0
    for k in post:
        assert 3.0 < w1["norm_channel_drift/" + k] / w2["norm_channel_drift/" + k] < 5.0


@pytest.mark.parametrize("opt", ["adamw", "muon", "paper", "ddc_adam", "ddc_muon"])
def test_gauge_drift_logged_for_every_optimizer(opt, corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path, arch="olmoe", optimizer=opt, steps=6, eval_every=3)
    L.train(cfg, prepared=corpus[1], **QUIET)
    g = L.read_metrics(cfg.out)[-1]["gauge"]
    for k in (
        "balance_mean",
        "balance_max",
        "head_mean_row",
        "head_mean_row_change",
        "router_mean_row",
        "router_mean_row_change",
        "vo_angle",
        "vo_angle_max",
        "norm_channel_drift",
        "norm_channel_drift_max",
    ):
        assert math.isfinite(g[k]), k
    assert "balance_mean/model.layers.1.mlp.experts" in g and "vo_angle/model.layers.0.self_attn" in g
    if opt in ("adamw", "muon"):  # AdamW on head and router moves their mean rows
        assert g["head_mean_row_change"] > 1e-4 and g["router_mean_row_change"] > 1e-4
    else:  # DDC's translation gauges and paper's centered maps keep the vocabulary / expert means
        assert g["head_mean_row_change"] < 1e-6 and g["router_mean_row_change"] < 1e-6
    # the input norms and the final norm (the post-attention norms feed the router and a gather
    # into the experts: not confirmed, not tracked); measured after 6 steps: DDC 1.5e-3 (adam),
    # 2.2e-3 (muon), the others 0.058 (adamw) to 0.14 (paper)
    assert (
        "norm_channel_drift/model.layers.0.input_layernorm.weight" in g and "norm_channel_drift/model.norm.weight" in g
    )
    assert (g["norm_channel_drift"] < 5e-3) if opt.startswith("ddc") else (g["norm_channel_drift"] > 2e-2)


# ----------------------------------------------------------------------------------------
# torch.distributed: DDP and FSDP2 parity (tests/dist_ddc_worker.py, 2 gloo processes)
# ----------------------------------------------------------------------------------------
@pytest.mark.dist
def test_ddp_and_fsdp2_match_one_process(tmp_path):
    import os
    from pathlib import Path

    import dist_ddc_worker as W

    from launch import torchrun

    here = Path(__file__).resolve().parent
    out = tmp_path / "dist"
    out.mkdir()
    torchrun(
        2,
        [str(here / "dist_ddc_worker.py"), str(out)],
        label="ddc ddp",
        timeout=float(os.environ.get("EQUIOPT_DIST_LAUNCH_TIMEOUT", 240)),
        pythonpath=(str(here),),
    )
    assert (out / "done").exists()
    for arch, base in W.CASES:
        got, ref = torch.load(out / f"ddp_{arch}_{base}.pt"), W.reference_run(arch, base)
        assert got.keys() == ref.keys()
        num = sum(float((got[k] - ref[k]).pow(2).sum()) for k in ref)
        den = sum(float(ref[k].pow(2).sum()) for k in ref)
        # float32: the all-reduced mean of two half-batch gradients vs the full-batch gradient
        assert math.sqrt(num / den) < 1e-5, (arch, base, math.sqrt(num / den))
        print(f"ddp {arch} {base}: relative parameter difference {math.sqrt(num / den):.1e}")
    for arch, base in W.FSDP2_CASES:  # DTensor parameters (Shard(0)); qwen3 / OLMoE with norm gauges
        got, ref = torch.load(out / f"fsdp2_{arch}_{base}.pt"), W.reference_run(arch, base)
        assert got.keys() == ref.keys()
        num = sum(float((got[k] - ref[k]).pow(2).sum()) for k in ref)
        den = sum(float(ref[k].pow(2).sum()) for k in ref)
        assert math.sqrt(num / den) < 1e-6, (arch, base, math.sqrt(num / den))
        print(f"fsdp2 {arch} {base}: relative parameter difference {math.sqrt(num / den):.1e}")
        local = set((out / f"fsdp2_{arch}_{base}_local.txt").read_text().split())
        # AdamW tensors and (DDC-Adam) the column-norm units step on their local rows, sharded state
        want = {"model.embed_tokens.weight", "lm_head.weight"}
        if base == "adam":
            want.add("model.layers.0.self_attn.q_proj.weight")
        if base == "adam" and arch == "qwen3":
            want.add("model.layers.0.mlp.down_proj.weight")
        if base == "adam" and arch == "olmoe":  # the stacked expert gauge on the local experts (E-sharded)
            want |= {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
        assert want <= local, (arch, base, local)
    msg = (out / "fsdp2.txt").read_text()
    assert "needs model= an unsharded replica" in msg, msg
