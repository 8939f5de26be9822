"""Planner: every trainable parameter of the five model families gets the role and layout
the architecture calls for (expectations written by hand from each model's forward)."""

import re

import pytest
import torch
from torch import nn

import equiopt
from equiopt.layouts import Layout
from equiopt.planner import PlanError

from plain_gpt import FUSED_LAYOUTS, PlainGPT

transformers = pytest.importorskip("transformers")

V, D, HID, HQ, HKV, HD, E = 96, 32, 40, 4, 2, 8, 4
COMMON = dict(
    vocab_size=V,
    hidden_size=D,
    intermediate_size=HID,
    num_hidden_layers=2,
    num_attention_heads=HQ,
    num_key_value_heads=HKV,
    head_dim=HD,
)


def qwen3(tied=False):
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, tie_word_embeddings=tied))


def gemma3(tied=True):
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**COMMON, tie_word_embeddings=tied))


def olmoe(tied=False):
    cfg = transformers.OlmoeConfig(**COMMON, num_experts=E, num_experts_per_tok=2, tie_word_embeddings=tied)
    return transformers.OlmoeForCausalLM(cfg)


def gpt_oss(tied=False):
    cfg = transformers.GptOssConfig(**COMMON, num_local_experts=E, num_experts_per_tok=2, tie_word_embeddings=tied)
    return transformers.GptOssForCausalLM(cfg)


ATTN = {
    r"q_proj\.weight$": ("attention", Layout(heads=HQ)),
    r"[kv]_proj\.weight$": ("attention", Layout(heads=HKV)),
    r"o_proj\.weight$": ("attention", Layout(heads=HQ, head_axis="in")),
}
DENSE_MLP = {
    r"mlp\.(gate|up)_proj\.weight$": ("mlp_in", Layout()),
    r"mlp\.down_proj\.weight$": ("mlp_out", Layout()),
}
VECTORS = {r"(norm|layernorm)\.weight$|_norm\.weight$|\.bias$|sinks$": ("vector", None)}


def head_and_embedding(tied):
    if tied:
        return {r"embed_tokens\.weight$": ("tied_embedding", Layout())}
    return {r"embed_tokens\.weight$": ("embedding", Layout()), r"^lm_head\.weight$": ("lm_head", Layout())}


EXPECTED = {
    "qwen3": lambda tied: {**head_and_embedding(tied), **ATTN, **DENSE_MLP, **VECTORS},
    "gemma3": lambda tied: {**head_and_embedding(tied), **ATTN, **DENSE_MLP, **VECTORS},
    "olmoe": lambda tied: {
        **head_and_embedding(tied),
        **ATTN,
        **VECTORS,
        r"mlp\.gate\.weight$": ("router", Layout()),
        r"experts\.gate_up_proj$": ("expert_in", Layout(stacked=True, fused=2)),  # [E, 2h, d], chunk(2)
        r"experts\.down_proj$": ("expert_out", Layout(stacked=True)),  # [E, d, h]
    },
    "gpt_oss": lambda tied: {
        **head_and_embedding(tied),
        **ATTN,
        **VECTORS,
        r"mlp\.router\.weight$": ("router", Layout()),
        # [E, d, 2h], gate = [..., ::2], up = [..., 1::2]
        r"experts\.gate_up_proj$": ("expert_in", Layout(stacked=True, transposed=True, fused=2, interleaved=True)),
        r"experts\.down_proj$": ("expert_out", Layout(stacked=True, transposed=True)),  # [E, h, d]
        r"experts\.(gate_up|down)_proj_bias$": ("vector", None),
    },
}
BUILDERS = {"qwen3": qwen3, "gemma3": gemma3, "olmoe": olmoe, "gpt_oss": gpt_oss}


