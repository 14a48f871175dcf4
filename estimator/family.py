"""One ``Family`` record per model type: everything the parameter count, the KV layout and the replay read.

A record holds the parameter layout (projections, biases, norms, the MLP or MoE block, embeddings and the
head: how ``estimator/families.py`` builds the ``ModelSpec``) and how transformers 5.17's modeling code
computes a layer where it differs from Llama's (norm kernels, rope, activations, softcaps: what
``estimator/replay/`` replays). Defaults of optional config keys are not here: they are the config
class's, from the generated table (``estimator/data/config_aliases.json``).

Adding a llama-like family is one record in ``FAMILY`` (plus a config in ``configs/models/``); a new mixer
kind (gated delta-net, an SSM) is one module of ``estimator/replay/`` and a ``builder`` or layer kind here.
The replay reads its view of a record through ``estimator.replay.layout(model_type)``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FAMILY", "Family", "MoE", "family"]


@dataclass(frozen=True)
class MoE:
    """One family's mixture-of-experts block (transformers 5 fuses the experts into 3-D tensors)."""

    experts_key: str  # the config key transformers' modeling code reads for the expert count
    width_key: str = "intermediate_size"
    # Which layers are MoE: "every"; "sparse_step" (Qwen: every decoder_sparse_step-th, less mlp_only_layers);
    # "moe_layers" (Llama 4: moe_layers, else every interleave_moe_layer_step-th)
    placement: str = "every"
    expert_bias: bool = False  # gpt-oss: biases on experts and router
    shared: str | None = None  # None; "gated": Qwen's shared expert and its sigmoid gate; "plain": Llama 4's
    router_first: bool = False  # the block registers its router (``gate``) before the experts (parameter order)


@dataclass(frozen=True)
class Family:
    """What distinguishes one model type from Llama, in its transformers 5.17 code: layout and compute."""

    # How the ModelSpec is built: "decoder" (the llama-like builder, steered by the knobs below), or a
    # family's own builder in estimator/families.py ("deepseek": multi-head latent attention; "gpt2")
    builder: str = "decoder"

    # --- parameter layout -----------------------------------------------------------------------------
    qkv_bias: bool | None = None  # None: config's attention_bias; Qwen2 hard-codes q/k/v biases
    o_bias: bool | None = None  # None: config's attention_bias
    qkv_bias_key: str | None = None  # a config key switching the q/k/v biases (Qwen2-MoE: qkv_bias)
    o_bias_key: str | None = None  # a config key switching o_proj's bias (Seed-OSS: attention_out_bias)
    qk_norm: str | None = None  # "head": RMSNorm(head_dim) on q and k; "full": over the whole projection
    gated_query: bool = False  # Qwen3-Next / Qwen3.5 full attention: q_proj also emits a sigmoid gate
    mlp_bias_key: str | None = None  # config key switching biases on the dense MLP (Llama: mlp_bias)
    dense_width_key: str = "intermediate_size"  # Llama 4: intermediate_size_mlp for its dense layers
    norms_per_layer: int = 2  # Gemma 2/3 add pre/post feed-forward norms (the replay: sandwich norms)
    # Which layers slide when the config has no layer_types: "none"; "all" (Mistral); "qwen" (layers from
    # max_window_layers on, when use_sliding_window); "qwen_all" (every layer, when use_sliding_window);
    # "alternate" (Gemma 2); "pattern" (Gemma 3: one global layer per sliding_window_pattern); "llama4"
    # (chunked attention on the RoPE layers, full attention on the NoPE ones); "olmo3" (every fourth layer
    # global); "qwen2_moe" (even layers below max_window_layers, when use_sliding_window); "smollm3" (the
    # NoPE layers, when use_sliding_window)
    windows: str = "none"
    moe: MoE | None = None  # None: a dense model
    rotary_per_layer_type: bool = False  # Gemma 3: one rotary embedding per layer type its layers use
    embed_scale: bool = False  # Gemma: embeddings * sqrt(hidden), a registered scalar buffer
    fused_qkv: bool = False  # Phi-3, GPT-NeoX, GPT-2: one qkv tensor (the same parameters as q, k, v)
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj tensor, chunked
    sinks: bool = False  # gpt-oss: one learned sink logit per head, concatenated to the scores
    linear_attention: bool = False  # Qwen3-Next / Qwen3.5: gated delta-net layers where layer_types say so
    gated_mlp: bool = True  # False: StarCoder2's c_fc, act, c_proj (no gate)
    mlp_bias: bool = False  # GPT-NeoX: the MLP's projections always have biases
    neox_order: bool = False  # GPT-NeoX: the two norms first, then query_key_value before dense
    parallel_residual_key: str | None = None  # GPT-NeoX: use_parallel_residual (ModelSpec.parallel_residual)
    lm_head_bias_key: str | None = None  # Phi-3.5-MoE: lm_head_bias
    # Layers without rotary (AttentionSpec.rope): "no_rope_layers" (SmolLM3: where no_rope_layers[i] == 0);
    # "global" (EXAONE 4: the full-attention layers, when the config has a window)
    nope: str | None = None

    # --- compute (how the modeling code runs a layer) ---------------------------------------------------
    # "rms" (Llama), "rms_gemma" (fp32 product, cast last), "layer" (nn.LayerNorm: weight and bias, for every
    # norm and the final one)
    norm: str = "rms"
    # "half": rotate_half; "half_cat": Phi-3's extra cat; "split": gpt-oss's halves and cat; "complex":
    # DeepSeek-V2's complex product; "none": learned positions; "partial": rotate_half on the first
    # ``partial_rotary_factor`` of the head dim, then cat with the rest (Qwen3-Next)
    rope: str = "half"
    act: str = "kernel"  # "kernel": one tensor (silu, gelu); "gelu_new": GPT-2's Python formula
    attn_softcap: bool = False  # Gemma 2 eager: scores / cap, tanh, * cap
    final_softcap: bool = False  # Gemma 2: logits / cap, tanh, * cap
    learned_positions: bool = False  # GPT-2: wpe(position_ids) added to the embeddings
    sdpa: bool = True  # False: transformers has no sdpa path (gpt-oss, with sinks): eager
    eager_fp32_softmax: bool = True  # False: GPT-2's eager softmax stays in the model's dtype
    router_fp32: bool = False  # DeepSeek: the router runs on an fp32 copy of the hidden states
    expert_glu: str = "act"  # "act": act(gate) * up; "gpt_oss": clamped gate/up, gate * sigmoid(1.702 gate) * (up + 1)
    post_norms: bool = False  # OLMo 2/3, EXAONE 4: no norm before attention or the MLP, one on each output
    # Granite: inputs_embeds * embedding_multiplier, residual + out * residual_multiplier, logits / logits_scaling
    multipliers: bool = False


