"""How each family's transformers 5.17 code computes a layer, where it differs from Llama's."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from estimator.errors import UserError
from estimator.spec import ModelSpec


@dataclass(frozen=True)
class Layout:
    """How a family's transformers code computes a layer, where it differs from Llama's."""

    norm: str = "rms"  # "rms" (Llama), "rms_gemma" (fp32 product, cast last), "layer" (LayerNorm kernel)
    fused_qkv: bool = False  # one qkv projection (Phi-3, GPT-2); q, k, v are views of it
    fused_gate_up: bool = False  # Phi-3: gate_up_proj, chunked
    rope: str = "half"  # "half": rotate_half; "half_cat": Phi-3's extra cat; "split": gpt-oss's halves and
    # cat; "complex": DeepSeek-V2's complex product; "none": learned positions; "partial": rotate_half on
    # the first ``partial_rotary_factor`` of the head dim, then cat with the rest (Qwen3-Next)
    act: str = "kernel"  # "kernel": one tensor (silu, gelu); "gelu_new": GPT-2's Python formula
    sandwich_norms: bool = False  # Gemma 2/3: norms on the attention and MLP outputs too
    attn_softcap: bool = False  # Gemma 2 eager: scores / cap, tanh, * cap
    final_softcap: bool = False  # Gemma 2: logits / cap, tanh, * cap
    embed_scale: bool = False  # Gemma: embeddings * sqrt(hidden)
    learned_positions: bool = False  # GPT-2: wpe(position_ids) added to the embeddings
    sdpa: bool = True  # False: transformers has no sdpa path (gpt-oss, with sinks): eager
    eager_fp32_softmax: bool = True  # False: GPT-2's eager softmax stays in the model's dtype
    router_fp32: bool = False  # DeepSeek: the router runs on an fp32 copy of the hidden states
    expert_glu: str = "act"  # "act": act(gate) * up; "gpt_oss": clamped gate/up, gate * sigmoid(1.702 gate) * (up + 1)
    expert_bias: bool = False  # gpt-oss: per-expert biases gathered for the routed rows
    sinks: bool = False  # gpt-oss: one sink logit per head concatenated to the scores
    gated_attention: bool = False  # Qwen3-Next: q_proj also yields a gate; output * sigmoid(gate)
    shared_expert_gate: bool = False  # Qwen3-Next: shared expert first, scaled by sigmoid(gate(x))
    qk_norm: bool = False  # Qwen3, Gemma 3, OLMoE: q_norm(q_proj(x)), k_norm(k_proj(x))
    post_norms: bool = False  # OLMo 2/3: no norm before attention or the MLP, one on each output
    # Granite: inputs_embeds * embedding_multiplier, residual + out * residual_multiplier, logits / logits_scaling
    multipliers: bool = False


# Compute-only knobs by model_type. The knobs that follow from the parameter layout (fused projections,
# qk-norms, gated attention, sandwich norms, the scaled embedding, the shared expert's gate, expert biases,
# sinks) come from estimator/families.py's DECODERS, one copy (``layout``); GPT-2 has no Decoder.
LAYOUTS: dict[str, Layout] = {
    "phi3": Layout(rope="half_cat"),
    # GPT-NeoX's apply_rotary_pos_emb cats (rotated, pass) whatever rotary_pct is (Phi-3's pattern)
    "gpt_neox": Layout(rope="half_cat"),
    "gpt2": Layout(norm="layer", fused_qkv=True, rope="none", act="gelu_new", learned_positions=True,
                   eager_fp32_softmax=False),
    "gemma2": Layout(norm="rms_gemma", attn_softcap=True, final_softcap=True),
    "gemma3_text": Layout(norm="rms_gemma"),
    # OLMo 2: Olmo2RMSNorm multiplies by the weight in fp32, then casts; norms on the block outputs only
    "olmo2": Layout(norm="rms_gemma", post_norms=True),
    "olmo3": Layout(norm="rms_gemma", post_norms=True),
    "granite": Layout(multipliers=True),
    "exaone4": Layout(post_norms=True),  # Exaone4RMSNorm is Llama's
    "gpt_oss": Layout(norm="rms_gemma", rope="split", sdpa=False, expert_glu="gpt_oss"),
    "deepseek_v2": Layout(rope="complex", router_fp32=True),
    "deepseek_v3": Layout(router_fp32=True),
    "qwen3_next": Layout(norm="rms_gemma", rope="partial"),
    # Qwen3.5 follows Qwen3-Next's code (Qwen3_5RMSNorm is 1 + weight; partial rotary); its split delta-net
    # projections (in_proj_qkv + in_proj_z) are replayed as Qwen3-Next's fused ones: not checked on a trace
    "qwen3_5_text": Layout(norm="rms_gemma", rope="partial"),
    "qwen3_5_moe_text": Layout(norm="rms_gemma", rope="partial"),
}
DEFAULT_LAYOUT = Layout()  # every other family follows Llama's code (qwen2/3, mistral, mixtral, olmoe...)


def rotary_fraction(spec: ModelSpec, lay: Layout) -> float:
    """The fraction of the head the replay rotates: ``spec.partial_rotary_factor`` where the family's code
    splits the head (Phi-3's ``apply_rotary_pos_emb`` cats ``q_pass``; Qwen3-Next), 1 elsewhere; a
    partial factor on a family whose code rotates the whole head is refused, not replayed as 1."""
    factor = spec.partial_rotary_factor
    if lay.rope in ("partial", "half_cat"):
        return factor
    if lay.rope == "half" and factor != 1.0:
        raise UserError(f"{spec.name}: partial_rotary_factor {factor} on {spec.model_type}, whose transformers "
                        "code rotates the whole head: the replay does not model it (use --engine trace)")
    return 1.0


@lru_cache(maxsize=None)
def layout(model_type: str) -> Layout:
    """``LAYOUTS``' compute knobs with the layout knobs of the family's ``Decoder`` (estimator/families.py)."""
    from estimator.families import _MOE, DECODERS

    lay = LAYOUTS.get(model_type, DEFAULT_LAYOUT)
    dec = DECODERS.get(model_type)
    if dec is None:
        return lay
    moe = _MOE[dec.moe] if dec.moe else None
    return replace(lay, norm="layer" if dec.layer_norm else lay.norm, fused_qkv=dec.fused_qkv, fused_gate_up=dec.fused_gate_up, qk_norm=dec.qk_norm is not None,
                   gated_attention=dec.gated_query, sandwich_norms=dec.norms_per_layer == 4,
                   embed_scale=dec.embed_scale, sinks=dec.sinks, expert_bias=bool(moe and moe.expert_bias),
                   shared_expert_gate=bool(moe and moe.shared == "gated"))


def attention_used(model_type: str, attn: str) -> str:
    """The attention path transformers 5.17 takes for ``attn``: a family without an sdpa path (gpt-oss,
    whose sinks need eager) runs eager when asked for sdpa."""
    if attn == "sdpa" and not layout(model_type).sdpa:
        return "eager"
    return attn
