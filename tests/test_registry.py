"""The map registry checked against the groups it declares, and the plan's compatibility
check and blocks. Tests are generated from ``MAP_SPECS``: a map registered without a true
group declaration fails here."""

import pytest
import torch
import transformers
from torch import nn

import equiopt
from equiopt.blocks import AttentionBlock, MLPBlock, MoEBlock, VocabBlock
from equiopt.groups import Factor, Group
from equiopt.maps import MAP_SPECS, center_rows, map_spec
from equiopt.optimizer import apply_map
from equiopt.presets import DEFAULTS

F64 = torch.float64
TOL = 1e-9  # float64 maps; Polar Express / Newton-Schulz are polynomials: rounding only


def run(name, x, center=None, column_aware=False):
    group = {**DEFAULTS, "map": name, "center": center, "column_aware": column_aware, "polar_method": "svd"}
    return apply_map(group, x, x)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


SPECS = [(n, c, ca) for n, s in MAP_SPECS.items() if s.fn is not None for c in (None, True) for ca in (False, True)]


@pytest.mark.parametrize("name,center,column_aware", SPECS)
def test_every_registered_map_is_equivariant_under_its_declared_group(name, center, column_aware):
    spec = map_spec(name, center=center, column_aware=column_aware)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, dtype=F64, generator=gen)
    for f in spec.group.factors:
        if f.kind == "shift":  # zero sums along the shift axis are kept
            dim = -2 if f.axis == "rows" else -1
            z = x - x.mean(dim, keepdim=True)
            assert run(name, z, center, column_aware).sum(dim).abs().max() < 1e-10, f
            continue
        g = f.sample(x.shape, gen)
        err = rel(run(name, f.act(x, g), center, column_aware), f.act(run(name, x, center, column_aware), g))
        assert err < TOL, (f.describe(), err)
    for f in spec.projects_out:  # invariant under the shift, output on the zero-sum subspace
        c = f.sample(x.shape, gen)
        assert rel(run(name, f.act(x, c), center, column_aware), run(name, x, center, column_aware)) < TOL
        assert run(name, x, center, column_aware).sum(-2 if f.axis == "rows" else -1).abs().max() < 1e-10


@pytest.mark.parametrize(
    "name,factor",
    [("row_norm", "orth:rows"), ("hybrid", "orth:rows"), ("col_norm", "orth:cols"), ("row_norm", "shift:rows")],
)
def test_the_check_fails_outside_the_declared_group(name, factor):
    f = Factor(*factor.split(":"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 5, dtype=F64, generator=gen)
    if f.kind == "shift":
        z = x - x.mean(-2, keepdim=True)
        assert run(name, z).sum(-2).abs().max() > 1e-3
        return
    g = f.sample(x.shape, gen)
    assert rel(run(name, f.act(x, g)), f.act(run(name, x), g)) > 1e-3
    assert not Group((f,)) <= MAP_SPECS[name].group


def qwen3():
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return transformers.Qwen3ForCausalLM(cfg)


def olmoe():
    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return transformers.OlmoeForCausalLM(cfg)


def test_plan_records_blocks():
    p = equiopt.plan(qwen3())
    kinds = {type(b) for b in p.blocks}
    assert kinds == {VocabBlock, AttentionBlock, MLPBlock}
    vocab = next(b for b in p.blocks if isinstance(b, VocabBlock))
    assert (vocab.embedding, vocab.head, vocab.tied) == ("model.embed_tokens.weight", "lm_head.weight", False)
    attn = next(b for b in p.blocks if isinstance(b, AttentionBlock))
    assert attn.q.endswith("q_proj.weight") and attn.k.endswith("k_proj.weight") and attn.v.endswith("v_proj.weight")
    assert (attn.hq, attn.hkv, attn.head_dim) == (4, 2, 8) and attn.o.endswith("o_proj.weight")
    mlp = next(b for b in p.blocks if isinstance(b, MLPBlock))
    assert mlp.ins == ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")
    assert mlp.out == "model.layers.0.mlp.down_proj.weight" and mlp.hidden == 48 and mlp.gated
    assert [s.name for s in vocab.symmetries()] == ["logit_shift"]
    assert set(mlp.symmetries()[0].params()) == set(mlp.params())


def test_plan_records_moe_blocks_with_stacked_experts():
    p = equiopt.plan(olmoe())
    moe = next(b for b in p.blocks if isinstance(b, MoEBlock))
    assert moe.router == "model.layers.0.mlp.gate.weight" and moe.experts == 4
    assert moe.mlp.ins == ("model.layers.0.mlp.experts.gate_up_proj",) and moe.mlp.fused == (2,)
    assert moe.mlp.out == "model.layers.0.mlp.experts.down_proj" and moe.mlp.hidden == 24
    assert [s.name for s in moe.symmetries()] == ["expert_perm", "router_shift"]
    tied = equiopt.plan(
        transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
            )
        )
    )
    vocab = next(b for b in tied.blocks if isinstance(b, VocabBlock))
    assert vocab.tied and vocab.symmetries() == ()


