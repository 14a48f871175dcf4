"""What the memory terms need to know about a model, computed once from its config.json.

A family module (``estimator/families.py``) turns a config dict into a ``ModelSpec``; nothing else in
the estimator looks at config keys. Every count here is exact (elements, not bytes): bytes come later,
once a dtype or quantization format is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Mapping

# Kinds of token mixer a layer can have; the KV cache and the attention activations depend on it.
ATTENTION_KINDS = ("full", "sliding", "mla", "linear", "ssm")
MLP_KINDS = ("dense", "moe", "none")


@dataclass(frozen=True)
class Linear:
    """A matmul weight of shape (out_features, in_features), ``count`` times in the model."""

    role: str  # "attn", "mlp", "expert", "shared_expert", "lm_head", "router", "ssm", ...
    in_features: int
    out_features: int
    count: int = 1
    bias: bool = False
    # Quantizers (GPTQ, AWQ, bitsandbytes, fp8) leave the lm_head and routers in the model dtype.
    quantizable: bool = True

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features * self.count

    @property
    def bias_params(self) -> int:
        return self.out_features * self.count if self.bias else 0


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's token mixer. Head counts are per layer (Gemma, gpt-oss and DeepSeek vary them)."""

    kind: str  # one of ATTENTION_KINDS
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0  # query/key head dim (MLA: qk_nope_head_dim + qk_rope_head_dim)
    v_head_dim: int = 0  # value head dim (== head_dim except MLA)
    window: int | None = None  # sliding-window layers: tokens kept
    kv_lora_rank: int = 0  # MLA: compressed KV width
    qk_rope_head_dim: int = 0  # MLA: rotary part of the key, shared across heads
    q_lora_rank: int = 0  # MLA: the query's low-rank width (q_a_proj, q_b_proj); 0: one q_proj (V2-Lite)
    # Linear-attention / state-space layers: recurrent state elements per sequence (conv + ssm state),
    # stored at ``state_dtype`` ("float32" or "model", i.e. the model's dtype).
    state_elems: int = 0
    state_dtype: str = "model"
    # Short-convolution state of linear-attention layers (Qwen3-Next: conv_dim x kernel per sequence),
    # always stored at the model's dtype, next to the recurrent state above.
    conv_state_elems: int = 0
    rope: bool = True  # False: a NoPE layer (SmolLM3's no_rope_layers) skips the rotary embedding


@dataclass(frozen=True)
class MLPSpec:
    """One layer's feed-forward block."""

    kind: str  # one of MLP_KINDS
    intermediate_size: int = 0  # dense: the MLP width; moe: one expert's width
    gated: bool = True  # gate*up (SwiGLU/GeGLU) vs a plain up projection
    num_experts: int = 0
    top_k: int = 0
    shared_intermediate_size: int = 0  # total width of the shared expert(s); 0 when none


@dataclass(frozen=True)
class LayerSpec:
    attention: AttentionSpec
    mlp: MLPSpec


@dataclass(frozen=True)
class ModelSpec:
    """A model as the memory terms see it: exact parameter layout plus per-layer shapes."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    layers: tuple[LayerSpec, ...]
    linears: tuple[Linear, ...]  # every matmul weight, lm_head included unless tied
    # Parameters that are not matmul weights, by category: "embedding", "norm", "other" (e.g. positional
    # embeddings, conv kernels, A_log/dt_bias of state-space layers, attention sinks).
    other_params: Mapping[str, int] = field(default_factory=dict)
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None
    config: Mapping = field(default_factory=dict, repr=False, compare=False)
    # Non-parameter buffers the framework registers (rotary inv_freq, ...), elements at fp32.
    buffer_elems: int = 0
    # Exact stored bytes per tensor name, when read from safetensors headers (quantized checkpoints).
    stored_bytes: Mapping[str, int] | None = field(default=None, repr=False, compare=False)
    # Parameters per part, summing to num_parameters: {"language_model": ...} and, for a multimodal
    # wrapper, "vision_tower" / "multi_modal_projector" (estimator/towers.py; also in other_params).
    parts: Mapping[str, int] = field(default_factory=dict, compare=False)
    # Sub-configs of a wrapper that nothing counted (e.g. ("audio_config",)): their weights are missing.
    uncounted_parts: tuple[str, ...] = ()
    # The weight format config.json's quantization_config names (estimator.quant.quant_from_config), for
    # an estimate without --quant: a normalize_quant name or None, and where it came from in one line.
    default_quant: str | None = None
    default_quant_source: str = ""
    # Set instead when quantization_config names a method vramcal cannot size: the UserError message to
    # raise if no --quant overrides it.
    default_quant_error: str | None = None
    config_dtype: str | None = None  # the config's dtype / torch_dtype, canonical ("bfloat16"), if known
    # The fraction of head_dim that rotary embeddings rotate (rope_parameters / partial_rotary_factor).
    partial_rotary_factor: float = 1.0
    # GPT-NeoX's use_parallel_residual: the MLP reads the layer's input, h + attn(ln1(h)) + mlp(ln2(h))
    parallel_residual: bool = False
    # Every parameter tensor's elements in the order the modeling code registers them, summing to
    # num_parameters (estimator/families.py): the load order the replay's allocator starts from.
    parameter_tensors: tuple[int, ...] = field(default=(), repr=False, compare=False)
    # Parameters of each decoder layer (``model.layers.<i>``), exact; what accelerate's device_map places
    # as one block (estimator/placement.py). Empty for a spec not built by estimator/families.py.
    layer_params: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "other_params", MappingProxyType(dict(self.other_params)))

    @cached_property
    def layer_groups(self) -> tuple[tuple[LayerSpec, int], ...]:
        """Distinct layer kinds with how many layers have each (most models have one or two)."""
        counts: dict[LayerSpec, int] = {}
        for layer in self.layers:
            counts[layer] = counts.get(layer, 0) + 1
        return tuple(counts.items())

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_parameters(self) -> int:
        return sum(l.weight_params + l.bias_params for l in self.linears) + sum(self.other_params.values())

    @property
    def embedding_params(self) -> int:
        return self.other_params.get("embedding", 0)

    def active_parameters(self) -> int:
        """Parameters touched per token (MoE: top_k of num_experts routed experts)."""
        total = self.num_parameters
        for l in self.linears:
            if l.role == "expert":
                layer_moe = [s.mlp for s in self.layers if s.mlp.kind == "moe"]
                if layer_moe and layer_moe[0].num_experts:
                    m = layer_moe[0]
                    total -= (l.weight_params + l.bias_params) * (m.num_experts - m.top_k) // m.num_experts
        return total
