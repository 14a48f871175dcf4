"""vLLM's engine started on a GPU: its profile parses into a record the start-up model matches."""

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]


def test_startup_record_matches_kv_pages():
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from estimator.catalogue import load_model
    from estimator.records import validate_record
    from estimator.vllm import VllmSettings, kv_pool_from_available
    from harness.backends.vllm import measure_startup

    rec = measure_startup("qwen2.5-0.5b", hf_model="Qwen/Qwen2.5-0.5B", max_model_len=4096, enforce_eager=True,
                          gpu_memory_utilization=0.5)
    validate_record(rec)
    v = rec["vllm"]
    assert v["kv_cache_bytes"] > 0
    if v.get("kv_cache_tokens"):
        pool = kv_pool_from_available(load_model("qwen2.5-0.5b"), "bfloat16", VllmSettings(max_model_len=4096),
                                      v["kv_cache_bytes"])
        assert abs(pool["kv_cache_tokens"] - v["kv_cache_tokens"]) <= 16 * 2
