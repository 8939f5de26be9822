"""EquiOptimizer: parity with torch.optim.AdamW / torch.optim.Muon, layouts as maps on
logical matrices (fused vs separate, per-head vs separate heads, stacked vs per-expert),
state_dict resume, schedulers, bad gradients, dtypes, and equivariance of whole runs."""

import copy

import pytest
import torch
from torch import nn

import equiopt
from equiopt import maps
from equiopt.layouts import Layout
from equiopt.optimizer import EquiOptimizer, NonFiniteGradientError

from plain_gpt import FUSED_LAYOUTS, PlainGPT


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return PlainGPT(vocab=32, d=16, n_head=2, h=24, layers=2).to(dtype)


def lm_loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 32, (4, 12), generator=g)
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), idx[:, 1:].reshape(-1))


# -- parity with torch ------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_preset_equals_torch_adamw_bitwise(foreach):
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = equiopt.build(model, preset="adamw", layouts=FUSED_LAYOUTS, foreach=foreach)
    plan = equiopt.plan(ref, preset="adamw", layouts=FUSED_LAYOUTS)
    groups = [
        {"params": [e.param for e in es], "weight_decay": 0.0 if role == "vector" else 0.1}
        for role, es in plan.by_role().items()
    ]
    torch_opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=foreach)
    for step in range(5):
        for m, o in ((model, opt), (ref, torch_opt)):
            o.zero_grad()
            lm_loss(m, step).backward()
            o.step()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), n


def test_muon_preset_matches_torch_muon():
    # A lone 2-D matrix is role "matrix"; the muon preset there is torch.optim.Muon with
    # Nesterov, momentum 0.95, Newton-Schulz and sqrt(max(1, A/B)). torch runs Newton-Schulz
    # in bf16; with polar_dtype="bfloat16" ours does the same arithmetic, so the remaining
    # difference is bf16 rounding order: relative 1e-2 of the update (~2 bf16 ulps).
    torch.manual_seed(0)
    w0 = torch.randn(48, 20)
    ours = nn.Linear(20, 48, bias=False)
    ref = nn.Linear(20, 48, bias=False)
    with torch.no_grad():
        ours.weight.copy_(w0)
        ref.weight.copy_(w0)
    opt = equiopt.build(ours, preset="muon", polar_dtype="bfloat16")
    assert opt.param_groups[0]["role"] == "matrix"
    torch_opt = torch.optim.Muon(
        [ref.weight], lr=2e-2, weight_decay=1e-3, momentum=0.95, nesterov=True, adjust_lr_fn="original"
    )
    for step in range(5):
        set_grads([ours.weight], step)
        set_grads([ref.weight], step)
        before = ref.weight.detach().clone()
        opt.step()
        torch_opt.step()
        ref_update = ref.weight - before
        err = (ours.weight - ref.weight).norm() / ref_update.norm()
        assert err < 1e-2 * (step + 1), (step, err)


# -- layouts are maps on logical matrices -------------------------------------------------
def one_step(params, groups_kw, layouts=None, grads=None):
    opt = EquiOptimizer([{"params": params, **groups_kw}], layouts=layouts)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return opt


HIDDEN_SPECS = [
    dict(map="hybrid", order="row_then_polar", polar_method="gram_eigh", lr=0.1),
    dict(map="hybrid", order="polar_then_row", polar_method="svd", lr=0.1),
    dict(map="row_norm", lr=0.1),
    dict(map="polar", polar_method="svd", lr=0.1, scale="muon"),
]