def check(plan, expected, model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {e.name for e in plan} == trainable, "every trainable parameter exactly once"
    for e in plan:
        hits = [v for pattern, v in expected.items() if re.search(pattern, e.name)]
        assert len(hits) == 1, f"{e.name}: expectation table matches {len(hits)} times"
        role, layout = hits[0]
        assert e.role == role, f"{e.name}: {e.role} != {role} ({e.reason})"
        if layout is not None:
            assert e.layout == layout, f"{e.name}: {e.layout} != {layout}"


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("tied", [False, True])
def test_hf_families(arch, tied):
    torch.manual_seed(0)
    model = BUILDERS[arch](tied=tied)
    plan = equiopt.plan(model)
    check(plan, EXPECTED[arch](tied), model)
    if tied:
        assert plan.role("lm_head.weight") == "tied_embedding"  # alias of the shared tensor


@pytest.mark.parametrize("tied", [False, True])
def test_plain_gpt(tied):
    model = PlainGPT(tied=tied)
    plan = equiopt.plan(model, layouts=FUSED_LAYOUTS)
    expected = {
        r"^wte\.weight$": ("tied_embedding" if tied else "embedding", Layout()),
        r"^wpe\.weight$": ("embedding", Layout()),
        r"^head\.weight$": ("lm_head", Layout()),
        r"c_attn\.weight$": ("attention", Layout(heads=12)),  # fused qkv: 3 x 4 heads
        r"c_proj\.weight$": ("attention", Layout(heads=4, head_axis="in")),
        r"mlp\.w[13]\.weight$": ("mlp_in", Layout()),
        r"mlp\.w2\.weight$": ("mlp_out", Layout()),
        r"router\.weight$": ("router", Layout()),
        r"experts\.w_in$": ("expert_in", Layout(stacked=True, fused=2)),
        r"experts\.w_out$": ("expert_out", Layout(stacked=True)),
        r"ln.*\.(weight|bias)$": ("vector", None),
    }
    check(plan, expected, model)


def test_unknown_fused_order_is_an_error_with_the_override():
    # the structure alone cannot tell the order: an error naming the override
    with pytest.raises(PlanError, match=r"experts\.w_in.*concatenated or interleaved.*layouts="):
        equiopt.plan(PlainGPT(), trace=False)
    # the traced forward reads it (chunk(2): concatenated) and agrees with the override
    assert equiopt.plan(PlainGPT()).entry("blocks.1.mlp.experts.w_in").layout == Layout(stacked=True, fused=2)


def test_expert_module_list_and_torch_modules():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_in = nn.Linear(8, 16)
            self.fc_out = nn.Linear(16, 8)

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 3, bias=False)
            self.experts = nn.ModuleList(MLP() for _ in range(3))

    plan = equiopt.plan(nn.ModuleDict({"moe": MoE(), "attn": nn.MultiheadAttention(8, 2)}))
    assert plan.role("moe.gate.weight") == "router"
    assert plan.role("moe.experts.1.fc_in.weight") == "expert_in"
    assert plan.role("moe.experts.1.fc_out.weight") == "expert_out"
    assert plan.entry("attn.in_proj_weight").layout == Layout(heads=6)
    assert plan.entry("attn.out_proj.weight").layout == Layout(heads=2, head_axis="in")


def test_frozen_left_out_and_overrides():
    model = qwen3()
    model.model.norm.weight.requires_grad_(False)
    plan = equiopt.plan(model, roles={r"layers\.0\.mlp\.down_proj": "matrix"})
    assert "model.norm.weight" not in {e.name for e in plan}
    assert plan.role("model.layers.0.mlp.down_proj.weight") == "matrix"
    assert plan.role("model.layers.1.mlp.down_proj.weight") == "mlp_out"


def test_override_errors():
    with pytest.raises(PlanError, match="unknown role 'attn'"):
        equiopt.plan(qwen3(), roles={"q_proj": "attn"})
    with pytest.raises(PlanError, match=r"roles\['nothing_here'\].*match no trainable"):
        equiopt.plan(qwen3(), roles={"nothing_here": "matrix"})
    with pytest.raises(PlanError, match="not divisible"):
        equiopt.plan(qwen3(), layouts={r"q_proj": "heads5:out"})


