"""Conformance suite: every optimizer configuration in ``CONFIGS`` passes the same checks.

In the spirit of torch's ``OptimizerInfo`` tests: one table of configurations, one set of
checks parametrized over all of them. Each check compares against something independent
of the code under test where one exists (``torch.optim.AdamW``, the update formula written
out below, a second optimizer run the plain way), so that it can fail.

Adding a preset (say ``ddc_adam``) is one row: ``Config("ddc_adam", "ddc_adam")`` (plus a
``foreach=False`` row). A row with a bit-exact torch counterpart sets ``torch_reference``.

Checks (parametrized over every row):

* first step == the update formula (EMA momentum, Nesterov, map on the logical matrices,
  Muon scale, decoupled weight decay; AdamW's closed-form first step), float64;
* bitwise parity with a torch optimizer over several steps (rows that have one);
* state_dict round trip into a fresh optimizer on a copy of the model: bitwise continuation;
* LR schedulers (LambdaLR, StepLR) set every group's lr and the step uses it;
* foreach kernels == the per-parameter loop, bitwise;
* dtypes: float32 / float64 / bfloat16 parameters keep their dtype, stay finite, and the
  state has the documented keys and dtypes;
* ``step(closure)`` returns the closure's loss and steps on the gradients it recomputed;
* ``copy.deepcopy`` / ``pickle`` of (model, optimizer) steps like the original;
* ``zero_grad()`` then ``step()`` changes nothing; parameters with ``grad=None`` are skipped;
* ``add_param_group`` steps the new group like a standalone optimizer; loading a state with
  a different number (or size) of groups raises.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import equiopt
from equiopt import maps
from equiopt.layouts import MATRIX
from equiopt.optimizer import EquiOptimizer

from plain_gpt import FUSED_LAYOUTS, PlainGPT

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------


def torch_adamw(model: nn.Module, options: dict) -> torch.optim.Optimizer:
    """The ``adamw`` preset as documented (README "Presets"): lr 3e-3, betas (0.9, 0.95),
    eps 1e-8, weight decay 0.1 on 2-D and higher weights, 0 on vectors; torch's fused kernel
    unless the row sets ``foreach`` (then torch's multi-tensor or per-tensor AdamW). Written
    out here, not read from equiopt, so that a drift of the preset fails the parity check."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    foreach = options.get("foreach")
    fused = options.get("fused", foreach is None)
    return torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=foreach, fused=fused or None)


@dataclass(frozen=True)
class Config:
    """One row: ``equiopt.build(model, preset=preset, **options)``."""

    id: str
    preset: str
    options: dict = field(default_factory=dict)
    #: builds a torch optimizer that must match this row bit for bit (or None)
    torch_reference: Callable[[nn.Module, dict], torch.optim.Optimizer] | None = None

    @property
    def uses_matrix_maps(self) -> bool:
        """Some role runs an update map (not torch's AdamW step)."""
        return any(spec["map"] != "adamw" for spec in equiopt.resolve(self.preset, **self.options).values())


CONFIGS = [
    Config("adamw", "adamw", torch_reference=torch_adamw),  # AdamW(fused=True)
    Config("adamw-foreach", "adamw", {"foreach": True}, torch_reference=torch_adamw),
    Config("adamw-loop", "adamw", {"foreach": False}, torch_reference=torch_adamw),
    Config("adamw-unfused", "adamw", {"fused": False}, torch_reference=torch_adamw),  # torch's default kernels
    Config("muon", "muon"),
    Config("muon-loop", "muon", {"foreach": False}),
    Config("paper", "paper"),
    Config("paper-loop", "paper", {"foreach": False}),
    Config("paper-ref", "paper", {"batched": False}),  # the per-parameter reference path
]

ROWS = [pytest.param(c, id=c.id) for c in CONFIGS]

COPY_ROWS = ROWS  # issue #12 item 5: copies keep layouts, names and the execution path


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

