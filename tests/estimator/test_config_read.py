"""Configs as the world writes them: aliases, dtype, rope_parameters, layer_types, nested text_config and
multimodal towers (pure Python: the alias table is data generated from transformers 5.17).

The transformers-side checks (to_dict round trips, meta-device tower counts, the table regenerated) are in
tests/harness/test_config_aliases.py and tests/harness/test_multimodal_meta.py.
"""

import json

import pytest

from estimator import Workload, estimate
from estimator.catalogue import CONFIG_DIR
from estimator.config import alias_table, parse_config
from estimator.families import spec_from_config
from estimator.terms import kv_cache_bytes


def load(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def spec(name: str):
    return spec_from_config(load(name), name)


def renamed(config: dict, **names) -> dict:
    """The config with keys renamed old=new."""
    return {names.get(k, k): v for k, v in config.items()}


def test_table_records_its_transformers_version_and_the_qwen3_moe_alias():
    table = alias_table()
    assert table["transformers_version"] == "5.17.0"
    assert table["model_types"]["qwen3_moe"]["attribute_map"] == {"num_experts": "num_local_experts"}


@pytest.mark.parametrize("name, renames", [
    ("qwen3-30b-a3b", {"num_experts": "num_local_experts"}),  # what Qwen3MoeConfig.to_dict() writes
    ("olmoe-1b-7b", {"num_experts": "num_local_experts"}),  # OlmoeConfig's alias, the other way round
    ("mixtral-8x7b", {"num_local_experts": "num_experts"}),
    ("deepseek-v3", {"n_routed_experts": "num_local_experts"}),
    ("gpt2", {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
              "n_positions": "max_position_embeddings"}),
])
def test_attribute_map_aliases_give_the_same_spec(name, renames):
    original = spec(name)
    aliased = spec_from_config(renamed(load(name), **renames), name)
    assert aliased.num_parameters == original.num_parameters
    assert aliased.layers == original.layers
    assert aliased.max_position_embeddings == original.max_position_embeddings


def test_when_both_spellings_differ_the_one_transformers_keeps_wins():
    # Qwen3MoeConfig(num_experts=64, num_local_experts=128).num_local_experts == 128: num_experts is the
    # dataclass field, set first; num_local_experts arrives later as an extra kwarg and overwrites it.
    both = {**load("qwen3-30b-a3b"), "num_experts": 64, "num_local_experts": 128}
    assert spec_from_config(both, "q").layers[0].mlp.num_experts == 128


def test_dtype_and_torch_dtype():
    assert spec("llama-3.1-8b").config_dtype == "bfloat16"  # the file says torch_dtype
    config = renamed(load("llama-3.1-8b"), torch_dtype="dtype")
    assert spec_from_config({**config, "dtype": "float16"}, "l").config_dtype == "float16"
    both = {**load("llama-3.1-8b"), "dtype": "float32"}  # PreTrainedConfig: dtype wins over torch_dtype
    assert spec_from_config(both, "l").config_dtype == "float32"
    assert spec_from_config({**config, "dtype": "auto"}, "l").config_dtype is None


def test_partial_rotary_factor_from_rope_parameters():
    # transformers 5 writes it inside rope_parameters (Qwen3NextConfig().to_dict())
    config = load("qwen3-next-80b-a3b")
    factor = config.pop("partial_rotary_factor")
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": factor}
    s = spec_from_config(config, "next")
    assert s.partial_rotary_factor == 0.25 and s.buffer_elems == spec("qwen3-next-80b-a3b").buffer_elems
    assert s.config["partial_rotary_factor"] == 0.25  # the replay reads it from the normalized config
    # rope_scaling wins over rope_parameters, as in convert_rope_params_to_dict; absent: the class default
    legacy = {**config, "rope_scaling": {"rope_type": "default", "partial_rotary_factor": 0.5}}
    assert spec_from_config(legacy, "next").partial_rotary_factor == 0.5
    del config["rope_parameters"]
    assert spec_from_config(config, "next").partial_rotary_factor == 0.25  # Qwen3NextConfig's default


def test_legacy_layer_type_names_are_remapped():
    config = load("qwen3-next-80b-a3b")
    interval = config["full_attention_interval"]
    config["layer_types"] = ["mamba" if (i + 1) % interval else "attention" for i in range(config["num_hidden_layers"])]
    assert spec_from_config(config, "next").layers == spec("qwen3-next-80b-a3b").layers


def test_explicit_layer_types_win_over_the_derived_ones():
    config = load("qwen2.5-7b")
    config["layer_types"] = ["full_attention"] * 27 + ["sliding_attention"]
    config["sliding_window"] = 1024
    kinds = [(l.attention.kind, l.attention.window) for l in spec_from_config(config, "q").layers]
    assert kinds[-2:] == [("full", None), ("sliding", 1024)]


def test_top_level_sizes_stay_required_but_a_nested_config_gets_its_class_defaults():
    # save_pretrained writes nested sub-configs as a diff against their class defaults
    wrapper = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "num_hidden_layers": 2},
               "vision_config": {"model_type": "siglip_vision_model", "num_hidden_layers": 1}}
    s = spec_from_config(wrapper, "tiny-gemma3")
    assert (s.vocab_size, s.hidden_size, s.num_layers) == (262208, 2304, 2)  # Gemma3TextConfig defaults
    assert set(s.parts) == {"language_model", "vision_tower", "multi_modal_projector"}
    assert s.parts["multi_modal_projector"] == 768 * 2304 + 768  # SigLIP default width x text width + norm
    assert sum(s.parts.values()) == s.num_parameters and s.tie_word_embeddings  # Gemma3Config ties


