"""The replay's view of a family record (``estimator/family.py``): the flags its code branches on."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from estimator.errors import UserError
from estimator.family import family
from estimator.spec import ModelSpec


@dataclass(frozen=True)
class Layout:
    """The flags the replay branches on. Compute knobs are the record's (their meaning: ``Family`` in
    estimator/family.py); the others follow from its parameter layout, as ``layout`` derives them."""

    norm: str = "rms"
    fused_qkv: bool = False
    fused_gate_up: bool = False
    rope: str = "half"
    act: str = "kernel"
    sandwich_norms: bool = False  # Gemma 2/3's four norms a layer: norms on the attention and MLP outputs too
    attn_softcap: bool = False
    final_softcap: bool = False
    embed_scale: bool = False
    learned_positions: bool = False
    sdpa: bool = True
    eager_fp32_softmax: bool = True
    router_fp32: bool = False
    expert_glu: str = "act"
    expert_bias: bool = False  # gpt-oss: per-expert biases gathered for the routed rows (MoE.expert_bias)
    sinks: bool = False
    gated_attention: bool = False  # Family.gated_query: output * sigmoid(gate)
    shared_expert_gate: bool = False  # MoE.shared == "gated": shared expert first, scaled by sigmoid(gate(x))
    qk_norm: bool = False  # Family.qk_norm set: q_norm(q_proj(x)), k_norm(k_proj(x))
    post_norms: bool = False
    multipliers: bool = False


DEFAULT_LAYOUT = Layout()  # Llama's code


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
    """The replay's view of the family record of ``model_type`` (``estimator/family.py``): its compute
    knobs as they are, its parameter-layout knobs as the flags the replay branches on."""
    fam = family(model_type)
    moe = fam.moe
    return Layout(norm=fam.norm, fused_qkv=fam.fused_qkv, fused_gate_up=fam.fused_gate_up, rope=fam.rope,
                  act=fam.act, sandwich_norms=fam.norms_per_layer == 4, attn_softcap=fam.attn_softcap,
                  final_softcap=fam.final_softcap, embed_scale=fam.embed_scale,
                  learned_positions=fam.learned_positions, sdpa=fam.sdpa, eager_fp32_softmax=fam.eager_fp32_softmax,
                  router_fp32=fam.router_fp32, expert_glu=fam.expert_glu, expert_bias=bool(moe and moe.expert_bias),
                  sinks=fam.sinks, gated_attention=fam.gated_query,
                  shared_expert_gate=bool(moe and moe.shared == "gated"), qk_norm=fam.qk_norm is not None,
                  post_norms=fam.post_norms, multipliers=fam.multipliers)


def attention_used(model_type: str, attn: str) -> str:
    """The attention path transformers 5.17 takes for ``attn``: a family without an sdpa path (gpt-oss,
    whose sinks need eager) runs eager when asked for sdpa."""
    if attn == "sdpa" and not layout(model_type).sdpa:
        return "eager"
    return attn
