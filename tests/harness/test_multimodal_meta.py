"""Multimodal wrappers: the estimator's count of every tower equals the transformers model on the meta device.

The configs come from transformers' own config classes (no real multimodal config.json is in the
catalogue): each class's defaults (the documented reference checkpoint's sizes), the same config as
``save_pretrained`` writes it (``to_diff_dict``: nested sub-configs keep only what differs from their
class defaults, so the estimator must fill those in as transformers does), and small variants that turn
the options the towers read (SigLIP's pooling head, tied embeddings, Mistral 3's feature layers and
projector biases, Llama 4's interleaved MoE and chunked layers).
"""

import warnings
from functools import lru_cache

import pytest

from estimator.families import spec_from_config
from estimator.towers import TOWERS, WRAPPERS

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

CACHE_KINDS = {"full_attention": ("full",), "sliding_attention": ("sliding",), "chunked_attention": ("sliding",),
               "linear_attention": ("linear",)}

_SMALL_TEXT = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=5000)
VARIANTS = {
    "gemma3-default": ("gemma3", {}),
    "gemma3-no-head-untied": ("gemma3", dict(
        tie_word_embeddings=False, text_config=dict(_SMALL_TEXT, head_dim=64, sliding_window=128),
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=14, vision_use_head=False))),
    "llama4-default": ("llama4", {}),
    "llama4-interleaved": ("llama4", dict(
        text_config=dict(_SMALL_TEXT, head_dim=64, intermediate_size_mlp=768, num_local_experts=4,
                         interleave_moe_layer_step=2, attention_chunk_size=256, tie_word_embeddings=True),
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=112, patch_size=14, vision_output_dim=512, projector_input_dim=512,
                           projector_output_dim=512))),
    "qwen3_5-default": ("qwen3_5", {}),
    "qwen3_5-tied": ("qwen3_5", dict(
        tie_word_embeddings=True, text_config=dict(_SMALL_TEXT, head_dim=64, linear_num_key_heads=2,
                                                   linear_num_value_heads=4, linear_key_head_dim=32,
                                                   linear_value_head_dim=32),
        vision_config=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256))),
    "qwen3_5_moe-default": ("qwen3_5_moe", {}),
    "mistral3-default": ("mistral3", {}),
    "mistral3-feature-layers": ("mistral3", dict(
        tie_word_embeddings=False, vision_feature_layer=[-1, -2], multimodal_projector_bias=True,
        spatial_merge_size=3, text_config=dict(_SMALL_TEXT, model_type="mistral"),
        vision_config=dict(model_type="pixtral", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, head_dim=32))),
}


@lru_cache(maxsize=None)
def _build(variant: str):
    """(transformers config, meta-device model) of one variant."""
    from transformers import AutoModelForImageTextToText

    model_type, kwargs = VARIANTS[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = CONFIG_MAPPING[model_type](**kwargs)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(hf_config)
    return hf_config, model


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tower_modules(model):
    """{part: module} of the vision tower and projector, whatever each wrapper names them."""
    inner = getattr(model, "model", model)
    vision = next(getattr(m, n) for m in (inner, model) for n in ("vision_tower", "visual", "vision_model")
                  if hasattr(m, n))
    parts = {"vision_tower": vision}
    projector = getattr(inner, "multi_modal_projector", None) or getattr(model, "multi_modal_projector", None)
    if projector is not None:
        parts["multi_modal_projector"] = projector
    return parts


def test_every_wrapper_and_tower_has_a_variant():
    assert {mt for mt, _ in VARIANTS.values()} == set(WRAPPERS)
    vision_types = {CONFIG_MAPPING[mt]().vision_config.model_type for mt in WRAPPERS}
    assert vision_types == set(TOWERS)


@pytest.mark.parametrize("saved", [False, True], ids=["to_dict", "as_saved"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_towers_match_the_meta_model(variant, saved):
    hf_config, model = _build(variant)
    config = hf_config.to_diff_dict() if saved else hf_config.to_dict()
    spec = spec_from_config(config, variant)

    assert spec.num_parameters == _params(model)
    towers = _tower_modules(model)
    for part, module in towers.items():
        assert spec.parts[part] == _params(module), part
    assert spec.parts["language_model"] == _params(model) - sum(_params(m) for m in towers.values())
    assert sum(spec.parts.values()) == spec.num_parameters and not spec.uncounted_parts
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert spec.buffer_elems * 4 == buffer_bytes
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert spec.tie_word_embeddings == tied
    assert spec.num_layers == hf_config.get_text_config().num_hidden_layers


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_kinds_match_the_dynamic_cache(variant):
    from transformers.cache_utils import get_layer_types_and_kwargs

    hf_config, _ = _build(variant)
    spec = spec_from_config(hf_config.to_diff_dict(), variant)
    layer_types, kwargs = get_layer_types_and_kwargs(hf_config.get_text_config())
    assert len(layer_types) == spec.num_layers
    for layer_type, layer in zip(layer_types, spec.layers):
        assert layer.attention.kind in CACHE_KINDS[layer_type]
        if layer.attention.kind == "sliding":
            assert layer.attention.window == kwargs["sliding_window"]


def test_an_unknown_wrapper_is_read_through_its_text_config_and_says_what_it_left_out():
    hf_config, _ = _build("gemma3-no-head-untied")
    config = {**hf_config.to_diff_dict(), "model_type": "some_vlm"}
    spec = spec_from_config(config, "vlm")
    assert spec.uncounted_parts == ("vision_config",)
    assert set(spec.parts) == {"language_model"}