@pytest.mark.parametrize("spec", HIDDEN_SPECS, ids=lambda s: s["map"] + "/" + s.get("order", ""))
def test_fused_interleaved_gate_up_equals_separate_parameters(spec):
    E, d, h = 3, 6, 5
    g = torch.Generator().manual_seed(0)
    gate_w, up_w = (
        torch.randn(E, h, d, generator=g, dtype=torch.float64),
        torch.randn(E, h, d, generator=g, dtype=torch.float64),
    )
    gate_g, up_g = (
        torch.randn(E, h, d, generator=g, dtype=torch.float64),
        torch.randn(E, h, d, generator=g, dtype=torch.float64),
    )

    def interleave(a, b):  # gpt-oss storage [E, d, 2h] with gate = [..., ::2], up = [..., 1::2]
        return torch.stack((a.mT, b.mT), dim=-1).reshape(E, d, 2 * h)

    fused = nn.Parameter(interleave(gate_w, up_w))
    one_step(
        [fused],
        spec,
        {fused: Layout(stacked=True, transposed=True, fused=2, interleaved=True)},
        [interleave(gate_g, up_g)],
    )
    gate, up = nn.Parameter(gate_w.clone()), nn.Parameter(up_w.clone())
    one_step([gate, up], spec, {gate: Layout(stacked=True), up: Layout(stacked=True)}, [gate_g, up_g])
    torch.testing.assert_close(fused.detach(), interleave(gate.detach(), up.detach()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", HIDDEN_SPECS, ids=lambda s: s["map"] + "/" + s.get("order", ""))
def test_stacked_experts_equal_per_expert_parameters(spec):
    E, d, h = 3, 6, 5
    w = torch.randn(E, d, h, dtype=torch.float64)
    grad = torch.randn(E, d, h, dtype=torch.float64)
    stacked = nn.Parameter(w.clone())
    spec = {**spec, "column_aware": True}  # expert down projection, [E, d, h]
    one_step([stacked], spec, {stacked: Layout(stacked=True)}, [grad])
    singles = [nn.Parameter(w[e].clone()) for e in range(E)]
    one_step(singles, spec, None, list(grad))
    torch.testing.assert_close(stacked.detach(), torch.stack([s.detach() for s in singles]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_per_head_equals_separate_heads(axis):
    H, hd, d = 4, 3, 8
    shape = (H * hd, d) if axis == "out" else (d, H * hd)
    w, grad = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    spec = dict(
        map="polar",
        polar_method="polar_express",
        per_head=True,
        nesterov=True,
        scale="muon",
        lr=0.02,
        weight_decay=1e-3,
    )
    whole = nn.Parameter(w.clone())
    opt = EquiOptimizer([{"params": [whole], **spec}], layouts={whole: Layout(heads=H, head_axis=axis)})

    def split(t):
        return t.split(hd, dim=0 if axis == "out" else 1)

    heads = [nn.Parameter(t.clone()) for t in split(w)]
    opt_heads = EquiOptimizer([{"params": heads, **spec}])
    for step in range(3):
        g = grad * (step + 1) + step
        whole.grad = g.clone()
        for p, gh in zip(heads, split(g)):
            p.grad = gh.clone()
        opt.step()
        opt_heads.step()
    torch.testing.assert_close(
        whole.detach(), torch.cat([p.detach() for p in heads], dim=0 if axis == "out" else 1), rtol=0, atol=1e-12
    )


def test_column_aware_down_projection_is_map_of_transpose():
    w, grad = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    p = nn.Parameter(w.clone())
    one_step([p], dict(map="row_norm", column_aware=True, lr=0.5, momentum=0.0), None, [grad])
    torch.testing.assert_close(p.detach(), w - 0.5 * maps.col_norm(grad), rtol=0, atol=1e-14)


# -- the step itself ------------------------------------------------------------------------
def test_ema_momentum_weight_decay_and_nesterov_by_hand():
    w = torch.randn(5, 4, dtype=torch.float64)
    g1, g2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    for nesterov in (False, True):
        p = nn.Parameter(w.clone())
        opt = EquiOptimizer(
            [{"params": [p], "map": "row_norm", "lr": 0.1, "weight_decay": 0.5, "momentum": 0.9, "nesterov": nesterov}]
        )
        expected, m = w.clone(), torch.zeros_like(w)
        for g in (g1, g2):
            p.grad = g.clone()
            opt.step()
            m = 0.9 * m + 0.1 * g
            x = 0.1 * g + 0.9 * m if nesterov else m
            rn = x / (x.norm(dim=1, keepdim=True) + 1e-8)
            expected = expected * (1 - 0.1 * 0.5) - 0.1 * rn
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("preset", ["adamw", "muon", "paper"])
def test_state_dict_resume_is_bit_identical(preset):
    def run(model, opt, steps):
        for s in steps:
            opt.zero_grad()
            lm_loss(model, s).backward()
            opt.step()

    model = tiny_model()
    opt = equiopt.build(model, preset=preset, layouts=FUSED_LAYOUTS)
    run(model, opt, range(3))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, range(3, 6))

    resumed = tiny_model()
    resumed.load_state_dict(saved_model)
    opt2 = equiopt.build(resumed, preset=preset, layouts=FUSED_LAYOUTS)
    opt2.load_state_dict(saved_opt)
    run(resumed, opt2, range(3, 6))
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


def test_lr_scheduler_drives_every_group():
    p = nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    v = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = EquiOptimizer([{"params": [p], "map": "row_norm", "lr": 1.0, "momentum": 0.0}, {"params": [v], "lr": 0.1}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for step in range(3):
        before = p.detach().clone()
        p.grad = torch.ones(3, 4, dtype=torch.float64)
        v.grad = torch.ones(4, dtype=torch.float64)
        opt.step()
        sched.step()
        row_step = (p.detach() - before).norm(dim=1)
        # each row moves by exactly lr_t (unit-norm rows up to eps)
        torch.testing.assert_close(row_step, torch.full((3,), 0.5**step, dtype=torch.float64), rtol=1e-7, atol=0)
    assert [g["lr"] for g in opt.param_groups] == [0.125, 0.0125]


def test_none_grad_untouched_and_zero_grad_no_nan():
    model = tiny_model()
    opt = equiopt.build(model, preset="paper", layouts=FUSED_LAYOUTS)
    frozen = model.blocks[0].mlp.w1.weight
    before = frozen.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before) and frozen not in opt.state
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n


def test_nonfinite_gradient_raises_with_name_or_skips_and_counts():
    model = tiny_model()
    opt = equiopt.build(model, preset="paper", layouts=FUSED_LAYOUTS)
    lm_loss(model).backward()
    model.blocks[1].mlp.router.weight.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"blocks\.1\.mlp\.router\.weight"):
        opt.step()

    opt = equiopt.build(model, preset="paper", layouts=FUSED_LAYOUTS, on_nonfinite="skip")
    router = model.blocks[1].mlp.router.weight
    before = router.detach().clone()
    opt.step()
    assert torch.equal(router, before) and opt.nonfinite_skips == 1
    assert not torch.equal(model.blocks[0].mlp.w1.weight, tiny_model().blocks[0].mlp.w1.weight)


def test_nonfinite_raise_leaves_every_parameter_and_state_untouched():
    """The check runs before any group steps: a NaN in a later group cannot leave earlier
    groups half-updated, and skips in "skip" groups are not counted when another raises."""
    model = tiny_model()
    opt = equiopt.build(model, preset="paper", layouts=FUSED_LAYOUTS)
    for g in opt.param_groups:
        if g["role"] == "embedding":
            g["on_nonfinite"] = "skip"
    lm_loss(model).backward()
    emb = next(p for g in opt.param_groups if g["role"] == "embedding" for p in g["params"])
    emb.grad[0, 0] = float("inf")
    last = opt.param_groups[-1]["params"][0]
    last.grad.view(-1)[0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert len(opt.state) == 0 and opt.nonfinite_skips == 0


def test_finite_screen_counts_overflowing_gradients():
    """Issue #12 item 9: a finite gradient whose squares overflow would freeze AdamW
    (exp_avg_sq = inf) and zero the matrix maps; it is screened like NaN/Inf."""
    from equiopt.functional import finite_flags

    huge = torch.full((4, 3), 1e30)  # finite, but its float32 2-norm overflows to inf
    nan, inf = torch.ones(5), torch.ones(2, 2)
    nan[3], inf[1, 0] = float("nan"), float("-inf")
    half = torch.ones(3, dtype=torch.bfloat16)
    half[0] = float("inf")
    grads = [torch.randn(3, 3), huge, nan, inf, half, torch.zeros(0, 4)]
    assert finite_flags(grads) == [True, False, False, False, False, True]
    big = torch.full((4, 3), 1e18)  # large but its squares fit: passes
    assert finite_flags([big]) == [True]


def test_huge_gradient_is_refused_or_skipped_not_frozen():
    model = tiny_model()
    for mode in ("raise", "skip"):
        opt = equiopt.build(model, preset="adamw", layouts=FUSED_LAYOUTS, on_nonfinite=mode)
        lm_loss(model, 0).backward()
        p = next(model.parameters())
        p.grad.fill_(1e30)
        before = p.detach().clone()
        if mode == "raise":
            with pytest.raises(NonFiniteGradientError, match="overflows"):
                opt.step()
        else:
            opt.step()
            assert opt.nonfinite_skips == 1 and torch.equal(p, before)
            assert "exp_avg_sq" not in opt.state[p] or torch.isfinite(opt.state[p]["exp_avg_sq"]).all()
        opt.zero_grad()


@pytest.mark.parametrize("preset", ["muon", "paper"])
def test_foreach_step_equals_per_parameter_loop_bitwise(preset):
    """foreach=False runs the per-parameter loop (momentum lerps, decay, update) that the
    multi-tensor kernels replace: same arithmetic, so the same bits."""
    runs = []
    for foreach in (False, True):
        model = tiny_model()
        opt = equiopt.build(model, preset=preset, layouts=FUSED_LAYOUTS, foreach=foreach)
        for s in range(3):
            opt.zero_grad()
            lm_loss(model, s).backward()
            opt.step()
        runs.append(dict(model.named_parameters()))
    for n, p in runs[0].items():
        assert torch.equal(p, runs[1][n]), n


def test_sparse_gradient_is_a_clear_error():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = equiopt.build(emb, preset="paper")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="weight: sparse gradients"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_keep_fp32_state(dtype):
    model = tiny_model(dtype)
    opt = equiopt.build(model, preset="paper", layouts=FUSED_LAYOUTS)
    loss0 = lm_loss(model).item()
    for _ in range(5):
        opt.zero_grad()
        lm_loss(model).backward()
        opt.step()
    for p, state in opt.state.items():
        assert p.dtype == dtype
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in state:
                assert state[key].dtype == torch.float32, key
    assert lm_loss(model).item() < loss0


def test_float64_stays_float64():
    model = tiny_model(torch.float64)
    opt = equiopt.build(model, preset="paper", layouts=FUSED_LAYOUTS)
    lm_loss(model).backward()
    opt.step()
    assert all(
        s[k].dtype == torch.float64 for s in opt.state.values() for k in ("momentum_buffer", "exp_avg") if k in s
    )


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (0, 5), (5, 0)])
@pytest.mark.parametrize("m", ["row_norm", "centered_row_norm", "hybrid", "polar", "left_spectral", "right_spectral"])
def test_degenerate_shapes(shape, m):
    p = nn.Parameter(torch.randn(shape))
    opt = EquiOptimizer([{"params": [p], "map": m, "lr": 0.1}])
    p.grad = torch.randn(shape)
    opt.step()
    assert p.shape == shape and torch.isfinite(p).all()


def test_zero_rows_get_zero_update():
    p = nn.Parameter(torch.zeros(4, 3))
    opt = EquiOptimizer([{"params": [p], "map": "hybrid", "lr": 0.1}])
    p.grad = torch.zeros(4, 3)
    p.grad[1] = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    assert torch.equal(p[[0, 2, 3]], torch.zeros(3, 3)) and p[1].abs().sum() > 0


def test_constructor_errors_name_the_problem():
    p = nn.Parameter(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="needs a 2-D tensor"):
        EquiOptimizer([{"params": [p], "map": "polar"}])
    with pytest.raises(TypeError, match="unknown hyperparameter.*'lrr'"):
        EquiOptimizer([p], lrr=0.1)
    with pytest.raises(ValueError, match="unknown map 'polr'"):
        equiopt.build(nn.Linear(3, 3), rules={"matrix": "polr"})
    with pytest.raises(ValueError, match="unknown role 'mlp'"):
        equiopt.build(nn.Linear(3, 3), lr={"mlp": 0.1})
    with pytest.raises(TypeError, match=r"\['preset'\]"):
        equiopt.build(equiopt.plan(nn.Linear(3, 3)), preset="muon")


def test_rules_and_lr_overrides_reach_param_groups():
    model = tiny_model()
    opt = equiopt.build(
        model,
        preset="paper",
        layouts=FUSED_LAYOUTS,
        rules={"router": "left_spectral", "embedding": "adamw"},
        lr={"tied_embedding": 0.3, "router": 0.01},
        lr_scale={"attention": 2.0},
    )
    groups = {g["role"]: g for g in opt.param_groups}
    assert groups["router"]["map"] == "left_spectral" and groups["router"]["lr"] == 0.01
    assert (
        groups["embedding"]["map"] == "adamw"
        and groups["embedding"]["lr"] == equiopt.PRESETS["adamw"]["embedding"]["lr"]
    )
    assert groups["attention"]["lr"] == 2.0 * equiopt.PRESETS["paper"]["attention"]["lr"]


# -- whole runs are equivariant -----------------------------------------------------------------
def test_training_from_permuted_hidden_neurons_gives_the_permuted_run():
    """Phi(g.G) = g.Phi(G) for every block => training from g.W0 gives g.W_t exactly
    (float64, paper preset): permute the SwiGLU hidden neurons of block 0 (w1, w3 rows and
    w2 columns) and the experts of block 1 (router rows and stacked expert weights)."""
    base = tiny_model(torch.float64)
    perm_h = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    perm_e = torch.randperm(4, generator=torch.Generator().manual_seed(2))
    permuted = copy.deepcopy(base)
    with torch.no_grad():
        mlp, moe = permuted.blocks[0].mlp, permuted.blocks[1].mlp
        mlp.w1.weight.copy_(mlp.w1.weight[perm_h])
        mlp.w3.weight.copy_(mlp.w3.weight[perm_h])
        mlp.w2.weight.copy_(mlp.w2.weight[:, perm_h])
        moe.router.weight.copy_(moe.router.weight[perm_e])
        moe.experts.w_in.copy_(moe.experts.w_in[perm_e])
        moe.experts.w_out.copy_(moe.experts.w_out[perm_e])
    runs = []
    for model in (base, permuted):
        opt = equiopt.build(model, preset="paper", layouts=FUSED_LAYOUTS, polar_method="gram_eigh")
        for step in range(4):
            opt.zero_grad()
            lm_loss(model, step).backward()
            opt.step()
        runs.append(model)
    a, b = runs[0], runs[1]
    tol = dict(rtol=0, atol=1e-10)
    torch.testing.assert_close(b.blocks[0].mlp.w1.weight, a.blocks[0].mlp.w1.weight[perm_h], **tol)
    torch.testing.assert_close(b.blocks[0].mlp.w2.weight, a.blocks[0].mlp.w2.weight[:, perm_h], **tol)
    torch.testing.assert_close(b.blocks[1].mlp.router.weight, a.blocks[1].mlp.router.weight[perm_e], **tol)
    torch.testing.assert_close(b.blocks[1].mlp.experts.w_out, a.blocks[1].mlp.experts.w_out[perm_e], **tol)
    torch.testing.assert_close(b.head.weight, a.head.weight, **tol)


@pytest.mark.parametrize("preset", ["adamw", "muon", "paper"])
def test_loss_goes_down_on_a_tiny_model(preset):
    model = tiny_model()
    opt = equiopt.build(model, preset=preset, layouts=FUSED_LAYOUTS)
    first = lm_loss(model, 0).item()
    for _ in range(30):
        opt.zero_grad()
        lm_loss(model, 0).backward()  # one fixed batch: the loss must fall well below ln(32)
        opt.step()
    last = lm_loss(model, 0).item()
    assert last < first - 0.5, (first, last)
