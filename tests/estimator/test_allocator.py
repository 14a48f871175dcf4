"""The caching-allocator model (estimator/allocator.py) and the replayed program (estimator/replay/).

Rules cited from c10/cuda/CUDACachingAllocator.cpp (torch 2.x, default PYTORCH_CUDA_ALLOC_CONF); golden
peaks from the reference H100 measurements (results/reference/h100-transformers-5.17.jsonl).
"""

import json
import os
from pathlib import Path

import pytest

from estimator.allocator import _ADDRESS, _SHIFT, CachingAllocator, round_size, segment_size

MIB = 2**20
TIB = 2**40
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
    from estimator.replay import simulate
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
    from estimator.replay import simulate
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
    from estimator.replay import simulate
    from estimator.terms import Workload

    spec = load_model("mixtral-8x7b")
    m = spec.layers[0].mlp
    one = simulate(spec, Workload(context=64, batch=8, new_tokens=2))["sim_allocated_bytes"]
    gathered = 8 * m.top_k * 3 * m.intermediate_size * spec.hidden_size * 2
    assert one >= gathered


# Requests of the llama-3.1-8b replay at batch 262145 with a 16384-token context (``max-batch --gpu H100
# --context 16384 --new-tokens 4096`` tries it): 12-84 TiB segments, which once overlapped the next ones.
HUGE = (13_194_189_864_960, 26_388_379_729_920, 52_776_759_459_840, 92_359_329_054_720)


def _random_program(seed: int, ops: int = 400, huge: bool = False) -> tuple[list, int]:
    """Requests and frees over slots, sizes from the small pool, the 20 MiB segments and the large ones;
    ``huge`` adds requests of terabytes: around multiples of the allocator's 16 TiB address gap and the
    sizes of ``HUGE``, some of them freed and reused in pieces."""
    import random

    rng = random.Random(seed)
    program, live, slots = [], [], 0
    for _ in range(ops):
        if live and rng.random() < 0.45:
            program.append((live.pop(rng.randrange(len(live))), 0))
        else:
            size = rng.choice([rng.randrange(1, 2 * MIB), rng.randrange(MIB, 30 * MIB), rng.randrange(10 * MIB, 300 * MIB)])
            if huge and rng.random() < 0.4:
                size = rng.choice([
                    rng.choice(HUGE), rng.choice(HUGE) // rng.choice([2, 3, 4, 7]),
                    rng.randrange(1, 7) * 16 * TIB + rng.choice([-MIB - 512, -512, 0, 512, MIB, 3 * MIB]),
                    rng.randrange(TIB, 100 * TIB),
                ])
            program.append((slots, size))
            live.append(slots)
            slots += 1
    return program, slots


def _stats(a: CachingAllocator) -> tuple:
    return (a.allocated, a.reserved, a.peak_allocated, a.peak_reserved, a.segments, a._next_ptr,
            tuple(a._pools[False]), tuple(a._pools[True]))


def _check_blocks(a: CachingAllocator, live) -> None:
    """The allocator's indices agree with its blocks (no ``empty_cache``, no ``restore``): every pool key
    names a free block of that size and pool in ``_free`` and nothing else is there; the segments, walked
    from their first block, are contiguous, doubly linked, hold every free and ``live`` block once, have
    no two free neighbours (merged), add up to ``reserved`` and ``segments``, and do not overlap."""
    held = [b for b in live if b is not None]
    for small, pool in a._pools.items():
        assert pool == sorted(set(pool))
        for key in pool:
            block = a._free[key & _ADDRESS]
            assert block.free and block.small == small
            assert (block.size, block.ptr) == (key >> _SHIFT, key & _ADDRESS)
    assert len(a._free) == sum(len(pool) for pool in a._pools.values())
    assert all(ptr == b.ptr for ptr, b in a._free.items())
    assert not any(b.free for b in held) and a.allocated == sum(b.size for b in held)
    blocks = {id(b): b for b in [*a._free.values(), *held]}
    assert len(blocks) == len(a._free) + len(held)
    seen, spans = set(), []
    for head in blocks.values():
        if head.prev is not None:
            continue
        b, end = head, head.ptr
        while b is not None:
            assert id(b) in blocks and id(b) not in seen and b.ptr == end and b.small == head.small
            seen.add(id(b))
            end += b.size
            if b.next is not None:
                assert b.next.prev is b and not (b.free and b.next.free)
            b = b.next
        spans.append((head.ptr, end))
    assert len(seen) == len(blocks)
    assert len(spans) == a.segments and sum(e - s for s, e in spans) == a.reserved
    spans.sort()
    assert all(end < start for (_, end), (start, _) in zip(spans, spans[1:]))


def _replay(program: list, slots: int, check: bool = False) -> tuple[CachingAllocator, list]:
    """``program`` through ``malloc``/``free``; ``check``: ``_check_blocks`` after every request."""
    a = CachingAllocator()
    blocks = [None] * slots
    for slot, size in program:
        if size:
            blocks[slot] = a.malloc(size)
        else:
            a.free(blocks[slot])
            blocks[slot] = None
        if check:
            _check_blocks(a, blocks)
    return a, blocks


