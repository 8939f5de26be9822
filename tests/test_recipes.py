"""Recipes of the paper's figure runs, per-role schedules, TensorBoard events, `equiopt reproduce`.

The expected numbers below are typed from issue #13's table (and, for the embedding/head
learning rates of the hybrid and AdamW variants, from the authors' README commands), not
read from equiopt.train.recipes.
"""

import dataclasses
import json
import math

import pytest
import torch

from equiopt.presets import resolve
from equiopt.train import loop as L
from equiopt.train.models import build_model
from equiopt.train.recipes import FIGURES, RECIPES, ReproduceOptions

pytestmark = pytest.mark.usefixtures("one_thread")

# -- issue #13's table -------------------------------------------------------------------
# role -> (learning rate, weight decay, map) of the figure runs; "muon" = per-head / per-expert Muon
TABLE = {
    "fig3": {
        "embedding": (5e-1, 0.0, "row_norm"),
        "lm_head": (5e-3, 0.0, "centered_row_norm"),
        "attention": (2e-2, 1e-3, "polar"),
        "mlp_in": (2e-2, 1e-3, "hybrid"),
        "mlp_out": (2e-2, 1e-3, "hybrid"),
        "vector": (5e-2, 1e-3, "adamw"),
    },
    "fig4": {
        "embedding": (5e-3, 0.0, "row_norm"),
        "lm_head": (5e-3, 0.0, "centered_row_norm"),
        "attention": (2e-2, 1e-3, "polar"),
        "mlp_in": (2e-2, 1e-3, "hybrid"),
        "mlp_out": (2e-2, 1e-3, "hybrid"),
        "vector": (5e-2, 1e-3, "adamw"),
    },
    "fig5": {
        "embedding": (5e-1, 0.0, "row_norm"),
        "lm_head": (5e-3, 0.0, "centered_row_norm"),
        "attention": (5e-3, 1e-3, "polar"),
        "router": (7.5e-4, 0.0, "centered_row_norm"),
        "expert_in": (5e-3, 1e-3, "polar"),
        "expert_out": (5e-3, 1e-3, "polar"),
        "vector": (1e-2, 1e-3, "adamw"),
    },
    "fig2": {
        "embedding": (1e-1, 0.0, "row_norm"),
        "lm_head": (1e-3, 0.0, "centered_row_norm"),
        "attention": (1e-3, 1e-3, "polar"),
        "router": (7.5e-4, 0.0, "centered_row_norm"),
        "expert_in": (1e-3, 1e-3, "polar"),
        "expert_out": (1e-3, 1e-3, "polar"),
        "vector": (5e-3, 1e-3, "adamw"),
    },
}
# model fields of the figure runs (the rest of each family's `paper` preset is unchanged)
MODELS = {
    "fig3": dict(
        arch="qwen3", num_layers=20, rope_theta=1e6, tie_embeddings=False, hidden_size=1024, intermediate_size=3072
    ),
    "fig4": dict(arch="gemma3", num_layers=18, tie_embeddings=False),
    "fig5": dict(arch="olmoe", num_layers=12, num_experts=32, top_k=8, aux_loss_coef=0.0),
    "fig2": dict(
        arch="gptoss",
        num_layers=12,
        hidden_size=2048,
        intermediate_size=2048,
        num_experts=16,
        top_k=4,
        aux_loss_coef=0.0,
    ),
}
RUN = {
    "fig3": (1024, 224, 30_000),
    "fig4": (1024, 144, 50_000),
    "fig5": (1024, 160, 30_000),
    "fig2": (1024, 64, 60_000),
}  # sequence length, global batch, steps
BASE = {
    "fig3": "rownorm-embed-head/hybrid-mlp",
    "fig4": "rownorm-embed-head/hybrid-mlp",
    "fig5": "rownorm-router",
    "fig2": "rownorm-router",
}
# embedding / LM-head learning rates of the dense variants (authors' README commands)
DENSE_EH = {
    "fig3": {
        "rownorm-embed-head/hybrid-mlp": (5e-1, 5e-3),
        "hybrid-embed-head/hybrid-mlp": (1.0, 1e-2),
        "adamw-embed-head/hybrid-mlp": (1e-1, 1e-3),
        "rownorm-embed-head/muon-mlp": (5e-1, 5e-3),
        "hybrid-embed-head/muon-mlp": (1.0, 1e-2),
        "adamw-embed-head/muon-mlp": (1e-1, 1e-3),
    },
    "fig4": {
        "rownorm-embed-head/hybrid-mlp": (5e-3, 5e-3),
        "hybrid-embed-head/hybrid-mlp": (1e-2, 1e-2),
        "adamw-embed-head/hybrid-mlp": (5e-4, 5e-4),
        "rownorm-embed-head/muon-mlp": (2.5e-3, 2.5e-3),
        "hybrid-embed-head/muon-mlp": (2.5e-3, 2.5e-3),
        "adamw-embed-head/muon-mlp": (5e-4, 5e-4),
    },
}
ROUTER_MAPS = {
    "rownorm-router": "centered_row_norm",
    "left-spectral-router": "left_spectral",
    "adamw-router": "adamw",
    "adamw-embed-head-router": "adamw",
}


