"""Every catalogue config: the estimator's exact count equals the transformers model built on the meta device.

The meta device allocates nothing, so even Llama-3.1-405B and DeepSeek-V3 build in a fraction of a second.
Besides ``sum(p.numel())``, the non-persistent buffers (rotary ``inv_freq``...) and each layer's cache
type (what ``DynamicCache`` derives from the config: full, sliding or linear attention) must match.
"""

import json
import warnings
from functools import lru_cache

import pytest

from estimator.catalogue import CONFIG_DIR
from estimator.families import spec_from_config

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.json"))

# DynamicCache layer type -> the AttentionSpec kinds that hold that cache
CACHE_KINDS = {"full_attention": ("full", "mla"), "sliding_attention": ("sliding",), "linear_attention": ("linear",)}


@lru_cache(maxsize=None)
def _load(filename: str):
    """(spec, transformers config, meta-device model) of one catalogue file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((CONFIG_DIR / filename).read_text())
    spec = spec_from_config(config, filename.removesuffix(".json"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    return spec, hf_config, model


def test_catalogue_is_populated():
    assert len(CONFIGS) >= 27


@pytest.mark.parametrize("filename", CONFIGS)
def test_parameter_count_matches_meta_model(filename):
    spec, hf_config, model = _load(filename)

    assert spec.num_parameters == sum(p.numel() for p in model.parameters())
    assert spec.buffer_elems == sum(b.numel() for b in model.buffers())
    assert spec.num_layers == hf_config.get_text_config().num_hidden_layers
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert spec.tie_word_embeddings == tied
    assert any(l.role == "lm_head" for l in spec.linears) != tied


@pytest.mark.parametrize("filename", CONFIGS)
def test_parameter_tensors_are_the_meta_models_in_order(filename):
    """``ModelSpec.parameter_tensors``, the load order the replay's allocator starts from, is
    ``named_parameters()``: every tensor, in registration order."""
    spec, _, model = _load(filename)
    assert list(spec.parameter_tensors) == [p.numel() for _, p in model.named_parameters()]


@pytest.mark.parametrize("filename", CONFIGS)
def test_layer_kinds_match_the_dynamic_cache(filename):
    from transformers.cache_utils import get_layer_types_and_kwargs

    spec, hf_config, _ = _load(filename)
    text_config = hf_config.get_text_config()
    layer_types, kwargs = get_layer_types_and_kwargs(text_config)

    assert len(layer_types) == spec.num_layers
    for layer_type, layer in zip(layer_types, spec.layers):
        assert layer.attention.kind in CACHE_KINDS[layer_type]
        if layer_type == "sliding_attention":
            assert layer.attention.window == kwargs["sliding_window"]