def test_undecidable_parameter_names_itself():
    model = nn.Module()
    model.kernel = nn.Parameter(torch.zeros(2, 3, 4, 5))
    with pytest.raises(PlanError, match=r"(?s)kernel \(2, 3, 4, 5\).*roles=\{"):
        equiopt.plan(model)
    assert equiopt.plan(model, roles={"kernel": "vector"}).role("kernel") == "vector"


def test_distinct_parameters_sharing_storage_are_refused():
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4)
    b.weight = nn.Parameter(a.weight.data)  # same storage, two Parameter objects
    with pytest.raises(PlanError, match="sharing memory"):
        equiopt.plan(nn.ModuleDict({"a": a, "b": b}))


def test_plan_table_and_lookup():
    plan = equiopt.plan(qwen3(), preset="paper", lr={"embedding": 0.3})
    text = str(plan)
    assert "model.embed_tokens.weight" in text and "row_norm" in text and "0.3" in text
    assert plan.role("model.embed_tokens.weight") == "embedding"
    with pytest.raises(KeyError, match="not a trainable parameter"):
        plan.role("model.embed.weight")


def test_frozen_tensors_are_said_not_skipped_silently():
    """A frozen parameter is neither planned nor optimized, and the plan's table (and the DDC
    optimizer's description of the same plan) says so by name; a long list is cut at five."""
    model = qwen3()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    text = equiopt.plan(model).table()
    assert "note: 1 frozen tensor(s) (requires_grad=False), not optimized: model.layers.0.mlp.up_proj.weight" in text
    assert "model.layers.0.mlp.up_proj.weight " not in text.split("note:")[0]
    assert "not optimized: model.layers.0.mlp.up_proj.weight" in equiopt.ddc.describe(equiopt.build(model, "ddc_adam"))
    for p in model.model.layers.parameters():
        p.requires_grad_(False)
    n = sum(1 for _ in model.model.layers.parameters())
    assert f"{n} frozen tensor(s)" in str(equiopt.plan(model)) and f"and {n - 5} more" in str(equiopt.plan(model))


@pytest.mark.parametrize("softcap,head_map", [(None, "centered_row_norm"), (30.0, "row_norm")])
def test_plan_downgrades_what_the_audit_finds_broken(softcap, head_map):
    # final-logit soft-capping breaks the LM-head shift symmetry: no centering then
    cfg = transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 1}, tie_word_embeddings=False, final_logit_softcapping=softcap
    )
    model = transformers.Gemma3ForCausalLM(cfg)
    report = equiopt.audit(model, torch.randint(0, V, (2, 8)))
    assert equiopt.plan(model, audit=report).specs["lm_head"]["map"] == head_map
    if softcap is None:
        assert (
            equiopt.plan(model, audit=report, rules={"lm_head": "centered_row_norm"}).specs["lm_head"]["map"]
            == "centered_row_norm"
        )
    else:  # the shift is broken: a map that projects it out is refused, naming the parameter
        with pytest.raises(equiopt.PlanError, match=r"lm_head.weight.*projects out Shift\(rows\)"):
            equiopt.plan(model, audit=report, rules={"lm_head": "centered_row_norm"})


def test_square_fused_experts_when_two_h_equals_d():
    # OLMoE-1B-7B has d = 2048 and h = 1024: gate_up is [E, d, d]; the [d, h] down projection
    # tells the orientation (d first = standard [E, out, in] storage, d last = transposed)
    kw = dict(COMMON, intermediate_size=D // 2, num_experts_per_tok=2)
    olmoe_p = equiopt.plan(transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**kw, num_experts=E)))
    assert olmoe_p.entry("model.layers.0.mlp.experts.gate_up_proj").layout == Layout(stacked=True, fused=2)
    oss = equiopt.plan(transformers.GptOssForCausalLM(transformers.GptOssConfig(**kw, num_local_experts=E)))
    assert oss.entry("model.layers.0.mlp.experts.gate_up_proj").layout == Layout(
        stacked=True, transposed=True, fused=2, interleaved=True
    )
    assert oss.entry("model.layers.0.mlp.experts.down_proj").layout == Layout(stacked=True, transposed=True)
