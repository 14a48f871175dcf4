"""The CPU harness in-process on a tiny real architecture: records, and peaks checked against hand counts.

The model is llama-3.2-1b's catalogue config with its sizes cut down (2 layers, hidden 128, 4 query heads,
2 KV heads of 64... see TINY), built with random weights like every harness model. Its real 128,256-token
vocabulary is kept, so the logits dominate the activations as they do in small real models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from estimator.records import validate_record  # noqa: E402
from harness.case import Case  # noqa: E402
from harness.worker import Session  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
L, H, I, HEADS, KV_HEADS, D, V = 2, 128, 384, 4, 2, 32, 128256
TINY = {"num_hidden_layers": L, "hidden_size": H, "intermediate_size": I, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": D}
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
BLOCK = 512  # the tracker rounds every storage up to 512 bytes, like the CUDA caching allocator


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    config = json.loads((REPO / "configs" / "models" / "llama-3.2-1b.json").read_text())
    config.update(TINY)
    path = tmp_path_factory.mktemp("models") / "llama-tiny.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def session() -> Session:
    s = Session("cpu")
    yield s
    s.close()


def measure(session, tiny, **kwargs) -> dict:
    rec = session.run_case(Case.make(tiny, device="cpu", **kwargs))
    validate_record(rec)
    return rec


def hand_weights_bytes(dtype: str) -> int:
    """llama: embeddings (tied with lm_head) + per layer q, k, v, o, gate, up, down and two RMSNorms + final
    norm, at `dtype`; plus the rotary buffers inv_freq and original_inv_freq, D/2 float32 each."""
    per_layer = H * HEADS * D + 2 * H * KV_HEADS * D + HEADS * D * H + 3 * H * I + 2 * H
    params = V * H + L * per_layer + H
    return params * BYTES[dtype] + 2 * (D // 2) * 4


def hand_kv_bytes(batch: int, tokens: int, dtype: str) -> int:
    """keys and values of every layer: 2 x layers x kv_heads x head_dim x batch x tokens x bytes."""
    return 2 * L * KV_HEADS * D * batch * tokens * BYTES[dtype]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_forward_peak_is_weights_plus_full_logits(session, tiny, dtype):
    b, s = 2, 64
    rec = measure(session, tiny, workload="forward", context=s, batch=b, dtype=dtype)
    assert rec["status"] == "ok" and rec["device"] == "cpu"
    assert rec["weights_bytes"] == hand_weights_bytes(dtype)
    assert rec["kv_cache_bytes"] is None and rec["cache_implementation"] is None
    # at the lm_head: weights (each tensor rounded up to 512 B: 2 + 9 per layer) + logits (b, s, V) at dtype
    # + the normed hidden state and what the last layer leaves; at most one MLP intermediate (b, s, I).
    tensors = 2 + 9 * L + 2
    floor = rec["weights_bytes"] + b * s * V * BYTES[dtype]
    assert floor <= rec["peak_allocated_bytes"] <= floor + tensors * BLOCK + b * s * (H + I) * BYTES[dtype]
    for cuda_only in ("peak_reserved_bytes", "peak_nvml_bytes", "context_bytes", "gpu_name"):
        assert rec[cuda_only] is None


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_kv_cache_exact_and_peak_bounded(session, tiny, cache):
    b, prompt, new = 2, 60, 4
    rec = measure(session, tiny, workload="generate", context=prompt + new, new_tokens=new, batch=b, cache=cache)
    assert rec["status"] == "ok"
    assert rec["weights_bytes"] == hand_weights_bytes("bfloat16")
    # the last generated token is never fed back: the cache ends holding prompt + new - 1 positions
    kv = hand_kv_bytes(b, prompt + new - 1, "bfloat16")
    counters = 8 * L if cache == "static" else 0  # StaticLayer.cumulative_length: one int64 per layer
    assert rec["kv_cache_bytes"] == kv + counters
    assert rec["cache_class"] == {"dynamic": "DynamicCache", "static": "StaticCache"}[cache]
    # everything the cache holds is live at the end together with the weights; above that, at most the
    # float32 next-token scores generate copies (logits, processed scores: 8 x (b, V)) and the prefill's
    # working set (4 x (b, prompt, I) at bf16)
    floor = rec["weights_bytes"] + kv
    ceiling = floor + 8 * b * V * 4 + 4 * b * prompt * I * 2 + 64 * BLOCK
    assert floor <= rec["peak_allocated_bytes"] <= ceiling


def test_kv_cache_grows_linearly_with_tokens_and_batch(session, tiny):
    small = measure(session, tiny, context=33, new_tokens=2, batch=1)
    large = measure(session, tiny, context=65, new_tokens=2, batch=3)
    assert small["kv_cache_bytes"] == hand_kv_bytes(1, 32, "bfloat16")
    assert large["kv_cache_bytes"] == hand_kv_bytes(3, 64, "bfloat16") == 6 * small["kv_cache_bytes"]


def test_over_the_limit_is_an_oom_record_and_the_next_case_runs(session, tiny):
    weights = hand_weights_bytes("bfloat16")
    # the full logits of a (4, 128) forward pass are 131 MB: far beyond weights + 1 MB
    oom = measure(session, tiny, workload="forward", context=128, batch=4, memory_limit_bytes=weights + 2**20)
    assert oom["status"] == "oom" and "OutOfMemoryError" in oom["error"]
    assert oom["memory_limit_bytes"] == weights + 2**20
    assert oom["peak_allocated_bytes"] > weights + 2**20
    after = measure(session, tiny, workload="forward", context=16, batch=1)
    assert after["status"] == "ok"
    assert after["peak_allocated_bytes"] < weights + 16 * V * 2 + 2**20  # nothing of the OOM case is left


def test_a_model_that_cannot_be_built_is_an_error_record(session, tmp_path):
    config = json.loads((REPO / "configs" / "models" / "llama-3.2-1b.json").read_text())
    config.update(TINY, num_attention_heads=3, head_dim=None, hidden_size=128)  # 128 not divisible by 3
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(config))
    rec = session.run_case(Case.make(str(path), device="cpu", context=32))
    validate_record(rec)
    if rec["status"] == "ok":  # this transformers accepts the shape: nothing to check
        pytest.skip("transformers built the odd config")
    assert rec["status"] == "error" and rec["error"].startswith("building the model:")
    assert rec["config"]["num_attention_heads"] == 3  # the config as read stands in for the resolved one
