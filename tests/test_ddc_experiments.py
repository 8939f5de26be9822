"""The DDC experiments (issue #15): ddc-collapse end to end on a tiny corpus and model, the
readout's sites on the harness's Qwen3, ddc-grok's data and loop, the statistics."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from equiopt import deadread as R
from equiopt.cli import main
from equiopt.train import data as D
from equiopt.train import ddc_experiments as X
from equiopt.train.config import TrainConfig
from equiopt.train.loop import make_optimizer
from equiopt.train.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)


def _text(seed, n):
    rng = random.Random(seed)
    words = (
        "the king and queen of a land far away did speak to all their men at night "
        "while wind and rain fell on every field and hill"
    ).split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "a.txt").write_text(_text(0, 1500))
    (root / "b.txt").write_text(_text(1, 1500))
    return D.DataConfig(source=str(root), vocab_size=320, cache=str(tmp_path_factory.mktemp("cache")))


def test_collapse_end_to_end(corpus, tmp_path):
    base = TrainConfig(
        arch="qwen3",
        steps=12,
        batch_size=4,
        seq_len=32,
        eval_every=2,
        eval_tokens=256,
        ckpt_every=0,
        warmup=1,
        schedule="constant",
        model=TINY,
        data=corpus,
        out=str(tmp_path),
    )
    opts = X.CollapseOptions(
        optimizers=["adamw", "ddc_adam"],
        seeds=2,
        train_tokens=3000,
        train_eval_tokens=256,
        probe_seqs=4,
        probe_len=16,
        lr_scales=[0.5, 1.0],
        sweep_steps=4,
        jobs=1,
    )
    s = X.collapse(base, opts, tmp_path, log=lambda m: None)
    rows = s["rows"]
    assert set(rows) == {"adamw", "ddc_adam"} and rows["adamw"]["n"] == 2
    assert rows["adamw"]["cells"] == 2 * (3 + 4 + 1) + 3
    assert all(math.isfinite(g) for g in rows["ddc_adam"]["gap"])
    assert "p_vs_adamw" in rows["ddc_adam"] and "gap" in rows["ddc_adam"]["p_vs_adamw"]
    rs = X._read_jsonl(tmp_path / "runs" / "adamw" / "seed0" / "readout.jsonl")
    assert [r["step"] for r in rs] == list(range(2, 13, 2))
    assert set(rs[0]["obs"]) == {s.name for s in R.find_sites(build_model(base.model_config(320)))}
    # the train subset is evaluated in eval mode on a fixed slice: gap = val - train
    assert all(math.isclose(r["gap"], r["val_loss"] - r["train_eval_loss"]) for r in rs)
    assert rs[0]["gauge"] and "balance_mean" in rs[0]["gauge"]
    for f in ("summary.md", "summary.json", "fits.json", "lr.json", "gap.png", "drift.png", "readout_heatmap.png"):
        assert (tmp_path / f).exists(), f
    lr = json.loads((tmp_path / "lr.json").read_text())
    assert set(lr["adamw"]["tried"]) == {"0.5", "1"}
    # rerun: finished runs with the same settings are reused (same numbers)
    s2 = X.collapse(base, opts, tmp_path, log=lambda m: None)
    assert s2["rows"]["adamw"]["gap"] == rows["adamw"]["gap"]


def test_train_slice_probe_and_train_subset(corpus, tmp_path):
    from equiopt.train.rundir import RunDir

    cfg = TrainConfig(
        arch="qwen3",
        steps=2,
        batch_size=2,
        seq_len=16,
        eval_every=2,
        eval_tokens=64,
        model=TINY,
        data=corpus,
        out=str(tmp_path / "r"),
    )
    prep = D.prepare(corpus, log=lambda m: None)
    extra = dict(train_tokens=500, train_eval_tokens=64, probe_seqs=3, probe_len=8)
    T = type("_T", (X.CollapseTrainer,), {"extra": extra})
    tr = T(cfg, None, RunDir(cfg.out), prep, lambda m: None)
    assert [len(s) for s in tr.train_w.shards] == [500]
    assert torch.equal(
        torch.tensor(np.asarray(tr.train_w.shards[0], dtype=np.int64)),
        torch.tensor(np.asarray(prep.train[0][:500], dtype=np.int64)),
    )
    assert len(tr.sampler.w) == (500 - 1) // 16
    assert tuple(tr.probe_x.shape) == (3, 8) and torch.equal(tr.probe_x[:, 1:], tr.probe_y[:, :-1])
    assert len(tr.train_eval_idx) == 64 // 16
    assert X.CollapseTrainer.extra == {}  # the settings ride on a subclass


def test_grok_data_and_labels():
    xt, yt, xv, yv = X.grok_data(7, 0.4, seed=0)
    assert len(xt) == round(0.4 * 49) and len(xt) + len(xv) == 49
    allx = torch.cat([xt, xv])
    assert len({tuple(r) for r in allx.tolist()}) == 49
    assert torch.equal(yt, (xt[:, 0] + xt[:, 1] - 7) % 7)


@pytest.mark.parametrize("opt", ["muon", "ddc_muon", "adamw", "ddc_adam"])
def test_grok_run_trains(opt):
    d = dict(
        modulus=11,
        train_fraction=0.5,
        depth=3,
        width=16,
        hidden=16,
        steps=30,
        eval_every=10,
        lr_scale=1.0,
        decay_rate=0.0,
        target_acc=0.99,
    )
    r = X.grok_run(d, opt, 0)
    assert r["status"] == "done" and r["history"]
    assert r["history"][-1]["train_acc"] > r["history"][0]["train_acc"] or r["history"][-1]["train_acc"] == 1.0


@pytest.mark.parametrize("opt", ["muon", "ddc_muon", "adamw", "ddc_adam"])
def test_decay_rate_is_the_per_step_shrink(opt):
    torch.manual_seed(0)
    model = X.GrokMLP(7, 8, 8, 2)
    o, _ = make_optimizer(model, opt)
    before = [g["weight_decay"] for g in o.param_groups]
    X.set_decay_rate(o, 2e-3)
    for wd0, g in zip(before, o.param_groups):
        if wd0 > 0:
            assert g["lr"] * g["weight_decay"] == pytest.approx(2e-3, rel=1e-12)
        else:
            assert g["weight_decay"] == 0  # undecayed groups stay undecayed
    assert any(wd0 > 0 for wd0 in before)
    # with a zero gradient the decoupled decay is the whole step: W <- (1 - rate) W on every
    # parameter of a decaying group (gauge groups too: their radial and tangent parts are zero)
    decayed = [p for g in o.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    w0 = [p.detach().clone() for p in decayed]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    o.step()
    for p, p0 in zip(decayed, w0):
        torch.testing.assert_close(p.detach(), (1 - 2e-3) * p0, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="decay_rate"):
        X.set_decay_rate(o, -1.0)


def test_grok_command(tmp_path):
    rc = main(
        [
            "ddc-grok",
            "--optimizers",
            "muon,ddc_muon",
            "--seeds",
            "2",
            "--modulus",
            "7",
            "--depth",
            "2",
            "--width",
            "8",
            "--hidden",
            "8",
            "--steps",
            "10",
            "--eval-every",
            "5",
            "--jobs",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["rows"]["muon"]["seeds"] == 2 and "Fisher exact" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "val_acc.png").stat().st_size > 0


def test_grok_keeps_finished_runs_and_resumes(tmp_path, monkeypatch):
    opts = X.GrokOptions(
        optimizers=["muon", "adamw"], seeds=2, modulus=7, depth=2, width=8, hidden=8, steps=10, eval_every=5, jobs=1
    )
    opts.out = str(tmp_path)
    first = X.grok(opts, log=lambda m: None)
    kept = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "runs").rglob("*.json"))
    assert kept == ["runs/adamw/seed0.json", "runs/adamw/seed1.json", "runs/muon/seed0.json", "runs/muon/seed1.json"]

    def no_training(*a, **k):
        raise AssertionError("a kept run was trained again")

    monkeypatch.setattr(X, "grok_run", no_training)
    again = X.grok(opts, log=lambda m: None)  # every run kept: nothing trains
    assert again["rows"] == first["rows"]
    assert (first["reused_runs"], again["reused_runs"], again["run_count"]) == (0, 4, 4)
    assert again["run_seconds"] == first["run_seconds"]  # the kept runs' own time, not this invocation's
    assert "4 of 4 runs reused" in (tmp_path / "summary.md").read_text()
    monkeypatch.undo()
    (tmp_path / "runs" / "adamw" / "seed1.json").unlink()  # an interrupted run: only it trains
    seen = []
    real = X.grok_run
    monkeypatch.setattr(X, "grok_run", lambda o, opt, seed: seen.append((opt, seed)) or real(o, opt, seed))
    X.grok(opts, log=lambda m: None)
    assert seen == [("adamw", 1)]
    opts.steps = 11  # other settings: every run trains again
    seen.clear()
    X.grok(opts, log=lambda m: None)
    assert len(seen) == 4
    seen.clear()
    monkeypatch.setattr(X, "git_revision", lambda: "another-commit")  # other code: every run trains again
    X.grok(opts, log=lambda m: None)
    assert len(seen) == 4


def test_grok_pair_statistics():
    """The comparison line: Fisher on the counts, Mann-Whitney on the steps with the seeds that
    did not generalise ranked beyond the budget, Welch on the steps of those that did; checked
    against scipy called on the explicit lists."""
    from scipy.stats import fisher_exact, mannwhitneyu, ttest_ind

    opts = X.GrokOptions(steps=3000, eval_every=50)
    ra = {"generalised": 3, "seeds": 4, "grok_steps": [1000, 1200, 1500]}
    rb = {"generalised": 4, "seeds": 4, "grok_steps": [600, 650, 700, 800]}
    line = X._grok_pair(opts, ra, rb, "muon", "ddc_muon", fisher_exact)
    p_mw = mannwhitneyu([600, 650, 700, 800], [1000, 1200, 1500, 3050]).pvalue
    p_w = ttest_ind([600, 650, 700, 800], [1000, 1200, 1500], equal_var=False).pvalue
    assert f"4/4 vs 3/4 generalised, Fisher exact p = {fisher_exact([[3, 1], [4, 0]]).pvalue:.2g}" in line
    assert f"Mann-Whitney p = {p_mw:.2g}" in line and f"Welch p = {p_w:.2g}" in line
    assert "688 vs 1233" in line
    none = {"generalised": 0, "seeds": 4, "grok_steps": []}
    line = X._grok_pair(opts, ra, none, "adamw", "ddc_adam", fisher_exact)
    assert "Mann-Whitney" in line and "Welch" not in line  # no steps to average on one side
    assert "Mann-Whitney" not in X._grok_pair(opts, none, none, "adamw", "ddc_adam", fisher_exact)