def test_multimodal_towers_are_weights_and_the_text_model_is_the_cache():
    text = load("gemma-3-1b")
    wrapper = {"model_type": "gemma3", "text_config": text, "tie_word_embeddings": True,
               "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                                 "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 896,
                                 "patch_size": 14, "vision_use_head": False}}
    mm, lm = spec_from_config(wrapper, "mm"), spec("gemma-3-1b")
    assert mm.parts["language_model"] == lm.num_parameters
    assert mm.parts["vision_tower"] > 400e6  # SigLIP-So400m
    assert mm.layers == lm.layers
    work = Workload(context=4096)
    assert kv_cache_bytes(mm, work) == kv_cache_bytes(lm, work)
    towers = mm.num_parameters - lm.num_parameters
    assert estimate(mm, work).weights_bytes == estimate(lm, work).weights_bytes + 2 * towers  # bf16


def test_wrapper_tie_flag_decides_the_lm_head():
    # Gemma3ForConditionalGeneration ties when the wrapper says so, whatever text_config says
    text = {**load("gemma-3-1b"), "tie_word_embeddings": True}
    untied = spec_from_config({"model_type": "gemma3", "text_config": text, "tie_word_embeddings": False}, "g")
    assert not untied.tie_word_embeddings and any(l.role == "lm_head" for l in untied.linears)
    assert untied.parts["language_model"] == spec("gemma-3-1b").num_parameters + 262144 * 1152


def test_text_only_spec_records_its_one_part():
    s = spec("llama-3.1-8b")
    assert s.parts == {"language_model": s.num_parameters} and s.uncounted_parts == ()


def _llama4_text(**overrides) -> dict:
    return {"model_type": "llama4_text", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 128,
            "intermediate_size_mlp": 512, "num_hidden_layers": 8, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64, "num_local_experts": 4, "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 2, "attention_chunk_size": 8192, **overrides}


def test_llama4_chunked_rope_layers_and_interleaved_experts():
    s = spec_from_config(_llama4_text(), "l4")
    kinds = [(l.attention.kind, l.attention.window) for l in s.layers]
    assert kinds[:4] == [("sliding", 8192)] * 3 + [("full", None)]  # NoPE every 4th layer: full attention
    mlps = [(l.mlp.kind, l.mlp.intermediate_size, l.mlp.shared_intermediate_size) for l in s.layers]
    assert mlps[:2] == [("dense", 512, 0), ("moe", 128, 128)]  # moe_layers = 1, 3, 5, 7
    # q, k, v, o; dense MLP (3 x 256 x 512) on 4 layers; experts 4 x 3 x 256 x 128 + router + shared on 4
    attn = 256 * 256 + 2 * 256 * 128 + 256 * 256
    per_moe = 4 * 3 * 256 * 128 + 256 * 4 + 3 * 256 * 128
    expected = 8 * (attn + 2 * 256) + 4 * 3 * 256 * 512 + 4 * per_moe + 2 * 1000 * 256 + 256
    assert s.num_parameters == expected


def test_llama4_without_chunk_size_has_full_attention_everywhere():
    s = spec_from_config(_llama4_text(attention_chunk_size=None), "l4")
    assert {l.attention.kind for l in s.layers} == {"full"}


def test_qwen3_5_text_hybrid_layers():
    config = {"model_type": "qwen3_5_text", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
              "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
              "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
              "linear_value_head_dim": 32}
    s = spec_from_config(config, "q35")
    assert [l.attention.kind for l in s.layers[:4]] == ["linear"] * 3 + ["full"]
    assert s.partial_rotary_factor == 0.25 and s.buffer_elems == 2 * (16 // 2)  # Qwen3.5's default
    q_proj = [l for l in s.linears if l.role == "attn" and l.out_features == 2 * 4 * 64]
    assert q_proj  # the gated query: q and its gate from one projection


def test_default_quant_from_the_config():
    assert (spec("gpt-oss-20b").default_quant, spec("deepseek-v3").default_quant) == ("mxfp4", "fp8-block")
    assert "quantization_config" in spec("gpt-oss-20b").default_quant_source
    assert spec("llama-3.1-8b").default_quant is None and spec("llama-3.1-8b").default_quant_error is None
    hqq = spec_from_config({**load("llama-3.2-1b"), "quantization_config": {"quant_method": "hqq"}}, "h")
    assert hqq.default_quant is None and "hqq" in hqq.default_quant_error  # --quant can still override


def test_parse_config_keeps_the_wrapper_and_towers_apart():
    parsed = parse_config({"model_type": "llama4", "text_config": {"model_type": "llama4_text"}}, "scout")
    assert (parsed.model_type, parsed.wrapper_type) == ("llama4_text", "llama4")
    assert set(parsed.towers) == {"vision_config"}  # absent: transformers builds the default vision model
    assert parsed.towers["vision_config"].data["model_type"] == "llama4_vision_model"


def test_absent_head_dim_is_the_class_default_not_hidden_over_heads():
    # Qwen3Config.head_dim defaults to 128 (Qwen3Attention reads config.head_dim); LlamaConfig's is None
    config = {k: v for k, v in load("qwen3-0.6b").items() if k != "head_dim"}  # 1024 / 16 heads = 64
    assert spec_from_config(config, "q").layers[0].attention.head_dim == 128
    llama = {**load("llama-3.2-1b"), "head_dim": None}
    assert spec_from_config(llama, "l").layers[0].attention.head_dim == 2048 // 32
