"""PYTORCH_CUDA_ALLOC_CONF: parsing (estimator/alloc_conf.py) and the allocator models under each setting
(estimator/allocator.py ``ConfiguredAllocator``, estimator/expandable.py ``ExpandableAllocator``).

The expected bytes of the small programs are worked by hand from c10/cuda/CUDACachingAllocator.cpp (the
functions each test names) and c10/core/AllocatorConfig.cpp (``parseArgs``, ``roundup_power2_divisions``).
"""

import json
import random
import subprocess
import sys

import pytest

from estimator.alloc_conf import AllocConf, parse_alloc_conf
from estimator.allocator import CachingAllocator, allocator_class
from estimator.catalogue import load_model
from estimator.errors import UserError
from estimator.expandable import PAGE, ExpandableAllocator
from estimator.replay import simulate
from estimator.terms import Workload

MIB = 2**20
ES = "expandable_segments:True"


def new(text: str):
    return allocator_class(parse_alloc_conf(text))()


# ---- parsing -------------------------------------------------------------------------------------------
def test_parse_canonical_and_defaults():
    assert parse_alloc_conf("").is_default and parse_alloc_conf("").text == ""
    assert parse_alloc_conf("expandable_segments:False").is_default  # the default, said explicitly
    c = parse_alloc_conf(" max_split_size_mb:512 , expandable_segments:True")
    assert c.expandable_segments and c.max_split_size_bytes == 512 * MIB
    assert c.text == "expandable_segments:True,max_split_size_mb:512"  # spaces dropped, one order
    assert parse_alloc_conf("release_lock_on_cudamalloc:True").is_default  # no effect on memory
    assert allocator_class(parse_alloc_conf("expandable_segments:False")) is CachingAllocator


def test_roundup_divisions_list_fills_like_torch():
    # parseRoundUpPower2Divisions: the first entry also fills the intervals below it; ">" refills from the
    # last named interval (that one included) to the end, so 1024 MB gets 8, not 4
    d = parse_alloc_conf("roundup_power2_divisions:[256:1,512:2,1024:4,>:8]").roundup_power2_divisions
    assert d == (1,) * 9 + (2,) + (8,) * 6
    assert parse_alloc_conf("roundup_power2_divisions:4").roundup_power2_divisions == (4,) * 16