def _specs(cfg):
    """What the harness hands equiopt.plan: the paper preset, the config's rules and absolute LRs."""
    return resolve("paper", rules=cfg.rules, lr=cfg.role_lr)


@pytest.mark.parametrize("fig", ["fig2", "fig3", "fig4", "fig5"])
def test_figure_recipe_matches_the_issue_table(fig):
    r = RECIPES[fig]
    cfg = r.train_config(BASE[fig], scale="paper")
    mc = cfg.model_config(vocab_size=1000)
    for k, v in MODELS[fig].items():
        assert getattr(mc, k) == v, (fig, k)
    assert (cfg.seq_len, cfg.batch_size, cfg.steps) == RUN[fig]
    assert mc.aux_loss is False  # router aux-loss coefficient 0, not in the loss
    specs = _specs(cfg)
    for role, (lr, wd, map_) in TABLE[fig].items():
        s = specs[role]
        assert (math.isclose(s["lr"], lr), s["weight_decay"], s["map"]) == (True, wd, map_), (fig, role, s)
        if map_ == "polar":  # Muon: Nesterov, Polar Express, momentum 0.95, sqrt(max(1, A/B))
            assert (s["nesterov"], s["polar_method"], s["momentum"], s["scale"]) == (
                True,
                "polar_express",
                0.95,
                "muon",
            )
        if map_ == "adamw":
            assert tuple(s["betas"]) == (0.9, 0.95)
        if map_ in ("row_norm", "centered_row_norm", "hybrid"):
            assert s["momentum"] == 0.95 and not s["nesterov"]
    assert specs["attention"]["per_head"]
    assert cfg.role_schedule == {"vector": "warmup_cosine:100", "*": "stable_decay:0.4"}
    if fig in ("fig3", "fig4"):
        assert specs["mlp_in"]["order"] == "row_then_polar" and specs["mlp_out"]["column_aware"]


@pytest.mark.parametrize("fig", ["fig3", "fig4"])
def test_dense_grid_embedding_head_x_mlp(fig):
    r = RECIPES[fig]
    assert sorted(r.variant_names) == sorted(DENSE_EH[fig])
    for v, (lr_e, lr_h) in DENSE_EH[fig].items():
        specs = _specs(r.train_config(v, scale="paper"))
        eh, mlp = v.split("/")
        want = {
            "rownorm-embed-head": ("row_norm", "centered_row_norm"),
            "hybrid-embed-head": ("hybrid", "hybrid"),
            "adamw-embed-head": ("adamw", "adamw"),
        }[eh]
        assert (specs["embedding"]["map"], specs["lm_head"]["map"]) == want
        assert math.isclose(specs["embedding"]["lr"], lr_e) and math.isclose(specs["lm_head"]["lr"], lr_h)
        assert specs["embedding"]["weight_decay"] == 0 and specs["lm_head"]["weight_decay"] == 0
        assert specs["mlp_in"]["map"] == ("hybrid" if mlp == "hybrid-mlp" else "polar")
        assert math.isclose(specs["mlp_in"]["lr"], 2e-2) and specs["mlp_in"]["weight_decay"] == 1e-3
        for role in ("attention", "vector"):  # everything else fixed
            assert specs[role] == _specs(r.train_config(BASE[fig]))[role]


