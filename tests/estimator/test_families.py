"""Model specs from config.json: published parameter counts and per-layer shapes (pure Python, fast).

The exact match of every catalogue config against transformers' meta-device model is in
tests/harness/test_param_count_meta.py; these tests need neither torch nor transformers.
"""

import json

import pytest

from estimator.catalogue import CONFIG_DIR
from estimator.errors import UserError
from estimator.families import FAMILIES, spec_from_config


def load(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def spec(name: str):
    return spec_from_config(load(name), name)


# Published totals: the parameter count the Hugging Face Hub shows for each checkpoint, read from its
# safetensors metadata (huggingface.co/<repo> "Model size", exact in the repo's safetensors index/API),
# which is also the count in the model cards. Tolerance: none.
PUBLISHED = {
    "llama-3.1-8b": 8_030_261_248,  # meta-llama/Llama-3.1-8B, safetensors BF16 total
    "qwen2.5-7b": 7_615_616_512,  # Qwen/Qwen2.5-7B, safetensors BF16 total ("7.61B")
    "mistral-7b": 7_241_732_096,  # mistralai/Mistral-7B-v0.1, safetensors BF16 total
    "gemma-2-9b": 9_241_705_984,  # google/gemma-2-9b, safetensors total ("9.24B")
    "qwen3-30b-a3b": 30_532_122_624,  # Qwen/Qwen3-30B-A3B, safetensors BF16 total ("30.5B")
    "deepseek-v2-lite": 15_706_484_224,  # deepseek-ai/DeepSeek-V2-Lite, safetensors BF16 total ("15.7B")
}


@pytest.mark.parametrize("name, expected", sorted(PUBLISHED.items()))
def test_published_parameter_counts(name, expected):
    assert spec(name).num_parameters == expected


def test_every_catalogue_config_builds():
    for path in sorted(CONFIG_DIR.glob("*.json")):
        s = spec_from_config(json.loads(path.read_text()), path.stem)
        assert s.num_parameters > 0 and s.num_layers > 0, path.name


def test_llama_gqa_layout_and_untied_head():
    s = spec("llama-3.1-8b")
    att = s.layers[0].attention
    assert (att.kind, att.num_heads, att.num_kv_heads, att.head_dim, att.window) == ("full", 32, 8, 128, None)
    assert not s.tie_word_embeddings
    heads = [l for l in s.linears if l.role == "lm_head"]
    assert len(heads) == 1 and heads[0].out_features == 128256 and not heads[0].quantizable
    assert s.embedding_params == 128256 * 4096
    assert s.buffer_elems == 128  # rotary inv_freq + original_inv_freq, 64 each


def test_tied_embeddings_drop_the_head():
    s = spec("llama-3.2-1b")
    assert s.tie_word_embeddings and not any(l.role == "lm_head" for l in s.linears)
    assert s.layers[0].attention.head_dim == 64  # the config's head_dim


def test_qwen2_has_qkv_biases_but_no_o_bias():
    s = spec("qwen2.5-0.5b")
    attn = [l for l in s.linears if l.role == "attn"]
    assert {(l.out_features, l.bias) for l in attn} == {(896, True), (128, True), (896, False)}


def test_qwen2_sliding_window_only_above_max_window_layers():
    config = {**load("qwen2.5-7b"), "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 20}
    kinds = [l.attention.kind for l in spec_from_config(config, "q").layers]
    assert kinds == ["full"] * 20 + ["sliding"] * 8
    assert spec("qwen2.5-7b").layers[-1].attention.kind == "full"  # use_sliding_window is false


def test_mistral_window_on_every_layer():
    s = spec("mistral-7b")
    assert {(l.attention.kind, l.attention.window) for l in s.layers} == {("sliding", 4096)}


def test_null_window_is_off_and_absent_window_is_the_family_default():
    null = {**load("mistral-7b"), "sliding_window": None}  # Mistral-7B-v0.3 writes null
    assert {l.attention.kind for l in spec_from_config(null, "v0.3").layers} == {"full"}
    absent = {k: v for k, v in load("mistral-7b").items() if k != "sliding_window"}
    assert {l.attention.window for l in spec_from_config(absent, "m").layers} == {4096}  # MistralConfig default


def test_gemma2_alternates_sliding_and_global_layers():
    s = spec("gemma-2-9b")
    kinds = [(l.attention.kind, l.attention.window) for l in s.layers]
    assert kinds[:4] == [("sliding", 4096), ("full", None), ("sliding", 4096), ("full", None)]
    assert len(kinds) == 42 and kinds.count(("full", None)) == 21
    att = s.layers[0].attention
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (16, 8, 256)  # head_dim != 3584 / 16
    assert s.tie_word_embeddings  # Gemma's default: the config does not say


def test_gemma3_one_global_layer_in_six():
    s = spec("gemma-3-1b")
    full = [i for i, l in enumerate(s.layers) if l.attention.kind == "full"]
    assert full == [5, 11, 17, 23]
    assert {l.attention.window for l in s.layers if l.attention.kind == "sliding"} == {512}
    assert s.vocab_size == 262144 and s.layers[0].attention.num_kv_heads == 1


def test_phi3_fused_layout_counts_like_separate_projections():
    s = spec("phi-3-mini")
    assert s.num_parameters == 3_821_079_552
    assert {l.attention.window for l in s.layers} == {2047}


def test_gpt2_key_names_biases_and_positions():
    s = spec("gpt2")
    assert s.num_parameters == 124_439_808
    assert (s.hidden_size, s.num_layers, s.max_position_embeddings) == (768, 12, 1024)
    att = s.layers[0].attention
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (12, 12, 64)
    assert s.layers[0].mlp.intermediate_size == 3072 and not s.layers[0].mlp.gated
    assert all(l.bias for l in s.linears)  # Conv1D layers carry biases
    assert s.tie_word_embeddings and s.other_params["other"] == 1024 * 768  # wpe


def test_moe_experts_router_and_top_k():
    s = spec("qwen3-30b-a3b")
    mlp = s.layers[0].mlp
    assert (mlp.kind, mlp.num_experts, mlp.top_k, mlp.intermediate_size) == ("moe", 128, 8, 768)
    routers = [l for l in s.linears if l.role == "router"]
    assert routers and not any(l.quantizable for l in routers)
    assert sum(l.count for l in s.linears if l.role == "expert") == 2 * 128 * 48
    assert s.active_parameters() < s.num_parameters / 5


def test_gpt_oss_sinks_expert_biases_and_alternating_window():
    s = spec("gpt-oss-20b")
    assert s.num_parameters == 20_914_757_184
    assert s.other_params["other"] == 24 * 64  # one sink logit per head per layer
    assert all(l.bias for l in s.linears if l.role in ("expert", "router", "attn"))
    assert [l.attention.window for l in s.layers[:2]] == [128, None]


def test_mla_dimensions_deepseek_v2_lite():
    s = spec("deepseek-v2-lite")
    att = s.layers[0].attention
    assert att.kind == "mla"
    assert (att.num_heads, att.num_kv_heads, att.head_dim, att.v_head_dim) == (16, 16, 192, 128)
    assert (att.kv_lora_rank, att.qk_rope_head_dim) == (512, 64)
    assert s.layers[0].mlp.kind == "dense" and s.layers[0].mlp.intermediate_size == 10944
    moe = s.layers[1].mlp
    assert (moe.kind, moe.num_experts, moe.top_k, moe.intermediate_size, moe.shared_intermediate_size) == (
        "moe", 64, 6, 1408, 2 * 1408)
    # no q LoRA: a plain q_proj of 16 heads x 192
    assert any(l.role == "attn" and (l.in_features, l.out_features) == (2048, 16 * 192) for l in s.linears)


def test_mla_with_query_lora_deepseek_v3():
    s = spec("deepseek-v3")
    assert sum(l.mlp.kind == "dense" for l in s.layers) == 3
    assert any(l.role == "attn" and (l.in_features, l.out_features) == (7168, 1536) for l in s.linears)
    assert 671e9 < s.num_parameters < 672e9  # the transformers model has no multi-token-prediction layer


def test_qwen3_next_linear_attention_state():
    s = spec("qwen3-next-80b-a3b")
    kinds = [l.attention.kind for l in s.layers]
    assert kinds[:4] == ["linear", "linear", "linear", "full"] and kinds.count("full") == 12
    lin = s.layers[0].attention
    assert lin.state_elems == 32 * 128 * 128 and lin.state_dtype == "float32"
    assert lin.conv_state_elems == (2 * 16 * 128 + 32 * 128) * 4
    assert s.layers[3].attention.head_dim == 256
    assert s.layers[0].mlp.shared_intermediate_size == 512


def test_multimodal_config_is_read_through_text_config():
    wrapped = {"model_type": "some_vlm", "text_config": load("gemma-3-1b"), "vision_config": {}}
    assert spec_from_config(wrapped, "vlm").num_parameters == spec("gemma-3-1b").num_parameters


def test_missing_key_names_it():
    config = load("llama-3.1-8b")
    del config["hidden_size"]
    with pytest.raises(UserError, match=r"config for broken lacks 'hidden_size'"):
        spec_from_config(config, "broken")


def test_missing_mla_query_rank_names_it():
    config = load("deepseek-v2-lite")
    del config["q_lora_rank"]
    with pytest.raises(UserError, match="lacks 'q_lora_rank'"):
        spec_from_config(config, "ds")


def test_unsupported_model_type_lists_supported():
    with pytest.raises(UserError, match="supported: .*llama") as exc:
        spec_from_config({"model_type": "rwkv"}, "rwkv-4")
    assert "'rwkv'" in str(exc.value)
    assert set(FAMILIES) >= {"llama", "gpt2", "deepseek_v3", "qwen3_next", "gemma2", "gpt_oss"}