@pytest.mark.parametrize("huge", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_the_inlined_replay_loop_is_malloc_and_free(seed, huge):
    """``run`` (the replay's hot loop, malloc and free inlined) ends in the same state as the methods, and
    the blocks of both stay consistent with the indices, terabyte segments included."""
    program, slots = _random_program(seed, huge=huge)
    one, blocks = _replay(program, slots)
    other = CachingAllocator()
    loc = [None] * slots
    assert other.run([(s, round_size(z) if z else 0) for s, z in program], loc) == len(program)
    assert _stats(one) == _stats(other)
    freed = {s for s, z in program if not z}
    _check_blocks(one, blocks)
    _check_blocks(other, [b for s, b in enumerate(loc) if s not in freed])


@pytest.mark.parametrize("seed", range(6))
def test_blocks_stay_consistent_after_every_request(seed):
    program, slots = _random_program(seed, ops=250, huge=True)
    _replay(program, slots, check=True)


def test_a_segment_larger_than_the_address_gap_does_not_overlap_the_next():
    """Regression: a new segment started 16 TiB after the previous one's start, whatever its size. A 32 TiB
    segment's split tail then had the address of the next segment's first block, both free: one ``_free``
    entry for two blocks, a request served from the wrong one, then ``KeyError`` in ``free``'s merge."""
    a = CachingAllocator()
    x = a.malloc(32 * TIB)
    y = a.malloc(100 * MIB)  # a second segment, wholly allocated
    a.free(y)
    a.free(x)
    half = a.malloc(16 * TIB)  # best fit: x's segment, split; its free tail at x + 16 TiB
    again = a.malloc(100 * MIB)  # y's segment again, not a piece of x's tail
    assert (again.ptr, again.size) == (y.ptr, 100 * MIB)
    assert a.segments == 2 and a.reserved == 32 * TIB + 100 * MIB
    _check_blocks(a, [half, again])
    a.free(half)
    a.free(again)
    assert a.allocated == 0
    _check_blocks(a, [])
    a.empty_cache()
    assert a.reserved == 0 and a.segments == 0


def test_run_stops_at_the_callers_ops():
    a = CachingAllocator()
    loc = [None] * 2
    ops = [(0, 20 * MIB), (-1, "loop"), (1, 30 * MIB), (0, 0)]
    assert a.run(ops, loc) == 1 and a.allocated == 20 * MIB
    assert a.run(ops, loc, 2) == 4 and a.allocated == 30 * MIB


def test_run_sizes_a_decode_steps_ops_at_its_past():
    """``(slot, (a, b))`` is a request of ``round_size(a + b * x)`` at ``run``'s ``x`` (sized in the loop)."""
    a, b = CachingAllocator(), CachingAllocator()
    ops = [(0, (3 * MIB + 1, 4096)), (1, (0, 100_000)), (0, 0), (2, 20 * MIB)]
    assert a.run(ops, [None] * 3, 0, 1000) == 4
    blocks = [b.malloc(3 * MIB + 1 + 4096 * 1000), b.malloc(100_000 * 1000)]
    b.free(blocks[0])
    b.malloc(20 * MIB)
    assert _stats(a) == _stats(b)


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
    from estimator.replay.engine import Sym as _Sym, valid_range as _valid_range

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


KV_PER_TOKEN = 32 * 8 * 128 * 2 * 2  # llama-3.1-8b: layers x KV heads x head dim x (K, V) x bf16 bytes


def test_cli_estimate_of_a_quarter_million_sequences_answers():
    """Regression (reported with ``KeyError`` in the allocator): ``vramcal estimate llama-3.1-8b --batch
    262145``, whose tensors reach tens of TiB, the size at which segments overlapped. It answers at least
    the KV cache and the 15 GiB of weights."""
    import subprocess
    import sys

    args = ["estimate", "llama-3.1-8b", "--batch", "262145", "--json"]
    r = subprocess.run([sys.executable, "-m", "vramcal", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["inputs"]["batch"] == 262145 and out["inputs"]["context"] == 4096
    assert out["kv_cache_bytes"] >= 262145 * 4096 * KV_PER_TOKEN
    assert out["total_bytes"] > out["kv_cache_bytes"] + out["weights_bytes"]


@pytest.mark.slow
def test_estimate_max_batch_tries_on_the_way_answers():
    """Regression: ``vramcal max-batch llama-3.1-8b --gpu H100 --context 16384 --new-tokens 4096`` died with
    ``KeyError`` in its second try, the estimate at batch 262145 (segments of 12-84 TiB). 15-40 s."""
    from estimator import Workload, estimate, load_model

    batch, context = 262145, 16384
    e = estimate(load_model("llama-3.1-8b"), Workload(context=context, batch=batch, new_tokens=4096))
    assert e.kv_cache_bytes >= batch * context * KV_PER_TOKEN
    assert e.total_bytes > e.kv_cache_bytes + e.weights_bytes
    assert e.peak_reserved_bytes >= e.peak_allocated_bytes > e.kv_cache_bytes


def _accelerated() -> bool:
    from estimator.replay import accelerated

    return accelerated()


@pytest.mark.slow
@pytest.mark.skipif(not (_accelerated() or os.environ.get("VRAMCAL_SLOW_MAX_BATCH")),
                    reason="on the Python replay the whole search takes minutes; set VRAMCAL_SLOW_MAX_BATCH=1")
def test_max_batch_at_16k_context_and_4k_new_tokens_answers():
    """The whole ``max-batch`` search of the regression above: a galloping search up from batch 1, a
    bisection, then the window below the answer, about 25 estimates (1-2 s on the C allocator, minutes on
    the Python one)."""
    from estimator import Workload, load_model, max_batch

    result = max_batch(load_model("llama-3.1-8b"), Workload(context=16384, new_tokens=4096), "H100")
    assert isinstance(result["max_batch"], int) and 1 <= result["max_batch"] < 262145
