"""The family records (estimator/families.py) and the replay (estimator/replay/) describe one model.

For every catalogue model: the replay loads exactly the weights ``weights_bytes`` counts (it starts its
allocator from ``ModelSpec.parameter_tensors``, which tests/harness/test_param_count_meta.py checks against
the meta-device model's ``named_parameters()``), and every knob both read agrees. The two drifts a review
found are pinned: a Qwen3-Next config without ``partial_rotary_factor`` (transformers 5.17
``Qwen3NextConfig.__post_init__``: ``kwargs.setdefault("partial_rotary_factor", 0.25)``) and DeepSeek-V3's
low-rank query (``DeepseekV3Attention``: ``q_a_proj``, ``q_a_layernorm``, ``q_b_proj`` when ``q_lora_rank``).
"""

from __future__ import annotations

import json

import pytest

from estimator import Workload, list_models, load_model
from estimator.catalogue import CONFIG_DIR
from estimator.errors import UserError
from estimator.family import FAMILY
from estimator.families import FAMILIES, spec_from_config
from estimator.replay import layout, parameter_bytes, rotary_fraction, simulate
from estimator.replay.program import Program
from estimator.quant import weights_bytes

MODELS = list_models()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_replayed_weights_are_weights_bytes(model, dtype):
    spec = load_model(model)
    assert sum(spec.parameter_tensors) == spec.num_parameters
    assert sum(parameter_bytes(spec, Workload(context=128, dtype=dtype))) == weights_bytes(spec, dtype)


@pytest.mark.parametrize("model_type", sorted(FAMILY))
def test_layout_is_the_family_record(model_type):
    """The replay's flags are its model type's one record (estimator/family.py), read and derived."""
    fam, lay = FAMILY[model_type], layout(model_type)
    for knob in ("norm", "fused_qkv", "fused_gate_up", "rope", "act", "attn_softcap", "final_softcap", "embed_scale",
                 "learned_positions", "sdpa", "eager_fp32_softmax", "router_fp32", "expert_glu", "sinks",
                 "post_norms", "multipliers"):
        assert getattr(lay, knob) == getattr(fam, knob), knob
    assert lay.qk_norm == (fam.qk_norm is not None)
    assert lay.gated_attention == fam.gated_query
    assert lay.sandwich_norms == (fam.norms_per_layer == 4)
    assert lay.expert_bias == bool(fam.moe and fam.moe.expert_bias)
    assert lay.shared_expert_gate == bool(fam.moe and fam.moe.shared == "gated")


def test_every_record_has_a_builder_and_every_builder_a_record():
    assert set(FAMILIES) == set(FAMILY)


def test_ssm_layers_are_refused_not_replayed_as_qwen3_next():
    from dataclasses import replace

    spec = load_model("qwen3-next-80b-a3b")
    layers = tuple(replace(l, attention=replace(l.attention, kind="ssm")) if l.attention.kind == "linear" else l
                   for l in spec.layers)
    with pytest.raises(UserError, match="ssm"):
        simulate(replace(spec, layers=layers), Workload(context=128))


@pytest.mark.parametrize("model", MODELS)
def test_rotary_fraction_is_the_specs(model):
    """The replay rotates what the spec's rotary buffers count (``_decoder``: 2 * (rotary_dim // 2) each)."""
    spec = load_model(model)
    lay = layout(spec.model_type)
    fraction = rotary_fraction(spec, lay)
    if lay.rope in ("partial", "half_cat"):
        assert fraction == spec.partial_rotary_factor
    elif lay.rope == "half":
        assert spec.partial_rotary_factor == fraction == 1.0


def _qwen3_next_without_factor() -> dict:
    config = json.loads((CONFIG_DIR / "qwen3-next-80b-a3b.json").read_text())
    config.pop("partial_rotary_factor", None)
    if isinstance(config.get("rope_parameters"), dict):
        config["rope_parameters"] = {k: v for k, v in config["rope_parameters"].items()
                                     if k != "partial_rotary_factor"}
    return config


def test_qwen3_next_without_partial_rotary_factor_rotates_a_quarter_in_both():
    spec = spec_from_config(_qwen3_next_without_factor(), "qwen3-next-no-factor")
    head_dim = spec.layers[3].attention.head_dim  # a full-attention layer (every 4th)
    assert spec.partial_rotary_factor == 0.25
    assert spec.buffer_elems == 2 * (int(head_dim * 0.25) // 2)  # inv_freq of the quarter rotated
    run = Program(spec, Workload(context=256), 1)
    assert run.rotary_fraction == 0.25
    stated = load_model("qwen3-next-80b-a3b")  # states 0.25: the same replay
    w = Workload(context=2048, batch=2, new_tokens=4)
    assert simulate(spec, w) == simulate(stated, w)


def test_deepseek_v3_replays_its_low_rank_query():
    spec = load_model("deepseek-v3")
    att = spec.layers[0].attention
    assert att.q_lora_rank == spec.config["q_lora_rank"] == 1536
    H, nh, qk = spec.hidden_size, att.num_heads, att.head_dim
    first_layer = spec.parameter_tensors[1:9]  # after embed_tokens
    assert first_layer[:3] == (H * 1536, 1536, 1536 * nh * qk)  # q_a_proj, q_a_layernorm, q_b_proj
    assert H * nh * qk not in spec.parameter_tensors  # no full-rank q_proj


def test_partial_rotary_on_a_whole_head_family_is_refused():
    config = json.loads((CONFIG_DIR / "llama-3.2-1b.json").read_text())
    spec = spec_from_config({**config, "partial_rotary_factor": 0.5}, "llama-half-rotary")
    with pytest.raises(UserError, match="partial_rotary_factor 0.5"):
        simulate(spec, Workload(context=128))


def test_eager_mask_lengths_follow_the_cache_layers():
    """transformers 5.17 cache_utils ``get_mask_sizes``: dynamic past + q; ``StaticLayer`` max_cache_len;
    ``StaticSlidingWindowLayer`` (window 100, max_cache_len 1000) the window until the tokens pass it."""
    from estimator.replay.attention import Attention
    from estimator.replay.step import Step

    kv = Attention._mask_kv
    assert kv(Step(30, 0), None) == kv(Step(30, 0), 100) == 30
    assert kv(Step(30, 0, static_len=1000), None) == kv(Step(1, 500, static_len=1000), None) == 1000
    assert kv(Step(30, 0, static_len=1000), 100) == 100  # not yet full
    assert kv(Step(130, 0, static_len=1000), 100) == 130  # becoming full on this update
    assert kv(Step(1, 130, static_len=1000), 100) == 100  # full: window + q - 1
    assert kv(Step(30, 0, static_len=50), 100) == 50  # the layer's length is min(window, max_cache_len)