@pytest.mark.parametrize("fig", ["fig2", "fig5"])
def test_moe_grid_router_rules_and_reference(fig):
    r = RECIPES[fig]
    assert sorted(r.variant_names) == sorted(ROUTER_MAPS)
    base = _specs(r.train_config(BASE[fig]))
    for v, map_ in ROUTER_MAPS.items():
        specs = _specs(r.train_config(v))
        assert specs["router"]["map"] == map_
        assert math.isclose(specs["router"]["lr"], 7.5e-4) and specs["router"]["weight_decay"] == 0
        for role in ("attention", "expert_in", "expert_out", "vector"):
            assert specs[role] == base[role], (v, role)
        if v == "adamw-embed-head-router":  # the all-AdamW reference (embedding, head, router)
            assert specs["embedding"]["map"] == specs["lm_head"]["map"] == "adamw"
            assert math.isclose(specs["embedding"]["lr"], 5e-4) and math.isclose(specs["lm_head"]["lr"], 5e-4)
        else:
            assert specs["embedding"] == base["embedding"] and specs["lm_head"] == base["lm_head"]


@pytest.mark.parametrize("fig", FIGURES)
def test_harness_builds_the_recipe_groups(fig):
    """The optimizer the trainer builds (CPU-scale model, same role structure) carries the recipe's values."""
    r = RECIPES[fig]
    cfg = r.train_config(BASE[fig], scale="cpu")
    mc = cfg.model_config(vocab_size=512)
    assert (mc.hidden_size, mc.num_layers, mc.num_experts, mc.top_k) == (
        128,
        4,
        MODELS[fig].get("num_experts", 0),
        MODELS[fig].get("top_k", 0),
    )
    opt, _ = L.make_optimizer(
        build_model(mc),
        cfg.optimizer,
        cfg.lr_scale,
        cfg.role_lr_scale,
        rules=cfg.rules,
        role_lr=cfg.role_lr,
        roles=cfg.roles,
        layouts=cfg.layouts,
    )
    groups = {g["role"]: g for g in opt.param_groups}
    for role, (lr, wd, map_) in TABLE[fig].items():
        assert math.isclose(groups[role]["lr"], lr) and groups[role]["weight_decay"] == wd
        assert groups[role]["map"] == map_


# -- per-role schedules ------------------------------------------------------------------


def test_schedule_curves_hand_computed():
    cfg = L.TrainConfig(steps=10)
    f = L.schedule_lambda(cfg, "stable_decay:0.4")
    # 1 while at least 40% of the run is left, then (1 - s/N) / 0.4
    assert [f(s) for s in range(11)] == pytest.approx([1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0], abs=1e-9)
    g = L.schedule_lambda(dataclasses.replace(cfg, steps=11), "warmup_cosine:3")
    # s/3 over the warm-up, then 0.5 (1 + cos(pi (s - 3) / 8))
    want = [
        0,
        1 / 3,
        2 / 3,
        1,
        0.9619397662556434,
        0.8535533905932737,
        0.6913417161825449,
        0.5,
        0.3086582838174551,
        0.14644660940672627,
        0.03806023374435663,
        0.0,
    ]
    assert [g(s) for s in range(12)] == pytest.approx(want, abs=1e-12)
    assert L.schedule_lambda(cfg, "constant")(7) == 1.0
    assert L.schedule_lambda(dataclasses.replace(cfg, warmup=2), "cosine")(0) == pytest.approx(0.5)
    for bad in ("stable_decay", "stable_decay:0", "stable_decay:1.5", "warmup_cosine:2.5", "linear", "cosine:3"):
        with pytest.raises(ValueError, match="role_schedule"):
            L.TrainConfig(role_schedule={"vector": bad})
    with pytest.raises(ValueError, match="unknown role 'head'"):
        L.TrainConfig(role_schedule={"head": "constant"})


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_one_lambdalr_with_a_curve_per_group():
    cfg = L.TrainConfig(steps=10, role_schedule={"vector": "warmup_cosine:2", "*": "stable_decay:0.4"})
    mc = RECIPES["fig3"].train_config(BASE["fig3"], scale="cpu").model_config(vocab_size=512)
    opt, _ = L.make_optimizer(build_model(mc), "paper")
    fns = L.role_lr_lambdas(cfg, opt.param_groups)
    base = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fns)
    assert sched.base_lrs == base
    for g, b in zip(opt.param_groups, base):  # step 0: the warm-up starts from 0, the rest at full rate
        assert g["lr"] == (0.0 if g["role"] == "vector" else b)
    for s in range(1, 11):
        sched.step()
        for g, b in zip(opt.param_groups, base):
            want = (
                b * (min(s / 2, 1.0) if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)))
                if g["role"] == "vector"
                else b * min(1.0, max(1 - s / 10, 1e-12) / 0.4)
            )  # clamped as theirs
            assert g["lr"] == pytest.approx(want, rel=1e-12, abs=1e-18), (s, g["role"])
    # without role_schedule: the single schedule of today (every group the same multiplier)
    assert L.role_lr_lambdas(L.TrainConfig(steps=10), opt.param_groups)[0](5) == L.lr_lambda(L.TrainConfig(steps=10))(5)


