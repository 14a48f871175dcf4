"""Model families: a config.json (as a dict) becomes a ModelSpec, exact to the parameter.

Each model type has one ``Family`` record (``estimator/family.py``); ``FAMILIES`` maps the type to the
builder its record names. Most decoders are llama-like and share ``_decoder``, steered by the record's
knobs; DeepSeek (multi-head latent attention) and GPT-2 (its own key names, Conv1D, learned positions)
have their own builders.

The layouts follow the transformers 5.x modeling code (``models/<family>/modeling_<family>.py``):
``tests/harness/test_param_count_meta.py`` builds every catalogue config on the meta device and checks
that ``ModelSpec.num_parameters`` equals ``sum(p.numel())`` exactly.

A config is read once, by ``estimator.config.parse_config``: aliases (``num_local_experts`` /
``num_experts``, ``n_embd`` / ``hidden_size``...), ``rope_parameters``, ``dtype``, nested ``text_config``
and value checks. A key that sizes the model (widths, counts) must be in the config, or a UserError names
it. A key that only toggles a detail (biases, tied head, windows) falls back to the transformers config
class's default (generated into ``estimator/data/config_aliases.json``). A multimodal wrapper's spec is
its language model's plus the towers ``estimator/towers.py`` counts (``ModelSpec.parts``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Callable

from estimator.config import MAX_TENSOR_ELEMS, Config, ParsedConfig, parse_config
from estimator.dtypes import normalize_dtype
from estimator.errors import UserError
from estimator.family import FAMILY, Family, MoE
from estimator.spec import AttentionSpec, LayerSpec, Linear, MLPSpec, ModelSpec
from estimator.towers import WRAPPERS, count_towers

__all__ = ["Config", "FAMILIES", "spec_from_config"]


class _Parts:
    """Accumulates matmul weights (merged when identical), other parameters and layers, and every parameter
    tensor's elements in the order the modeling code's ``__init__`` registers them (``tensors``: the order
    the weights are loaded in, which the replay's allocator starts from; ``estimator/replay/``)."""

    def __init__(self):
        self.linears: Counter[tuple] = Counter()
        self.other: Counter[str] = Counter()
        self.layers: list[LayerSpec] = []
        self.tensors: list[int] = []
        self.front: list[int] = []  # created before the decoder layers, after the token embedding (wpe)
        self.layer_params: list[int] = []  # parameters of each decoder layer, exact (for device_map placement)
        self._counted = 0

    def add_layer(self, layer: LayerSpec) -> None:
        """Close one decoder layer: every parameter added since the previous one belongs to it."""
        total = sum(i * o * n + (o * n if b else 0) for (_, i, o, b, _), n in self.linears.items())
        total += sum(self.other.values())
        self.layer_params.append(total - self._counted)
        self._counted = total
        self.layers.append(layer)

    def linear(self, role: str, in_f: int, out_f: int, count: int = 1, bias: bool = False,
               quantizable: bool = True, fused: bool = False, tensors: bool = True) -> None:
        """``count`` weights (out_f, in_f), each a tensor, or one (count, out_f, in_f) tensor when ``fused``
        (transformers 5's experts); ``tensors=False``: the caller records the tensors (a fused projection)."""
        self.linears[(role, in_f, out_f, bias, quantizable)] += count
        if tensors:
            for _ in range(1 if fused else count):
                n = count if fused else 1
                self.tensors.append(n * in_f * out_f)
                if bias:
                    self.tensors.append(n * out_f)

    def param(self, category: str, elems: int, count: int = 1) -> None:
        """``count`` parameter tensors of ``elems`` elements that are not matmul weights (norms, sinks...)."""
        self.other[category] += count * elems
        self.tensors.extend([elems] * count)

    def linear_tuple(self) -> tuple[Linear, ...]:
        return tuple(Linear(role, i, o, n, b, q) for (role, i, o, b, q), n in self.linears.items())


# ---------------------------------------------------------------------------------------------------
# The generic llama-like decoder


def _head_dim(cfg: Config) -> int:
    heads = cfg.need("num_attention_heads", "the attention projections")
    head_dim = cfg.get("head_dim")  # absent: the class default (Qwen3: 128), which may not be hidden / heads
    if head_dim:
        return head_dim
    hidden = cfg.need("hidden_size", "the model width")
    if hidden % heads:
        raise cfg.fail(f"'{cfg.key('hidden_size')}' ({hidden:,}) is not divisible by "
                       f"'{cfg.key('num_attention_heads')}' ({heads:,}) and there is no head_dim to say the "
                       "head width")
    return hidden // heads


# transformers' cache layer type -> (AttentionSpec kind, the config key holding its window)
_ATTENTION_TYPES = {
    "full_attention": ("full", None),
    "sliding_attention": ("sliding", "sliding_window"),
    "chunked_attention": ("sliding", "attention_chunk_size"),  # a DynamicSlidingWindowLayer of chunk size
}


def _layer_types(cfg: Config, dec: Family, n_layers: int) -> list[str]:
    """Each layer's token mixer as transformers' config classes derive it."""
    explicit = cfg.data.get("layer_types")
    if explicit:
        if len(explicit) != n_layers:
            raise cfg.fail(f"'{cfg.key('layer_types')}' has {len(explicit)} entries for {n_layers} layers")
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
    if dec.windows == "smollm3":  # SmolLM3Config.__post_init__: the NoPE layers slide, when use_sliding_window
        sliding = cfg.get("use_sliding_window", False) and window is not None
        rope = _rope_layers(cfg, n_layers)
        return ["sliding_attention" if sliding and not rope[i] else "full_attention" for i in range(n_layers)]
    if dec.windows == "olmo3":  # Olmo3Config.__post_init__: every fourth layer is global
        return ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n_layers)]
    if dec.windows == "llama4":  # Llama4TextConfig.__post_init__: no_rope_layers[i] == 1 -> chunked
        interval = cfg.get("no_rope_layer_interval", 4)
        rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
        if len(rope) < n_layers:
            raise cfg.fail(f"'{cfg.key('no_rope_layers')}' has {len(rope)} entries for {n_layers} layers")
        chunked = cfg.get("attention_chunk_size") is not None
        return ["chunked_attention" if rope[i] and chunked else "full_attention" for i in range(n_layers)]
    if dec.windows == "qwen":
        if cfg.get("use_sliding_window", False) and window:
            first = cfg.get("max_window_layers", 28)
            return ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        return ["full_attention"] * n_layers
    if dec.windows == "qwen2_moe":  # Qwen2MoeConfig.__post_init__: even layers below max_window_layers
        if cfg.get("use_sliding_window", False) and window:
            first = cfg.get("max_window_layers", 28)
            return ["sliding_attention" if (i + 1) % 2 and i < first else "full_attention" for i in range(n_layers)]
        return ["full_attention"] * n_layers
    if dec.windows == "qwen_all":  # Qwen3-MoE: one window for every layer when switched on
        sliding = cfg.get("use_sliding_window", False) and window
        return ["sliding_attention" if sliding else "full_attention"] * n_layers
    if dec.windows == "all" and window:  # Mistral, Mixtral, Phi-3: every layer slides
        return ["sliding_attention"] * n_layers
    return ["full_attention"] * n_layers


