"""The vLLM start-up model (estimator/vllm.py) against vLLM's own formulas and published logs."""

import subprocess
import sys

import pytest

from estimator.catalogue import load_model
from estimator.vllm import VllmSettings, kv_layout, layer_pages, startup, weights_per_gpu

H100 = 85_017_755_648


def test_llama_kv_bytes_per_token_exact_and_weights_match_vllm_log():
    spec = load_model("llama-3.1-8b")
    r = startup(spec, "bfloat16", None, H100, VllmSettings())
    # 2 (K,V) x 32 layers x 8 KV heads x 128 x 2 bytes (FullAttentionSpec.real_page_size_bytes / block)
    assert r.kv_bytes_per_token == 131_072
    # vLLM logs "Loading model weights took 14.9888 GB" (GiB) for Llama-3.1-8B bf16 (reference rows v7, v24):
    # parameters plus the rotary cos_sin_cache (131072 x 128 x bf16)
    assert abs(r.weights_bytes / 2**30 - 14.9888) / 14.9888 < 0.001
    # get_num_blocks: available // page // layers; tokens = blocks x 16
    assert r.num_gpu_blocks == r.kv_cache_bytes // (65_536 * 32)
    assert r.kv_cache_tokens == r.num_gpu_blocks * 16


def test_sliding_window_groups_gemma3():
    # 22 sliding + 4 full: group size min(22, 4) = 4, cdiv(22, 4) = 6 sliding groups + 1 full group
    # (_get_kv_cache_groups_uniform_page_size); tokens = num_blocks // 7 x block_size (_report_kv_cache_config)
    spec = load_model("gemma-3-1b")
    layout = kv_layout(layer_pages(spec, "bfloat16", VllmSettings()))
    assert layout.group_size == 4 and len(layout.groups) == 7
    assert layout.page_bytes == 16 * 1 * (256 + 256) * 2
    sliding = next(p for p, _ in layout.groups if p.kind == "sliding")
    # SlidingWindowSpec.max_memory_usage_bytes: (cdiv(min(window - 1 + mnbt, L), bs) + 1) x page
    assert sliding.max_bytes_per_request(32768, 2048) == (-(-(512 - 1 + 2048) // 16) + 1) * layout.page_bytes
    assert layout.tokens(7000) == 1000 * 16


def test_mla_latent_page_deepseek_v2_lite():
    # MLAAttentionSpec.real_page_size_bytes: block x 1 x (kv_lora_rank + qk_rope_head_dim) x dtype, no K/V pair,
    # not divided by TP; 64-token blocks for the FlashMLA backend
    spec = load_model("deepseek-v2-lite")
    for tp in (1, 2):
        pages = layer_pages(spec, "bfloat16", VllmSettings(tensor_parallel_size=tp))
        assert {p.page_bytes for p in pages} == {64 * (512 + 64) * 2}
    assert startup(spec, "bfloat16", None, H100, VllmSettings()).kv_bytes_per_token == 27 * 576 * 2


def test_hybrid_linear_attention_qwen3_next():
    # gated_delta_net_state_shape at TP 4: conv (8192 / 4, 3), temporal (32 / 4, 128, 128), bf16;
    # _align_hybrid_block_size: attention block = 16 x cdiv(state, 16 x per-token page) and the Mamba page is
    # padded to the attention page; 12 full + 36 linear layers -> 4 groups of 12
    spec = load_model("qwen3-next-80b-a3b")
    state = (8192 // 4) * 3 * 2 + 8 * 128 * 128 * 2
    per_token = 1 * (256 + 256) * 2  # 2 KV heads < TP 4: one replicated head per GPU
    block = 16 * -(-state // (16 * per_token))
    pages = layer_pages(spec, "bfloat16", VllmSettings(tensor_parallel_size=4))
    assert {p.page_bytes for p in pages} == {block * per_token}
    layout = kv_layout(pages)
    assert layout.group_size == 12 and len(layout.groups) == 4
    r = startup(spec, "bfloat16", None, H100, VllmSettings(tensor_parallel_size=4))
    assert r.block_size == block and r.kv_cache_tokens == r.num_gpu_blocks // 4 * block


def test_tensor_parallel_divides_weights_and_kv_heads():
    spec = load_model("llama-3.1-70b")
    one = weights_per_gpu(spec, "bfloat16", None, 1)
    eight = weights_per_gpu(spec, "bfloat16", None, 8)
    assert 0.124 < eight / one < 0.127
    r = startup(spec, "bfloat16", None, H100, VllmSettings(tensor_parallel_size=8))
    assert r.kv_bytes_per_token == 80 * 1 * 256 * 2  # 8 KV heads / TP 8
    r16 = layer_pages(load_model("llama-3.1-8b"), "bfloat16", VllmSettings(tensor_parallel_size=16))
    assert r16[0].bytes_per_token == 1 * 256 * 2  # fewer KV heads than GPUs: one replicated head


def test_does_not_start_reports_largest_len_and_utilization():
    spec = load_model("llama-3.1-8b")
    r = startup(spec, "bfloat16", None, 25_386_352_640, VllmSettings(max_model_len=131072))
    assert not r.starts and "larger than the maximum number of tokens" in r.reason
    assert 0 < r.max_model_len_that_starts < 131072
    ok = startup(spec, "bfloat16", None, 25_386_352_640, VllmSettings(max_model_len=r.max_model_len_that_starts))
    assert ok.starts
    r2 = startup(spec, "bfloat16", None, H100, VllmSettings(gpu_memory_utilization=0.2, max_model_len=8192))
    assert not r2.starts and r2.utilization_needed and r2.utilization_needed > 0.2
    assert startup(spec, "bfloat16", None, H100, VllmSettings(gpu_memory_utilization=r2.utilization_needed,
                                                                 max_model_len=8192)).starts


def test_qwen3_coder_480b_kv_needed_matches_vllm_error():
    # reference rows v28/v29: vLLM says 62.00 GiB KV cache is needed for max seq len 262144 (62 layers,
    # 8 KV heads x 128, bf16): cdiv(262144, 16) blocks x page x 62 layers
    spec = load_model("qwen3-30b-a3b")
    from dataclasses import replace

    layer = replace(spec.layers[0], attention=replace(spec.layers[0].attention, num_kv_heads=8, head_dim=128, v_head_dim=128))
    big = replace(spec, layers=(layer,) * 62, max_position_embeddings=262144)
    layout = kv_layout(layer_pages(big, "bfloat16", VllmSettings()))
    assert round(layout.bytes_per_request(262144, 8192) / 2**30, 2) == 62.00


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "vramcal", *argv], capture_output=True, text=True)


@pytest.mark.parametrize("argv", [
    ["estimate", "llama-3.1-8b", "--framework", "vllm", "--gpu", "H100", "--gpu-memory-utilization", "1.2"],
    ["estimate", "llama-3.1-8b", "--framework", "vllm", "--gpu", "H100", "--gpu-memory-utilization", "0"],
    ["estimate", "llama-3.1-8b", "--framework", "vllm", "--gpu", "H100", "--tensor-parallel-size", "3"],
    ["estimate", "llama-3.1-8b", "--framework", "vllm", "--gpu", "H9000"],
    ["estimate", "llama-3.1-8b", "--framework", "vllm"],
    ["estimate", "llama-3.1-8b", "--gpu-memory-utilization", "0.5"],
])
def test_bad_settings_one_line_exit_2(argv):
    p = _run(*argv)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_cli_json_has_vllm_object():
    import json

    p = _run("estimate", "llama-3.1-8b", "--framework", "vllm", "--gpu", "H100", "--max-model-len", "8192", "--json")
    assert p.returncode == 0, p.stderr
    v = json.loads(p.stdout)["vllm"]
    for k in ("weights_bytes", "activation_peak_bytes", "non_torch_bytes", "cuda_graph_bytes", "kv_cache_bytes",
              "kv_bytes_per_token", "kv_cache_tokens", "num_gpu_blocks", "max_concurrency", "starts"):
        assert k in v
    assert v["kv_bytes_per_token"] == 131072 and v["starts"] is True


def test_estimator_imports_no_torch():
    p = subprocess.run([sys.executable, "-c", "import sys, estimator.vllm, estimator.vllm_cli; "
                        "assert 'torch' not in sys.modules"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