# -- runs: resume continues the schedules; TensorBoard events ------------------------------


def _recipe_cfg(corpus, out, fig="fig5", **kw):
    r = RECIPES[fig]
    small = dict(steps=8, batch_size=4, eval_every=2, eval_tokens=256, ckpt_every=3, data=corpus[0], out=str(out))
    small.update(kw)
    cfg = r.train_config(BASE[fig], scale="cpu", **small)
    model = {
        **cfg.model,
        "hidden_size": 32,
        "head_dim": 16,
        "num_heads": 2,
        "num_kv_heads": 2,
        "intermediate_size": 16,
        "num_layers": 2,
        "num_experts": 8,
        "top_k": 2,
    }
    return dataclasses.replace(
        cfg, model=model, seq_len=32, role_schedule={"vector": "warmup_cosine:3", "*": "stable_decay:0.4"}
    )


def _strip(recs):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "opt_step_s")} for r in recs]


def test_resume_continues_the_role_schedules_exactly(corpus, tmp_path):
    ref = _recipe_cfg(corpus, tmp_path / "ref")
    L.train(ref, progress=False, log=lambda m: None, prepared=corpus[1])
    cut = _recipe_cfg(corpus, tmp_path / "cut")
    L.train(cut, progress=False, log=lambda m: None, prepared=corpus[1], stop_after=5)  # checkpoint at 3
    L.train(cut, resume=True, progress=False, log=lambda m: None, prepared=corpus[1])
    a, b = L.read_metrics(ref.out), L.read_metrics(cut.out)
    assert _strip(a) == _strip(b)
    lrs = {r["step"]: r["lr"] for r in a}
    # the learning rate of the step just taken (step s - 1 of 8): vector warm-up/cosine, the rest stable/decay
    assert lrs[2]["vector"] == pytest.approx(1e-2 * 1 / 3)
    assert lrs[8]["router"] == pytest.approx(7.5e-4 * (1 / 8) / 0.4)
    assert lrs[4]["embedding"] == pytest.approx(5e-1)
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert ck["scheduler"]["last_epoch"] == 8


def test_tensorboard_events_hold_every_scalar(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _recipe_cfg(corpus, tmp_path / "run")
    L.train(cfg, progress=False, log=lambda m: None, prepared=corpus[1], stop_after=5)
    L.train(cfg, resume=True, progress=False, log=lambda m: None, prepared=corpus[1])  # purges steps > 3
    ea = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    recs = L.read_metrics(cfg.out)
    for tag in (
        "train_loss",
        "val_loss",
        "lr/vector",
        "lr/router",
        "lr/embedding",
        "logits/max_abs",
        "routing/load_cv",
        "routing/z_loss",
        "routing/top_load",
        "grad_norm_max",
        "lr_factor",
    ):
        assert tag in tags, tag
    assert any(t.startswith("routing_layers/") for t in tags)
    for tag in ("val_loss", "lr/router", "routing/load_cv", "logits/centered_rms"):
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in recs]  # one value per step after the resume
        path = tag.split("/")
        want = [r[path[0]] if len(path) == 1 else r[path[0]][path[1]] for r in recs]
        assert [e.value for e in events] == pytest.approx(want, rel=1e-6)


def test_tensorboard_can_be_switched_off(corpus, tmp_path):
    cfg = dataclasses.replace(_recipe_cfg(corpus, tmp_path / "run", steps=2), tensorboard=False)
    L.train(cfg, progress=False, log=lambda m: None, prepared=corpus[1])
    assert not (tmp_path / "run" / "tb").exists()


# -- equiopt reproduce --------------------------------------------------------------------


