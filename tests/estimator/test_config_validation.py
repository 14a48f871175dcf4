"""Config values of the wrong type or range: one UserError naming the field and what it may hold.

Checked once, where the config is read (estimator.config.parse_config), before any count is made: a
10**12-layer config used to raise MemoryError while its layers were listed.
"""

import json
import subprocess
import sys
import time

import pytest

from estimator.catalogue import CONFIG_DIR, list_models, load_model
from estimator.errors import UserError
from estimator.families import spec_from_config


def load(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def with_(name: str, **changes) -> dict:
    return {**load(name), **changes}


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": "4096"}, r"'hidden_size' must be a positive integer .*got \"4096\" \(a string\)"),
    ({"hidden_size": [4096]}, r"'hidden_size' must be a positive integer .*got \[4096\] \(a list\)"),
    ({"hidden_size": -4096}, r"'hidden_size' must be a positive integer \(at most 2,147,483,647\), got -4096"),
    ({"hidden_size": 4096.0}, r"'hidden_size' must be a positive integer.*got 4096.0 \(a number\)"),
    ({"hidden_size": True}, r"'hidden_size' must be a positive integer.*got true \(a boolean\)"),  # bools are not ints
    ({"num_attention_heads": 0}, r"'num_attention_heads' must be a positive integer"),
    ({"num_key_value_heads": 3}, r"'num_key_value_heads' \(3\) must divide 'num_attention_heads' \(32\)"),
    ({"vocab_size": None}, r"'vocab_size' must be a positive integer \(at most 2,147,483,647\), got null"),
    ({"num_hidden_layers": 10**12}, r"'num_hidden_layers' must be a positive integer \(at most 10,000\)"),
    ({"max_position_embeddings": "131072"}, r"'max_position_embeddings' must be a positive integer .*or null, "
                                            r"got \"131072\" \(a string\)"),
    ({"tie_word_embeddings": 1}, r"'tie_word_embeddings' must be true or false or null, got 1"),
    ({"intermediate_size": 0}, r"'intermediate_size' must be a positive integer"),
    ({"layer_types": "full_attention"}, r"'layer_types' must be a list of strings"),
    ({"layer_types": ["full_attention"] * 31 + ["global"]}, r"layer type 'global' .*allowed: full_attention, "
                                                            r"sliding_attention, chunked_attention"),
    ({"layer_types": ["full_attention"] * 3}, r"'layer_types' has 3 entries for 32 layers"),
    ({"layer_types": ["sliding_attention"] * 32}, r"layer 0 is sliding_attention but 'sliding_window' is null"),
    ({"model_type": 7}, r"'model_type' must be a string, got 7"),
])
def test_bad_values_name_the_field_and_the_allowed_values(changes, message):
    with pytest.raises(UserError, match=message) as info:
        spec_from_config(with_("llama-3.1-8b", **changes), "bad")
    assert str(info.value).startswith("config for bad: ") and "\n" not in str(info.value)


def test_width_not_divisible_by_heads_without_head_dim():
    with pytest.raises(UserError, match=r"'hidden_size' \(4,097\) is not divisible by 'num_attention_heads' \(32\)"):
        spec_from_config(with_("llama-3.1-8b", hidden_size=4097), "bad")
    assert spec_from_config(with_("llama-3.1-8b", hidden_size=4097, head_dim=128), "ok").num_parameters > 0
    with pytest.raises(UserError, match=r"'n_embd' \(770\) is not divisible by 'n_head' \(12\)"):
        spec_from_config(with_("gpt2", n_embd=770), "bad")


def test_absurd_layer_count_fails_fast_instead_of_exhausting_memory():
    start = time.perf_counter()
    with pytest.raises(UserError, match="at most 10,000"):
        spec_from_config(with_("qwen3-30b-a3b", num_hidden_layers=10**12), "huge")
    assert time.perf_counter() - start < 1


def test_tensor_larger_than_int64_sizes_is_refused():
    huge = with_("qwen3-30b-a3b", hidden_size=2**30, moe_intermediate_size=2**30, num_hidden_layers=2,
                 head_dim=128)
    with pytest.raises(UserError, match=r"the routed experts' fused weight would hold .* more than a tensor can"):
        spec_from_config(huge, "huge")


def test_moe_settings():
    with pytest.raises(UserError, match=r"'num_experts_per_tok' \(200\) is more than the 128 experts"):
        spec_from_config(with_("qwen3-30b-a3b", num_experts_per_tok=200), "moe")
    with pytest.raises(UserError, match=r"'num_experts' must be an integer >= 0"):
        spec_from_config(with_("qwen3-30b-a3b", num_experts=-1), "moe")


def test_fractions_lists_and_nested_keys_name_their_path():
    with pytest.raises(UserError, match=r"'partial_rotary_factor' must be a number in \(0, 1\]"):
        spec_from_config(with_("qwen3-next-80b-a3b", partial_rotary_factor=2), "next")
    with pytest.raises(UserError, match=r"'mlp_only_layers' must be a list of integers from 0"):
        spec_from_config(with_("qwen3-30b-a3b", mlp_only_layers=[0, "1"]), "moe")
    wrapped = {"model_type": "gemma3", "text_config": {**load("gemma-3-1b"), "hidden_size": "1152"}}
    with pytest.raises(UserError, match=r"'text_config\.hidden_size' must be a positive integer"):
        spec_from_config(wrapped, "mm")
    vision = {"model_type": "gemma3", "text_config": load("gemma-3-1b"), "vision_config": {"patch_size": 0}}
    with pytest.raises(UserError, match=r"'vision_config\.patch_size' must be a positive integer"):
        spec_from_config(vision, "mm")
    with pytest.raises(UserError, match=r"'text_config' must be a JSON object"):
        spec_from_config({"model_type": "gemma3", "text_config": [1]}, "mm")


def test_explicit_null_of_a_needed_size_says_null():
    config = load("qwen3-30b-a3b")
    config["moe_intermediate_size"] = None
    with pytest.raises(UserError, match=r"has 'null' for 'moe_intermediate_size' \(needed for the expert width\)"):
        spec_from_config(config, "moe")


def test_every_catalogue_config_still_loads():
    load_model.cache_clear()
    for name in list_models():
        spec = load_model(name)
        assert spec.num_parameters > 0 and sum(spec.parts.values()) == spec.num_parameters, name


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(with_("llama-3.2-1b", hidden_size="2048")))
    r = subprocess.run([sys.executable, "-m", "vramcal", "estimate", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    lines = (r.stderr + r.stdout).strip().splitlines()
    assert len(lines) == 1 and "'hidden_size' must be a positive integer" in lines[0], lines
