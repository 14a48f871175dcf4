"""The caching-allocator model (estimator/allocator.py) and the replayed program (estimator/program.py).

Rules cited from c10/cuda/CUDACachingAllocator.cpp (torch 2.x, default PYTORCH_CUDA_ALLOC_CONF); golden
peaks from the reference H100 measurements (results/reference/h100-transformers-5.17.jsonl).
"""

import json
from pathlib import Path

import pytest

from estimator.allocator import CachingAllocator, round_size, segment_size

MIB = 2**20
REFERENCE = Path(__file__).resolve().parents[2] / "results" / "reference" / "h100-transformers-5.17.jsonl"


def test_sizes_round_like_the_cuda_allocator():
    assert round_size(1) == 512 and round_size(513) == 1024
    assert segment_size(512) == 2 * MIB  # small pool: 2 MiB segments
    assert segment_size(3 * MIB) == 20 * MIB  # 1-10 MiB: kLargeBuffer
    assert segment_size(10 * MIB + 1) == 12 * MIB  # >= 10 MiB: rounded up to 2 MiB


def test_best_fit_split_and_merge():
    a = CachingAllocator()
    x = a.malloc(100 * MIB)
    y = a.malloc(100 * MIB)
    assert a.reserved == 200 * MIB and a.segments == 2
    a.free(x)
    small = a.malloc(30 * MIB)  # reuses x's segment, split: 70 MiB stay free there
    assert a.reserved == 200 * MIB and a.allocated == 130 * MIB
    big = a.malloc(80 * MIB)  # no free block of 80 MiB: a new segment, although 70 MiB are free
    assert a.reserved == 280 * MIB
    a.free(small)
    again = a.malloc(100 * MIB)  # 30 + 70 merged back into one 100 MiB block
    assert a.reserved == 280 * MIB
    a.free(again), a.free(y), a.free(big)
    a.empty_cache()
    assert a.reserved == 0 and a.peak_reserved == 280 * MIB


def test_large_blocks_are_not_split_for_a_small_remainder():
    a = CachingAllocator()
    x = a.malloc(50 * MIB)
    a.free(x)
    y = a.malloc(50 * MIB - 600 * 1024)  # remainder 600 KiB <= 1 MiB: the whole block is handed out
    assert a.allocated == 50 * MIB
    a.free(y)


def _reference(model, workload, batch, prompt, dtype="bfloat16", attn="sdpa"):
    for line in REFERENCE.read_text().splitlines():
        r = json.loads(line)
        if (r["model"], r["workload"], r["batch_size"], r["prompt_tokens"], r["dtype"],
                r["attn_implementation"]) == (model, workload, batch, prompt, dtype, attn):
            return r
    raise KeyError(model)


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference data not imported")
@pytest.mark.parametrize("case", [
    ("llama-3.1-8b", "generate", 16, 4080, "bfloat16", "sdpa"),
    ("llama-3.2-1b", "generate", 4, 4080, "bfloat16", "eager"),
    ("llama-3.2-1b", "generate", 4, 4080, "float32", "sdpa"),  # sdpa's math kernel at fp32 GQA
    ("phi-3-mini", "generate", 4, 16368, "bfloat16", "sdpa"),
    ("qwen2.5-0.5b", "forward", 2, 8192, "bfloat16", "sdpa"),
])
def test_replay_reproduces_measured_allocated_and_reserved(case):
    """Golden: the H100 reference peaks above the weights, within 1% of the NVML peak, after the ~40 MiB
    of cuBLAS workspace and small tensors the replay leaves out."""
    from estimator.families import spec_from_config
    from estimator.program import simulate
    from estimator.terms import Workload

    r = _reference(*case)
    sim = simulate(spec_from_config(r["config"], r["model"]), Workload.from_record(r))
    small = 40 * MIB
    allocated = r["peak_allocated_bytes"] - r["weights_bytes"]
    reserved = r["peak_reserved_bytes"] - r["weights_bytes"]
    assert abs(sim["sim_allocated_bytes"] + small - allocated) < 0.01 * r["peak_nvml_bytes"]
    assert abs(sim["sim_reserved_bytes"] + small - reserved) < 0.01 * r["peak_nvml_bytes"]


def test_replay_follows_the_attention_path():
    from estimator import load_model
    from estimator.program import simulate
    from estimator.terms import Workload

    spec = load_model("llama-3.2-1b")
    sdpa = simulate(spec, Workload(context=4096, batch=1))["sim_allocated_bytes"]
    eager = simulate(spec, Workload(context=4096, batch=1, attn="eager"))["sim_allocated_bytes"]
    fp32 = simulate(spec, Workload(context=4096, batch=1, dtype="float32"))["sim_allocated_bytes"]
    scores = 32 * 4080 * 4080  # heads x q x k
    assert eager > sdpa + 4 * scores * 2  # eager keeps several bf16/fp32 copies of the scores
    assert fp32 > 2.25 * scores * 4  # math kernel: scores, softmax and a boolean mask


def test_moe_decode_gathers_expert_weights():
    """generate switches MoE experts to batched_mm for decoding on a GPU: each routed token's expert
    weights are gathered, (batch x top_k) x (2I x H + H x I) bytes at once."""
    from estimator import load_model
    from estimator.program import simulate
    from estimator.terms import Workload

    spec = load_model("mixtral-8x7b")
    m = spec.layers[0].mlp
    one = simulate(spec, Workload(context=64, batch=8, new_tokens=2))["sim_allocated_bytes"]
    gathered = 8 * m.top_k * 3 * m.intermediate_size * spec.hidden_size * 2
    assert one >= gathered