# ---------------------------------------------------------------------------------------------------
# The mixture-of-experts blocks

_MIXTRAL = MoE("num_local_experts", router_first=True)
_QWEN3_5_MOE = MoE("num_experts", "moe_intermediate_size", shared="gated")

# ---------------------------------------------------------------------------------------------------
# The registry: one record per model_type

_GEMMA = dict(norms_per_layer=4, embed_scale=True, norm="rms_gemma")
# Qwen3-Next and Qwen3.5: gated full attention, gated delta-net layers, Qwen3NextRMSNorm (1 + weight),
# partial rotary. Qwen3.5's split delta-net projections (in_proj_qkv + in_proj_z) are replayed as
# Qwen3-Next's fused ones.
_QWEN_NEXT = dict(qk_norm="head", gated_query=True, linear_attention=True, norm="rms_gemma", rope="partial")

FAMILY: dict[str, Family] = {
    "llama": Family(mlp_bias_key="mlp_bias"),
    "mistral": Family(windows="all"),
    "seed_oss": Family(mlp_bias_key="mlp_bias", o_bias_key="attention_out_bias"),  # Llama's code, two bias keys
    "qwen2": Family(qkv_bias=True, o_bias=False, windows="qwen"),
    "qwen3": Family(qk_norm="head", windows="qwen"),
    "phi3": Family(windows="all", fused_qkv=True, fused_gate_up=True, rope="half_cat"),
    "gemma2": Family(windows="alternate", attn_softcap=True, final_softcap=True, **_GEMMA),
    "gemma3_text": Family(qk_norm="head", windows="pattern", rotary_per_layer_type=True, **_GEMMA),
    "mixtral": Family(windows="all", moe=_MIXTRAL),
    "qwen3_moe": Family(qk_norm="head", windows="qwen_all", moe=MoE("num_experts", "moe_intermediate_size",
                                                                     placement="sparse_step")),
    # Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): the router, the experts, then a gated shared expert
    "qwen2_moe": Family(qkv_bias_key="qkv_bias", o_bias=False, windows="qwen2_moe",
                        moe=MoE("num_experts", "moe_intermediate_size", placement="sparse_step", shared="gated",
                                router_first=True)),
    "olmoe": Family(qk_norm="full", moe=MoE("num_experts", router_first=True)),
    # gpt-oss: sinks need eager; its RMSNorm multiplies in fp32; rotary on split halves; clamped experts
    "gpt_oss": Family(moe=MoE("num_local_experts", expert_bias=True, router_first=True), sinks=True,
                      norm="rms_gemma", rope="split", sdpa=False, expert_glu="gpt_oss"),
    "qwen3_next": Family(moe=MoE("num_experts", "moe_intermediate_size", placement="sparse_step", shared="gated",
                                 router_first=True), **_QWEN_NEXT),
    "qwen3_5_text": Family(**_QWEN_NEXT),
    "qwen3_5_moe_text": Family(moe=_QWEN3_5_MOE, **_QWEN_NEXT),
    # StarCoder2: LayerNorms with biases, a plain c_fc/c_proj MLP, one use_bias switch
    "starcoder2": Family(qkv_bias_key="use_bias", o_bias_key="use_bias", mlp_bias_key="use_bias", windows="all",
                         norm="layer", gated_mlp=False),
    "smollm3": Family(mlp_bias_key="mlp_bias", windows="smollm3", nope="no_rope_layers"),  # NoPE layers may slide
    # EXAONE 4: OLMo 2's post-norm layer with Llama's RMSNorm, per-head qk-norms, global NoPE layers
    "exaone4": Family(qk_norm="head", windows="pattern", nope="global", post_norms=True),
    # Phi-3.5-MoE: Mixtral's experts behind LayerNorms with biases (its sparsemixer router: T x E tensors)
    "phimoe": Family(windows="all", moe=_MIXTRAL, norm="layer", lm_head_bias_key="lm_head_bias"),
    "granite": Family(mlp_bias_key="mlp_bias", multipliers=True),  # Llama's layout and its multipliers
    # OLMo 2/3: qk-norms over the whole projections; Olmo2RMSNorm multiplies in fp32, then casts; norms on
    # the block outputs only. OLMo 3: windows, rotary per layer type
    "olmo2": Family(qk_norm="full", norm="rms_gemma", post_norms=True),
    "olmo3": Family(qk_norm="full", windows="olmo3", rotary_per_layer_type=True, norm="rms_gemma", post_norms=True),
    # GPT-NeoX (Pythia, RedPajama-INCITE): one interleaved query_key_value, LayerNorms, a plain MLP with
    # biases; its apply_rotary_pos_emb cats (rotated, pass) whatever rotary_pct is (Phi-3's pattern)
    "gpt_neox": Family(fused_qkv=True, norm="layer", gated_mlp=False, mlp_bias=True, neox_order=True,
                       parallel_residual_key="use_parallel_residual", rope="half_cat"),
    # Llama 4: the L2 qk-norm has no weights; MoE layers add a shared expert; dense layers are wider
    "llama4_text": Family(windows="llama4", moe=MoE("num_local_experts", placement="moe_layers", shared="plain"),
                          dense_width_key="intermediate_size_mlp"),
    # DeepSeek V2/V3: multi-head latent attention, dense first layers, routed + shared experts, an fp32 router
    "deepseek_v2": Family(builder="deepseek", rope="complex", router_fp32=True),
    "deepseek_v3": Family(builder="deepseek", router_fp32=True),
    # GPT-2: its own key names, Conv1D with biases, LayerNorms, learned positions, GPT-2's gelu formula
    "gpt2": Family(builder="gpt2", norm="layer", fused_qkv=True, rope="none", act="gelu_new",
                   learned_positions=True, eager_fp32_softmax=False),
}

_LLAMA = Family()


def family(model_type: str) -> Family:
    """The record of ``model_type``; Llama's for a type without one (the replay of a hand-built spec)."""
    return FAMILY.get(model_type, _LLAMA)