def test_incompatible_rule_is_refused_naming_parameter_group_and_map():
    with pytest.raises(
        equiopt.PlanError, match=r"(?s)role 'attention'.*q_proj.weight.*O\(rows\) x O\(cols\).*'row_norm'"
    ):
        equiopt.plan(qwen3(), rules={"attention": "row_norm"})
    with pytest.raises(equiopt.PlanError, match=r"mlp_out.*not equivariant under O\(rows\)"):
        equiopt.plan(qwen3(), rules={"mlp_out": {"map": "row_norm", "column_aware": False}})
    with pytest.raises(equiopt.PlanError, match=r"embedding.*projects out Shift\(rows\)"):
        equiopt.plan(qwen3(), rules={"embedding": "centered_row_norm"})
    # baselines and compatible choices pass
    equiopt.plan(qwen3(), preset="adamw")
    equiopt.plan(qwen3(), preset="muon")
    equiopt.plan(qwen3(), rules={"lm_head": "hybrid", "embedding": "right_spectral"})


@pytest.mark.parametrize("role,model", [("lm_head", qwen3), ("router", olmoe)])
def test_hybrid_on_a_shift_symmetric_block_is_centered(role, model):
    m = model()
    p = equiopt.plan(m, rules={role: "hybrid"})
    assert p.specs[role]["center"] is True
    opt = equiopt.build(p)
    (param,) = [e.param for e in p.entries if e.role == role]
    before = param.detach().clone()
    param.grad = torch.randn_like(param)
    opt.step()
    delta = param.detach() - before
    # the update never moves along the shift orbit: zero column sums (float32 rounding)
    assert delta.sum(0).abs().max() < 1e-5 * delta.abs().max()
    # forced uncentered, the map would move the mean row: refused as incompatible
    with pytest.raises(equiopt.PlanError, match=r"not equivariant under Shift\(rows\)"):
        equiopt.plan(model(), rules={role: {"map": "hybrid", "center": False}})
    # and such an update does move along the orbit (what the check protects against)
    x = torch.randn(1, *param.shape, dtype=F64)
    assert run("hybrid", x - x.mean(-2, keepdim=True), center=False).sum(-2).abs().max() > 1e-3


def test_centering_wrapper_matches_the_formula():
    x = torch.randn(2, 6, 4, dtype=F64)
    got = run("hybrid", x, center=True)
    want = center_rows(run("hybrid", center_rows(x), center=False))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(run("row_norm", x, center=True), run("centered_row_norm", x), rtol=1e-12, atol=1e-12)


def test_plan_without_structure_has_no_blocks_and_matrix_group():
    p = equiopt.plan(nn.Sequential(nn.Linear(4, 4)))
    assert p.blocks == [] and p.groups["matrix"] == Group.of("orth:rows", "orth:cols")


