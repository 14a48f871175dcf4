"""Model families: a config.json (as a dict) becomes a ModelSpec, exact to the parameter.

One small builder per family, registered by ``model_type`` in ``FAMILIES``. Most decoders are
llama-like and share ``_decoder``, steered by the knobs of ``Decoder``; DeepSeek (multi-head latent
attention) and GPT-2 (its own key names, Conv1D, learned positions) have their own builders.

The layouts follow the transformers 5.x modeling code (``models/<family>/modeling_<family>.py``):
``tests/harness/test_param_count_meta.py`` builds every catalogue config on the meta device and checks
that ``ModelSpec.num_parameters`` equals ``sum(p.numel())`` exactly.

A key that sizes the model (widths, counts) must be in the config, or a UserError names it. A key that
only toggles a detail (biases, tied head, windows) falls back to the transformers default for the family.
Multimodal configs that nest the language model in ``text_config`` are read through it: the spec is the
text model's (the vision tower is not counted).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

from estimator.errors import UserError
from estimator.spec import AttentionSpec, LayerSpec, Linear, MLPSpec, ModelSpec

class Config:
    """A config dict that names the model and the missing key when something needed is absent."""

    def __init__(self, data: dict, name: str, defaults: dict | None = None):
        self.data, self.name, self.defaults = data, name or data.get("model_type", "model"), defaults or {}

    def need(self, key: str, why: str):
        value = self.data.get(key)
        if value is None:
            raise UserError(f"config for {self.name} lacks '{key}' (needed for {why})")
        return value

    def get(self, key: str, default=None):
        """The config's value; ``default`` when it is null; the family default when the key is absent.

        An explicit null switches a feature off (Mistral-7B-v0.3: ``"sliding_window": null``), while an
        absent key means the transformers config class's default (Mistral: a 4096-token window).
        """
        if key in self.data:
            return default if self.data[key] is None else self.data[key]
        return self.defaults.get(key, default)

    def present(self, key: str, why: str):
        """A key that must be present but may be null (e.g. ``q_lora_rank``)."""
        if key not in self.data:
            raise UserError(f"config for {self.name} lacks '{key}' (needed for {why}; null is allowed)")
        return self.data[key]


class _Parts:
    """Accumulates matmul weights (merged when identical), other parameters and layers."""

    def __init__(self):
        self.linears: Counter[tuple] = Counter()
        self.other: Counter[str] = Counter()
        self.layers: list[LayerSpec] = []

    def linear(self, role: str, in_f: int, out_f: int, count: int = 1, bias: bool = False,
               quantizable: bool = True) -> None:
        self.linears[(role, in_f, out_f, bias, quantizable)] += count

    def linear_tuple(self) -> tuple[Linear, ...]:
        return tuple(Linear(role, i, o, n, b, q) for (role, i, o, b, q), n in self.linears.items())


# ---------------------------------------------------------------------------------------------------
# The generic llama-like decoder


@dataclass(frozen=True)
class Decoder:
    """What distinguishes one llama-like family from another (transformers 5.x layouts)."""

    defaults: dict = field(default_factory=dict)  # transformers config-class defaults for optional keys
    qkv_bias: bool | None = None  # None: config's attention_bias; Qwen2 hard-codes q/k/v biases
    o_bias: bool | None = None  # None: config's attention_bias
    qk_norm: str | None = None  # "head": RMSNorm(head_dim) on q and k; "full": over the whole projection
    gated_query: bool = False  # Qwen3-Next full attention: q_proj also emits a sigmoid gate
    mlp_bias_key: str | None = None  # config key switching biases on the dense MLP (Llama: mlp_bias)
    norms_per_layer: int = 2  # Gemma 2/3 add pre/post feed-forward norms
    # Which layers slide: "none"; "all" (Mistral); "qwen" (layers from max_window_layers on, when
    # use_sliding_window); "qwen_all" (every layer, when use_sliding_window); "alternate" (Gemma 2);
    # "pattern" (Gemma 3: one global layer per sliding_window_pattern). A config's layer_types wins.
    windows: str = "none"
    moe: str | None = None  # None, "mixtral", "qwen", "olmoe", "gpt_oss", "qwen_next"
    rotary_copies: int = 1  # Gemma 3 keeps a global and a local rotary embedding
    embed_scale: bool = False  # Gemma's scaled embedding registers a scalar buffer
    linear_attention: bool = False  # Qwen3-Next: gated delta-net layers where layer_types say so


def _head_dim(cfg: Config) -> int:
    heads = cfg.need("num_attention_heads", "the attention projections")
    head_dim = cfg.data.get("head_dim")
    if head_dim:
        return head_dim
    return cfg.need("hidden_size", "the model width") // heads


def _layer_types(cfg: Config, dec: Decoder, n_layers: int) -> list[str]:
    """Each layer's token mixer as transformers' config classes derive it."""
    explicit = cfg.data.get("layer_types")
    if explicit:
        if len(explicit) != n_layers:
            raise UserError(f"config for {cfg.name} has {len(explicit)} layer_types for {n_layers} layers")
        return list(explicit)
    window = cfg.get("sliding_window")
    if dec.linear_attention:
        interval = cfg.get("full_attention_interval", 4)
        return ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]
    if dec.windows == "alternate":  # Gemma 2: even layers slide
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    if dec.windows == "pattern":  # Gemma 3: every sliding_window_pattern-th layer is global
        pattern = cfg.get("sliding_window_pattern", 6)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    if dec.windows == "qwen":
        if cfg.get("use_sliding_window", False) and window:
            first = cfg.get("max_window_layers", 28)
            return ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        return ["full_attention"] * n_layers
    if dec.windows == "qwen_all":  # Qwen3-MoE: one window for every layer when switched on
        sliding = cfg.get("use_sliding_window", False) and window
        return ["sliding_attention" if sliding else "full_attention"] * n_layers
    if dec.windows == "all" and window:  # Mistral, Mixtral, Phi-3: every layer slides
        return ["sliding_attention"] * n_layers
    return ["full_attention"] * n_layers


def _moe_layer(cfg: Config, dec: Decoder, i: int) -> bool:
    if dec.moe in ("mixtral", "olmoe", "gpt_oss"):
        return True
    if dec.moe in ("qwen", "qwen_next"):
        step = cfg.get("decoder_sparse_step", 1)
        experts = cfg.need("num_experts", "the expert count")
        return i not in (cfg.get("mlp_only_layers") or []) and experts > 0 and (i + 1) % step == 0
    return False


_EXPERT_KEYS = {"mixtral": "num_local_experts", "gpt_oss": "num_local_experts", "qwen": "num_experts",
                "olmoe": "num_experts", "qwen_next": "num_experts"}


def _decoder(cfg: Config, dec: Decoder, model_type: str) -> ModelSpec:
    hidden = cfg.need("hidden_size", "the model width")
    vocab = cfg.need("vocab_size", "the embedding and the head")
    n_layers = cfg.need("num_hidden_layers", "the layer count")
    heads = cfg.need("num_attention_heads", "the attention projections")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = _head_dim(cfg)
    attn_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = attn_bias if dec.qkv_bias is None else dec.qkv_bias
    o_bias = attn_bias if dec.o_bias is None else dec.o_bias
    mlp_bias = bool(cfg.get(dec.mlp_bias_key, False)) if dec.mlp_bias_key else False
    window = cfg.get("sliding_window")
    types = _layer_types(cfg, dec, n_layers)
    p = _Parts()
    q_out, kv_out = heads * head_dim, kv_heads * head_dim

    for i, layer_type in enumerate(types):
        if layer_type == "linear_attention":
            attention = _gated_delta_net(cfg, p, hidden)
        else:
            if layer_type not in ("full_attention", "sliding_attention"):
                raise UserError(f"config for {cfg.name}: layer type {layer_type!r} is not supported for {model_type}")
            p.linear("attn", hidden, q_out * (2 if dec.gated_query else 1), bias=qkv_bias)
            p.linear("attn", hidden, kv_out, 2, bias=qkv_bias)  # k_proj, v_proj
            p.linear("attn", q_out, hidden, bias=o_bias)
            if dec.qk_norm == "head":
                p.other["norm"] += 2 * head_dim
            elif dec.qk_norm == "full":
                p.other["norm"] += q_out + kv_out
            if model_type == "gpt_oss":
                p.other["other"] += heads  # attention sinks: one logit per head
            sliding = layer_type == "sliding_attention"
            attention = AttentionSpec("sliding" if sliding else "full", heads, kv_heads, head_dim, head_dim,
                                      window=window if sliding else None)
        mlp = _moe(cfg, dec, p, hidden) if _moe_layer(cfg, dec, i) else _dense_mlp(cfg, p, hidden, mlp_bias)
        p.other["norm"] += dec.norms_per_layer * hidden
        p.layers.append(LayerSpec(attention, mlp))

    rotary_dim = int(head_dim * cfg.get("partial_rotary_factor", 1.0))
    buffers = dec.rotary_copies * 2 * (rotary_dim // 2) + (1 if dec.embed_scale else 0)
    return _finish(cfg, p, model_type, vocab, hidden, buffers)


def _dense_mlp(cfg: Config, p: _Parts, hidden: int, bias: bool = False, width: int | None = None,
               role: str = "mlp") -> MLPSpec:
    width = width or cfg.need("intermediate_size", "the MLP width")
    p.linear(role, hidden, width, 2, bias=bias)  # gate_proj, up_proj
    p.linear(role, width, hidden, bias=bias)
    return MLPSpec("dense", width, gated=True)


def _moe(cfg: Config, dec: Decoder, p: _Parts, hidden: int) -> MLPSpec:
    experts = cfg.need(_EXPERT_KEYS[dec.moe], "the expert count")
    top_k = cfg.need("num_experts_per_tok", "the experts used per token")
    width_key = "moe_intermediate_size" if dec.moe in ("qwen", "qwen_next") else "intermediate_size"
    width = cfg.need(width_key, "the expert width")
    expert_bias = dec.moe == "gpt_oss"
    # transformers stores experts as (E, 2I, H) gate_up and (E, H, I) down tensors
    p.linear("expert", hidden, 2 * width, experts, bias=expert_bias)
    p.linear("expert", width, hidden, experts, bias=expert_bias)
    p.linear("router", hidden, experts, bias=expert_bias, quantizable=False)
    shared = 0
    if dec.moe == "qwen_next":
        shared = cfg.need("shared_expert_intermediate_size", "the shared expert width")
        _dense_mlp(cfg, p, hidden, width=shared, role="shared_expert")
        p.linear("router", hidden, 1, quantizable=False)  # shared_expert_gate
    return MLPSpec("moe", width, gated=True, num_experts=experts, top_k=top_k, shared_intermediate_size=shared)


def _gated_delta_net(cfg: Config, p: _Parts, hidden: int) -> AttentionSpec:
    """Qwen3-Next linear attention (Qwen3NextGatedDeltaNet): a fixed recurrent state per sequence."""
    why = "the linear-attention layers"
    k_heads = cfg.need("linear_num_key_heads", why)
    v_heads = cfg.need("linear_num_value_heads", why)
    k_dim = cfg.need("linear_key_head_dim", why)
    v_dim = cfg.need("linear_value_head_dim", why)
    kernel = cfg.get("linear_conv_kernel_dim", 4)
    key_width, value_width = k_heads * k_dim, v_heads * v_dim
    conv_dim = 2 * key_width + value_width
    p.linear("ssm", hidden, 2 * key_width + 2 * value_width)  # in_proj_qkvz
    p.linear("ssm", hidden, 2 * v_heads)  # in_proj_ba
    p.linear("ssm", value_width, hidden)  # out_proj
    p.other["other"] += conv_dim * kernel + 2 * v_heads  # depthwise conv1d (no bias), dt_bias, A_log
    p.other["norm"] += v_dim  # gated RMSNorm over one value head
    # cache_utils.LinearAttentionLayer: conv state (batch, conv_dim, kernel) in the model dtype, and the
    # delta-rule state (batch, v_heads, k_dim, v_dim), which the torch and fla kernels keep in fp32.
    return AttentionSpec("linear", v_heads, k_heads, k_dim, v_dim, state_elems=v_heads * k_dim * v_dim,
                         state_dtype="float32", conv_state_elems=conv_dim * kernel)


def _finish(cfg: Config, p: _Parts, model_type: str, vocab: int, hidden: int, buffers: int,
            max_positions: int | None = None) -> ModelSpec:
    tied = bool(cfg.get("tie_word_embeddings", False))
    p.other["embedding"] += vocab * hidden
    p.other["norm"] += hidden  # final norm
    if not tied:
        p.linear("lm_head", hidden, vocab, quantizable=False)
    return ModelSpec(
        name=cfg.name, model_type=model_type, vocab_size=vocab, hidden_size=hidden, layers=tuple(p.layers),
        linears=p.linear_tuple(), other_params=dict(p.other), tie_word_embeddings=tied,
        max_position_embeddings=max_positions or cfg.get("max_position_embeddings"), config=cfg.data, buffer_elems=buffers,
    )


# ---------------------------------------------------------------------------------------------------
# DeepSeek V2/V3: multi-head latent attention, dense first layers, routed + shared experts


def _deepseek(cfg: Config, model_type: str) -> ModelSpec:
    hidden = cfg.need("hidden_size", "the model width")
    vocab = cfg.need("vocab_size", "the embedding and the head")
    n_layers = cfg.need("num_hidden_layers", "the layer count")
    heads = cfg.need("num_attention_heads", "the attention projections")
    why = "multi-head latent attention"
    q_lora = cfg.present("q_lora_rank", "the MLA query projection")
    kv_lora = cfg.need("kv_lora_rank", why)
    nope = cfg.need("qk_nope_head_dim", why)
    rope = cfg.need("qk_rope_head_dim", why)
    v_dim = cfg.need("v_head_dim", why)
    bias = bool(cfg.get("attention_bias", False))
    first_dense = cfg.get("first_k_dense_replace", 0)
    p = _Parts()
    qk_dim = nope + rope
    mla = AttentionSpec("mla", heads, heads, qk_dim, v_dim, kv_lora_rank=kv_lora, qk_rope_head_dim=rope)
    n_moe = 0
    for i in range(n_layers):
        if q_lora is None:
            p.linear("attn", hidden, heads * qk_dim)  # q_proj
        else:
            p.linear("attn", hidden, q_lora, bias=bias)  # q_a_proj
            p.other["norm"] += q_lora  # q_a_layernorm
            p.linear("attn", q_lora, heads * qk_dim)  # q_b_proj
        p.linear("attn", hidden, kv_lora + rope, bias=bias)  # kv_a_proj_with_mqa
        p.other["norm"] += kv_lora  # kv_a_layernorm
        p.linear("attn", kv_lora, heads * (nope + v_dim))  # kv_b_proj
        p.linear("attn", heads * v_dim, hidden, bias=bias)  # o_proj
        p.other["norm"] += 2 * hidden
        # transformers: every layer from first_k_dense_replace on is MoE (moe_layer_freq is not read)
        if i < first_dense:
            mlp = _dense_mlp(cfg, p, hidden, bias=bool(cfg.get("mlp_bias", False)))
        else:
            n_moe += 1
            experts = cfg.need("n_routed_experts", "the expert count")
            width = cfg.need("moe_intermediate_size", "the expert width")
            shared = width * cfg.get("n_shared_experts", 1 if model_type == "deepseek_v3" else 2)
            p.linear("expert", hidden, 2 * width, experts)
            p.linear("expert", width, hidden, experts)
            p.linear("router", hidden, experts, quantizable=False)
            if shared:
                _dense_mlp(cfg, p, hidden, width=shared, role="shared_expert")
            mlp = MLPSpec("moe", width, True, experts, cfg.need("num_experts_per_tok", "the experts used per token"),
                          shared)
        p.layers.append(LayerSpec(mla, mlp))
    buffers = 2 * (rope // 2)
    if model_type == "deepseek_v3":  # router e_score_correction_bias, one per expert
        buffers += n_moe * cfg.need("n_routed_experts", "the expert count")
    return _finish(cfg, p, model_type, vocab, hidden, buffers)


# ---------------------------------------------------------------------------------------------------
# GPT-2: n_embd/n_layer/n_head, Conv1D with biases, LayerNorm with bias, learned positions


def _gpt2(cfg: Config, model_type: str) -> ModelSpec:
    hidden = cfg.need("n_embd", "the model width")
    vocab = cfg.need("vocab_size", "the embedding and the head")
    n_layers = cfg.need("n_layer", "the layer count")
    heads = cfg.need("n_head", "the attention projections")
    positions = cfg.need("n_positions", "the learned position embeddings")
    inner = cfg.get("n_inner") or 4 * hidden
    p = _Parts()
    attention = AttentionSpec("full", heads, heads, hidden // heads, hidden // heads)
    mlp = MLPSpec("dense", inner, gated=False)
    for _ in range(n_layers):
        p.linear("attn", hidden, 3 * hidden, bias=True)  # c_attn: fused q, k, v
        p.linear("attn", hidden, hidden, bias=True)  # attn.c_proj
        p.linear("mlp", hidden, inner, bias=True)  # c_fc
        p.linear("mlp", inner, hidden, bias=True)  # mlp.c_proj
        p.other["norm"] += 2 * 2 * hidden  # ln_1, ln_2: weight and bias
        p.layers.append(LayerSpec(attention, mlp))
    p.other["other"] += positions * hidden  # wpe
    p.other["norm"] += hidden  # ln_f bias (its weight is counted by _finish)
    return _finish(cfg, p, model_type, vocab, hidden, 0, max_positions=positions)


# ---------------------------------------------------------------------------------------------------
# The registry

_GEMMA = dict(norms_per_layer=4, embed_scale=True)

DECODERS: dict[str, Decoder] = {
    "llama": Decoder(mlp_bias_key="mlp_bias"),
    "mistral": Decoder(windows="all", defaults={"sliding_window": 4096}),
    "qwen2": Decoder(qkv_bias=True, o_bias=False, windows="qwen", defaults={"sliding_window": 4096}),
    "qwen3": Decoder(qk_norm="head", windows="qwen", defaults={"sliding_window": 4096}),
    "phi3": Decoder(windows="all"),
    "gemma2": Decoder(windows="alternate", defaults={"sliding_window": 4096, "tie_word_embeddings": True}, **_GEMMA),
    "gemma3_text": Decoder(qk_norm="head", windows="pattern", rotary_copies=2,
                           defaults={"sliding_window": 4096, "tie_word_embeddings": True}, **_GEMMA),
    "mixtral": Decoder(windows="all", moe="mixtral"),
    "qwen3_moe": Decoder(qk_norm="head", windows="qwen_all", moe="qwen", defaults={"sliding_window": 4096}),
    "olmoe": Decoder(qk_norm="full", moe="olmoe"),
    "gpt_oss": Decoder(moe="gpt_oss", defaults={"attention_bias": True, "sliding_window": 128}),
    "qwen3_next": Decoder(qk_norm="head", gated_query=True, moe="qwen_next", linear_attention=True,
                          defaults={"partial_rotary_factor": 0.25}),
}

# Defaults of the families outside DECODERS (transformers config-class values).
_DEFAULTS = {"gpt2": {"tie_word_embeddings": True}}

FAMILIES: dict[str, Callable[[Config, str], ModelSpec]] = {
    **{mt: (lambda cfg, mt, dec=dec: _decoder(cfg, dec, mt)) for mt, dec in DECODERS.items()},
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "gpt2": _gpt2,
}


def spec_from_config(config: dict, name: str = "") -> ModelSpec:
    """The ModelSpec of a Hugging Face ``config.json`` (already parsed into a dict)."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES and isinstance(config.get("text_config"), dict):
        text = config["text_config"]  # multimodal wrapper: the language model's config
        return replace(spec_from_config(text, name), config=config)
    if model_type not in FAMILIES:
        label = name or "this model"
        got = f"model_type {model_type!r}" if model_type else "no model_type"
        raise UserError(f"config for {label} has {got}; supported: {', '.join(sorted(FAMILIES))}")
    defaults = DECODERS[model_type].defaults if model_type in DECODERS else _DEFAULTS.get(model_type, {})
    return FAMILIES[model_type](Config(config, name, defaults), model_type)
