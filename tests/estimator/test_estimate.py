"""The estimate's exact terms, its invariants and the inversion (pure Python, fast)."""

import pytest

from estimator import Workload, estimate, features, load_model, max_batch, max_context
from estimator.coefficients import DEFAULT
from estimator.errors import UserError
from estimator.gpus import find_gpu
from estimator.terms import kv_cache_bytes

GIB = 2**30


def test_llama_8b_acceptance_figures():
    # issue 2 "Done when": weights = 8,030,261,248 params x 2 bytes; KV = 2 x 8 kv heads x 128 x 32 layers
    # x 2 bytes x 8192 tokens x 4 sequences = 4 GiB exactly.
    est = estimate(load_model("llama-3.1-8b"), Workload(context=8192, batch=4))
    assert est.weights_bytes == 16_060_522_496
    assert est.kv_cache_bytes == 4 * GIB


def test_breakdown_terms_bound_what_the_run_must_hold():
    # Qwen2.5-7B (hidden 3584, MLP 18944, vocab 152064) at 4096 x 2 in bf16: the prefill must hold, besides
    # weights and cache, at least one layer's gate/up output (tokens x 18944 x 2 bytes, twice: gate and up)
    # and the fp32 last-position logits; the overhead at least the CUDA context the H100 reference measured
    # (716.8 MiB in every run).
    est = estimate(load_model("qwen2.5-7b"), Workload(context=4096, batch=2))
    prefill_tokens = 2 * (4096 - 16)
    assert est.activation_bytes >= 2 * prefill_tokens * 18944 * 2 + 2 * 152064 * 4
    assert est.activation_bytes < 4 * GIB  # a few layer working sets, not a copy of the cache or weights
    assert est.overhead_bytes >= 716 * 2**20
    assert est.peak_allocated_bytes - est.weights_bytes >= est.kv_cache_bytes - 28 * 2 * 4 * 128 * 2 * 2 * 16
    assert est.low_bytes < est.total_bytes < est.high_bytes


def test_estimate_grows_with_context_and_batch():
    spec = load_model("llama-3.2-1b")
    totals = [estimate(spec, Workload(context=c, batch=b)).total_bytes for c, b in
              [(1024, 1), (4096, 1), (4096, 4), (16384, 4)]]
    assert totals == sorted(totals) and len(set(totals)) == 4


def test_kv_dtype_fp8_halves_the_cache():
    spec = load_model("llama-3.1-8b")
    bf16 = kv_cache_bytes(spec, Workload(context=4096, batch=2))
    fp8 = kv_cache_bytes(spec, Workload(context=4096, batch=2, kv_dtype="fp8"))
    assert fp8 * 2 == bf16


def test_sliding_window_caps_the_cache():
    # Mistral-7B-v0.1: sliding_window 4096 on every layer; transformers' DynamicSlidingWindowLayer
    # keeps window - 1 tokens, its StaticSlidingWindowLayer the window; vLLM the window.
    spec = load_model("mistral-7b")
    per_token = 32 * 2 * 8 * 128 * 2
    assert kv_cache_bytes(spec, Workload(context=32768)) == per_token * 4095
    assert kv_cache_bytes(spec, Workload(context=32768, cache="static")) == per_token * 4096
    assert kv_cache_bytes(spec, Workload(context=32768, framework="vllm")) == per_token * 4096
    assert kv_cache_bytes(spec, Workload(context=2048)) == per_token * 2048


def test_gemma2_only_global_layers_grow():
    spec = load_model("gemma-2-9b")
    short = kv_cache_bytes(spec, Workload(context=4096, new_tokens=16))
    long = kv_cache_bytes(spec, Workload(context=8192, new_tokens=16))
    kinds = [l.attention.kind for l in spec.layers]
    assert kinds.count("sliding") == kinds.count("full") == len(kinds) // 2
    # past the 4096 window only the full-attention half of the layers grows
    assert long - short < short


def test_mla_caches_the_compressed_latent():
    # transformers 5.x DeepseekV2Attention/DeepseekV3Attention update the cache "while the latent KV is
    # still compressed" (kv_lora_rank + qk_rope_head_dim per token, one head) and expand it with
    # kv_b_proj on every forward, as vLLM's MLA backends store it.
    spec = load_model("deepseek-v2-lite")
    tf = kv_cache_bytes(spec, Workload(context=1024))
    vllm = kv_cache_bytes(spec, Workload(context=1024, framework="vllm"))
    att = spec.layers[0].attention
    assert tf == vllm == len(spec.layers) * 1024 * (att.kv_lora_rank + att.qk_rope_head_dim) * 2


def test_static_cache_is_preallocated():
    spec = load_model("llama-3.2-1b")
    dyn = kv_cache_bytes(spec, Workload(context=1024))
    static = kv_cache_bytes(spec, Workload(context=1024, cache="static", max_cache_len=4096))
    assert static == 4 * dyn


def test_forward_has_no_cache_and_full_logits():
    spec = load_model("qwen2.5-0.5b")
    f = features(spec, Workload(context=2048, batch=4, workload="forward"))
    assert f["kv_final_bytes"] == 0
    assert f["logits"] == 4 * 2048 * 151936 * 2
    g = features(spec, Workload(context=2048, batch=4, workload="generate"))
    assert g["logits"] == 4 * 151936 * 2  # generate computes the last position's logits only


