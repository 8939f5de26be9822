"""The four architecture families of the paper, built from Hugging Face config classes.

No weights are downloaded: every model is constructed from a config and randomly
initialised. Each family has two size presets:

* ``tiny``  -- a few million parameters, sized so a training step takes well under a
  second on two CPU cores (the default comparison runs twelve of these in minutes);
* ``paper`` -- the shapes of the paper's runs, for GPU users: Qwen3-0.6B-style (0.75B with
  the untied head), Gemma-3-1B-style (1.0B), OLMoE-1B-7B-style (6.9B total, ~1.3B active),
  downsized gpt-oss (3.3B total).

| family  | HF classes                              | traits kept at every size                          |
|---------|-----------------------------------------|----------------------------------------------------|
| qwen3   | Qwen3Config / Qwen3ForCausalLM          | dense SwiGLU, QK-norm, untied head                 |
| gemma3  | Gemma3TextConfig / Gemma3ForCausalLM    | gated GELU-tanh, explicit sliding/full layer_types, tied |
| olmoe   | OlmoeConfig / OlmoeForCausalLM          | top-k MoE, no router bias, experts gate_up [E,2h,d] |
| gptoss  | GptOssConfig / GptOssForCausalLM        | router bias, sinks, clamped SwiGLU, interleaved experts [E,d,2h] |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch

ARCHS = ("qwen3", "gemma3", "olmoe", "gptoss")
SIZES = ("tiny", "paper")
MOE_ARCHS = ("olmoe", "gptoss")


@dataclass
class ModelConfig:
    """Architecture-independent description of one model; ``build_model`` maps it to HF."""

    arch: str
    size: str = "tiny"
    vocab_size: int = 4096  # overwritten by the tokenizer's vocabulary size at run time
    hidden_size: int = 128
    intermediate_size: int = 384  # dense MLP width, or per-expert width for MoE
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    max_seq_len: int = 128
    tie_embeddings: bool = False
    # sliding-window pattern: "sliding_attention"/"full_attention" per layer, explicit
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    # MoE
    num_experts: int = 0
    top_k: int = 0
    aux_loss: bool = False  # add router_aux_loss_coef * load-balancing loss to the training loss
    aux_loss_coef: float = 0.01
    rope_theta: float | None = None  # None = the family's default (HF config; gpt-oss: 150000)
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # passed verbatim to the HF config

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose one of {', '.join(SIZES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}")
        if self.arch in MOE_ARCHS:
            if not (1 <= self.top_k <= self.num_experts):
                raise ValueError(
                    f"{self.arch}: need 1 <= top_k <= num_experts, got top_k={self.top_k}, "
                    f"num_experts={self.num_experts}"
                )
        elif self.num_experts or self.top_k or self.aux_loss:
            raise ValueError(f"{self.arch} is a dense family: experts, top_k and aux_loss do not apply")
        if self.rope_theta is not None and (self.arch == "gemma3" or not self.rope_theta > 0):
            raise ValueError(
                f"rope_theta={self.rope_theta}: must be > 0, and is not supported on gemma3 (its rope "
                "parameters are per layer type)"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class _TinyCommon(TypedDict):
    """The fields every tiny preset shares (typed, so that ``ModelConfig(**common)`` is checked)."""

    arch: str
    size: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int


class _HFCommon(TypedDict):
    """The Hugging Face config arguments every family shares (see :func:`hf_config`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    initializer_range: float
    tie_word_embeddings: bool
    use_cache: bool
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None


def _alternating(n: int, period: int) -> list[str]:
    """(period-1) sliding layers then one full layer, repeated; the last layer is always full."""
    types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]
    types[-1] = "full_attention"
    return types