@pytest.mark.parametrize("text, key", [
    ("expandable_segments:true", "expandable_segments"),
    ("max_split_size_mb:19", "max_split_size_mb"),  # min_allowed_split_size_mb = kLargeBuffer / kMB
    ("max_split_size_mb:abc", "max_split_size_mb"),
    ("garbage_collection_threshold:1.0", "garbage_collection_threshold"),  # (0, 1) exclusive
    ("roundup_power2_divisions:3", "roundup_power2_divisions"),  # a power of two
    ("roundup_power2_divisions:[300:2]", "roundup_power2_divisions"),  # intervals are powers of two
    ("max_split_size_mb", "max_split_size_mb"),
    ("backend:cudaMallocAsync", "backend"),  # the driver's pool: not modelled, refused
    ("expandable_segmnts:True", "expandable_segmnts"),
])
def test_bad_settings_name_the_key(text, key):
    with pytest.raises(UserError) as e:
        parse_alloc_conf(text)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_round_size_power2_divisions():
    c = parse_alloc_conf("roundup_power2_divisions:4")
    assert c.round_size(1200) == 1536  # size <= 512 x divisions: 512-byte blocks
    assert c.round_size(5 * MIB + 1) == 6 * MIB  # [4, 8) MiB in 4 divisions: steps of 1 MiB
    assert c.round_size(8 * MIB) == 8 * MIB  # a power of two stays
    assert c.round_size(1025 * MIB) == 1280 * MIB  # [1, 2) GiB: steps of 256 MiB
    # applied to a size the program rounded to 512 bytes, the same bytes (steps are powers of two >= 512)
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randrange(1, 1 << 34)
        assert c.round_size(-(-n // 512) * 512) == c.round_size(n)


# ---- max_split_size_mb: get_free_block, should_split ----------------------------------------------------
def test_max_split_refuses_oversize_blocks_and_does_not_split_them():
    a = new("max_split_size_mb:100")
    x = a.malloc(200 * MIB)
    a.free(x)
    small = a.malloc(50 * MIB)  # 50 < 100 and the free block is >= 100: refused, a new 50 MiB segment
    assert a.reserved == 250 * MIB and a.segments == 2
    big = a.malloc(190 * MIB)  # >= 100 and 200 < 190 + 20: the 200 MiB block, whole (not split)
    assert a.reserved == 250 * MIB and a.allocated == 250 * MIB
    a.free(big)
    a.free(small)
    again = a.malloc(150 * MIB)  # best fit is 200: 200 >= 150 + max_non_split_rounding (20): refused
    assert a.reserved == 400 * MIB
    a.free(again)
    plain = new("")  # the default allocator splits the 200 MiB block instead
    p = plain.malloc(200 * MIB)
    plain.free(p)
    plain.malloc(50 * MIB)
    assert plain.reserved == 200 * MIB


def test_max_split_needed_reserve_excludes_releasable_segments():
    """A request just below max_split_size never reuses a segment at or above it: the reserve with unlimited
    memory grows by a segment per request, the reserve a run needs (release_cached_blocks frees the wholly
    free ones when cudaMalloc fails) does not."""
    a = new("max_split_size_mb:512")
    a.reset_peak()
    for _ in range(5):
        a.free(a.malloc(511 * MIB + 1))  # rounded to a 512 MiB segment: oversize
    assert a.peak_reserved == 5 * 512 * MIB
    assert a.peak_needed == 512 * MIB


# ---- expandable segments --------------------------------------------------------------------------------
def _check(a: ExpandableAllocator) -> None:
    """Invariants of the segment lists: ordered, contiguous, free neighbours merged, counters agree."""
    allocated = mapped = 0
    for small in (True, False):
        head = b = a._head(small)
        while b is not None:
            if b.next is not None:
                assert b.next.prev is b and b.next.ptr == b.ptr + b.size
                assert not (b.free and b.next.free and b.mapped == b.next.mapped), "unmerged free neighbours"
            if not b.mapped:
                assert (b.ptr - head.ptr) % PAGE[small] == 0 and a._unmapped[small][b.ptr] is b
            else:
                mapped += b.size
                if b.free:
                    assert a._free[b.ptr] is b
                else:
                    allocated += b.size
            b = b.next
    assert (allocated, mapped) == (a.allocated, a.reserved)


def test_expandable_maps_20_mib_pages_and_grows_at_the_end():
    a = new(ES)
    x = a.malloc(30 * MIB)  # map_block: 2 pages of 20 MiB
    assert (a.reserved, a.allocated) == (40 * MIB, 30 * MIB)
    a.malloc(5 * MIB)  # in the mapped tail (10 MiB free)
    assert a.reserved == 40 * MIB
    a.malloc(10 * MIB)  # tail 5 MiB + one more page, merged into one block (try_allocate_expandable_block)
    assert a.reserved == 60 * MIB
    a.free(x)
    a.malloc(25 * MIB)  # the freed 30 MiB block, split (should_split: >= 512 bytes left)
    assert (a.reserved, a.allocated) == (60 * MIB, 40 * MIB)
    _check(a)


def test_expandable_best_fit_passes_over_the_growing_end():
    """get_free_block: the free block before unmapped space counts as its size plus that space, so a larger
    block elsewhere is taken first."""
    a = new(ES)
    x = a.malloc(100 * MIB)  # 5 pages
    a.malloc(50 * MIB)  # 3 pages: mapped to 160 MiB, 10 MiB free at the end
    a.free(x)
    y = a.malloc(8 * MIB)  # fits the 10 MiB end, but the 100 MiB block is taken
    assert y.ptr == x.ptr and a.reserved == 160 * MIB
    _check(a)


def test_expandable_splits_small_remainders_and_small_pool_pages():
    a = new(ES)
    x = a.malloc(60 * MIB)
    a.free(x)
    a.malloc(60 * MIB - 600 * 1024)  # 600 KiB left: the default hands out the whole block, this splits
    assert a.allocated == 60 * MIB - 600 * 1024
    s = a.malloc(700 * 1024)  # small pool: its own segment, 2 MiB pages
    assert a.reserved == 60 * MIB + 2 * MIB and s.small
    _check(a)


def test_expandable_empty_cache_unmaps_whole_free_pages_and_remaps_the_hole_first():
    a = new(ES)
    x = a.malloc(100 * MIB)
    keep = a.malloc(30 * MIB)  # pages: 0-100 x, 100-130 keep, 140 mapped
    a.free(x)
    a.empty_cache()  # the 5 whole pages of x go back; the 10 MiB after keep stay (a partial page)
    assert a.reserved == 40 * MIB
    _check(a)
    y = a.malloc(50 * MIB)  # find_expandable_block: the lowest unmapped range with room, the hole
    assert y.ptr == x.ptr and a.reserved == 100 * MIB
    assert keep.ptr == x.ptr + 100 * MIB
    _check(a)


@pytest.mark.parametrize("conf", [ES, ES + ",max_split_size_mb:64", "max_split_size_mb:64", "roundup_power2_divisions:2"])
@pytest.mark.parametrize("seed", range(4))
def test_random_programs_keep_the_segments_consistent(conf, seed):
    rng = random.Random(seed)
    a = new(conf)
    live, ops = [], []  # ops: the same program for run(), slot per malloc
    for _ in range(400):
        if live and rng.random() < 0.45:
            slot, block = live.pop(rng.randrange(len(live)))
            a.free(block)
            ops.append((slot, 0))
        else:
            n = -(-rng.choice([rng.randrange(1, MIB), rng.randrange(MIB, 40 * MIB),
                               rng.randrange(40 * MIB, 300 * MIB)]) // 512) * 512
            live.append((len(ops), a.malloc(n)))
            ops.append((len(ops), n))
        if isinstance(a, ExpandableAllocator):
            _check(a)
    assert a.allocated == sum(b.size for _, b in live)
    # run() is malloc and free: the same program through it ends in the same state
    b = new(conf)
    loc = [None] * len(ops)
    assert b.run(ops, loc) == len(ops)
    held = [blk for _, blk in live]
    assert b.state([loc[s] for s, _ in live]) == a.state(held)
    assert (b.peak_allocated, b.peak_reserved) == (a.peak_allocated, a.peak_reserved)
    if isinstance(a, ExpandableAllocator):
        a.empty_cache()
        _check(a)
        assert a.reserved <= b.reserved


def test_expandable_snapshot_restores_the_same_state():
    a = new(ES)
    for n in (300 * MIB, 7 * MIB, 500 * 1024, 33 * MIB):
        a.malloc(n)
    b = type(a).restore(a.snapshot())
    assert b.state([]) == a.state([]) and (b.allocated, b.reserved) == (a.allocated, a.reserved)
    for n in (13 * MIB, 400 * MIB):
        assert (a.malloc(n).ptr, a.reserved) == (b.malloc(n).ptr, b.reserved)


# ---- replays with and without the setting ---------------------------------------------------------------
def _sim(conf, accelerate=None, **kw):
    w = Workload(context=kw.pop("context", 8192), batch=kw.pop("batch", 4), new_tokens=16, alloc_conf=conf, **kw)
    return simulate(load_model("llama-3.1-8b"), w, accelerate=accelerate)


def test_replay_with_expandable_segments_keeps_a_small_reserve():
    default, es = _sim(""), _sim(ES)
    reserve = lambda r: r["sim_reserved_bytes"] - r["sim_allocated_bytes"]  # noqa: E731
    # the allocated peak is the same program's (within the default's unsplit <= 1 MiB tails)
    assert abs(es["sim_allocated_bytes"] - default["sim_allocated_bytes"]) < 64 * MIB
    assert reserve(es) < reserve(default) / 3 and reserve(es) < 1024 * MIB
    assert _sim(ES, accelerate=True) == _sim(ES, accelerate=False)  # no C path: the same Python answer
    assert _sim("expandable_segments:False", accelerate=True) == _sim("", accelerate=True)


def test_replay_under_max_split_reports_the_needed_reserve():
    r = _sim("max_split_size_mb:512", batch=8)
    assert r["sim_needed_bytes"] < r["sim_reserved_bytes"]  # hidden states of 511 MiB: oversize growth
    assert r["sim_needed_bytes"] < 2 * (r["sim_allocated_bytes"])
    assert "sim_needed_bytes" not in _sim(ES)


def test_estimate_widens_and_says_so_for_an_uncalibrated_setting():
    from estimator.coefficients import select_coefficients
    from estimator.estimate import ALLOC_CONF_ABS_BYTES, ALLOC_CONF_REL, bounds, estimate

    spec, c = load_model("llama-3.1-8b"), select_coefficients("transformers")
    e = estimate(spec, Workload(context=4096, alloc_conf=ES), c)
    assert any("uncalibrated" in n and ES in n for n in e.notes)
    iv = c.interval
    assert e.high_bytes == round(e.total_bytes * (1 + iv["high"]) * (1 + ALLOC_CONF_REL) + ALLOC_CONF_ABS_BYTES)
    assert e.as_dict()["inputs"]["alloc_conf"] == ES
    # coefficients fitted under the setting: no widening, no note
    from dataclasses import replace

    fitted = replace(c, alloc_conf=ES)
    e2 = estimate(spec, Workload(context=4096, alloc_conf=ES), fitted)
    assert not any("uncalibrated" in n for n in e2.notes)
    assert (e2.low_bytes, e2.high_bytes) == bounds(e2.total_bytes, fitted, None, ES)
    assert e2.high_bytes == round(e2.total_bytes * (1 + iv["high"]))


def vramcal(*args, env=None):
    import os

    full = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "vramcal", *args], capture_output=True, text=True, timeout=60, env=full)


def test_cli_alloc_conf_option_environment_and_bad_input():
    r = vramcal("estimate", "qwen2.5-0.5b", "--alloc-conf", ES, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["inputs"]["alloc_conf"] == ES
    r = vramcal("estimate", "qwen2.5-0.5b", env={"PYTORCH_CUDA_ALLOC_CONF": ES})
    assert r.returncode == 0 and f"allocator {ES}" in r.stdout
    r = vramcal("max-batch", "qwen2.5-0.5b", "--gpu", "L4", "--context", "1024", "--alloc-conf", ES)
    assert r.returncode == 0 and f"allocator {ES}]" in r.stdout, r.stderr
    r = vramcal("max-batch", "qwen2.5-0.5b", "--gpu", "L4", "--context", "1024", "--alloc-conf", "max_split_size_mb:8")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "max_split_size_mb" in r.stderr
    r = vramcal("max-context", "qwen2.5-0.5b", "--gpu", "L4", env={"PYTORCH_ALLOC_CONF": "expandable_segments:1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "from the environment" in r.stderr