def test_reproduce_options_are_checked():
    with pytest.raises(ValueError, match="unknown variant"):
        ReproduceOptions(figure="fig3", variants=["muon"])
    with pytest.raises(ValueError, match="lr_scales"):
        ReproduceOptions(figure="fig5", lr_scales=[0.0])
    with pytest.raises(ValueError, match="figure"):
        ReproduceOptions(figure="fig9")


def test_reproduce_takes_a_previous_sweeps_choice(tmp_path, monkeypatch):
    """--lr-from-sweep: the seeds run at each variant's multiplier from a best.json, no sweep
    runs; a missing file or variant is an error naming it; it excludes --lr-scales."""
    from equiopt.train import recipes as R

    best = tmp_path / "best.json"
    best.write_text(json.dumps({"rownorm-router": {"lr_scale": 4.0}, "adamw-router": {"lr_scale": 2.0}}))
    opts = ReproduceOptions(figure="fig5", variants=["rownorm-router", "adamw-router"], lr_from_sweep=str(best))
    assert R._swept(opts) == {"rownorm-router": 4.0, "adamw-router": 2.0}
    cfgs = opts.configs([0, 1], tmp_path / "out", R._swept(opts))
    assert sorted((c.variant, c.lr_scale) for c in cfgs) == [("adamw-router", 2.0)] * 2 + [("rownorm-router", 4.0)] * 2
    with pytest.raises(ValueError, match="left-spectral-router"):
        R._swept(dataclasses.replace(opts, variants=["left-spectral-router"]))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        R._swept(dataclasses.replace(opts, lr_from_sweep=str(tmp_path / "nope.json")))
    with pytest.raises(ValueError, match="exclude"):
        ReproduceOptions(figure="fig5", lr_from_sweep=str(best), lr_scales=[1.0])
    assert R._swept(ReproduceOptions(figure="fig5")) == {}


@pytest.mark.parametrize(
    "losses, expected",
    [
        ({0.5: 3.0, 1.0: 2.0, 2.0: 1.0}, 4.0),  # best at the top: one ratio beyond
        ({0.5: 1.0, 1.0: 2.0, 2.0: 3.0}, 0.25),  # best at the bottom
        ({0.5: 2.0, 1.0: 1.0, 2.0: 3.0}, None),  # interior
        ({0.5: 2.0, 1.0: 1.5, 2.0: math.inf}, None),  # top diverged, best interior
        ({0.5: math.inf, 1.0: math.inf}, 0.25),  # all diverged: go lower
        ({1.0: 1.0}, None),  # one point has no edge direction
        ({0.25: 2.0, 0.5: 1.0, 1.0: 3.0, 2.0: 4.0}, None),
    ],
)
def test_edge_extension(losses, expected):
    from equiopt.train.experiments import edge_extension

    assert edge_extension(losses) == expected


def test_reproduce_sweep_extends_winning_edges(tmp_path, monkeypatch):
    """Synthetic losses (no training), optimum per variant: x4 and x0.5 outside the grid [1, 2], x1 on it."""
    from equiopt.train import recipes as R

    optimum = {"rownorm-router": 4.0, "left-spectral-router": 0.5, "adamw-router": 1.0}
    calls = []

    def fake_run_many(cfgs, **kw):
        calls.append(sorted((c.variant, c.lr_scale) for c in cfgs))
        return [{"status": "done", "val_loss": (math.log(c.lr_scale / optimum[c.variant])) ** 2} for c in cfgs]

    monkeypatch.setattr(R, "run_many", fake_run_many)
    opts = ReproduceOptions(figure="fig5", variants=list(optimum), lr_scales=[1.0, 2.0], extend_edges=3)
    chosen = R._sweep_variants(opts, tmp_path, {"log": lambda m: None})
    assert chosen == optimum
    # round 1: one step past each winning edge (adamw-router's x1 sits on the lower edge of [1, 2])
    assert calls[1] == [("adamw-router", 0.5), ("left-spectral-router", 0.5), ("rownorm-router", 4.0)]
    assert calls[2] == [("left-spectral-router", 0.25), ("rownorm-router", 8.0)]
    assert len(calls) == 3  # every best is interior after round 2
    best = json.loads((tmp_path / "sweep" / "best.json").read_text())
    assert best["rownorm-router"]["at_grid_edge"] is False and best["adamw-router"]["at_grid_edge"] is False
    assert [p[0] for p in best["rownorm-router"]["points"]] == [1.0, 2.0, 4.0, 8.0]
    stopped = ReproduceOptions(figure="fig5", variants=["rownorm-router"], lr_scales=[0.5, 1.0], extend_edges=0)
    calls.clear()
    assert R._sweep_variants(stopped, tmp_path / "b", {"log": lambda m: None}) == {"rownorm-router": 1.0}
    assert (
        len(calls) == 1
        and json.loads((tmp_path / "b" / "sweep" / "best.json").read_text())["rownorm-router"]["at_grid_edge"]
    )


