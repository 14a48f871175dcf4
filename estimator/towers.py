"""The other towers of multimodal models: vision encoders and projectors, counted to the parameter.

A multimodal config (``gemma3``, ``llama4``, ``qwen3_5``, ``mistral3``...) nests its language model in
``text_config``; ``estimator/families.py`` builds that, and this module counts what the wrapper adds:

- ``TOWERS``: a vision model_type (the ``model_type`` of ``vision_config``) -> its parameter and buffer
  count, following its transformers 5.x modeling file;
- ``WRAPPERS``: a wrapper model_type -> which sub-configs hold towers, its projector between the vision
  features and the language model, and whose ``tie_word_embeddings`` transformers reads.

``tests/harness/test_multimodal_meta.py`` checks every entry against the meta-device model's
``sum(p.numel())``. Buffers are counted in fp32 elements (bytes / 4) like ``ModelSpec.buffer_elems``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

from estimator.config import Config, ParsedConfig


class Count(NamedTuple):
    params: int
    buffers: int = 0  # fp32 elements (int64 position ids count 2, complex64 rotary tables 2)


def _pair(cfg: Config, key: str, default: int | None = None) -> tuple[int, int]:
    value = cfg.get(key, default)
    if value is None:
        value = cfg.need(key, "the vision tower")
    return (value[0], value[1]) if isinstance(value, list) else (value, value)


def _encoder_layer(h: int, i: int, attn_width: int | None = None) -> int:
    """Pre-LN ViT block with biases: 2 LayerNorms, q/k/v/o, fc1/fc2 (SigLIP, Llama 4 vision)."""
    a = attn_width or h
    return 2 * 2 * h + 3 * (h * a + a) + (a * h + h) + (h * i + i) + (i * h + h)


# --- vision towers, by the vision_config's model_type -------------------------------------------


def _siglip(c: Config) -> Count:
    """SiglipVisionModel (models/siglip/modeling_siglip.py): Conv2d patches with bias, learned positions,
    post-LayerNorm and, when ``vision_use_head``, the attention-pooling head (Gemma 3 turns it off)."""
    why = "the SigLIP vision tower"
    h, i, n = c.need("hidden_size", why), c.need("intermediate_size", why), c.need("num_hidden_layers", why)
    ph, pw = _pair(c, "patch_size")
    ih, iw = _pair(c, "image_size")
    patches = (ih // ph) * (iw // pw)
    params = c.get("num_channels", 3) * ph * pw * h + h + patches * h  # patch_embedding, position_embedding
    params += n * _encoder_layer(h, i) + 2 * h  # layers, post_layernorm
    if c.get("vision_use_head", True):  # probe, nn.MultiheadAttention in/out proj, layernorm, mlp
        params += h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h)
    return Count(params, 2 * patches)  # position_ids: int64 (1, patches)


def _llama4_vision(c: Config) -> Count:
    """Llama4VisionModel (models/llama4/modeling_llama4.py): unfold + linear patches, a class token,
    learned positions, pre/post LayerNorms, the encoder, and the pixel-shuffle adapter MLP."""
    why = "the Llama 4 vision tower"
    h, i, n = c.need("hidden_size", why), c.need("intermediate_size", why), c.need("num_hidden_layers", why)
    heads = c.need("num_attention_heads", why)
    ph, pw = _pair(c, "patch_size")
    ih, iw = _pair(c, "image_size")
    patches = (ih // ph) * (iw // pw) + 1  # + class token
    width = heads * (h // heads)  # q/k/v/o over heads x head_dim
    params = c.get("num_channels", 3) * ph * pw * h + h + patches * h + 2 * 2 * h
    params += n * _encoder_layer(h, i, width)
    params += i * c.need("projector_input_dim", why) + c.need("projector_output_dim", why) ** 2  # adapter fc1, fc2
    freq = h // heads // 2
    return Count(params, patches * 2 * (freq // 2) * 2)  # freqs_ci: complex64 (patches, 1, 2 * (freq // 2))


def _qwen3_5_vision(c: Config) -> Count:
    """Qwen3_5VisionModel (models/qwen3_5/modeling_qwen3_5.py): Conv3d patches with bias, learned
    positions, blocks with fused qkv, and the patch merger (LayerNorm, fc1, fc2 to the text width)."""
    why = "the Qwen3.5 vision tower"
    h, i, n = c.need("hidden_size", why), c.need("intermediate_size", why), c.need("depth", why)
    heads = c.need("num_heads", why)
    ph, pw = _pair(c, "patch_size")
    t = c.need("temporal_patch_size", why)
    merged = h * c.need("spatial_merge_size", why) ** 2
    out = c.need("out_hidden_size", why)
    params = c.get("in_channels", 3) * t * ph * pw * h + h + c.need("num_position_embeddings", why) * h
    params += n * (2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h))
    params += 2 * h + (merged * merged + merged) + (merged * out + out)  # merger: norm, linear_fc1, linear_fc2
    spatial = (c.get("head_dim") or h // heads) // 2
    return Count(params, 2 * len(range(0, spatial, 2)))  # axial rope inv_freq + original_inv_freq


def _pixtral(c: Config) -> Count:
    """PixtralVisionModel (models/pixtral/modeling_pixtral.py): bias-free Conv2d patches, RMSNorms, gated
    MLPs, no biases; 2-D rotary positions (no learned table)."""
    why = "the Pixtral vision tower"
    h, i, n = c.need("hidden_size", why), c.need("intermediate_size", why), c.need("num_hidden_layers", why)
    ph, pw = _pair(c, "patch_size")
    params = c.get("num_channels", 3) * ph * pw * h + h  # patch_conv, ln_pre
    params += n * (2 * h + 4 * h * h + 3 * h * i)  # attention_norm, ffn_norm, q/k/v/o, gate/up/down
    dim = c.get("head_dim") or h // c.need("num_attention_heads", why)
    return Count(params, 2 * len(range(0, dim, 2)))  # inv_freq + original_inv_freq


TOWERS: dict[str, Callable[[Config], Count]] = {
    "siglip_vision_model": _siglip,
    "llama4_vision_model": _llama4_vision,
    "qwen3_5_vision": _qwen3_5_vision,
    "qwen3_5_moe_vision": _qwen3_5_vision,
    "pixtral": _pixtral,
}


# --- projectors, by the wrapper's model_type (wrapper, text, vision configs) ----------------------


def _gemma3_projector(w: Config, text: Config, vision: Config) -> int:
    """Gemma3MultiModalProjector: mm_input_projection_weight (vision, text) + mm_soft_emb_norm (vision)."""
    v = vision.need("hidden_size", "the multimodal projector")
    return v * text.need("hidden_size", "the multimodal projector") + v


def _llama4_projector(w: Config, text: Config, vision: Config) -> int:
    """Llama4MultiModalProjector: linear_1 (vision_output_dim -> text hidden), no bias."""
    return vision.need("vision_output_dim", "the multimodal projector") * text.need("hidden_size", "the projector")


def _mistral3_projector(w: Config, text: Config, vision: Config) -> int:
    """Mistral3MultiModalProjector: RMSNorm, patch merger (merge^2 patches -> one), linear_1, linear_2."""
    why = "the multimodal projector"
    v, t = vision.need("hidden_size", why), text.need("hidden_size", why)
    layers = w.get("vision_feature_layer", -1)
    n_features = len(layers) if isinstance(layers, list) else 1
    bias = bool(w.get("multimodal_projector_bias", False))
    merge = w.get("spatial_merge_size", 2)
    return v + v * merge * merge * v + (v * n_features * t + t * bias) + (t * t + t * bias)


@dataclass(frozen=True)
class Wrapper:
    """A multimodal model_type: the towers its sub-configs hold and the projector that joins them."""

    towers: tuple[tuple[str, str], ...] = (("vision_tower", "vision_config"),)  # (part name, sub-config key)
    projector: Callable[[Config, Config, Config], int] | None = None  # (wrapper, text, vision) -> params
    # Whose tie_word_embeddings transformers reads: the wrapper's (its ForConditionalGeneration owns the
    # lm_head) or the text config's (Llama 4 nests a whole Llama4ForCausalLM).
    tie: str = "wrapper"


WRAPPERS: dict[str, Wrapper] = {
    "gemma3": Wrapper(projector=_gemma3_projector),
    "llama4": Wrapper(projector=_llama4_projector, tie="text"),
    "qwen3_5": Wrapper(),  # the patch merger, its projector, lives inside the vision model
    "qwen3_5_moe": Wrapper(),
    "mistral3": Wrapper(projector=_mistral3_projector),
}


class TowerCount(NamedTuple):
    parts: dict[str, int]  # part name -> parameters, e.g. {"vision_tower": ..., "multi_modal_projector": ...}
    buffers: int
    uncounted: tuple[str, ...]  # sub-configs present that no entry counts
    tied: bool | None  # the tie_word_embeddings transformers applies; None: the text config's


def count_towers(parsed: ParsedConfig) -> TowerCount:
    """What a wrapper adds to its language model (nothing for a plain language model)."""
    if parsed.wrapper_type is None:
        return TowerCount({}, 0, (), None)
    wrapper = WRAPPERS.get(parsed.wrapper_type)
    parts: dict[str, int] = {}
    buffers = 0
    counted: set[str] = set()
    if wrapper is not None:
        for part, key in wrapper.towers:
            sub = parsed.towers.get(key)
            tower = TOWERS.get(sub.data.get("model_type")) if sub is not None else None
            if tower is None:
                continue
            count = tower(sub)
            parts[part] = parts.get(part, 0) + count.params
            buffers += count.buffers
            counted.add(key)
        vision = parsed.towers.get("vision_config")
        if wrapper.projector is not None and "vision_config" in counted:
            parts["multi_modal_projector"] = wrapper.projector(parsed.wrapper, parsed.text, vision)
    uncounted = tuple(k for k in parsed.towers if k not in counted)
    tied = None
    if wrapper is not None and wrapper.tie == "wrapper":
        tied = bool(parsed.wrapper.get("tie_word_embeddings", False))
    return TowerCount(parts, buffers, uncounted, tied)
