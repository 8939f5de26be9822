"""A zoo of architectures the planner must read right without overrides (issue #11).

Every entry builds a tiny model from its config (Hugging Face, nothing downloaded) or by hand,
an example batch, a loss, and the expected plan: ``{regex: (role, layout or None)}`` matched
with ``re.search`` against every trainable parameter (exactly one pattern per parameter).
The expectations were written from each class's forward (transformers 5.x sources), not from
the planner's output; ``covers`` names the failure classes of issue #11 the model exercises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from equiopt.layouts import Layout

transformers = None
# the zoo's Hugging Face entries need transformers; the hand-written ones do not
with contextlib.suppress(ImportError):
    import transformers

V, D, H, HKV, HD, FF, E, SEQ = 64, 32, 4, 2, 8, 48, 4, 8
L = Layout


@dataclass
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    expected: dict
    covers: tuple[str, ...] = ()
    batch: Callable[[nn.Module], dict] | None = None  # default: input_ids [2, 8] (+ labels for LMs)
    loss: Callable[[nn.Module, dict], torch.Tensor] | None = None  # default: model(**batch).loss
    scoring: dict = field(default_factory=dict)  # router name regex -> expected scoring
    hf: bool = True


def ids_batch(model, with_labels=True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids} if with_labels else {"input_ids": ids}


def hidden_loss(model, batch):
    """A regression of the last hidden state on a fixed target (models without a head)."""
    out = model(**batch)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    g = torch.Generator().manual_seed(1)
    target = torch.randn(h.shape, generator=g)
    return (h - target).pow(2).mean()


def pixels(model):
    g = torch.Generator().manual_seed(0)
    c = model.config
    return {"pixel_values": torch.randn(2, c.num_channels, c.image_size, c.image_size, generator=g)}


def ce_loss(model, batch):
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


VEC = {r"(norm|ln|layernorm|LayerNorm|layer_norm)[^.]*\.(weight|bias)$|\.bias$": ("vector", None)}
ATTN_SEP = {
    r"q_proj\.weight$": ("attention", L(heads=H)),
    r"[kv]_proj\.weight$": ("attention", L(heads=HKV)),
    r"o_proj\.weight$": ("attention", L(heads=H, head_axis="in")),
}
SWIGLU = {r"mlp\.(gate|up)_proj\.weight$": ("mlp_in", L()), r"mlp\.down_proj\.weight$": ("mlp_out", L())}


def untied(emb=r"embed_tokens\.weight$", head=r"^lm_head\.weight$"):
    return {emb: ("embedding", L()), head: ("lm_head", L())}


def common(**kw):
    return dict(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=HKV,
        head_dim=HD,
        **kw,
    )


# ----------------------------------------------------------------------------------------
# hand-written models
# ----------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attn(nn.Module):
    """Plain separate q/k/v/o, SDPA."""

    def __init__(self, d=D, h=H):
        super().__init__()
        self.h = h
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (w(x).view(B, T, self.h, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, d))


class W13MLP(nn.Module):
    """LLaMA-reference style fused w13: ``x1, x3 = w13(x).chunk(2)``; ``w2(silu(x1) * x3)``."""

    def __init__(self, d=D, h=FF):
        super().__init__()
        self.w13 = nn.Linear(d, 2 * h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)

    def forward(self, x):
        x1, x3 = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(x1) * x3)


class FlatExperts(nn.Module):
    """Experts stored flattened to 2-D: ``w_in [E*2h, d]`` (fused gate|up, interleaved) and
    ``w_out [E*d, h]``; viewed as ``[E, ., .]`` and indexed by the routed ids."""

    def __init__(self, d=D, h=16, e=E):
        super().__init__()
        self.e, self.h, self.d = e, h, d
        self.w_in = nn.Parameter(torch.randn(e * 2 * h, d) / d**0.5)
        self.w_out = nn.Parameter(torch.randn(e * d, h) / h**0.5)

    def forward(self, x, idx, weights):  # x [N, d], idx/weights [N, k]
        w_in = self.w_in.view(self.e, 2 * self.h, self.d)
        w_out = self.w_out.view(self.e, self.d, self.h)
        out = torch.zeros_like(x)
        for slot in range(idx.shape[1]):
            sel = idx[:, slot]
            a = torch.bmm(w_in[sel], x.unsqueeze(-1)).squeeze(-1)  # [N, 2h]
            gate, up = a[..., ::2], a[..., 1::2]
            y = torch.bmm(w_out[sel], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
            out = out + y * weights[:, slot, None]
        return out


class SigmoidRouter(nn.Module):
    """DeepSeek-V3-style scoring: sigmoid scores, a learned correction bias for the choice."""

    def __init__(self, d=D, e=E, k=2, bias=True):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.randn(e, d) / d**0.5)
        self.correction = nn.Parameter(torch.zeros(e)) if bias else None

    def forward(self, x):
        scores = F.linear(x, self.weight).sigmoid()
        choice = scores + self.correction if self.correction is not None else scores
        idx = choice.topk(self.k, dim=-1).indices
        w = scores.gather(-1, idx)
        return idx, w / w.sum(-1, keepdim=True)


class FlatMoE(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.router = SigmoidRouter(bias=bias)
        self.experts = FlatExperts()

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, w = self.router(x)
        return self.experts(x, idx, w).view(shape)


class ListMoE(nn.Module):
    """Experts as a ModuleList of SwiGLU MLPs, softmax router as nn.Linear, tokens gathered."""

    def __init__(self, sigmoid=False):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(W13MLP(h=16) for _ in range(E))
        self.sigmoid = sigmoid

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(-1)
        w, idx = scores.topk(2, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                out = out.index_add(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.n1, self.n2 = RMSNorm(D), RMSNorm(D)
        self.attn = Attn()
        self.mlp = mlp

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class HandLM(nn.Module):
    """Embedding, blocks, final norm; the head is ``F.linear(x, wte.weight)`` when tied (no
    head module), else ``self.head``. ``aux``: an extra ``[vocab, d]`` Linear (a per-token
    value table used as a lookup projection) that a shape rule would take for the head."""

    def __init__(self, mlp: Callable[[], nn.Module], tied=False, aux=False, layers=2):
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block(mlp()) for _ in range(layers))
        self.norm = RMSNorm(D)
        self.tied = tied
        self.head = None if tied else nn.Linear(D, V, bias=False)
        self.aux = nn.Linear(D, V, bias=False) if aux else None

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.blocks:
            x = b(x)
        x = self.norm(x)
        if self.aux is not None:  # a soft lookup: a distribution over tokens mixes their embeddings
            x = x + 0.1 * (self.aux(x).softmax(-1) @ self.wte.weight)
        return F.linear(x, self.wte.weight) if self.tied else self.head(x)


class MLA(nn.Module):
    """Low-rank MLA attention: q = q_b(norm(q_a x)), [k_nope | v] = kv_b(norm(kv_a x)) per
    head, a shared rope key from kv_a's last rows, o per head."""

    def __init__(self, d=D, h=H, r=16, nope=8, rope=4, vd=8):
        super().__init__()
        self.h, self.r, self.nope, self.rope, self.vd = h, r, nope, rope, vd
        self.q_a = nn.Linear(d, r, bias=False)
        self.q_norm = RMSNorm(r)
        self.q_b = nn.Linear(r, h * (nope + rope), bias=False)
        self.kv_a = nn.Linear(d, r + rope, bias=False)
        self.kv_norm = RMSNorm(r)
        self.kv_b = nn.Linear(r, h * (nope + vd), bias=False)
        self.o = nn.Linear(h * vd, d, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_b(self.q_norm(self.q_a(x))).view(B, T, self.h, -1).transpose(1, 2)
        c, k_rope = self.kv_a(x).split([self.r, self.rope], dim=-1)
        kv = self.kv_b(self.kv_norm(c)).view(B, T, self.h, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        k_rope = k_rope.view(B, 1, T, self.rope).expand(B, self.h, T, self.rope)
        k = torch.cat([k_nope, k_rope], dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MLABlock(Block):
    def __init__(self):
        super().__init__(W13MLP())
        self.attn = MLA()


class MLALM(HandLM):
    def __init__(self):
        super().__init__(W13MLP)
        self.blocks = nn.ModuleList(MLABlock() for _ in range(2))


class ConfigMLP(nn.Module):
    """An fc1/fc2 MLP keeping a config with a head count (CLIP/SigLIP/ViT style)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(D, FF)
        self.fc2 = nn.Linear(FF, D)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Cfg:
    num_attention_heads = H
    hidden_size = D


# ----------------------------------------------------------------------------------------
# the zoo
# ----------------------------------------------------------------------------------------
def _hf(cls, cfg_cls, **kw):
    def build():
        cfg = getattr(transformers, cfg_cls)(**kw)
        return getattr(transformers, cls)(cfg)

    return build


MOE_STACKED = {
    r"mlp\.gate\.weight$": ("router", L()),
    r"experts\.gate_up_proj$": ("expert_in", L(stacked=True, fused=2)),
    r"experts\.down_proj$": ("expert_out", L(stacked=True)),
}
HAND_ATTN = {
    r"attn\.w[qkv]\.weight$": ("attention", L(heads=H)),
    r"attn\.wo\.weight$": ("attention", L(heads=H, head_axis="in")),
}
HAND_W13 = {r"mlp\.w13\.weight$": ("mlp_in", L(fused=2)), r"mlp\.w2\.weight$": ("mlp_out", L())}
HAND_VEC = {r"(n1|n2|norm|q_norm|kv_norm)\.weight$|\.bias$": ("vector", None)}

ZOO: list[ZooModel] = [
    ZooModel(
        "qwen3",
        _hf("Qwen3ForCausalLM", "Qwen3Config", **common()),
        {**untied(), **ATTN_SEP, **SWIGLU, **VEC},
        ("baseline dense, separate q/k/v/o",),
    ),
    ZooModel(
        "qwen3_tied",
        _hf("Qwen3ForCausalLM", "Qwen3Config", **common(tie_word_embeddings=True)),
        {r"embed_tokens\.weight$": ("tied_embedding", L()), **ATTN_SEP, **SWIGLU, **VEC},
        ("tied head",),
    ),
    ZooModel(
        "llama",
        _hf("LlamaForCausalLM", "LlamaConfig", **common()),
        {**untied(), **ATTN_SEP, **SWIGLU, **VEC},
        ("baseline dense",),
    ),
    ZooModel(
        "gemma3_tied",
        _hf("Gemma3ForCausalLM", "Gemma3TextConfig", **common(tie_word_embeddings=True)),
        {r"embed_tokens\.weight$": ("tied_embedding", L()), **ATTN_SEP, **SWIGLU, **VEC},
        ("tied head, q/k norms",),
    ),
    ZooModel(
        "olmoe",
        _hf("OlmoeForCausalLM", "OlmoeConfig", **common(num_experts=E, num_experts_per_tok=2)),
        {**untied(), **ATTN_SEP, **MOE_STACKED, **VEC},
        ("softmax router, stacked experts, norm over all heads",),
        scoring={r"mlp\.gate\.weight$": "softmax"},
    ),
    ZooModel(
        "gpt_oss",
        _hf("GptOssForCausalLM", "GptOssConfig", **common(num_local_experts=E, num_experts_per_tok=2)),
        {
            **untied(),
            **ATTN_SEP,
            **VEC,
            r"sinks$": ("vector", None),
            r"mlp\.router\.weight$": ("router", L()),
            r"experts\.gate_up_proj$": ("expert_in", L(stacked=True, transposed=True, fused=2, interleaved=True)),
            r"experts\.down_proj$": ("expert_out", L(stacked=True, transposed=True)),
            r"experts\.(gate_up|down)_proj_bias$": ("vector", None),
        },
        ("softmax after topk, transposed interleaved experts",),
        scoring={r"router\.weight$": "softmax"},
    ),
    ZooModel(
        "qwen2_moe",
        _hf(
            "Qwen2MoeForCausalLM",
            "Qwen2MoeConfig",
            **common(
                num_experts=E, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=FF
            ),
        ),
        {
            **untied(),
            **ATTN_SEP,
            **MOE_STACKED,
            **VEC,
            r"shared_expert\.(gate|up)_proj\.weight$": ("mlp_in", L()),
            r"shared_expert\.down_proj\.weight$": ("mlp_out", L()),
            r"shared_expert_gate\.weight$": ("vector", None),
        },
        ("softmax router + shared expert with a [1, d] sigmoid gate",),
        scoring={r"mlp\.gate\.weight$": "softmax"},
    ),
    ZooModel(
        "phi3",
        _hf("Phi3ForCausalLM", "Phi3Config", **common(pad_token_id=0)),
        {
            **untied(),
            r"qkv_proj\.weight$": ("attention", L(heads=H + 2 * HKV)),
            r"o_proj\.weight$": ("attention", L(heads=H, head_axis="in")),
            r"gate_up_proj\.weight$": ("mlp_in", L(fused=2)),
            r"down_proj\.weight$": ("mlp_out", L()),
            **VEC,
        },
        ("o_proj registered before a fused qkv_proj", "fused gate_up_proj"),
    ),
    ZooModel(
        "gpt_neox",
        _hf(
            "GPTNeoXForCausalLM",
            "GPTNeoXConfig",
            vocab_size=V,
            hidden_size=D,
            intermediate_size=FF,
            num_hidden_layers=2,
            num_attention_heads=H,
        ),
        {
            r"embed_in\.weight$": ("embedding", L()),
            r"^(embed_out|lm_head)\.weight$": ("lm_head", L()),
            # qkv.view(B, T, H, 3 hd).chunk(3, -1): per head [q_h; k_h; v_h], each hd rows
            r"query_key_value\.weight$": ("attention", L(heads=3 * H)),
            r"attention\.dense\.weight$": ("attention", L(heads=H, head_axis="in")),
            r"dense_h_to_4h\.weight$": ("mlp_in", L()),
            r"dense_4h_to_h\.weight$": ("mlp_out", L()),
            **VEC,
        },
        ("per-head interleaved fused qkv", "fc MLP"),
    ),
    ZooModel(
        "gpt2",
        _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=V, n_embd=D, n_layer=2, n_head=H, n_positions=SEQ),
        {
            r"wte\.weight$": ("tied_embedding", L()),
            r"wpe\.weight$": ("embedding", L()),
            # Conv1D stores [in, out]: addmm(b, x, W)
            r"c_attn\.weight$": ("attention", L(transposed=True, heads=3 * H)),
            r"attn\.c_proj\.weight$": ("attention", L(transposed=True, heads=H, head_axis="in")),
            r"c_fc\.weight$": ("mlp_in", L(transposed=True)),
            r"mlp\.c_proj\.weight$": ("mlp_out", L(transposed=True)),
            r"ln_.*\.(weight|bias)$|\.bias$": ("vector", None),
        },
        ("Conv1D [in, out] weights", "tied head", "fused qkv"),
    ),
    ZooModel(
        "bert",
        _hf(
            "BertModel",
            "BertConfig",
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=H,
            intermediate_size=FF,
            max_position_embeddings=SEQ,
            type_vocab_size=2,
        ),
        {
            r"(word|position|token_type)_embeddings\.weight$": ("embedding", L()),
            r"self\.(query|key|value)\.weight$": ("attention", L(heads=H)),
            r"attention\.output\.dense\.weight$": ("attention", L(heads=H, head_axis="in")),
            r"intermediate\.dense\.weight$": ("mlp_in", L()),
            r"layer\.\d+\.output\.dense\.weight$": ("mlp_out", L()),
            r"pooler\.dense\.weight$": ("matrix", L()),
            r"LayerNorm\.(weight|bias)$|\.bias$": ("vector", None),
        },
        ("encoder q/k/v with the output projection in a sibling module", "MLP split over two modules"),
        batch=lambda m: ids_batch(m, with_labels=False),
        loss=hidden_loss,
    ),
    ZooModel(
        "roberta_mlm",
        _hf(
            "RobertaForMaskedLM",
            "RobertaConfig",
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=H,
            intermediate_size=FF,
            max_position_embeddings=SEQ + 4,
            type_vocab_size=1,
            pad_token_id=1,
        ),
        {
            r"word_embeddings\.weight$": ("tied_embedding", L()),
            r"(position|token_type)_embeddings\.weight$": ("embedding", L()),
            r"self\.(query|key|value)\.weight$": ("attention", L(heads=H)),
            r"attention\.output\.dense\.weight$": ("attention", L(heads=H, head_axis="in")),
            r"intermediate\.dense\.weight$": ("mlp_in", L()),
            r"layer\.\d+\.output\.dense\.weight$": ("mlp_out", L()),
            r"lm_head\.dense\.weight$": ("matrix", L()),  # transform before the tied decoder: no block
            r"LayerNorm\.(weight|bias)$|layer_norm\.(weight|bias)$|\.bias$": ("vector", None),
        },
        ("encoder q/k/v + sibling output", "tied masked-LM decoder"),
    ),
    ZooModel(
        "vit",
        _hf(
            "ViTModel",
            "ViTConfig",
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=H,
            intermediate_size=FF,
            image_size=16,
            patch_size=4,
            num_channels=3,
        ),
        {
            r"cls_token$": ("vector", None),
            r"position_embeddings$": ("vector", None),
            r"patch_embeddings\.projection\.weight$": ("matrix", L(flatten=True)),
            r"attention\.[qkv]_proj\.weight$": ("attention", L(heads=H)),
            r"attention\.o_proj\.weight$": ("attention", L(heads=H, head_axis="in")),
            r"mlp\.fc1\.weight$": ("mlp_in", L()),
            r"mlp\.fc2\.weight$": ("mlp_out", L()),
            r"pooler\.dense\.weight$": ("matrix", L()),
            r"layernorm.*\.(weight|bias)$|\.bias$": ("vector", None),
        },
        (
            "vision transformer: conv patch kernel, [1, 1, d] cls token",
            "fc1/fc2 MLP keeping a config with a head count",
        ),
        batch=pixels,
        loss=hidden_loss,
    ),
    ZooModel(
        "clip_vision",
        _hf(
            "CLIPVisionModel",
            "CLIPVisionConfig",
            hidden_size=D,
            intermediate_size=FF,
            num_hidden_layers=2,
            num_attention_heads=H,
            image_size=16,
            patch_size=4,
        ),
        {
            r"class_embedding$": ("vector", None),
            r"position_embedding\.weight$": ("embedding", L()),
            r"patch_embedding\.weight$": ("matrix", L(flatten=True)),
            r"self_attn\.[qkv]_proj\.weight$": ("attention", L(heads=H)),
            r"self_attn\.out_proj\.weight$": ("attention", L(heads=H, head_axis="in")),
            r"mlp\.fc1\.weight$": ("mlp_in", L()),
            r"mlp\.fc2\.weight$": ("mlp_out", L()),
            r"(layer_norm\d|layrnorm|layernorm)\.(weight|bias)$|\.bias$": ("vector", None),
        },
        ("fc1/fc2 MLP keeping a config with a head count", "conv patch kernel"),
        batch=pixels,
        loss=hidden_loss,
    ),
    ZooModel(
        "siglip_vision",
        _hf(
            "SiglipVisionModel",
            "SiglipVisionConfig",
            hidden_size=D,
            intermediate_size=FF,
            num_hidden_layers=2,
            num_attention_heads=H,
            image_size=16,
            patch_size=4,
            vision_use_head=False,
        ),
        {
            r"position_embedding\.weight$": ("embedding", L()),
            r"patch_embedding\.weight$": ("matrix", L(flatten=True)),
            r"self_attn\.[qkv]_proj\.weight$": ("attention", L(heads=H)),
            r"self_attn\.out_proj\.weight$": ("attention", L(heads=H, head_axis="in")),
            r"mlp\.fc1\.weight$": ("mlp_in", L()),
            r"mlp\.fc2\.weight$": ("mlp_out", L()),
            r"(layer_norm\d|post_layernorm)\.(weight|bias)$|\.bias$": ("vector", None),
        },
        ("fc1/fc2 MLP keeping a config with a head count",),
        batch=pixels,
        loss=hidden_loss,
    ),
    ZooModel(
        "deepseek_v3",
        _hf(
            "DeepseekV3ForCausalLM",
            "DeepseekV3Config",
            vocab_size=V,
            hidden_size=D,
            intermediate_size=FF,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=H,
            num_key_value_heads=H,
            n_routed_experts=E,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_shared_experts=1,
        ),
        {
            **untied(),
            r"q_a_proj\.weight$": ("matrix", L()),
            r"kv_a_proj_with_mqa\.weight$": ("matrix", L()),
            # per head: q = [q_nope | q_rope] (12 rows); kv_b: k_nope (8) then v (8) rows per head
            r"q_b_proj\.weight$": ("attention", L(heads=H)),
            r"kv_b_proj\.weight$": ("attention", L(heads=2 * H)),
            r"o_proj\.weight$": ("attention", L(heads=H, head_axis="in")),
            r"gate\.weight$": ("router", L()),
            r"experts\.gate_up_proj$": ("expert_in", L(stacked=True, fused=2)),
            r"experts\.down_proj$": ("expert_out", L(stacked=True)),
            r"(mlp|shared_experts)\.(gate|up)_proj\.weight$": ("mlp_in", L()),
            r"(mlp|shared_experts)\.down_proj\.weight$": ("mlp_out", L()),
            **VEC,
        },
        ("MLA low-rank attention", "sigmoid router with a score-correction bias", "dense first layer"),
        scoring={r"gate\.weight$": "sigmoid"},
    ),
    ZooModel(
        "hand_mla",
        lambda: MLALM(),
        {
            r"wte\.weight$": ("embedding", L()),
            r"^head\.weight$": ("lm_head", L()),
            r"q_a\.weight$": ("matrix", L()),
            r"kv_a\.weight$": ("matrix", L()),
            r"q_b\.weight$": ("attention", L(heads=H)),
            r"kv_b\.weight$": ("attention", L(heads=2 * H)),
            r"attn\.o\.weight$": ("attention", L(heads=H, head_axis="in")),
            **HAND_W13,
            **HAND_VEC,
        },
        ("MLA per-head up-projections and output", "w13 fused"),
        loss=ce_loss,
        hf=False,
    ),
    ZooModel(
        "hand_flat_sigmoid",
        lambda: HandLM(lambda: FlatMoE(bias=True)),
        {
            r"wte\.weight$": ("embedding", L()),
            r"^head\.weight$": ("lm_head", L()),
            **HAND_ATTN,
            **HAND_VEC,
            r"router\.weight$": ("router", L()),
            r"router\.correction$": ("vector", None),
            r"experts\.w_in$": ("expert_in", L(stacked=True, flat_experts=E, fused=2, interleaved=True)),
            r"experts\.w_out$": ("expert_out", L(stacked=True, flat_experts=E)),
        },
        ("experts flattened to 2-D", "sigmoid router with a correction bias"),
        loss=ce_loss,
        scoring={r"router\.weight$": "sigmoid"},
        hf=False,
    ),
    ZooModel(
        "hand_list_sigmoid",
        lambda: HandLM(lambda: ListMoE(sigmoid=True), tied=True),
        {
            r"wte\.weight$": ("tied_embedding", L()),
            **HAND_ATTN,
            **HAND_VEC,
            r"mlp\.gate\.weight$": ("router", L()),
            r"experts\.\d+\.w13\.weight$": ("expert_in", L(fused=2)),
            r"experts\.\d+\.w2\.weight$": ("expert_out", L()),
        },
        ("sigmoid router without bias, expert list", "w13 fused", "tied head by F.linear"),
        loss=ce_loss,
        scoring={r"gate\.weight$": "sigmoid"},
        hf=False,
    ),
    ZooModel(
        "hand_list_softmax",
        lambda: HandLM(lambda: ListMoE(sigmoid=False)),
        {
            r"wte\.weight$": ("embedding", L()),
            r"^head\.weight$": ("lm_head", L()),
            **HAND_ATTN,
            **HAND_VEC,
            r"mlp\.gate\.weight$": ("router", L()),
            r"experts\.\d+\.w13\.weight$": ("expert_in", L(fused=2)),
            r"experts\.\d+\.w2\.weight$": ("expert_out", L()),
        },
        ("softmax router, expert list",),
        loss=ce_loss,
        scoring={r"gate\.weight$": "softmax"},
        hf=False,
    ),
    ZooModel(
        "hand_tied_aux",
        lambda: HandLM(W13MLP, tied=True, aux=True),
        {
            r"wte\.weight$": ("tied_embedding", L()),
            **HAND_ATTN,
            **HAND_W13,
            **HAND_VEC,
            r"^aux\.weight$": ("matrix", L()),
        },
        ("tied head by F.linear beside another [vocab, d] Linear",),
        loss=ce_loss,
        hf=False,
    ),
    ZooModel(
        "hand_config_mlp",
        lambda: HandLM(lambda: ConfigMLP(_Cfg())),
        {
            r"wte\.weight$": ("embedding", L()),
            r"^head\.weight$": ("lm_head", L()),
            **HAND_ATTN,
            **HAND_VEC,
            r"mlp\.fc1\.(weight)$": ("mlp_in", L()),
            r"mlp\.fc2\.weight$": ("mlp_out", L()),
        },
        ("fc1/fc2 MLP keeping a config with a head count",),
        loss=ce_loss,
        hf=False,
    ),
]

#: expected "no structure found" entries (a 2-D weight the flow matches to no block)
NO_STRUCTURE = {
    "bert": r"pooler\.dense\.weight$",
    "vit": r"pooler\.dense\.weight$",
    "roberta_mlm": r"lm_head\.dense\.weight$",
    "hand_tied_aux": r"^aux\.weight$",
}