VOCAB = 32


def make_model(dtype: torch.dtype = torch.float32) -> PlainGPT:
    """Fused qkv attention, a SwiGLU MLP, a top-2 MoE with stacked fused experts, untied head:
    every role but tied_embedding and matrix."""
    torch.manual_seed(0)
    return PlainGPT(vocab=VOCAB, d=16, n_head=2, h=24, layers=2).to(dtype)


def build(cfg: Config, model: nn.Module, **extra) -> EquiOptimizer:
    return equiopt.build(model, preset=cfg.preset, layouts=FUSED_LAYOUTS, **{**cfg.options, **extra})


def set_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


def run(model: nn.Module, opt: torch.optim.Optimizer, seeds) -> None:
    for s in seeds:
        set_grads(model, s)
        opt.step()


def lm_loss(model: nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (2, 9), generator=g)
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), idx[:, 1:].reshape(-1))


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.dtype == pb.dtype and torch.equal(pa, pb), name


def assert_same(x, y, where: str = "state") -> None:
    """Recursive bitwise equality of state_dict-like structures."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), where
        for k in x:
            assert_same(x[k], y[k], f"{where}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


# ----------------------------------------------------------------------------------------
# the update formula, written out (float64)
# ----------------------------------------------------------------------------------------


def _map_kwargs(group: dict) -> dict:
    polar = {"method": group["polar_method"]}
    if group["polar_steps"] is not None:
        polar["steps"] = group["polar_steps"]
    return {
        "identity": {},
        "row_norm": {"eps": group["eps"]},
        "col_norm": {"eps": group["eps"]},
        "centered_row_norm": {"eps": group["eps"]},
        "polar": polar,
        "scaled_polar": {"alpha": group["alpha"], **polar},
        "right_spectral": {"alpha": group["alpha"]},
        "left_spectral": {"alpha": group["alpha"], "center": group["center"]},
        "hybrid": {"order": group["order"], "alpha": group["alpha"], "eps": group["eps"], **polar},
    }[group["map"]]


def first_step(group: dict, layout, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """p after one step from empty state (docs/symmetry.md, "Optimizer conventions")."""
    lr, wd = group["lr"], group["weight_decay"]
    if group["map"] == "adamw":  # m_hat = g, v_hat = g^2 after one step
        return p * (1 - lr * wd) - lr * g / (g.abs() + group["adam_eps"])
    beta = group["momentum"]
    m = (1 - beta) * g  # EMA from a zero buffer
    x = g + beta * (m - g) if group["nesterov"] else m
    layout = layout if group["per_head"] else layout.without_heads()
    logical = layout.to_logical(x)
    fn = maps.MAPS[group["map"]]
    kwargs = _map_kwargs(group)
    u = fn(logical.mT, **kwargs).mT if group["column_aware"] else fn(logical, **kwargs)
    if group["scale"] == "muon":
        u = u * math.sqrt(max(1.0, u.shape[-2] / u.shape[-1]))
    return p * (1 - lr * wd) - lr * layout.from_logical(u, p.shape)


# Tolerance of the first-step check, relative to the largest entry of the expected update.
# Same map, same float64 inputs; the optimizer may take another exact route (stacked
# batches, the Polar Express polynomial evaluated on Gram eigenvalues instead of by
# iterations), which changes rounding only. Observed worst case 3.4e-14 (stacked expert
# AdamW), i.e. ~150 float64 ulps; 1e-11 leaves a 300x margin, while a wrong map input,
# Muon scale, layout, momentum or decay is off by 1e-4 (decay) to O(1).
FIRST_STEP_TOL = 1e-11


@pytest.mark.parametrize("cfg", ROWS)
def test_first_step_equals_the_update_formula(cfg):
    model = make_model(torch.float64)
    opt = build(cfg, model)
    layouts = equiopt.plan(model, cfg.preset, layouts=FUSED_LAYOUTS, **cfg.options).layouts()
    before = {p: p.detach().clone() for p in model.parameters()}
    set_grads(model, 0)
    opt.step()
    names = {p: n for n, p in model.named_parameters()}
    seen = 0
    for group in opt.param_groups:
        for p in group["params"]:
            want = first_step(group, layouts.get(p, MATRIX), before[p], p.grad)
            delta_want, delta_got = want - before[p], p.detach() - before[p]
            scale = float(delta_want.abs().max())
            assert scale > 0, names[p]
            err = float((delta_got - delta_want).abs().max()) / scale
            assert err <= FIRST_STEP_TOL, f"{cfg.id} {names[p]} ({group['role']}, {group['map']}): {err:.2e}"
            seen += 1
    assert seen == len(list(model.parameters()))


@pytest.mark.parametrize("cfg", ROWS)
def test_matches_torch_optimizer_bitwise(cfg):
    if cfg.torch_reference is None:
        pytest.skip(f"{cfg.id}: no bit-exact torch counterpart (the first-step check covers it)")
    model = make_model()
    ref = copy.deepcopy(model)
    opt = build(cfg, model)
    torch_opt = cfg.torch_reference(ref, cfg.options)
    for s in range(4):
        set_grads(model, s)
        set_grads(ref, s)
        opt.step()
        torch_opt.step()
    assert_same_params(model, ref)


@pytest.mark.parametrize("options", [{"fused": True, "foreach": True}, {"fused": "yes"}])
def test_fused_option_is_validated(options):
    """``fused`` is None / True / False and not True with ``foreach=True`` (two kernels asked
    for at once): refused at build time, naming the role and both options."""
    with pytest.raises(ValueError, match=r"role '\w+': fused must be None .* got fused="):
        equiopt.build(make_model(), preset="adamw", **options)


def test_fused_adamw_is_not_used_across_memory_layouts():
    """torch's fused AdamW walks raw memory: a parameter stored transposed with a contiguous
    gradient gets wrong elements from it (shown here, so this test can fail). The default
    ``fused=None`` then steps that group with torch's other kernels: equal to
    ``AdamW(foreach=False)`` bit for bit."""
    from equiopt.functional import same_dense_layout

    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))  # contiguous
    out = {}
    for name in ("equiopt", "torch_loop", "torch_fused"):
        p = nn.Parameter(base.clone().t())  # [4, 6], strides (1, 4)
        p.grad = grad.clone()
        if name == "equiopt":
            opt = equiopt.EquiOptimizer([p], map="adamw", lr=0.1)
        else:
            opt = torch.optim.AdamW(
                [p], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False, fused=name == "torch_fused"
            )
        opt.step()
        out[name] = p.detach().clone()
    assert not torch.equal(out["torch_fused"], out["torch_loop"])  # the hazard is real
    assert torch.equal(out["equiopt"], out["torch_loop"])
    t = torch.zeros(3, 4)
    assert same_dense_layout(t, torch.ones(3, 4)) and same_dense_layout(t.t(), torch.ones(3, 4).t())
    assert not same_dense_layout(t.t(), torch.ones(4, 3))  # another order
    assert not same_dense_layout(torch.zeros(3, 6)[:, :4], torch.zeros(3, 6)[:, :4])  # gaps


# ----------------------------------------------------------------------------------------
# state_dict, schedulers, foreach
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ROWS)
def test_state_dict_round_trip_continues_bitwise(cfg):
    model = make_model()
    opt = build(cfg, model)
    run(model, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)  # the model at the same point
    twin_opt = build(cfg, twin)
    twin_opt.load_state_dict(saved)
    assert_same(twin_opt.state_dict(), saved)
    run(model, opt, range(3, 6))
    run(twin, twin_opt, range(3, 6))
    assert_same_params(model, twin)
    assert_same(opt.state_dict(), twin_opt.state_dict())


SCHEDULERS = {
    "LambdaLR": (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s), lambda s: 0.5**s),
    "StepLR": (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1), lambda s: 0.1 ** (s // 2)),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("cfg", ROWS)
def test_lr_scheduler_sets_every_group_and_the_step_uses_it(cfg, sched):
    """The scheduled run equals a run in which every step is taken by a FRESH optimizer
    (state loaded, lr set by hand), so no lr cached inside an optimizer can go unnoticed."""
    make_sched, factor = SCHEDULERS[sched]
    model = make_model()
    plain, manual = copy.deepcopy(model), copy.deepcopy(model)
    opt, plain_opt = build(cfg, model), build(cfg, plain)
    base = [g["lr"] for g in opt.param_groups]
    assert all(lr > 0 for lr in base)
    scheduler = make_sched(opt)
    state = None
    for s in range(5):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == pytest.approx([b * factor(s) for b in base], rel=1e-12, abs=0), s
        if factor(s) != 1:
            assert all(lr != b for lr, b in zip(lrs, base)), s
        manual_opt = build(cfg, manual)
        if state is not None:
            manual_opt.load_state_dict(state)
        for g, lr in zip(manual_opt.param_groups, lrs):  # the same numbers, set by hand
            g["lr"] = lr
        for m, o in ((model, opt), (plain, plain_opt), (manual, manual_opt)):
            set_grads(m, s)
            o.step()
        state = manual_opt.state_dict()
        scheduler.step()
    assert_same_params(model, manual)
    # and the schedule mattered: the unscheduled run went elsewhere
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))


@pytest.mark.parametrize("cfg", ROWS)
def test_foreach_equals_per_parameter_loop_bitwise(cfg):
    """Multi-tensor kernels (``foreach=True``) == the per-parameter loop (``False``), bitwise
    (the default fused AdamW is another kernel: its parity is the torch-reference row)."""
    model = make_model()
    twin = copy.deepcopy(model)
    opt, twin_opt = build(cfg, model, foreach=True), build(cfg, twin, foreach=False)
    assert {g["foreach"] for g in twin_opt.param_groups} == {False}
    run(model, opt, range(3))
    run(twin, twin_opt, range(3))
    assert_same_params(model, twin)
    assert_same(opt.state_dict()["state"], twin_opt.state_dict()["state"])


# ----------------------------------------------------------------------------------------
# dtypes, closure, copies
# ----------------------------------------------------------------------------------------

STATE_KEYS = {"adamw": {"step", "exp_avg", "exp_avg_sq"}}  # every other map: one momentum buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", ROWS)
def test_dtype_kept_and_state_dtypes_as_documented(cfg, dtype):
    model = make_model(dtype)
    opt = build(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    run(model, opt, range(3))
    # state: float64 for float64 parameters, float32 otherwise (README "Numerics")
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for group in opt.param_groups:
        keys = STATE_KEYS.get(group["map"], {"momentum_buffer"})
        for p in group["params"]:
            assert p.dtype == dtype and torch.isfinite(p).all(), group["role"]
            state = opt.state[p]
            assert set(state) == keys, (group["role"], set(state))
            for k in keys - {"step"}:
                assert state[k].dtype == state_dtype and state[k].shape == p.shape, (group["role"], k)
            if "step" in keys:
                assert state["step"].dtype == torch.float32 and float(state["step"]) == 3.0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("cfg", ROWS)
def test_step_with_closure_returns_its_loss_and_uses_its_gradients(cfg):
    model = make_model()
    ref = copy.deepcopy(model)
    opt, ref_opt = build(cfg, model), build(cfg, ref)
    losses = []

    def closure():
        opt.zero_grad()
        loss = lm_loss(model, 1)
        loss.backward()
        losses.append(loss)
        return loss

    set_grads(model, 123)  # stale gradients: the closure must replace them
    out = opt.step(closure)
    assert len(losses) == 1 and out is losses[0]
    assert out.requires_grad  # evaluated with gradients enabled inside step()'s no_grad
    ref_opt.zero_grad()
    lm_loss(ref, 1).backward()
    ref_opt.step()
    assert_same_params(model, ref)
    assert opt.step() is None  # no closure, no loss


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cfg", COPY_ROWS)
def test_copied_optimizer_steps_like_the_original(cfg, how):
    model = make_model()
    opt = build(cfg, model)
    run(model, opt, range(2))
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    params2 = set(model2.parameters())
    assert all(p in params2 for g in opt2.param_groups for p in g["params"])  # bound to the copy
    run(model, opt, range(2, 5))
    run(model2, opt2, range(2, 5))
    assert_same_params(model, model2)
    assert_same(opt.state_dict(), opt2.state_dict())


# ----------------------------------------------------------------------------------------
# zero_grad, grad=None, param groups
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ROWS)
def test_zero_grad_then_step_changes_nothing(cfg):
    model = make_model()
    opt = build(cfg, model)
    run(model, opt, range(2))
    opt.zero_grad()  # set_to_none=True by default
    assert all(p.grad is None for p in model.parameters())
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert_same(opt.state_dict(), state)


@pytest.mark.parametrize("cfg", ROWS)
def test_parameters_without_grad_are_skipped(cfg):
    model = make_model()
    opt = build(cfg, model)
    frozen = [g["params"][0] for g in opt.param_groups]  # one per group (role)
    before = {p: p.detach().clone() for p in model.parameters()}
    for s in range(2):
        set_grads(model, s)
        for p in frozen:
            p.grad = None
        opt.step()
    for p in model.parameters():
        if any(p is f for f in frozen):
            assert torch.equal(p, before[p]) and p not in opt.state
        else:
            assert not torch.equal(p, before[p]) and p in opt.state


def _group(opt: EquiOptimizer, role: str) -> dict:
    return next(g for g in opt.param_groups if g["role"] == role)


@pytest.mark.parametrize("cfg", ROWS)
def test_add_param_group_steps_like_a_standalone_optimizer(cfg):
    model = make_model()
    untouched = copy.deepcopy(model)
    opt, untouched_opt = build(cfg, model), build(cfg, untouched)
    spec = {k: v for k, v in _group(opt, "mlp_in").items() if k != "params"}
    gen = torch.Generator().manual_seed(5)
    w = nn.Parameter(torch.randn(10, 6, generator=gen))
    alone = nn.Parameter(w.detach().clone())
    opt.add_param_group({"params": [w], **spec})
    alone_opt = EquiOptimizer([{"params": [alone], **spec}])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [w], **spec})
    assert len(opt.param_groups) == len(untouched_opt.param_groups) + 1
    for s in range(3):
        set_grads(model, s)
        set_grads(untouched, s)
        w.grad = torch.randn(w.shape, generator=gen)
        alone.grad = w.grad.clone()
        opt.step()
        untouched_opt.step()
        alone_opt.step()
    assert not torch.equal(w, alone.new_zeros(w.shape)) and torch.equal(w, alone)
    assert_same_params(model, untouched)  # the old groups did not notice


@pytest.mark.parametrize("cfg", ROWS)
def test_load_state_dict_with_other_groups_raises(cfg):
    model = make_model()
    opt = build(cfg, model)
    run(model, opt, range(1))
    saved = opt.state_dict()
    fewer = copy.deepcopy(saved)
    fewer["param_groups"] = fewer["param_groups"][:-1]
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(fewer)
    smaller = copy.deepcopy(saved)
    group = max(smaller["param_groups"], key=lambda g: len(g["params"]))
    group["params"] = group["params"][:-1]
    with pytest.raises(ValueError, match="doesn't match the size"):
        opt.load_state_dict(smaller)
    assert_same(opt.state_dict(), saved)  # a refused load leaves the optimizer as it was
    # an optimizer with one more group refuses the shorter state as well
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], **{k: v for k, v in _group(opt, "vector").items() if k != "params"}})
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(saved)
