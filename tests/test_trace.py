"""The dataflow tracer (equiopt.trace) and how the planner uses it: records, the structural
cross-check, fallbacks that are noted, sigmoid routers' groups, meta-device planning, the CLI."""

import re
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import equiopt
from equiopt.layouts import Layout, parse_layout
from equiopt.planner import PlanError
from equiopt.trace import infer, trace

transformers = pytest.importorskip("transformers")

from zoo import W13MLP, D, FlatMoE, H, HandLM, V  # noqa: E402


def shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_records_attention_gate_router_and_logits():
    torch.manual_seed(0)
    model = HandLM(lambda: FlatMoE(bias=True), layers=1)
    tr = trace(model)
    assert len(tr.attention) == 1 and tr.attention[0].heads == H
    q = tr.attention[0].sources["q"]
    (sets,) = q.values()
    assert sets == [tuple(range(h * D // H, (h + 1) * D // H)) for h in range(H)]  # head h reads rows h*hd..
    assert tr.gates and tr.routers
    readings, blocks = infer(tr, shapes(model))
    assert readings["head.weight"].role == "lm_head"
    assert readings["blocks.0.mlp.router.weight"].scoring == "sigmoid"
    assert readings["blocks.0.mlp.experts.w_in"].layout == parse_layout("experts4+fused2:interleaved")
    assert {b.kind for b in blocks} >= {"vocab", "attention", "mlp", "moe"}


def test_interleaved_heads_are_refused_with_the_override():
    class Odd(nn.Module):  # heads on the inner axis: rows h, h+H, h+2H, ... belong to head h
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(V, D)
            self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
            self.head = nn.Linear(D, V, bias=False)

        def forward(self, idx):
            x = self.wte(idx)
            B, T, _ = x.shape
            q, k, v = (w(x).view(B, T, -1, H).permute(0, 3, 1, 2) for w in (self.q, self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
            return self.head(x + self.o(y))

    with pytest.raises(PlanError, match=r"q\.weight.*not as equal contiguous blocks.*layouts="):
        equiopt.plan(Odd())
    plan = equiopt.plan(Odd(), roles={r"^[qkv]\.weight$": "matrix"})
    assert plan.role("q.weight") == "matrix"


def test_structure_and_dataflow_disagreeing_is_an_error_naming_both():
    class Backwards(nn.Module):  # an nn.Embedding used only as the output head
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D)
            self.inp = nn.Linear(V, D, bias=False)

        def forward(self, idx):
            return F.linear(self.inp(F.one_hot(idx, V).float()), self.emb.weight)

    with pytest.raises(PlanError, match=r"emb\.weight: structure reads embedding.*dataflow reads lm_head.*roles="):
        equiopt.plan(Backwards())
    plan = equiopt.plan(Backwards(), trace=False)  # the structure alone
    assert plan.role("emb.weight") == "embedding"


def test_untraceable_models_fall_back_to_the_structure_with_a_note():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 8)})
    plan = equiopt.plan(model)
    assert plan.entry("attn.in_proj_weight").layout == Layout(heads=6)
    assert any("not traced" in n for n in plan.notes) and "note: not traced" in plan.table()


def test_multihead_attention_inside_a_traced_model_stays_structural():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(V, D)
            self.attn = nn.MultiheadAttention(D, H, batch_first=True)
            self.head = nn.Linear(D, V, bias=False)

        def forward(self, idx):
            x = self.wte(idx)
            return self.head(x + self.attn(x, x, x)[0])

    plan = equiopt.plan(M())
    assert plan.entry("attn.in_proj_weight").layout == Layout(heads=3 * H)
    assert plan.entry("attn.out_proj.weight").layout == Layout(heads=H, head_axis="in")
    assert plan.role("head.weight") == "lm_head" and not plan.notes


def test_sigmoid_router_gets_its_own_group_and_no_centering():
    torch.manual_seed(0)
    model = HandLM(lambda: FlatMoE(bias=True), layers=1)
    plan = equiopt.plan(model)
    e = plan.entry("blocks.0.mlp.router.weight")
    assert e.role == "router" and not plan.group_of(e.name).has("shift")
    groups = [g for g in plan.param_groups() if g["role"] == "router"]
    assert len(groups) == 1 and groups[0]["map"] == "row_norm" and groups[0]["center"] is False
    assert "router (no shift)" in plan.table()
    # a centering map chosen explicitly is refused: its group is not the block's
    with pytest.raises(PlanError, match=r"router.*projects out Shift"):
        equiopt.plan(model, rules={"router": "centered_row_norm"})
    # softmax routers keep the shift and the centered map
    soft = equiopt.plan(
        transformers.OlmoeForCausalLM(
            transformers.OlmoeConfig(
                vocab_size=V,
                hidden_size=D,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=H,
                num_key_value_heads=2,
                num_experts=4,
                num_experts_per_tok=2,
            )
        )
    )
    r = [g for g in soft.param_groups() if g["role"] == "router"]
    assert len(r) == 1 and r[0]["map"] == "centered_row_norm" and r[0]["center"] is True


def test_meta_model_is_planned_without_materialising_it():
    cfg = transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    t0 = time.perf_counter()
    plan = equiopt.plan(model)
    seconds = time.perf_counter() - t0
    assert sum(p.numel() for p in model.parameters()) > 1e9
    assert all(p.device.type == "meta" for p in model.parameters())
    assert any("shrunk copy" in n for n in plan.notes)
    assert plan.entry("model.layers.15.self_attn.q_proj.weight").layout == Layout(heads=32)
    assert plan.entry("model.layers.15.self_attn.k_proj.weight").layout == Layout(heads=8)
    assert plan.entry("model.layers.15.self_attn.o_proj.weight").layout == Layout(heads=32, head_axis="in")
    assert plan.role("model.layers.9.mlp.down_proj.weight") == "mlp_out"
    assert plan.role("lm_head.weight") == "lm_head"
    # norm channels carried from the copy at each layer's own indices
    post = {c.gain: c for c in plan.norm_channels}["model.layers.9.post_attention_layernorm.weight"]
    assert post.certain and post.readers == ("model.layers.9.mlp.gate_proj.weight", "model.layers.9.mlp.up_proj.weight")
    assert len(plan.norm_channels) == 2 * 16 + 1 and plan.gauges("model.layers.15.self_attn.v_proj.weight") == [
        "norm_channel"
    ]
    assert seconds < 60


def test_layer_pattern_survives_shrinking():
    """DeepSeek-V3: layer 0 dense, layers >= 1 MoE; the shrunk copy keeps both kinds."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
    )
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(cfg)
    plan = equiopt.plan(model)
    assert plan.role("model.layers.0.mlp.gate_proj.weight") == "mlp_in"
    assert plan.role("model.layers.5.mlp.gate.weight") == "router"
    assert plan.entry("model.layers.5.mlp.experts.gate_up_proj").layout == Layout(stacked=True, fused=2)
    assert plan.entry("model.layers.5.self_attn.q_b_proj.weight").layout == Layout(heads=8)
    assert not plan.group_of("model.layers.5.mlp.gate.weight").has("shift")


def test_no_structure_found_is_counted():
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(V, D)
            self.mlp = W13MLP()
            self.pool = nn.Linear(D, D)

        def forward(self, idx):
            return torch.tanh(self.pool(self.mlp(self.wte(idx))))

    plan = equiopt.plan(Pool())
    assert plan.role("pool.weight") == "matrix" and not plan.entry("pool.weight").found
    assert re.search(r"pool\.weight\s+\S+\s+matrix \(no structure found\)", plan.table())
    assert "1 2-D weight(s) with no structure found" in plan.table()


def test_cli_plan_from_config(tmp_path, capsys):
    from equiopt.cli import main

    cfg = tmp_path / "config.json"
    cfg.write_text(
        transformers.Qwen3Config(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=H,
            num_key_value_heads=2,
            head_dim=8,
            architectures=["Qwen3ForCausalLM"],
        ).to_json_string()
    )
    assert main(["plan", "--config", str(cfg), "--set", "intermediate_size=64"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.2.self_attn.q_proj.weight" in out and "heads4:out" in out and "shrunk copy" in out
    assert (
        main(
            [
                "plan",
                "--model",
                "GPT2LMHeadModel",
                "--set",
                "n_embd=32",
                "--set",
                "n_layer=1",
                "--set",
                "n_head=4",
                "--set",
                "vocab_size=64",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(r"c_attn\.weight\s+32x96\s+attention\s+transposed\+heads12:out", out)
    # a DDC preset: the gauges each parameter is in, probed on a real (cpu) model; meta is refused
    assert main(["plan", "--config", str(cfg), "--preset", "ddc_muon", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    up = r"up_proj\.weight\s+48x\d+\s+mlp_in\s+neuron_rescale:model\.layers\.0\.mlp \(rows\); norm_scale"
    assert re.search(up, out)
    assert "vo_rotation:model.layers.2.self_attn" in out and "gauges claimed by DDC-Muon" in out
    with pytest.raises(SystemExit):
        main(["plan", "--config", str(cfg), "--preset", "ddc_adam"])
    assert "pass --device cpu" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# norm channels: a 1-D gain and the linear maps reading its output (equiopt.trace.norm_channels)
# ----------------------------------------------------------------------------------------
class _NormLM(nn.Module):
    """embed -> RMSNorm(s) -> two readers; ``mode`` breaks the gauge in one structural way."""

    def __init__(self, mode="plain", d=8, V=16):
        super().__init__()
        self.mode = mode
        self.embed = nn.Embedding(V, d)
        self.norm = nn.RMSNorm(d)
        self.gain = nn.Parameter(torch.rand(d) + 0.5)  # a hand-written gain: x * g (or x * (1 + g))
        self.a, self.b = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, V, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        y = self.norm(x)
        if self.mode == "dropout":  # a diagonal mask (identity in eval): the gauge holds
            y = F.dropout(y, 0.1, self.training)
        if self.mode == "residual":  # the normed value also enters the residual stream
            x = x + y
        if self.mode == "twice":  # one norm called twice
            x = x + self.a(self.norm(x))
        x = x + self.a(y) + self.b(y)
        g = 1 + self.gain if self.mode == "offset" else self.gain
        z = F.rms_norm(x, (x.shape[-1],)) * g
        return self.head(z.reshape(z.shape)[:, :])


def test_norm_channels_confirmed_and_unconfirmed():
    from equiopt.trace import norm_channels

    torch.manual_seed(0)
    got = {c.gain: c for c in norm_channels(trace(_NormLM()))}
    assert got["norm.weight"].readers == ("a.weight", "b.weight") and got["norm.weight"].certain
    assert got["gain"].readers == ("head.weight",) and got["gain"].certain  # through reshape and a slice
    assert got["gain"].orients == ("out_in",) and got["gain"].bias is None
    drop = {c.gain: c for c in norm_channels(trace(_NormLM("dropout")))}["norm.weight"]
    assert drop.certain and drop.readers == ("a.weight", "b.weight")
    res = {c.gain: c for c in norm_channels(trace(_NormLM("residual")))}["norm.weight"]
    assert not res.certain and "add" in res.why
    twice = {c.gain: c for c in norm_channels(trace(_NormLM("twice")))}["norm.weight"]
    assert not twice.certain and "scales 2 tensors" in twice.why
    off = {c.gain: c for c in norm_channels(trace(_NormLM("offset")))}["gain"]
    assert not off.certain and "add of the gain" in off.why


def test_norm_channels_of_hf_models():
    """LayerNorm (gain + bias) read by GPT-2's Conv1D (x @ W: in_out); the tied final norm and
    the routed experts' gather are not confirmed; q/k norms feed RoPE, not a linear map."""
    from equiopt.trace import norm_channels

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    got = {c.gain: c for c in norm_channels(trace(gpt2))}
    ln1 = got["transformer.h.0.ln_1.weight"]
    assert ln1.certain and ln1.bias == "transformer.h.0.ln_1.bias" and ln1.orients == ("in_out",)
    assert ln1.readers == ("transformer.h.0.attn.c_attn.weight",)
    assert not got["transformer.ln_f.weight"].certain and "tied or shared" in got["transformer.ln_f.weight"].why
    moe = transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(
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
        )
    )
    got = {c.gain: c for c in norm_channels(trace(moe))}
    assert got["model.layers.0.input_layernorm.weight"].certain
    assert got["model.layers.0.input_layernorm.weight"].readers == tuple(
        f"model.layers.0.self_attn.{r}_proj.weight" for r in "qkv"
    )
    post = got["model.layers.0.post_attention_layernorm.weight"]
    assert not post.certain and post.readers == ("model.layers.0.mlp.gate.weight",)  # the router; experts gather
    assert "model.layers.0.self_attn.q_norm.weight" not in got