def test_scores_only_where_the_gpu_path_materialises_them():
    spec = load_model("llama-3.2-1b")  # GQA: 32 heads, 8 kv heads
    sdpa_bf16 = features(spec, Workload(context=4096, attn="sdpa"))
    sdpa_fp32 = features(spec, Workload(context=4096, attn="sdpa", dtype="float32"))
    eager = features(spec, Workload(context=4096, attn="eager"))
    assert sdpa_bf16["scores_eager"] == sdpa_bf16["scores_math"] == 0
    assert sdpa_fp32["scores_math"] == 32 * 4080 * 4080 * 4
    assert eager["scores_eager"] == 32 * 4080 * 4080 * 2


def test_coefficients_are_named_in_output():
    est = estimate(load_model("gpt2"), Workload(context=512), coefficients=DEFAULT)
    d = est.as_dict()
    assert d["coefficients"]["calibrated"] is False
    for key in ("total_bytes", "weights_bytes", "kv_cache_bytes", "activation_bytes", "overhead_bytes",
                "low_bytes", "high_bytes", "inputs"):
        assert key in d


@pytest.mark.parametrize("kwargs, word", [
    ({"context": 0}, "context"), ({"context": 128, "batch": -1}, "batch"),
    ({"context": 16, "new_tokens": 16}, "new-tokens"), ({"context": 128, "attn": "flash"}, "attn"),
    ({"context": 128, "dtype": "float12"}, "dtype"),
])
def test_bad_workloads_name_the_option(kwargs, word):
    with pytest.raises(UserError, match=word):
        Workload(**kwargs)


def test_max_context_and_max_batch_are_the_largest_that_fit():
    spec = load_model("llama-3.1-8b")
    gpu = find_gpu("L4")
    base = Workload(context=1, new_tokens=0)
    best = max_context(spec, base, "L4")["max_context"]
    assert best is not None
    from dataclasses import replace
    # the interval for the L4 (widened: the coefficients were fitted on the H100)
    assert estimate(spec, replace(base, context=best), gpu="L4").high_bytes <= gpu.memory_bytes
    assert estimate(spec, replace(base, context=best + 1), gpu="L4").high_bytes > gpu.memory_bytes
    b = max_batch(spec, Workload(context=4096), "H100")["max_batch"]
    h100 = find_gpu("H100").memory_bytes
    assert estimate(spec, Workload(context=4096, batch=b)).high_bytes <= h100
    assert estimate(spec, Workload(context=4096, batch=b + 1)).high_bytes > h100


def test_inversion_is_conservative_where_the_estimate_is_not_monotone():
    """The allocator model's reserve jumps between neighbouring contexts (qwen3-0.6b at batch 32 on an L4:
    contexts 3408, 3440, 3472... do not fit while 3412, 3444... do). A bisection alone stops at a context
    that fits above shorter ones that do not; the answer must fit, and so must the window below it."""
    from estimator.estimate import BATCH_WINDOW, CONTEXT_WINDOW

    def high(spec, context: int, batch: int, gpu: str) -> int:
        return estimate(spec, Workload(context=context, batch=batch, new_tokens=16), gpu=gpu).high_bytes

    spec, memory = load_model("qwen3-0.6b"), find_gpu("L4").memory_bytes
    best = max_context(spec, Workload(context=100, batch=32, new_tokens=16), "L4")["max_context"]
    assert all(high(spec, m, 32, "L4") <= memory for m in range(best - CONTEXT_WINDOW, best + 1))
    assert high(spec, best + 1, 32, "L4") > memory
    # batch 219 does not fit at 1024 tokens on a T4, 223 does
    spec, memory = load_model("qwen2.5-0.5b"), find_gpu("T4").memory_bytes
    b = max_batch(spec, Workload(context=1024, new_tokens=16), "T4")["max_batch"]
    assert all(high(spec, 1024, n, "T4") <= memory for n in range(b - BATCH_WINDOW, b + 1))
    assert high(spec, 1024, b + 1, "T4") > memory


def test_max_context_stops_at_the_models_positions():
    spec = load_model("gpt2")  # 1024 positions; fits any listed GPU
    assert max_context(spec, Workload(context=1, new_tokens=0), "H200")["max_context"] == 1024


def test_a_model_too_large_for_the_gpu_has_no_max_batch():
    assert max_batch(load_model("llama-3.1-70b"), Workload(context=1024), "T4")["max_batch"] is None


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError, match="llama-3.1-8b"):
        load_model("llama-3.1-8")


def test_gpu_names_resolve_from_aliases_and_nvml_names():
    assert find_gpu("h100").name == "H100 SXM 80GB"
    assert find_gpu("H100 80GB").name == "H100 SXM 80GB"  # how earlier coefficients files named it
    assert find_gpu("NVIDIA H100 80GB HBM3").name == "H100 SXM 80GB"
    assert find_gpu("NVIDIA A100-PCIE-40GB").name == "A100 40GB PCIe"
    with pytest.raises(UserError, match="unknown GPU"):
        find_gpu("voodoo2")
