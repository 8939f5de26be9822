"""Training loop: smoke runs on every family, exact resume, divergence, atomic checkpoints."""

import dataclasses
import json

import pytest
import torch

from equiopt.train import loop as L
from equiopt.train.models import ARCHS, build_model, preset

TINY = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
TIMING = ("tokens_per_s", "opt_step_s")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(corpus, tmp_path, **kw):
    data, _ = corpus
    model = dict(TINY)
    if kw.get("arch") in ("olmoe", "gptoss"):
        model.update(num_experts=4, top_k=2)
    model.update(kw.pop("model", {}))
    base = dict(
        steps=6,
        batch_size=4,
        seq_len=32,
        eval_every=3,
        eval_tokens=256,
        ckpt_every=3,
        warmup=2,
        model=model,
        data=data,
        out=str(tmp_path / "run"),
    )
    base.update(kw)
    return L.TrainConfig(**base)


def _strip(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_smoke_every_family(arch, corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path, arch=arch, optimizer="paper")
    final = L.train(cfg, progress=False, log=lambda m: None, prepared=corpus[1])
    recs = L.read_metrics(cfg.out)
    assert [r["step"] for r in recs] == [3, 6] and final["status"] == "done"
    r = recs[-1]
    assert r["val_loss"] < recs[0]["val_loss"] + 0.5 and r["val_loss"] < 6.5  # log(320) = 5.77
    assert set(r["logits"]) == {"rms", "centered_rms", "max_abs", "lse_mean", "lse_max", "entropy", "max_prob"}
    assert r["tokens_per_s"] > 0 and r["opt_step_s"] > 0 and r["grad_norm_max"] >= r["grad_norm_mean"] > 0
    if arch in ("olmoe", "gptoss"):
        assert len(r["routing_layers"]) == 2 and 0 <= r["routing"]["dead_frac"] <= 1
        assert 1.0 <= r["routing"]["load_balance_loss"] <= 4.0 + 1e-9
    else:
        assert r["routing"] is None
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["arch"] == arch
    env = json.loads((out / "env.json").read_text())
    assert env["packages"]["torch"] and env["git_revision"] and env["parameters"] > 0
    assert "role" in (out / "plan.txt").read_text() and (out / "checkpoint.pt").exists()


def test_families_have_their_traits():
    for arch in ARCHS:
        mc = preset(arch)
        mc.vocab_size = 300
        m = build_model(mc)
        tied = m.get_output_embeddings().weight is m.get_input_embeddings().weight
        assert tied == (arch == "gemma3")
        names = dict(m.named_parameters())
        if arch == "qwen3":
            assert "model.layers.0.self_attn.q_norm.weight" in names
        if arch == "gemma3":
            assert m.config.layer_types == mc.layer_types and "sliding_attention" in mc.layer_types
            assert m.config.hidden_activation == "gelu_pytorch_tanh"
        if arch == "olmoe":
            assert names["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 2 * 96, 128)
            assert not any("gate.bias" in n for n in names)
        if arch == "gptoss":
            assert names["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 128, 2 * 96)
            assert "model.layers.0.mlp.router.bias" in names and "model.layers.0.self_attn.sinks" in names
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(preset("olmoe"), top_k=9).validate()
    with pytest.raises(ValueError, match="dense"):
        dataclasses.replace(preset("qwen3"), num_experts=4).validate()


@pytest.mark.slow
@pytest.mark.parametrize("arch,opt", [("olmoe", "paper"), ("qwen3", "muon")])
def test_resume_after_kill_matches_uninterrupted(arch, opt, corpus, tmp_path):
    kw = dict(arch=arch, optimizer=opt, steps=8, eval_every=2, ckpt_every=3)
    ref = _cfg(corpus, tmp_path / "ref", **kw)
    L.train(ref, progress=False, log=lambda m: None, prepared=corpus[1])
    cut = _cfg(corpus, tmp_path / "cut", **kw)
    # "kill" after 5 steps: checkpoint at step 3, evaluations at 2 and 4 already logged
    assert L.train(cut, progress=False, log=lambda m: None, prepared=corpus[1], stop_after=5)["status"] == "stopped"
    assert [r["step"] for r in L.read_metrics(cut.out)] == [2, 4]
    (tmp_path / "cut" / "run" / "checkpoint.pt.abc.tmp").write_bytes(b"half-written")  # killed mid-save
    with pytest.raises(FileExistsError, match="--resume"):
        L.train(cut, progress=False, log=lambda m: None, prepared=corpus[1])
    L.train(cut, resume=True, progress=False, log=lambda m: None, prepared=corpus[1])
    a, b = L.read_metrics(ref.out), L.read_metrics(cut.out)
    assert [r["step"] for r in b] == [2, 4, 6, 8]
    assert _strip(a) == _strip(b)  # bit-identical losses and metrics
    sa = torch.load(tmp_path / "ref" / "run" / "checkpoint.pt", weights_only=False)["model"]
    sb = torch.load(tmp_path / "cut" / "run" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_rejects_changed_config(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path, steps=6)
    L.train(cfg, progress=False, log=lambda m: None, prepared=corpus[1], stop_after=4)
    with pytest.raises(ValueError, match="lr_scale"):
        L.train(dataclasses.replace(cfg, lr_scale=2.0), resume=True, progress=False, prepared=corpus[1])


@pytest.mark.slow
def test_divergence_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    real = L.build_model
    calls = {"n": 0}

    def poisoned(mcfg, seed=0):
        m = real(mcfg, seed)

        def hook(module, args, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] == 5:  # the 5th training forward produces NaN logits
                    return output * float("nan")
            return output

        m.get_output_embeddings().register_forward_hook(hook)
        return m

    monkeypatch.setattr(L, "build_model", poisoned)
    cfg = _cfg(corpus, tmp_path, steps=8, ckpt_every=3, eval_every=2)
    with pytest.raises(L.TrainingDiverged, match=r"non-finite loss nan at step 4.*checkpoint \(step 3\)"):
        L.train(cfg, progress=False, log=lambda m: None, prepared=corpus[1])
    out = tmp_path / "run"
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3
    final = json.loads((out / "final.json").read_text())
    assert final["status"] == "diverged" and final["val_loss"] is None
    assert L.read_metrics(out)[-1]["event"] == "diverged"


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    L.save_checkpoint(path, {"step": 1})

    def crash(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        L.save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=False)["step"] == 1


def test_config_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        _cfg(corpus, tmp_path, optimizer="sgd").validate()
    with pytest.raises(ValueError, match="unknown model override"):
        _cfg(corpus, tmp_path, model={"depth": 3}).validate()
    with pytest.raises(ValueError, match="num_kv_heads"):
        _cfg(corpus, tmp_path, model={"num_heads": 3, "num_kv_heads": 2}).validate()
    with pytest.raises(ValueError, match="unknown role 'head'"):
        _cfg(corpus, tmp_path, role_lr_scale={"head": 2.0}).validate()
    with pytest.raises(ValueError, match="warmup"):
        _cfg(corpus, tmp_path, warmup=50).validate()


def test_bf16_autocast_on_cpu(corpus, tmp_path, monkeypatch):
    """``autocast="bf16"`` runs the CPU forward and backward under bfloat16 autocast (weights and
    optimizer float32): the losses differ from the float32 run's, by bf16 rounding only; the
    default keeps CPU runs float32 (a run recorded before the option existed still matches)."""
    seen = []
    real = torch.autocast
    monkeypatch.setattr(L.torch, "autocast", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    f32 = _cfg(corpus, tmp_path / "f32", steps=4, eval_every=4, ckpt_every=0)
    L.train(f32, progress=False, log=lambda m: None, prepared=corpus[1])
    assert not seen  # auto on CPU: no autocast
    b16 = _cfg(corpus, tmp_path / "b16", steps=4, eval_every=4, ckpt_every=0, autocast="bf16")
    L.train(b16, progress=False, log=lambda m: None, prepared=corpus[1])
    assert seen and all(a == ("cpu",) and k == {"dtype": torch.bfloat16} for a, k in seen)
    a, b = L.read_metrics(f32.out)[-1], L.read_metrics(b16.out)[-1]
    assert a["val_loss"] != b["val_loss"] and abs(a["val_loss"] - b["val_loss"]) < 0.05, (a["val_loss"], b["val_loss"])
    assert all(
        p.dtype == torch.float32 for p in torch.load(f"{b16.out}/checkpoint.pt", weights_only=False)["model"].values()
    )
    saved = {k: v for k, v in f32.to_dict().items() if k != "autocast"}  # a record from before the option
    assert L.config_diff(saved, f32.to_dict()) == [] and L.config_diff(saved, b16.to_dict()) == ["autocast"]
    with pytest.raises(ValueError, match="autocast"):
        _cfg(corpus, tmp_path, autocast="fp8").validate()


def test_lr_schedule_and_optimizer_names():
    cfg = L.TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    f = L.lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.1, abs=1e-3)
    assert L.lr_lambda(dataclasses.replace(cfg, schedule="constant"))(80) == 1.0
    mc = preset("olmoe")
    mc.vocab_size = 300
    model = build_model(mc)
    opt, plan = L.make_optimizer(model, "paper-adamw-router", lr_scale=2.0, role_lr_scale={"embedding": 3.0})
    by_role = {g["role"]: g for g in opt.param_groups}
    paper = {g["role"]: g for g in L.make_optimizer(model, "paper")[0].param_groups}
    adamw = {g["role"]: g for g in L.make_optimizer(model, "adamw")[0].param_groups}
    assert by_role["router"]["map"] == "adamw" and by_role["router"]["lr"] == pytest.approx(2 * adamw["router"]["lr"])
    assert by_role["embedding"]["lr"] == pytest.approx(6 * paper["embedding"]["lr"])
    assert by_role["attention"]["lr"] == pytest.approx(2 * paper["attention"]["lr"])
    # Muon's maps on the expert matrices, the paper stack everywhere else
    swap = {g["role"]: g for g in L.make_optimizer(model, "paper-muon-mlp")[0].param_groups}
    muon = {g["role"]: g for g in L.make_optimizer(model, "muon")[0].param_groups}
    for role in ("expert_in", "expert_out"):
        for key in ("map", "lr", "polar_method", "nesterov", "scale", "momentum", "weight_decay"):
            assert swap[role][key] == muon[role][key], (role, key)
    for role in ("embedding", "lm_head", "router", "attention", "vector"):
        assert {k: v for k, v in swap[role].items() if k != "params"} == {
            k: v for k, v in paper[role].items() if k != "params"
        }, role