@pytest.mark.parametrize("view", ["same", "transpose", "slice"])
def test_parameters_sharing_memory_are_refused(view):
    """Issue #12 item 4: a transposed view or a slice of another Parameter's storage would be
    stepped twice with two momenta."""
    a = nn.Linear(6, 6, bias=False)
    b = nn.Linear(6, 6, bias=False)
    w = a.weight
    b.weight = nn.Parameter({"same": w.data, "transpose": w.data.t(), "slice": w.data}[view])
    if view == "slice":
        b = nn.Linear(6, 3, bias=False)
        b.weight = nn.Parameter(w.data[:3])
    with pytest.raises(equiopt.PlanError, match="sharing memory"):
        equiopt.plan(nn.ModuleDict({"a": a, "b": b}))
    # disjoint slices of one buffer are fine
    buf = torch.zeros(12, 6)
    c, d = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
    c.weight, d.weight = nn.Parameter(buf[:6]), nn.Parameter(buf[6:])
    equiopt.plan(nn.ModuleDict({"c": c, "d": d}))


def test_deepcopy_and_pickle_step_like_the_original():
    """Issue #12 item 5: a copied optimizer keeps its layouts, names and execution path."""
    import copy
    import pickle

    model = qwen3()
    opt = equiopt.build(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for clone in (copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))):
        m2, o2 = clone
        for p, q in zip(model.parameters(), m2.parameters()):
            q.grad = p.grad.clone()
        o2.step()
        assert o2.context.layouts and len(o2.context.layouts) == len(opt.context.layouts)
    opt.step()
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_of_another_preset_is_refused():
    """Issue #12 item 3: AdamW state into a paper optimizer would silently run AdamW."""
    model = qwen3()
    src = equiopt.build(model, preset="adamw")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    src.step()
    with pytest.raises(ValueError, match=r"saved map 'adamw'.*'row_norm'"):
        equiopt.build(model, preset="paper").load_state_dict(src.state_dict())
    other = qwen3()
    other.lm_head = nn.Linear(32, 80, bias=False)
    opt = equiopt.build(other, preset="adamw")
    with pytest.raises(ValueError, match="lm_head.weight: saved exp_avg has shape"):
        opt.load_state_dict(src.state_dict())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"betas": (0.9,)}, "betas must be two numbers in"),
        ({"betas": "ab"}, "betas must be two numbers in"),
        ({"momentum": "x"}, "momentum must be in"),
        ({"momentum": float("nan")}, "momentum must be in"),
        ({"weight_decay": "x"}, "weight_decay must be a finite number"),
        ({"eps": -1.0}, "eps must be a finite number"),
        ({"adam_eps": float("inf")}, "adam_eps must be a finite number"),
        ({"alpha": "x"}, "alpha must be a finite number"),
        ({"polar_steps": -1}, "polar_steps must be None"),
        ({"polar_steps": 2.5}, "polar_steps must be None"),
        ({"nesterov": "yes"}, "nesterov must be True or False"),
        ({"polar_method": "foo"}, "polar_method must be one of"),
        ({"compute_dtype": "float17"}, "compute_dtype must be None or one of"),
        ({"lr": float("nan")}, r"^lr: expected a finite number >= 0"),
        ({"lr_scale": float("inf")}, r"^lr_scale: expected a finite number >= 0"),
        ({"lr": {"embedding": -1.0}}, r"lr\['embedding'\]: expected a finite"),
    ],
)
def test_bad_hyperparameter_is_refused_by_name_when_built(kwargs, message):
    """Every hyperparameter of the map presets is checked when the plan is made: a value
    that would fail at the first step (betas of one number, a string momentum, an unknown
    polar method or dtype) or run silently wrong (a negative eps, a nan lr) is a ValueError
    naming it."""
    with pytest.raises(ValueError, match=message):
        equiopt.build(qwen3(), preset="paper", **kwargs)


def test_add_param_group_refuses_bad_input_at_once():
    """Issue #12 item 8: unknown hyperparameter, unknown map, 3-D parameter without a layout."""
    opt = equiopt.EquiOptimizer([nn.Parameter(torch.zeros(3, 3))], map="polar")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))], "lrr": 0.1})
    with pytest.raises(ValueError, match="unknown map name 'polr'"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))], "map": "polr"})
    with pytest.raises(ValueError, match="needs a 2-D tensor, got shape"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2, 2))], "map": "polar"})
    with pytest.raises(ValueError, match=r"param_groups\[1\]: betas must be two numbers"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))], "betas": (0.9,)})
    with pytest.raises(ValueError, match=r"param_groups\[0\]: momentum must be in \[0, 1\)"):
        equiopt.EquiOptimizer([nn.Parameter(torch.zeros(3, 3))], map="polar", momentum=1.5)
    assert len(opt.param_groups) == 1  # every refused group was taken back out
    equiopt.EquiOptimizer([nn.Parameter(torch.zeros(3, 3))], map="polar", lr=torch.tensor(0.01))  # a tensor lr: kept