def _rope_layers(cfg: Config, n_layers: int) -> list[int]:
    """SmolLM3Config.__post_init__: 1 where a layer applies RoPE; every no_rope_layer_interval-th does not."""
    interval = cfg.get("no_rope_layer_interval", 4)
    rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
    if len(rope) < n_layers:
        raise cfg.fail(f"'{cfg.key('no_rope_layers')}' has {len(rope)} entries for {n_layers} layers")
    return list(rope)


def _moe_layer(cfg: Config, moe: MoE | None, i: int, n_layers: int) -> bool:
    if moe is None:
        return False
    if moe.placement == "every":
        return True
    if moe.placement == "moe_layers":  # Llama4TextConfig.__post_init__
        layers = cfg.get("moe_layers")
        if layers is None:
            step = cfg.get("interleave_moe_layer_step", 1)
            layers = range(step - 1, n_layers, step)
        return i in layers
    step = cfg.get("decoder_sparse_step", 1)
    experts = cfg.need(moe.experts_key, "the expert count")
    return i not in (cfg.get("mlp_only_layers") or []) and experts > 0 and (i + 1) % step == 0


def _decoder(cfg: Config, dec: Family, model_type: str) -> ModelSpec:
    hidden = cfg.need("hidden_size", "the model width")
    vocab = cfg.need("vocab_size", "the embedding and the head")
    n_layers = cfg.need("num_hidden_layers", "the layer count")
    heads = cfg.need("num_attention_heads", "the attention projections")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = _head_dim(cfg)
    attn_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = attn_bias if dec.qkv_bias is None else dec.qkv_bias
    if dec.qkv_bias_key:  # Qwen2-MoE: its own switch (Qwen2MoeConfig.qkv_bias, default True)
        qkv_bias = bool(cfg.get(dec.qkv_bias_key, False))
    o_bias = attn_bias if dec.o_bias is None else dec.o_bias
    if dec.o_bias_key:  # Seed-OSS: o_proj's bias has its own switch (attention_out_bias)
        o_bias = bool(cfg.get(dec.o_bias_key, False))
    mlp_bias = bool(cfg.get(dec.mlp_bias_key, False)) if dec.mlp_bias_key else dec.mlp_bias
    norm_tensors = dec.norms_per_layer * (2 if dec.norm == "layer" else 1)
    moe = dec.moe
    types = _layer_types(cfg, dec, n_layers)
    rope = _rope_layers(cfg, n_layers) if dec.nope == "no_rope_layers" else [1] * n_layers
    if dec.nope == "global" and cfg.get("sliding_window") is not None:  # Exaone4Attention: global NoPE
        rope = [int(t == "sliding_attention") for t in types]
    p = _Parts()
    q_out, kv_out = heads * head_dim, kv_heads * head_dim

    for i, layer_type in enumerate(types):
        if layer_type == "linear_attention" and dec.linear_attention:
            attention = _gated_delta_net(cfg, p, hidden)
        else:
            if layer_type not in _ATTENTION_TYPES:
                allowed = ", ".join([*_ATTENTION_TYPES, *(["linear_attention"] if dec.linear_attention else [])])
                raise cfg.fail(f"layer type {layer_type!r} in '{cfg.key('layer_types')}' is not supported for "
                               f"{model_type} (allowed: {allowed})")
            kind, window_key = _ATTENTION_TYPES[layer_type]
            window = cfg.get(window_key) if window_key else None
            if window_key and window is None:
                raise cfg.fail(f"layer {i} is {layer_type} but '{cfg.key(window_key)}' is null or absent")
            if dec.neox_order:
                p.param("norm", hidden, norm_tensors)  # input_layernorm, post_attention_layernorm
            if dec.sinks:
                p.param("other", heads)  # attention sinks: one logit per head, the module's own parameter
            q_width = q_out * (2 if dec.gated_query else 1)
            p.linear("attn", hidden, q_width, bias=qkv_bias, tensors=not dec.fused_qkv)
            p.linear("attn", hidden, kv_out, 2, bias=qkv_bias, tensors=not dec.fused_qkv)  # k_proj, v_proj
            o_at = len(p.tensors)
            p.linear("attn", q_out, hidden, bias=o_bias)
            if dec.fused_qkv:  # Phi-3: one qkv_proj (q_out + 2 kv_out, hidden), registered after o_proj
                at = o_at if dec.neox_order else len(p.tensors)  # GPT-NeoX: query_key_value before dense
                p.tensors[at:at] = [hidden * (q_width + 2 * kv_out)] + ([q_width + 2 * kv_out] if qkv_bias else [])
            if dec.qk_norm == "head":
                p.param("norm", head_dim, 2)
            elif dec.qk_norm == "full":
                p.param("norm", q_out)
                p.param("norm", kv_out)
            attention = AttentionSpec(kind, heads, kv_heads, head_dim, head_dim, window=window, rope=bool(rope[i]))
        if _moe_layer(cfg, moe, i, n_layers):
            mlp = _moe(cfg, moe, p, hidden)
        else:
            mlp = _dense_mlp(cfg, p, hidden, mlp_bias, width=cfg.need(dec.dense_width_key, "the MLP width"),
                             fused=dec.fused_gate_up, gated=dec.gated_mlp)
        if not dec.neox_order:
            p.param("norm", hidden, norm_tensors)
        p.add_layer(LayerSpec(attention, mlp))

    rotary_dim = int(head_dim * cfg.get("partial_rotary_factor", 1.0))
    copies = len(set(types)) if dec.rotary_per_layer_type else 1
    buffers = copies * 2 * (rotary_dim // 2) + (1 if dec.embed_scale else 0)
    if dec.norm == "layer":
        p.param("norm", hidden)  # the final LayerNorm's bias (its weight is counted by _finish)
    head_bias = bool(cfg.get(dec.lm_head_bias_key, False)) if dec.lm_head_bias_key else False
    spec = _finish(cfg, p, model_type, vocab, hidden, buffers, head_bias=head_bias)
    if dec.parallel_residual_key:
        spec = replace(spec, parallel_residual=bool(cfg.get(dec.parallel_residual_key, False)))
    return spec


def _dense_mlp(cfg: Config, p: _Parts, hidden: int, bias: bool = False, width: int | None = None,
               role: str = "mlp", fused: bool = False, gated: bool = True) -> MLPSpec:
    width = width or cfg.need("intermediate_size", "the MLP width")
    # gate_proj, up_proj (Phi-3: gate_up_proj); StarCoder2: c_fc alone
    p.linear(role, hidden, width, 2 if gated else 1, bias=bias, fused=fused)
    p.linear(role, width, hidden, bias=bias)
    return MLPSpec("dense", width, gated=gated)


def _moe(cfg: Config, moe: MoE, p: _Parts, hidden: int) -> MLPSpec:
    experts = cfg.need(moe.experts_key, "the expert count")
    top_k = cfg.need("num_experts_per_tok", "the experts used per token")
    if top_k > experts:
        raise cfg.fail(f"'{cfg.key('num_experts_per_tok')}' ({top_k}) is more than the "
                       f"{experts} experts of '{cfg.key(moe.experts_key)}'")
    width = cfg.need(moe.width_key, "the expert width")
    if moe.router_first:
        p.linear("router", hidden, experts, bias=moe.expert_bias, quantizable=False)
    # transformers stores experts as (E, 2I, H) gate_up and (E, H, I) down tensors
    p.linear("expert", hidden, 2 * width, experts, bias=moe.expert_bias, fused=True)
    p.linear("expert", width, hidden, experts, bias=moe.expert_bias, fused=True)
    if not moe.router_first:
        p.linear("router", hidden, experts, bias=moe.expert_bias, quantizable=False)
    shared = 0
    if moe.shared == "gated":  # Qwen: shared_expert + shared_expert_gate
        shared = cfg.need("shared_expert_intermediate_size", "the shared expert width")
        _dense_mlp(cfg, p, hidden, width=shared, role="shared_expert")
        p.linear("router", hidden, 1, quantizable=False)
    elif moe.shared == "plain":  # Llama 4: one shared expert as wide as a routed one
        shared = width
        _dense_mlp(cfg, p, hidden, width=shared, role="shared_expert")
    return MLPSpec("moe", width, gated=True, num_experts=experts, top_k=top_k, shared_intermediate_size=shared)


def _gated_delta_net(cfg: Config, p: _Parts, hidden: int) -> AttentionSpec:
    """Qwen3-Next / Qwen3.5 linear attention (GatedDeltaNet): a fixed recurrent state per sequence.

    Qwen3.5 splits in_proj_qkvz into in_proj_qkv + in_proj_z and in_proj_ba into in_proj_b + in_proj_a;
    the parameters are the same.
    """
    why = "the linear-attention layers"
    k_heads = cfg.need("linear_num_key_heads", why)
    v_heads = cfg.need("linear_num_value_heads", why)
    k_dim = cfg.need("linear_key_head_dim", why)
    v_dim = cfg.need("linear_value_head_dim", why)
    kernel = cfg.get("linear_conv_kernel_dim", 4)
    key_width, value_width = k_heads * k_dim, v_heads * v_dim
    conv_dim = 2 * key_width + value_width
    # in named_parameters() order: the module's own dt_bias and A_log, then its submodules
    p.param("other", v_heads, 2)  # dt_bias, A_log
    p.param("other", conv_dim * kernel)  # depthwise conv1d (no bias)
    p.linear("ssm", hidden, 2 * key_width + 2 * value_width)  # in_proj_qkvz
    p.linear("ssm", hidden, 2 * v_heads)  # in_proj_ba
    p.param("norm", v_dim)  # gated RMSNorm over one value head
    p.linear("ssm", value_width, hidden)  # out_proj
    # cache_utils.LinearAttentionLayer: conv state (batch, conv_dim, kernel) in the model dtype, and the
    # delta-rule state (batch, v_heads, k_dim, v_dim), which the torch and fla kernels keep in fp32.
    return AttentionSpec("linear", v_heads, k_heads, k_dim, v_dim, state_elems=v_heads * k_dim * v_dim,
                         state_dtype="float32", conv_state_elems=conv_dim * kernel)


def _finish(cfg: Config, p: _Parts, model_type: str, vocab: int, hidden: int, buffers: int,
            max_positions: int | None = None, head_bias: bool = False) -> ModelSpec:
    tied = bool(cfg.get("tie_word_embeddings", False))
    p.other["embedding"] += vocab * hidden
    p.tensors[:0] = [vocab * hidden, *p.front]  # embed_tokens (GPT-2: wte, wpe) come before the layers
    p.param("norm", hidden)  # final norm
    if not tied:
        p.linear("lm_head", hidden, vocab, bias=head_bias, quantizable=False)
    return ModelSpec(
        name=cfg.name, model_type=model_type, vocab_size=vocab, hidden_size=hidden, layers=tuple(p.layers),
        linears=p.linear_tuple(), other_params=dict(p.other), tie_word_embeddings=tied,
        max_position_embeddings=max_positions or cfg.get("max_position_embeddings"), config=cfg.data,
        buffer_elems=buffers, partial_rotary_factor=cfg.get("partial_rotary_factor", 1.0),
        parameter_tensors=tuple(p.tensors),
        layer_params=tuple(p.layer_params),
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
    mla = AttentionSpec("mla", heads, heads, qk_dim, v_dim, kv_lora_rank=kv_lora, qk_rope_head_dim=rope,
                        q_lora_rank=q_lora or 0)
    n_moe = 0
    for i in range(n_layers):
        if q_lora is None:
            p.linear("attn", hidden, heads * qk_dim)  # q_proj
        else:
            p.linear("attn", hidden, q_lora, bias=bias)  # q_a_proj
            p.param("norm", q_lora)  # q_a_layernorm
            p.linear("attn", q_lora, heads * qk_dim)  # q_b_proj
        p.linear("attn", hidden, kv_lora + rope, bias=bias)  # kv_a_proj_with_mqa
        p.param("norm", kv_lora)  # kv_a_layernorm
        p.linear("attn", kv_lora, heads * (nope + v_dim))  # kv_b_proj
        p.linear("attn", heads * v_dim, hidden, bias=bias)  # o_proj
        # transformers: every layer from first_k_dense_replace on is MoE (moe_layer_freq is not read)
        if i < first_dense:
            mlp = _dense_mlp(cfg, p, hidden, bias=bool(cfg.get("mlp_bias", False)))
        else:
            n_moe += 1
            experts = cfg.need("n_routed_experts", "the expert count")
            width = cfg.need("moe_intermediate_size", "the expert width")
            shared = width * cfg.get("n_shared_experts", 1 if model_type == "deepseek_v3" else 2)
            p.linear("expert", hidden, 2 * width, experts, fused=True)
            p.linear("expert", width, hidden, experts, fused=True)
            p.linear("router", hidden, experts, quantizable=False)
            if shared:
                _dense_mlp(cfg, p, hidden, width=shared, role="shared_expert")
            mlp = MLPSpec("moe", width, True, experts, cfg.need("num_experts_per_tok", "the experts used per token"),
                          shared)
        p.param("norm", hidden, 2)  # input_layernorm, post_attention_layernorm (registered after the mlp)
        p.add_layer(LayerSpec(mla, mlp))
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
    if hidden % heads:
        raise cfg.fail(f"'{cfg.key('n_embd')}' ({hidden:,}) is not divisible by '{cfg.key('n_head')}' ({heads:,})")
    p = _Parts()
    attention = AttentionSpec("full", heads, heads, hidden // heads, hidden // heads)
    mlp = MLPSpec("dense", inner, gated=False)
    for _ in range(n_layers):
        p.param("norm", hidden, 2)  # ln_1: weight and bias
        p.linear("attn", hidden, 3 * hidden, bias=True)  # c_attn: fused q, k, v
        p.linear("attn", hidden, hidden, bias=True)  # attn.c_proj
        p.param("norm", hidden, 2)  # ln_2
        p.linear("mlp", hidden, inner, bias=True)  # c_fc
        p.linear("mlp", inner, hidden, bias=True)  # mlp.c_proj
        p.add_layer(LayerSpec(attention, mlp))
    p.other["other"] += positions * hidden
    p.front.append(positions * hidden)  # wpe, right after wte
    p.param("norm", hidden)  # ln_f bias (its weight is counted by _finish)
    return _finish(cfg, p, model_type, vocab, hidden, 0, max_positions=positions)


# ---------------------------------------------------------------------------------------------------
# The registry

_BUILDERS: dict[str, Callable[[Config, Family, str], ModelSpec]] = {
    "decoder": _decoder,
    "deepseek": lambda cfg, fam, model_type: _deepseek(cfg, model_type),
    "gpt2": lambda cfg, fam, model_type: _gpt2(cfg, model_type),
}

# model_type -> the builder of its ModelSpec, from its record in estimator/family.py
FAMILIES: dict[str, Callable[[Config, str], ModelSpec]] = {
    mt: (lambda cfg, mt, fam=fam: _BUILDERS[fam.builder](cfg, fam, mt)) for mt, fam in FAMILY.items()
}


def spec_from_config(config: dict, name: str = "") -> ModelSpec:
    """The ModelSpec of a Hugging Face ``config.json`` (already parsed into a dict).

    A multimodal wrapper gives its language model's spec plus the towers ``estimator/towers.py`` counts,
    in ``other_params`` and ``parts``. ``config`` keeps the file as given for a wrapper (the trace builds
    the whole model from it) and the normalized language-model config otherwise.
    """
    from estimator.quant import quant_from_config

    parsed = parse_config(config, name)
    label = parsed.text.name
    if parsed.model_type not in FAMILIES:
        got = f"model_type {parsed.model_type!r}" if parsed.model_type else "no model_type"
        where = f" in the text_config of {parsed.wrapper_type!r}" if parsed.wrapper_type else ""
        raise UserError(f"config for {label} has {got}{where}; supported: {', '.join(sorted(FAMILIES))}"
                        + (f" (and the multimodal {', '.join(sorted(WRAPPERS))})" if not where else ""))
    spec = FAMILIES[parsed.model_type](parsed.text, parsed.model_type)
    spec = _with_towers(spec, parsed, config)
    _check_tensor_sizes(spec, label)
    try:
        quant, source, error = *quant_from_config(config), None
    except UserError as exc:  # kept for the estimate to raise when no --quant overrides it
        quant, source, error = None, "", str(exc)
    return replace(spec, default_quant=quant, default_quant_source=source, default_quant_error=error,
                   config_dtype=_dtype_name(parsed.dtype))


def _with_towers(spec: ModelSpec, parsed: ParsedConfig, raw: dict) -> ModelSpec:
    towers = count_towers(parsed)
    language = spec.num_parameters
    if parsed.wrapper_type is None:
        return replace(spec, parts={"language_model": language})
    other = dict(spec.other_params)
    linears = spec.linears
    tensors = list(spec.parameter_tensors)
    tied = spec.tie_word_embeddings
    if towers.tied is not None and towers.tied != tied:  # the wrapper's lm_head follows the wrapper's flag
        tied = towers.tied
        hidden, vocab = spec.hidden_size, spec.vocab_size
        if tied:
            linears = tuple(l for l in linears if l.role != "lm_head")
            tensors.pop()  # the lm_head, the last tensor _finish records
        else:
            linears = (*linears, Linear("lm_head", hidden, vocab, quantizable=False))
            tensors.append(hidden * vocab)
        language += (-1 if tied else 1) * hidden * vocab
    for part, count in towers.parts.items():
        other[part] = other.get(part, 0) + count
    # The towers' parameters as one block per part, before the language model (the wrappers' ``Model``
    # creates vision_tower and multi_modal_projector first): their sum is exact, their split into tensors
    # is not known here, which moves the weights' fragmentation only (the replay's tracked tensors).
    tensors[:0] = [count for count in towers.parts.values() if count]
    return replace(spec, other_params=other, linears=linears, tie_word_embeddings=tied, config=raw,
                   parameter_tensors=tuple(tensors),
                   buffer_elems=spec.buffer_elems + towers.buffers, parts={"language_model": language, **towers.parts},
                   uncounted_parts=towers.uncounted)


def _check_tensor_sizes(spec: ModelSpec, label: str) -> None:
    """No single tensor may exceed what an int64 size holds (routed experts are one fused tensor)."""
    experts = max((l.mlp.num_experts for l in spec.layers), default=0) or 1
    tensors = [(spec.vocab_size * spec.hidden_size, "the token embedding")]
    for l in spec.linears:
        if l.role == "expert":
            tensors.append((l.in_features * l.out_features * experts, "the routed experts' fused weight"))
        else:
            tensors.append((l.in_features * l.out_features, f"the {l.role} weight {l.out_features} x {l.in_features}"))
    elems, what = max(tensors)
    if elems > MAX_TENSOR_ELEMS:
        raise UserError(f"config for {label}: {what} would hold {elems:.3g} elements, more than a tensor can "
                        f"({MAX_TENSOR_ELEMS:.3g}); check the widths, vocab_size and expert counts")


def _dtype_name(dtype: str | None) -> str | None:
    """The config's dtype in canonical form; None when absent or not a dtype vramcal knows ("auto")."""
    if dtype is None:
        return None
    try:
        return normalize_dtype(dtype)
    except UserError:
        return None
