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


def _random_program(seed: int, ops: int = 400) -> tuple[list, int]:
    """Requests and frees over slots, sizes from the small pool, the 20 MiB segments and the large ones."""
    import random

    rng = random.Random(seed)
    program, live, slots = [], [], 0
    for _ in range(ops):
        if live and rng.random() < 0.45:
            program.append((live.pop(rng.randrange(len(live))), 0))
        else:
            size = rng.choice([rng.randrange(1, 2 * MIB), rng.randrange(MIB, 30 * MIB), rng.randrange(10 * MIB, 300 * MIB)])
            program.append((slots, size))
            live.append(slots)
            slots += 1
    return program, slots


def _stats(a: CachingAllocator) -> tuple:
    return a.allocated, a.reserved, a.peak_allocated, a.peak_reserved, a.segments, tuple(a._pools[False])


@pytest.mark.parametrize("seed", range(20))
def test_the_inlined_replay_loop_is_malloc_and_free(seed):
    """``run`` (the replay's hot loop, malloc and free inlined) ends in the same state as the methods."""
    program, slots = _random_program(seed)
    one = CachingAllocator()
    blocks = [None] * slots
    for slot, size in program:
        if size:
            blocks[slot] = one.malloc(size)
        else:
            one.free(blocks[slot])
    other = CachingAllocator()
    assert other.run([(s, round_size(z) if z else 0) for s, z in program], [None] * slots) == len(program)
    assert _stats(one) == _stats(other)


def test_run_stops_at_the_callers_ops():
    a = CachingAllocator()
    loc = [None] * 2
    ops = [(0, 20 * MIB), (-1, "loop"), (1, 30 * MIB), (0, 0)]
    assert a.run(ops, loc) == 1 and a.allocated == 20 * MIB
    assert a.run(ops, loc, 2) == 4 and a.allocated == 30 * MIB


def test_restored_weights_behave_like_the_loaded_ones():
    """``snapshot``/``restore`` keep only the free tails of the weights' segments (their other blocks are
    never freed): a run continued from the restored state matches one continued from the original."""
    program, slots = _random_program(7)
    weights = [3 * MIB, 40 * MIB, 700 * 1024, 12 * MIB + 512, 25 * MIB]
    loaded = CachingAllocator()
    for nbytes in weights:
        loaded.malloc(nbytes)
    restored = CachingAllocator.restore(loaded.snapshot())
    loaded.reset_peak()
    for a in (loaded, restored):
        blocks = [None] * slots
        for slot, size in program:
            if size:
                blocks[slot] = a.malloc(size)
            else:
                a.free(blocks[slot])
    assert _stats(loaded) == _stats(restored)


def test_symbolic_sizes_hold_where_their_comparisons_do():
    """A decode step is recorded once with the past tokens as a symbol; its comparisons bound the pasts
    the recording serves (``_valid_range``), e.g. a mask that exists once the past reaches a window."""
    from estimator.program import _Sym, _valid_range

    conds: list = []
    past = _Sym(0, 1, 100, conds)
    kv = past + 1
    assert (kv >= 4096) is False  # the window is not full yet
    assert (kv * 2048 < MIB + 1) is True  # a tensor of 2 KiB per token stays under the tracked size
    lo, hi = _valid_range(conds, 100)
    assert hi == min(4094, (MIB + 1 - 1) // 2048 - 1) and lo == float("-inf")
    conds.clear()
    assert (min(past + 1, 4095) == 4095) is False
    assert _valid_range(conds, 100) == (float("-inf"), 4093)