def test_reproduce_cli_runs_a_grid_with_contrasts(corpus, tmp_path, monkeypatch):
    from equiopt import cli

    monkeypatch.setenv("EQUIOPT_CACHE", corpus[0].cache)
    out = tmp_path / "rep"
    variants = "rownorm-embed-head/hybrid-mlp,adamw-embed-head/hybrid-mlp"
    argv = [
        "reproduce",
        "fig3",
        "--scale",
        "cpu",
        "--seeds",
        "2",
        "--variants",
        variants,
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--eval-every",
        "3",
        "--eval-tokens",
        "256",
        "--data",
        corpus[0].source,
        "--lr-scales",
        "0.5,1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    md = (out / "summary.md").read_text()
    assert "rownorm-embed-head/hybrid-mlp" in md and "Block-wise contrasts" in md
    others = md.split("## Block-wise contrasts, the other observables")[1].split("##")[0]
    assert "logit_max_abs" in others and "router_load_cv" not in others  # dense: no routing metrics
    summary = json.loads((out / "summary.json").read_text())["summary"]["qwen3"]
    assert set(summary) == set(variants.split(","))
    assert summary["adamw-embed-head/hybrid-mlp"]["val_loss"]["n"] == 2
    assert summary["adamw-embed-head/hybrid-mlp"]["val_loss"]["p_vs_paper"] is not None  # vs the baseline
    assert (out / "val_loss.png").exists() and (out / "sweep" / "best.json").exists()
    run = json.loads((out / "runs" / "adamw-embed-head__hybrid-mlp" / "seed1" / "config.json").read_text())
    assert run["variant"] == "adamw-embed-head/hybrid-mlp" and run["steps"] == 3
    assert run["role_lr"]["embedding"] == 1e-1 and run["rules"]["embedding"]["map"] == "adamw"
    # A rerun (a restarted run.sh) reuses every finished run: the recorded configs, whose AdamW
    # betas came back from JSON as lists, match the recipe's tuples; nothing is retrained.
    finals = sorted(out.glob("**/final.json"))
    stamps = [f.stat().st_mtime_ns for f in finals]
    assert len(finals) >= 8 and cli.main(argv) == 0
    assert [f.stat().st_mtime_ns for f in finals] == stamps


def test_contrast_metrics_table_differences_and_welch_p():
    """Each cell is mean(a) - mean(b) with scipy's Welch p of the two samples (independent
    oracle: the values written here); a metric one side lacks is '-', one no pair has is left out."""
    from scipy.stats import ttest_ind

    from equiopt.train.report import contrast_metrics_table

    def cell(values):
        return {"values": values, "mean": sum(values) / len(values), "n": len(values)}

    summary = {
        "olmoe": {
            "a": {"router_load_cv": cell([0.4, 0.45, 0.5]), "logit_max_abs": cell([20.0, 21.0, 22.0])},
            "b": {"router_load_cv": cell([1.0, 1.1, 1.05])},
            "c": {"router_load_cv": cell([0.8, 0.9, 0.7]), "logit_max_abs": cell([20.5, 20.0, 21.5])},
        }
    }
    pairs = [("a", "b"), ("a", "c"), ("a", "missing")]
    rows = contrast_metrics_table(summary, pairs, ["router_load_cv", "logit_max_abs", "x"])
    assert rows[0] == "| arch | a | b | router_load_cv | logit_max_abs |" and len(rows) == 4
    p = ttest_ind([0.4, 0.45, 0.5], [1.0, 1.1, 1.05], equal_var=False).pvalue
    assert rows[2] == f"| olmoe | a | b | {0.45 - 1.05:+.3f} (p {p:.1e}) | - |"
    p2 = ttest_ind([20.0, 21.0, 22.0], [20.5, 20.0, 21.5], equal_var=False).pvalue
    assert rows[3].endswith(f"| {21.0 - 20.666666666666668:+.3f} (p {p2:.3f}) |")
