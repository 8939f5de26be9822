"""Symmetry audit: verdicts on tiny models match the symmetries each architecture has.

The expected verdicts are written by hand from each model's forward (not produced by the
audit): e.g. SiLU(gate) * up is homogeneous in `up` only, RoPE commutes only with rotations
inside its 2-planes, tanh soft-capping does not commute with a shift of the logits. Some
claims are also checked with explicit group actions written here, independent of the audit's
own machinery (Layout views, gathers), and mutations (a wrong layout) must be caught.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import equiopt
from equiopt import audit as A
from equiopt.groups import haar, inverse_permutation, permutation

from plain_gpt import SwiGLU

transformers = pytest.importorskip("transformers")

V, D, HID, HQ, HKV, HD, E = 64, 32, 24, 4, 2, 8, 4


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------
# A plain PyTorch GPT-style model: learned positions, RMSNorm, fused-qkv attention without
# RoPE, SwiGLU MLP and a top-k MoE with stacked experts (optionally a per-expert router scale)
# ------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Attention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d, bias=True)  # [q; k; v], heads contiguous
        self.c_proj = nn.Linear(d, d, bias=True)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(d, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, d))


class StackedExperts(nn.Module):
    def __init__(self, d, h, experts):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(experts, 2 * h, d) / d**0.5)  # [gate; up]
        self.w_out = nn.Parameter(torch.randn(experts, d, h) / h**0.5)

    def forward(self, x):  # every expert on every token: [N, E, d]
        gate, up = torch.einsum("nd,ekd->nek", x, self.w_in).chunk(2, dim=-1)
        return torch.einsum("neh,edh->ned", F.silu(gate) * up, self.w_out)


class TopKMoE(nn.Module):
    def __init__(self, d, h, experts, top_k, expert_scale=False):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d, experts, bias=False)
        # a learned per-expert temperature on the router logits (breaks the router shift)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, experts)) if expert_scale else None
        self.experts = StackedExperts(d, h, experts)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        if self.scale is not None:
            logits = logits * self.scale
        probs = logits.softmax(-1)
        weight, index = probs.topk(self.top_k, dim=-1)
        dense = torch.zeros_like(probs).scatter(-1, index, weight)
        return (self.experts(x) * dense.unsqueeze(-1)).sum(1).reshape(shape)


class Block(nn.Module):
    def __init__(self, d, n_head, h, moe, expert_scale, norm):
        super().__init__()
        self.ln1, self.ln2 = norm(d), norm(d)
        self.attn = Attention(d, n_head)
        self.mlp = TopKMoE(d, h, E, 2, expert_scale) if moe else SwiGLU(d, h)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PlainGPT(nn.Module):
    def __init__(self, vocab=V, d=D, n_head=HQ, h=HID, block_size=20, expert_scale=False, norm=RMSNorm):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(
            [Block(d, n_head, h, False, expert_scale, norm), Block(d, n_head, h, True, expert_scale, norm)]
        )
        self.ln_f = norm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


PLAIN_LAYOUTS = {r"experts\.w_in$": "stacked+fused2:concat"}


def plain_plan(model):
    return equiopt.plan(model, layouts=PLAIN_LAYOUTS)


def batch(seed=0, vocab=V, B=2, T=16):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------
# Hugging Face models from config classes (no download), eager attention
# ------------------------------------------------------------------------------------------
COMMON = dict(
    vocab_size=V,
    hidden_size=D,
    intermediate_size=HID,
    num_hidden_layers=2,
    num_attention_heads=HQ,
    num_key_value_heads=HKV,
    head_dim=HD,
    attn_implementation="eager",
    bos_token_id=None,
    eos_token_id=None,
)


# built once per session (HF init is slow on a loaded CPU); the audit never modifies a model


@functools.cache
def qwen3():
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON))


@functools.cache
def gemma3(**kw):
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**COMMON, **kw))


@functools.cache
def olmoe():  # default experts implementation (grouped_mm, float32 only): the audit switches it
    torch.manual_seed(0)
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**COMMON, num_experts=E, num_experts_per_tok=2))


@functools.cache
def gptoss():
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        **COMMON, num_local_experts=E, num_experts_per_tok=2, experts_implementation="eager"
    )
    return transformers.GptOssForCausalLM(cfg)


def verdicts(report, kind):
    return [c.verdict for c in report.by_kind(kind)]


def only(report, kind, scope_part=""):
    cs = [c for c in report.by_kind(kind) if scope_part in c.scope]
    assert len(cs) == 1, (kind, scope_part, [c.scope for c in cs])
    return cs[0]


def rescale(report, part_label):
    """neuron_rescale results whose rescaled part is ``part_label`` (one per layer)."""
    cs = [c for c in report.by_kind("neuron_rescale") if c.part == part_label]
    assert cs, [c.part for c in report.by_kind("neuron_rescale")]
    return cs


# ------------------------------------------------------------------------------------------
# Explicit oracles: the symmetry claims themselves, with group actions written out here
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def test_oracle_plain_model_symmetries():
    """Hand-written actions on the plain model: neuron permutation (dense and one expert),
    router shift, head rows with relabelled targets, and a q/k head rotation (no RoPE)."""
    torch.manual_seed(1)
    m = PlainGPT().double().eval()
    ids = batch()
    base = m(ids)
    g = torch.Generator().manual_seed(3)

    def close(other):
        return (other - base).abs().max().item() / base.abs().max().item()

    m2 = PlainGPT().double().eval()
    m2.load_state_dict(m.state_dict())
    mlp = m2.blocks[0].mlp
    P = permutation(HID, g)
    mlp.w1.weight.copy_(mlp.w1.weight[P])
    mlp.w3.weight.copy_(mlp.w3.weight[P])
    mlp.w2.weight.copy_(mlp.w2.weight[:, P])
    ex = m2.blocks[1].mlp.experts
    Q = permutation(HID, g)
    ex.w_in[2].copy_(torch.cat([ex.w_in[2, :HID][Q], ex.w_in[2, HID:][Q]]))
    ex.w_out[2].copy_(ex.w_out[2][:, Q])
    r = m2.blocks[1].mlp.router
    r.weight.add_(torch.randn(D, generator=g, dtype=torch.float64))
    assert close(m2(ids)) < 1e-13
    # the same neuron permutation applied to the gate only is *not* a symmetry
    mlp.w1.weight.copy_(mlp.w1.weight[permutation(HID, g)])
    assert close(m2(ids)) > 1e-6

    m3 = PlainGPT().double().eval()
    m3.load_state_dict(m.state_dict())
    Pv = permutation(V, g)
    m3.head.weight.copy_(m3.head.weight[Pv])
    assert close(m3(ids)[..., inverse_permutation(Pv)]) < 1e-13  # new logit j is old logit Pv[j]
    # q/k rotation of head 0 (learned positions: no RoPE)
    m4 = PlainGPT().double().eval()
    m4.load_state_dict(m.state_dict())
    R = haar(1, HD, g)[0]
    W = m4.blocks[0].attn.c_attn.weight
    b = m4.blocks[0].attn.c_attn.bias
    for lo in (0, D):  # head 0 of q and of k
        W[lo : lo + HD] = R @ W[lo : lo + HD]
        b[lo : lo + HD] = R @ b[lo : lo + HD]
    assert close(m4(ids)) < 1e-13


@torch.no_grad()
def test_oracle_gptoss_interleaved_neuron_permutation():
    """gpt-oss stores gate_up as [E, d, 2h] with gate = [..., ::2], up = [..., 1::2].
    (HF norms compute in float32 even for a float64 model: rounding-level errors ~1e-7.)"""
    m = copy.deepcopy(gptoss()).double().eval()
    ids = batch()
    base = m(ids).logits
    ex = m.model.layers[0].mlp.experts
    P = permutation(HID, torch.Generator().manual_seed(0))
    gu, gub, dn = ex.gate_up_proj.clone(), ex.gate_up_proj_bias.clone(), ex.down_proj.clone()
    ex.gate_up_proj[..., 0::2] = gu[..., 0::2][..., P]
    ex.gate_up_proj[..., 1::2] = gu[..., 1::2][..., P]
    ex.gate_up_proj_bias[..., 0::2] = gub[..., 0::2][..., P]
    ex.gate_up_proj_bias[..., 1::2] = gub[..., 1::2][..., P]
    ex.down_proj.copy_(dn[:, P, :])
    assert (m(ids).logits - base).abs().max() / base.abs().max() < 1e-6
    # the same permutation of the down rows alone is not a symmetry
    ex.down_proj.copy_(dn)
    assert (m(ids).logits - base).abs().max() / base.abs().max() > 1e-4


# ------------------------------------------------------------------------------------------
# Audit verdicts
# ------------------------------------------------------------------------------------------
def test_plain_gpt_verdicts():
    torch.manual_seed(0)
    m = PlainGPT()
    r = A.audit(m, batch(), plan=plain_plan(m))
    exact = [
        "vocab_perm",
        "head_perm",
        "logit_shift",
        "vo_rotation",
        "qk_rotation",
        "qk_rope_rotation",
        "neuron_perm",
        "expert_perm",
        "router_shift",
    ]
    for kind in exact:
        assert set(verdicts(r, kind)) == {"exact"}, (kind, [(c.scope, c.error, c.reason) for c in r.by_kind(kind)])
    # learned positions: nothing relabels them
    assert verdicts(r, "row_perm") == ["broken"]
    assert only(r, "row_perm").params == ["wpe.weight"]
    # RMSNorm gains break O(d); at unit gains (as given) the rotation holds
    rot = only(r, "residual_rotation")
    assert rot.verdict == "broken" and rot.as_given_error < r.settings["tol"]
    assert "norm gains" in rot.reason
    # SiLU(gate) * up: the up branch is homogeneous, the gate is not
    assert [c.verdict for c in rescale(r, "w3.weight")] == ["exact"]
    assert [c.verdict for c in rescale(r, "w1.weight")] == ["broken"]
    assert [c.verdict for c in rescale(r, "w_in[part 1]")] == ["exact"]
    assert [c.verdict for c in rescale(r, "w_in[part 0]")] == ["broken"]
    # the fused qkv bias is rotated with its heads; expert perm moves router rows + experts
    assert "blocks.0.attn.c_attn.bias" in only(r, "qk_rotation", "blocks.0").params
    assert set(only(r, "expert_perm").params) == {
        "blocks.1.mlp.router.weight",
        "blocks.1.mlp.experts.w_in",
        "blocks.1.mlp.experts.w_out",
    }
    assert only(r, "router_shift").scope == "blocks.1.mlp.router"
    assert A.downgrade_rules(r) == {}


def test_router_with_per_expert_scale_breaks_the_shift_only():
    torch.manual_seed(0)
    m = PlainGPT(expert_scale=True)
    r = A.audit(m, batch(), plan=plain_plan(m))
    shift = only(r, "router_shift")
    assert shift.verdict == "broken" and shift.assumed_by
    assert "blocks.1.mlp.scale" in shift.reason
    # permuting the scale with the router rows and the experts keeps the expert permutation
    perm = only(r, "expert_perm")
    assert perm.verdict == "exact" and "blocks.1.mlp.scale" in perm.params
    assert A.downgrade_rules(r) == {"router": {"map": "row_norm", "center": False}}


def test_layernorm_breaks_the_residual_rotation_even_at_unit_gains():
    torch.manual_seed(0)
    m = PlainGPT(norm=nn.LayerNorm)
    r = A.audit(m, batch(), plan=plain_plan(m))
    rot = only(r, "residual_rotation")
    assert rot.verdict == "broken" and rot.as_given_error > 1e-6
    assert "LayerNorm" in rot.reason


class ListMoE(nn.Module):
    """Experts as a ModuleList of SwiGLU MLPs (Mixtral-v1 style) beside a router."""

    def __init__(self, d, h, experts=E, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, h) for _ in range(experts))

    def forward(self, x):
        probs = self.gate(x).softmax(-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        dense = torch.zeros_like(probs).scatter(-1, idx, w)
        return sum(dense[..., e : e + 1] * ex(x) for e, ex in enumerate(self.experts))


def test_expert_list_moe_router_shift_and_per_expert_neurons():
    torch.manual_seed(0)
    m = PlainGPT()
    m.blocks[1].mlp = ListMoE(D, HID)
    r = A.audit(m, batch())
    assert verdicts(r, "expert_perm") == ["untested"] and "ModuleList" in only(r, "expert_perm").reason
    assert verdicts(r, "router_shift") == ["exact"]
    assert verdicts(r, "neuron_perm") == ["exact"] * (1 + E)  # the dense MLP and each expert


def test_wrong_layout_is_caught():
    """Declaring gpt-oss' interleaved gate_up as concatenated permutes gate and up coordinates
    together: the neuron permutation the map would assume is then broken."""
    m = gptoss()
    plan = equiopt.plan(m, layouts={r"experts\.gate_up_proj$": "stacked+transposed+fused2:concat"})
    r = A.audit(m, batch(), plan=plan, grads=False)
    assert set(verdicts(r, "neuron_perm")) == {"broken"}


def test_qwen3_verdicts():
    r = A.audit(qwen3(), batch())
    for kind in ("vocab_perm", "head_perm", "logit_shift", "vo_rotation", "neuron_perm"):
        assert set(verdicts(r, kind)) == {"exact"}, kind
    rot = only(r, "residual_rotation")
    assert rot.verdict == "broken" and rot.as_given_error < r.settings["tol"] and "norm gains" in rot.reason
    # RoPE: a general per-head rotation of q and k fails even at unit QK-norm gains ...
    for c in r.by_kind("qk_rotation"):
        assert c.verdict == "broken" and c.as_given_error > 1e-3 and "RoPE" in c.reason
    # ... rotations inside the RoPE planes hold at unit gains, and break with generic QK-norm gains
    for c in r.by_kind("qk_rope_rotation"):
        assert c.verdict == "broken" and c.as_given_error < r.settings["tol"]
        assert "q_norm" in c.reason and "k_norm" in c.reason
    assert [c.verdict for c in rescale(r, "up_proj.weight")] == ["exact"] * 2
    assert [c.verdict for c in rescale(r, "gate_proj.weight")] == ["broken"] * 2
    assert A.downgrade_rules(r) == {}


def test_gemma3_tied_verdicts():
    r = A.audit(gemma3(), batch())  # tied embedding (Gemma default), padding_idx 0
    assert verdicts(r, "tied_perm") == ["exact"]
    assert "padding_idx=0" in " ".join(only(r, "tied_perm").notes)
    shift = only(r, "logit_shift")  # not a symmetry of a tied head, and not assumed by its map
    assert shift.verdict == "broken" and not shift.assumed_by
    assert set(verdicts(r, "neuron_perm")) == {"exact"}
    assert set(verdicts(r, "vo_rotation")) == {"exact"}
    assert [c.verdict for c in rescale(r, "up_proj.weight")] == ["exact"] * 2  # gelu(gate) * up
    assert A.downgrade_rules(r) == {}


def test_gemma3_final_logit_softcapping_breaks_the_head_shift():
    model = gemma3(tie_word_embeddings=False, final_logit_softcapping=30.0)
    r = A.audit(model, batch())
    shift = only(r, "logit_shift")
    assert shift.verdict == "broken" and shift.assumed_by
    assert "final_logit_softcapping" in shift.reason
    assert verdicts(r, "head_perm") == ["exact"]  # tanh acts per logit: permutations survive
    rules = A.downgrade_rules(r)
    assert rules == {"lm_head": {"map": "row_norm", "center": False}}
    # the downgraded plan no longer assumes the shift (plan(audit=) drops it from the head's group)
    plan = equiopt.plan(model, audit=r)
    assert plan.specs["lm_head"]["map"] == "row_norm" and plan.specs["lm_head"]["center"] is False
    # the map name alone is not a downgrade: center=None follows the head's shift and centers it again
    recentered = A.audit(model, batch(), plan=equiopt.plan(model, rules={"lm_head": "row_norm"}), grads=False)
    assert only(recentered, "logit_shift").assumed_by
    r2 = A.audit(model, batch(), plan=plan, grads=False)
    assert not only(r2, "logit_shift").assumed_by and A.downgrade_rules(r2) == {}


def test_olmoe_verdicts():
    r = A.audit(olmoe(), batch())
    for kind in ("vocab_perm", "head_perm", "logit_shift", "vo_rotation", "neuron_perm", "expert_perm", "router_shift"):
        assert set(verdicts(r, kind)) == {"exact"}, (kind, [c.reason for c in r.by_kind(kind)])
    assert "padding_idx=1" in " ".join(only(r, "vocab_perm").notes)
    # fused [gate; up]: part 1 (up) is linear, part 0 (gate) is not
    assert {c.verdict for c in rescale(r, "gate_up_proj[part 1]")} == {"exact"}
    assert {c.verdict for c in rescale(r, "gate_up_proj[part 0]")} == {"broken"}
    assert A.downgrade_rules(r) == {}


def test_gptoss_verdicts():
    r = A.audit(gptoss(), batch())
    for kind in ("vocab_perm", "head_perm", "logit_shift", "vo_rotation", "neuron_perm", "expert_perm", "router_shift"):
        assert set(verdicts(r, kind)) == {"exact"}, (kind, [c.reason for c in r.by_kind(kind)])
    # no QK norm: RoPE-plane rotations hold at the generic point, general rotations do not
    assert set(verdicts(r, "qk_rope_rotation")) == {"exact"}
    assert set(verdicts(r, "qk_rotation")) == {"broken"}
    # biases travel with their rows: router bias with the experts, expert biases with neurons
    assert "model.layers.0.mlp.router.bias" in only(r, "expert_perm", "layers.0").params
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" in only(r, "neuron_perm", "layers.0").params
    # clamped SwiGLU with (up + 1): neither part is homogeneous
    assert {c.verdict for c in r.by_kind("neuron_rescale")} == {"broken"}
    # o_proj and down_proj biases write the residual stream: rotated with it (exact as given)
    rot = only(r, "residual_rotation")
    assert "model.layers.0.self_attn.o_proj.bias" in rot.params and rot.as_given_error < r.settings["tol"]
    assert A.downgrade_rules(r) == {}


# ------------------------------------------------------------------------------------------
# Checks come from the planner's blocks, not from parameter names
# ------------------------------------------------------------------------------------------
class GQAttention(nn.Module):
    """q, k, v, o with biases and grouped kv heads; ``names`` are the Linear children's
    names in the order q, k, v, o (the forward reads them through ``names``)."""

    def __init__(self, d, names):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = HQ, HKV, HD
        self.names = names
        for n, (i, o) in zip(names, ((d, HQ * HD), (d, HKV * HD), (d, HKV * HD), (HQ * HD, d))):
            setattr(self, n, nn.Linear(i, o, bias=True))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v, o = (getattr(self, n) for n in self.names)
        q, k, v = (f(x).view(B, T, -1, HD).transpose(1, 2) for f in (q, k, v))
        k, v = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o(y.transpose(1, 2).reshape(B, T, HQ * HD))


class GatedMLP(nn.Module):
    def __init__(self, d, h, names):  # names: gate, up, down
        super().__init__()
        self.names = names
        for n, (i, o) in zip(names, ((d, h), (d, h), (h, d))):
            setattr(self, n, nn.Linear(i, o, bias=False))

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


class NamedLM(nn.Module):
    def __init__(self, attn_names, mlp_names, cap=None):
        super().__init__()
        self.cap = cap
        self.embed = nn.Embedding(V, D)
        self.n1, self.n2, self.nf = RMSNorm(D), RMSNorm(D), RMSNorm(D)
        self.mix = GQAttention(D, attn_names)
        self.ff = GatedMLP(D, HID, mlp_names)
        self.unembed = nn.Linear(D, V, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.mix(self.n1(x))
        x = x + self.ff(self.n2(x))
        z = self.unembed(self.nf(x))
        return z if self.cap is None else self.cap * torch.tanh(z / self.cap)  # soft-capped logits


CONVENTIONAL = (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"))
UNCONVENTIONAL = (("a", "b", "c", "out"), ("p", "r", "s"))


def named_pair():
    """The same network twice: conventional names, and names no regex would read."""
    torch.manual_seed(0)
    conv = NamedLM(*CONVENTIONAL)
    odd = NamedLM(*UNCONVENTIONAL)
    rename = dict(zip(CONVENTIONAL[0] + CONVENTIONAL[1], UNCONVENTIONAL[0] + UNCONVENTIONAL[1]))
    state = {}
    for k, v in conv.state_dict().items():
        parts = k.split(".")
        state[".".join(rename.get(p, p) for p in parts)] = v
    odd.load_state_dict(state)
    return conv, odd


def test_unconventional_names_give_the_same_verdicts():
    conv, odd = named_pair()
    ids = batch()
    r1, r2 = A.audit(conv, ids), A.audit(odd, ids)
    assert [(c.kind, c.scope, c.verdict) for c in r1.checks] == [(c.kind, c.scope, c.verdict) for c in r2.checks]
    for c1, c2 in zip(r1.checks, r2.checks):  # the same group elements on the same weights
        assert c1.error == pytest.approx(c2.error, rel=1e-6, abs=1e-15), c1.kind
        assert len(c1.params) == len(c2.params) and len(c1.assumed_by) == len(c2.assumed_by)
    assert "untested" not in {c.verdict for c in r2.checks}
    for kind in (
        "vocab_perm",
        "head_perm",
        "logit_shift",
        "vo_rotation",
        "qk_rotation",
        "qk_rope_rotation",
        "neuron_perm",
    ):
        assert verdicts(r2, kind) == ["exact"], (kind, [c.reason for c in r2.by_kind(kind)])
    # q/k/v in registration order: the q/k rotation acts on a and b (and their biases), v/o on c and out
    assert set(only(r2, "qk_rotation").params) == {"mix.a.weight", "mix.a.bias", "mix.b.weight", "mix.b.bias"}
    assert set(only(r2, "vo_rotation").params) == {"mix.c.weight", "mix.c.bias", "mix.out.weight"}
    # the linear branch is measured, not read from a name: r (up) holds, p (gate) does not
    assert [c.verdict for c in rescale(r2, "r.weight")] == ["exact"]
    assert [c.verdict for c in rescale(r2, "p.weight")] == ["broken"]
    assert only(r2, "residual_rotation").verdict == "broken"  # RMSNorm gains at the generic point


def test_soft_capped_head_breaks_the_logit_shift():
    """tanh soft-capping of the logits (plain PyTorch, no config entry to ablate): the shift
    check must fail, permutations survive, and the centered head map is downgraded."""
    torch.manual_seed(0)
    m = NamedLM(*UNCONVENTIONAL, cap=2.0)
    r = A.audit(m, batch())
    shift = only(r, "logit_shift")
    assert shift.verdict == "broken" and shift.error > 1e-3 and shift.as_given_error > 1e-3
    assert shift.assumed_by == ["unembed.weight: lm_head/centered_row_norm"]
    assert verdicts(r, "head_perm") == ["exact"]
    assert A.downgrade_rules(r) == {"lm_head": {"map": "row_norm", "center": False}}
    assert r.broken_factors() == {"lm_head": (equiopt.groups.Factor("shift", "rows"),)}
    plan = equiopt.plan(m, audit=r)
    assert plan.specs["lm_head"]["center"] is False and not plan.groups["lm_head"].has("shift")
    # without the cap the same check holds
    m.cap = None
    assert only(A.audit(m, batch(), grads=False), "logit_shift").verdict == "exact"


def test_assumed_follows_the_map_registry():
    """AdamW is permutation-equivariant only: rotations are not assumed under it, permutations are."""
    torch.manual_seed(0)
    m = NamedLM(*UNCONVENTIONAL)
    r = A.audit(m, batch(), plan=equiopt.plan(m, preset="adamw"), grads=False)
    assert not only(r, "vo_rotation").assumed_by and not only(r, "residual_rotation").assumed_by
    assert len(only(r, "neuron_perm").assumed_by) == 3 and only(r, "head_perm").assumed_by
    assert not only(r, "logit_shift").assumed_by and not any(c.assumed_by for c in r.by_kind("neuron_rescale"))


# ------------------------------------------------------------------------------------------
# Report, rules, errors, CLI
# ------------------------------------------------------------------------------------------
def test_report_formats_and_by_parameter():
    torch.manual_seed(0)
    m = PlainGPT()
    r = A.audit(m, batch(), plan=plain_plan(m), grads=False)
    text = str(r)
    assert "residual_rotation" in text and "verdict" in text
    md = r.to_markdown()
    assert md.count("\n| ") >= len(r.checks) + 2 and "| neuron_perm |" in md
    d = json.loads(r.to_json())
    assert len(d["checks"]) == len(r.checks) and {s["kind"] for s in d["summary"]} == {c.kind for c in r.checks}
    per = r.by_parameter()
    kinds = {x["kind"] for x in per["blocks.1.mlp.router.weight"]}
    assert {"expert_perm", "router_shift", "residual_rotation"} <= kinds


def test_downgrade_rules_for_left_spectral_router():
    torch.manual_seed(0)
    m = PlainGPT(expert_scale=True)
    plan = equiopt.plan(m, layouts=PLAIN_LAYOUTS, rules={"router": "left_spectral"})
    r = A.audit(m, batch(), plan=plan, grads=False)
    assert A.downgrade_rules(r) == {"router": {"map": "left_spectral", "center": False}}
    plan2 = equiopt.plan(m, layouts=PLAIN_LAYOUTS, rules={"router": "left_spectral", **A.downgrade_rules(r)})
    assert plan2.specs["router"]["center"] is False


def test_errors_name_the_input():
    m = PlainGPT()
    with pytest.raises(A.AuditError, match="input_ids"):
        A.audit(m, torch.randn(2, 8), plan=plain_plan(m))
    other = PlainGPT(vocab=V + 1)
    with pytest.raises(A.AuditError, match="wte.weight"):
        A.audit(m, batch(), plan=plain_plan(other))


def test_callable_module():
    """``equiopt.audit(model, batch)`` (the issue's spelling) is ``equiopt.audit.audit``."""
    torch.manual_seed(0)
    m = PlainGPT()
    r = equiopt.audit(m, batch(), plan=plain_plan(m), grads=False)
    assert isinstance(r, A.AuditReport) and only(r, "neuron_perm", "blocks.0").verdict == "exact"


def test_cli(tmp_path, capsys):
    import argparse

    pytest.importorskip("equiopt.train.models")
    p = argparse.ArgumentParser()
    A.add_arguments(p)
    out = tmp_path / "audit.md"
    args = p.parse_args(
        [
            "--arch",
            "gemma3",
            "--layers",
            "1",
            "--vocab",
            "64",
            "--tied",
            "no",
            "--softcap",
            "30",
            "--seq",
            "8",
            "--no-grads",
            "--markdown",
            str(out),
            "--strict",
        ]
    )
    code = A.run(args)
    assert code == 1  # the soft-capped head's centering must be downgraded
    assert "logit_shift" in out.read_text() and "'lm_head'" in capsys.readouterr().out


def test_relied_on_semantics():
    """Relied on = the plan needs the symmetry exact: a centering map projects the shift out,
    or a map uses the structure a witness check tests (row units, per-head maps). A map
    equivariant under more than the network's group (per-head polar under RoPE, anything under
    the residual rotation) does not rely on the smaller group; nor does a block whose group
    does not claim the factor (a sigmoid router)."""
    from equiopt.groups import Factor, Group
    from equiopt.layouts import Layout

    polar = {"map": "polar", "center": False, "column_aware": False, "per_head": True}
    heads, rows, cols = Layout(heads=HQ), Factor("orth", "rows"), Factor("orth", "cols")
    attn = Group.of("orth:rows", "orth:cols")
    assert A.relies_on(polar, rows, "vo_rotation", attn, heads) == "structure"
    assert A.relies_on(polar, cols, "vo_rotation", attn, Layout(heads=HQ, head_axis="in")) == "structure"
    assert A.relies_on({**polar, "per_head": False}, rows, "vo_rotation", attn, heads) == ""  # whole-matrix polar
    assert A.relies_on(polar, rows, "qk_rotation", attn, heads) == ""
    assert A.relies_on(polar, cols, "residual_rotation", attn, heads) == ""
    perm = Factor("perm", "rows")
    hybrid = {"map": "hybrid", "center": False, "column_aware": False, "order": "row_then_polar"}
    assert A.relies_on(hybrid, perm, "neuron_perm", Group.of("perm:rows", "orth:cols")) == "structure"
    assert A.relies_on(polar, perm, "neuron_perm", attn) == ""  # equivariant under O(rows): rows are not its units
    assert A.relies_on({"map": "adamw", "center": False}, perm, "neuron_perm") == "structure"
    assert A.relies_on({"map": "row_norm", "center": False}, perm, "row_perm") == ""  # positions: informational
    shift, head = Factor("shift", "rows"), Group.of("perm:rows", "orth:cols", "shift:rows")
    assert A.relies_on({"map": "centered_row_norm", "center": True}, shift, "logit_shift", head) == "projects out"
    assert A.relies_on({"map": "row_norm", "center": False}, shift, "logit_shift", head) == ""
    assert A.relies_on({"map": "centered_row_norm", "center": True}, shift, "router_shift", head.without("shift")) == ""
    assert A.relies_on(hybrid, None, "expert_perm") == "structure"