def test_maps_reductions_let_a_row_shard_compute_the_whole_map():
    """Maps expose their reductions (#10): with sums that add the other shard's part (what
    the sharded path's all-reduce does), each row shard gets its rows of the whole map."""
    from equiopt.maps import center_rows, centered_row_norm, col_norm, row_norm

    x = torch.randn(10, 6, dtype=F64)
    shards = (x[:4], x[4:])

    for i, s in enumerate(shards):
        rows = slice(0, 4) if i == 0 else slice(4, 10)
        torch.testing.assert_close(
            center_rows(s, sum_rows=lambda v: x.sum(-2, keepdim=True), count=10),
            center_rows(x)[rows],
            rtol=0,
            atol=1e-14,
        )
        torch.testing.assert_close(
            col_norm(s, sum_rows=lambda v: (x * x).sum(-2, keepdim=True)), col_norm(x)[rows], rtol=0, atol=1e-14
        )
        torch.testing.assert_close(
            row_norm(s, sum_cols=lambda v: v.sum(-1, keepdim=True)), row_norm(x)[rows], rtol=0, atol=1e-14
        )
    # the centered map needs the global column sums of the intermediate results too: a real
    # all-reduce does that; here both shards are computed together to emulate it
    full = centered_row_norm(
        x, sum_rows=lambda v: v.sum(-2, keepdim=True), sum_cols=lambda v: v.sum(-1, keepdim=True), count=10
    )
    torch.testing.assert_close(full, centered_row_norm(x), rtol=0, atol=1e-14)
    # a wrong count (the local one) gives another map: the check can fail
    assert (
        center_rows(shards[0], sum_rows=lambda v: x.sum(-2, keepdim=True), count=4) - center_rows(x)[:4]
    ).abs().max() > 1e-3


def test_plan_prints_each_parameters_gauges():
    """Issue #14: the plan lists the continuous symmetries its blocks claim per parameter."""
    p = equiopt.plan(qwen3())
    assert p.gauges("lm_head.weight") == ["logit_shift", "norm_channel"]  # reads the final norm
    assert p.gauges("model.layers.0.self_attn.v_proj.weight") == ["vo_rotation", "norm_channel"]
    assert p.gauges("model.layers.0.mlp.up_proj.weight") == ["neuron_rescale?", "norm_channel"]
    assert p.gauges("model.layers.0.mlp.down_proj.weight") == ["neuron_rescale?"]  # reads no norm
    assert p.gauges("model.layers.0.input_layernorm.weight") == ["norm_channel"]
    assert p.gauges("model.norm.weight") == ["norm_channel"]
    assert p.gauges("model.layers.0.self_attn.q_norm.weight") == []  # read by RoPE / attention, no linear map
    assert p.gauges("model.embed_tokens.weight") == []
    moe = equiopt.plan(olmoe())
    experts = "model.layers.0.mlp.experts."
    assert "neuron_rescale?" in moe.gauges(experts + "gate_up_proj") and "neuron_rescale?" in moe.gauges(
        experts + "down_proj"
    )  # per expert, probed by equiopt.ddc (StackedRescaleGauge)
    header = str(p).splitlines()[0].split()
    assert header[-1] == "gauges"
    tied = equiopt.plan(
        transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
            )
        )
    )
    vocab = next(b for b in tied.blocks if isinstance(b, VocabBlock))
    assert "logit_shift" not in tied.gauges(vocab.head)  # a tied head has no shift gauge
    # Gemma's (1 + w) gains and the final norm read by the tied embedding: not confirmed
    assert tied.gauges("model.layers.0.input_layernorm.weight") == ["norm_channel?"]
    assert tied.gauges("model.layers.0.self_attn.q_proj.weight")[-1] == "norm_channel?"
    assert tied.gauges("model.norm.weight") == ["norm_channel?"]
    assert "norm_channel?" in tied.gauges(vocab.head)