# The paper's shapes (0.6B-3.5B), sequence length 1024 as in the paper. Gemma-3-1B: 5 sliding
# : 1 full, 512-token window, large vocab. OLMoE-1B-7B: top-8 of 64. gpt-oss downsized
# (~3.3B total): alternating sliding/full, top-4 of 32, o200k-size vocab; its expert width
# differs from d (gpt-oss-120b has both 2880): with equal square expert blocks the planner
# cannot tell the neuron axis of down_proj from shapes alone.
_PAPER_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3": dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
    ),
    "gemma3": dict(
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_layers=26,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        tie_embeddings=True,
        layer_types=_alternating(26, 6),
        sliding_window=512,
    ),
    "olmoe": dict(
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=1024,
        num_layers=16,
        num_heads=16,
        num_kv_heads=16,
        head_dim=128,
        num_experts=64,
        top_k=8,
    ),
    "gptoss": dict(
        vocab_size=201088,
        hidden_size=1536,
        intermediate_size=1280,
        num_layers=14,
        num_heads=24,
        num_kv_heads=8,
        head_dim=64,
        num_experts=32,
        top_k=4,
        layer_types=_alternating(14, 2),
        sliding_window=128,
    ),
}
# the CPU-sized models: what differs per family on top of the common tiny shape
_TINY_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3": dict(intermediate_size=384),
    "gemma3": dict(
        intermediate_size=384,
        tie_embeddings=True,
        sliding_window=32,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    ),
    "olmoe": dict(intermediate_size=96, num_experts=8, top_k=2),
    "gptoss": dict(intermediate_size=96, num_experts=8, top_k=2, layer_types=_alternating(4, 2), sliding_window=32),
}


def preset(arch: str, size: str = "tiny") -> ModelConfig:
    """The size preset of one family (see the module docstring)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if size == "tiny":
        common = _TinyCommon(
            arch=arch,
            size=size,
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            max_seq_len=128,
        )
        return ModelConfig(**common, **_TINY_SHAPES[arch])
    return ModelConfig(arch=arch, size=size, max_seq_len=1024, **_PAPER_SHAPES[arch])


def hf_config(cfg: ModelConfig):
    """The Hugging Face config object for ``cfg`` (float32, no cache, eager attention)."""
    cfg.validate()
    import transformers as tf  # of the [train] extra; slow to import: only when a model is built

    common = _HFCommon(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max(cfg.max_seq_len, 128),
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_embeddings,
        use_cache=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    c: tf.PreTrainedConfig
    rope = {} if cfg.rope_theta is None else {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    if cfg.arch == "qwen3":
        c = tf.Qwen3Config(**common, head_dim=cfg.head_dim, hidden_act="silu", **{**rope, **cfg.extra})
    elif cfg.arch == "gemma3":
        c = tf.Gemma3TextConfig(
            **common,
            head_dim=cfg.head_dim,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=cfg.head_dim,
            layer_types=list(cfg.layer_types or []) or None,
            sliding_window=cfg.sliding_window or cfg.max_seq_len,
            **cfg.extra,
        )
    elif cfg.arch == "olmoe":
        c = tf.OlmoeConfig(
            **common,
            hidden_act="silu",
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k,
            output_router_logits=cfg.aux_loss,
            router_aux_loss_coef=cfg.aux_loss_coef,
            **{**rope, **cfg.extra},
        )
    else:
        c = tf.GptOssConfig(
            **common,
            head_dim=cfg.head_dim,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k,
            output_router_logits=cfg.aux_loss,
            router_aux_loss_coef=cfg.aux_loss_coef,
            layer_types=list(cfg.layer_types or []) or None,
            sliding_window=cfg.sliding_window or cfg.max_seq_len,
            # plain RoPE: gpt-oss's YaRN (factor 32 over 4096) is a long-context extension, not
            # part of pre-training at these sequence lengths
            **{"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta or 150000.0}, **cfg.extra},
        )
    return c


def build_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised float32 model; deterministic given ``seed``."""
    import transformers as tf  # of the [train] extra; slow to import: only when a model is built

    c = hf_config(cfg)
    cls = {
        "qwen3": tf.Qwen3ForCausalLM,
        "gemma3": tf.Gemma3ForCausalLM,
        "olmoe": tf.OlmoeForCausalLM,
        "gptoss": tf.GptOssForCausalLM,
    }[cfg.arch]
    # eager attention everywhere: sinks (gpt-oss) and deterministic CPU results
    c._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(c)
    model.to(torch.float32)
    if cfg.tie_embeddings != (model.get_output_embeddings().weight is model.get_input_embeddings().weight):
        raise RuntimeError(f"{cfg.arch}: tie_embeddings={cfg.tie_embeddings} was not honoured by HF")
    return model


def num_experts_per_tok(model: torch.nn.Module) -> int:
    """Top-k of an HF MoE model (0 for dense models)."""
    return int(getattr(model.config, "num_experts_per_tok", 0) or 0)


def count_parameters(model: torch.nn.Module) -> int:
    seen = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    return sum(seen.values())
