"""Dead-direction diagnostics on constructed cases whose answer is known by construction:
a neuron forced dead, an expert the router can never pick, an embedding row carried by
momentum while its token is absent, a shift of the LM head that a centered map never undoes,
and a known rescaling along the up/down orbit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_audit import HID, PLAIN_LAYOUTS, E, PlainGPT, V
from torch import nn

import equiopt
from equiopt.diagnostics import DiagnosticsTracker, plot_history

pytestmark = pytest.mark.usefixtures("one_thread")


def model_with_router_bias(seed=0):
    torch.manual_seed(seed)
    m = PlainGPT()
    m.blocks[1].mlp.router = nn.Linear(m.wte.weight.shape[1], E, bias=True)  # router + bias
    return m


def loss_of(m, ids):
    logits = m(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))


def train(m, opt, tracker, batches):
    for ids in batches:
        opt.zero_grad()
        loss_of(m, ids).backward()
        opt.step()
        tracker.step()


def batches(n, low=0, high=V, seed=0, B=2, T=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (B, T), generator=g) for _ in range(n)]


@pytest.mark.parametrize("preset", ["adamw", "paper"])
def test_forced_dead_neuron_is_found(preset):
    m = model_with_router_bias()
    mlp = m.blocks[0].mlp
    dead = 5
    with torch.no_grad():  # gate row, up row and down column of neuron 5: zero activation, zero gradient
        mlp.w1.weight[dead] = 0
        mlp.w3.weight[dead] = 0
        mlp.w2.weight[:, dead] = 0
    plan = equiopt.plan(m, layouts=PLAIN_LAYOUTS)
    opt = equiopt.build(plan) if preset == "paper" else equiopt.build(m, preset="adamw", layouts=PLAIN_LAYOUTS)
    tr = DiagnosticsTracker(m, plan)
    train(m, opt, tr, batches(4))
    assert tr.dead_neurons("blocks.0.mlp", by="update").tolist() == [[0, dead]]
    assert tr.dead_neurons("blocks.0.mlp", by="act").tolist() == [[0, dead]]
    rec = tr.record(4)
    assert rec["dead_act/blocks.0.mlp"] == pytest.approx(1 / HID)
    assert rec["dead_update/blocks.0.mlp"] == pytest.approx(1 / HID)
    assert rec["dead_update/blocks.1.mlp.experts"] == 0.0  # every expert neuron learns
    assert rec["window_steps"] == 4
    tr.close()


def test_dead_expert_is_found():
    m = model_with_router_bias()
    with torch.no_grad():
        m.blocks[1].mlp.router.bias[3] = -1e4  # expert 3 can never be in the top-2
    plan = equiopt.plan(m, layouts=PLAIN_LAYOUTS)
    tr = DiagnosticsTracker(m, plan)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    train(m, opt, tr, batches(2))
    rec = tr.record(2)
    assert rec["dead_experts/blocks.1.mlp.router"] == pytest.approx(1 / E)
    # no evaluation forward (no_grad) is counted
    with torch.no_grad():
        m(batches(1)[0])
    assert tr.record(3).get("dead_experts/blocks.1.mlp.router") is None
    tr.close()


def test_stale_momentum_row_is_found():
    """Token 7 occurs at step 1 only. With momentum (Adam) its row keeps moving at steps 2-3;
    rows of tokens never seen have zero momentum and stay; plain SGD moves no absent row."""
    g = torch.Generator().manual_seed(1)
    ids1 = torch.cat([torch.tensor([7]), torch.arange(8, V)])[torch.randperm(V - 7, generator=g)].reshape(3, 19)
    later = [(8 + torch.randperm(V - 8, generator=g)).reshape(4, 14) for _ in range(2)]  # tokens 0..7 absent
    for opt_name, expect in (("adam", [7]), ("sgd", [])):
        m = model_with_router_bias()
        plan = equiopt.plan(m, layouts=PLAIN_LAYOUTS)
        if opt_name == "adam":
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        else:
            opt = torch.optim.SGD(m.parameters(), lr=1e-2)
        tr = DiagnosticsTracker(m, plan)
        train(m, opt, tr, [ids1])
        for ids in later:
            train(m, opt, tr, [ids])
            assert tr.last_stale.tolist() == expect, opt_name
        rec = tr.record()
        if opt_name == "adam":  # step 1: no stale row (fresh optimizer); steps 2, 3: token 7 of 8 absent
            assert rec["stale_rows"] == pytest.approx((0 + 1 / 8 + 1 / 8) / 3)
            assert rec["stale_update_ratio"] > 0
        else:
            assert rec["stale_rows"] == 0.0
        tr.close()


def test_weight_decay_is_not_stale_momentum():
    """Decoupled weight decay moves every row; given the optimizer, the tracker removes it."""
    g = torch.Generator().manual_seed(1)
    ids1 = torch.cat([torch.tensor([7]), torch.arange(8, V)])[torch.randperm(V - 7, generator=g)].reshape(3, 19)
    later = (8 + torch.randperm(V - 8, generator=g)).reshape(4, 14)
    for give, expect in ((True, [7]), (False, list(range(8)))):
        m = model_with_router_bias()
        plan = equiopt.plan(m, layouts=PLAIN_LAYOUTS)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
        tr = DiagnosticsTracker(m, plan, optimizer=opt if give else None)
        train(m, opt, tr, [ids1, later])
        assert tr.last_stale.tolist() == expect
        tr.close()


def test_centered_head_map_never_moves_along_the_shift_orbit():
    """The paper preset's centered LM-head map has zero column sums: the head's mean row is
    constant over training (wd 0 for the head); AdamW moves it."""
    for preset, moves in (("paper", False), ("adamw", True)):
        m = model_with_router_bias()
        plan = equiopt.plan(m, preset=preset, layouts=PLAIN_LAYOUTS)
        tr = DiagnosticsTracker(m, plan)
        before = tr.record(0)
        key = "head_mean_row_abs/head.weight"
        train(m, equiopt.build(plan), tr, batches(3))
        after = tr.record(3)
        change = abs(after[key] - before[key]) / before[key]
        assert (change > 1e-3) == moves, (preset, change)
        # the router's centered map too (paper), AdamW moves it
        rkey = "router_mean_row_abs/blocks.1.mlp.router.weight"
        assert (abs(after[rkey] - before[rkey]) / before[rkey] > 1e-3) == moves
        tr.close()


@torch.no_grad()
def test_updown_orbit_coordinate_follows_a_known_rescaling():
    m = model_with_router_bias()
    plan = equiopt.plan(m, layouts=PLAIN_LAYOUTS)
    tr = DiagnosticsTracker(m, plan)
    before = tr.orbit_drift()
    a = torch.randn(HID, generator=torch.Generator().manual_seed(0))
    mlp = m.blocks[0].mlp
    mlp.w3.weight.mul_(a.exp()[:, None])  # up rows (w3: the linear branch) times e^a
    mlp.w2.weight.div_(a.exp()[None, :])  # down columns / e^a: the function is unchanged
    after = tr.orbit_drift()
    k = "updown_log_ratio_mean/blocks.0.mlp"
    assert after[k] - before[k] == pytest.approx(2 * float(a.mean()), abs=1e-5)  # log(e^a up / (down / e^a))
    assert after["updown_log_ratio_std/blocks.1.mlp.experts"] == before["updown_log_ratio_std/blocks.1.mlp.experts"]
    tr.close()


def test_plot_history(tmp_path):
    hist = {}
    for preset in ("adamw", "paper"):
        m = model_with_router_bias()
        plan = equiopt.plan(m, preset=preset, layouts=PLAIN_LAYOUTS)
        tr = DiagnosticsTracker(m, plan)
        opt = equiopt.build(plan)
        for i, b in enumerate(batches(4, seed=5)):
            train(m, opt, tr, [b])
            if i % 2 == 1:
                tr.record(i + 1)
        hist[preset] = tr.history
        tr.close()
    path = tmp_path / "diag.png"
    keys = plot_history(hist, path, title="test")
    assert path.stat().st_size > 1000
    assert {"dead_update", "dead_experts", "stale_rows", "head_mean_row", "updown_log_ratio_std"} <= set(keys)
    assert all(math.isfinite(r["head_mean_row"]) for r in hist["paper"])


def test_state_dict_round_trip_and_errors():
    m = model_with_router_bias()
    plan = equiopt.plan(m, layouts=PLAIN_LAYOUTS)
    tr = DiagnosticsTracker(m, plan)
    tr.record(0)
    tr2 = DiagnosticsTracker(m, plan)
    tr2.load_state_dict(tr.state_dict())
    assert tr2.history == tr.history
    with pytest.raises(KeyError, match="blocks.0.mlp"):
        tr2.dead_neurons("blocks.9.mlp")
    with pytest.raises(ValueError, match="token_embedding"):
        DiagnosticsTracker(m, plan, token_embedding="nope")
    tr.close()
    tr2.close()


@torch.no_grad()
def test_orbit_coordinates_come_from_the_blocks_not_the_names():
    """Unconventionally named MLP (p, r, s) and head (unembed): the tracker reads the plan's
    blocks; the up/down coordinate follows a rescaling of the last in-projection part, the
    head's mean row follows a shift W + 1 c^T."""
    from test_audit import UNCONVENTIONAL, D, NamedLM

    torch.manual_seed(0)
    m = NamedLM(*UNCONVENTIONAL)
    tr = DiagnosticsTracker(m, equiopt.plan(m))
    before = tr.orbit_drift()
    a = torch.randn(HID, generator=torch.Generator().manual_seed(0))
    m.ff.r.weight.mul_(a.exp()[:, None])
    m.ff.s.weight.div_(a.exp()[None, :])
    c = torch.randn(D, generator=torch.Generator().manual_seed(1))
    mean_row = m.unembed.weight.mean(0).clone()
    m.unembed.weight.add_(c)
    after = tr.orbit_drift()
    assert after["updown_log_ratio_mean/ff"] - before["updown_log_ratio_mean/ff"] == pytest.approx(
        2 * float(a.mean()), abs=1e-5
    )
    assert after["head_mean_row_abs/unembed.weight"] == pytest.approx(float((mean_row + c).norm()), rel=1e-5)
    tr.close()


def test_verify_and_diagnostics_import_only_downwards():
    """The audit (equiopt.verify) and the diagnostics import neither each other nor the
    optimizer side, and import nothing inside functions but optional plotting."""
    import ast
    import pathlib

    src = pathlib.Path(equiopt.__file__).parent
    files = [src / "diagnostics.py", src / "audit.py", *sorted((src / "verify").glob("*.py"))]
    banned = {"optimizer", "fastpath", "distributed"}
    for f in files:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                mod = (node.module or "").split(".")
                assert not banned & set(mod), (f.name, node.module)
                assert not (f.name == "diagnostics.py" and {"audit", "verify"} & set(mod)), node.module
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            inner = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert all(isinstance(n, ast.Import) and n.names[0].name.startswith("matplotlib") for n in inner), (
                f.name,
                fn.name,
            )
