"""The optional C allocator (estimator/_replay.c) against the Python one (estimator/allocator.py), the
reference: random malloc/free programs end in identical states, op by op; a random grid of estimates
answers the same bytes on both paths; a size past 2**62 falls back to Python with the same answer.

Skipped when the extension is not built (``python setup.py build_ext --inplace``), failed instead when
``VRAMCAL_REQUIRE_ACCELERATOR=1`` (CI builds it).
"""

from __future__ import annotations

import os
import random

import pytest

from estimator.replay import runner as program
from estimator.allocator import CachingAllocator, round_size


def _sibling(name: str):
    """A module of this folder (the tests run with ``--import-mode=importlib``: no package to import from)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"_vramcal_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_allocator_tests = _sibling("test_allocator")
MIB, _random_program, _stats = _allocator_tests.MIB, _allocator_tests._random_program, _allocator_tests._stats

if program._CAllocator is None:
    if os.environ.get("VRAMCAL_REQUIRE_ACCELERATOR"):
        raise RuntimeError("the C accelerator (estimator/_replay.c) is not built")
    pytest.skip("the C accelerator is not built", allow_module_level=True)

Allocator = program._CAllocator


def _c_stats(a) -> tuple:
    large, small = a.pools()
    return (a.allocated, a.reserved, a.peak_allocated, a.peak_reserved, a.segments, a._next_ptr, large, small)


def _same_blocks(py_block, c, handle) -> bool:
    return (py_block.ptr, py_block.size, py_block.free, py_block.small) == c.block(handle)[:4]


@pytest.mark.parametrize("huge", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_random_programs_end_in_identical_states_op_by_op(seed, huge):
    """Thousands of requests and frees (terabyte segments with ``huge``): after every op the counters and
    both pools (keys ``size << 96 | address``) agree, and so does every live block."""
    program_ops, slots = _random_program(seed, ops=3000, huge=huge)
    py, c = CachingAllocator(), Allocator()
    pb, cb = [None] * slots, [None] * slots
    for n, (slot, size) in enumerate(program_ops):
        if size:
            pb[slot], cb[slot] = py.malloc(size), c.malloc(size)
        else:
            py.free(pb[slot])
            c.free(cb[slot])
            pb[slot] = cb[slot] = None
        if n % 97 == 0 or n == len(program_ops) - 1:
            assert _stats(py) == _c_stats(c), n
            assert py.state(pb) == c.state(cb)
            assert all(_same_blocks(p, c, h) for p, h in zip(pb, cb) if p is not None)


@pytest.mark.parametrize("seed", range(8))
def test_run_with_symbolic_sizes_matches_python(seed):
    """``run`` over ops with ``(a, b)`` sizes (``a + b * x`` rounded), frees and a caller's op, both paths."""
    rng = random.Random(seed)
    ops, live, slots = [], [], 0
    for _ in range(2000):
        if live and rng.random() < 0.45:
            ops.append((live.pop(rng.randrange(len(live))), 0))
        else:
            z = rng.choice([round_size(rng.randrange(1, 300 * MIB)), (rng.randrange(0, 20 * MIB), rng.randrange(1, 300_000))])
            ops.append((slots, z))
            live.append(slots)
            slots += 1
    ops.insert(1234, (-1, "caller"))
    x = rng.randrange(1, 5000)
    py, c = CachingAllocator(), Allocator()
    pl, cl = [None] * slots, [None] * slots
    assert py.run(ops, pl, 0, x) == c.run(ops, cl, 0, x) == 1234
    assert py.run(ops, pl, 1235, x) == c.run(ops, cl, 1235, x) == len(ops)
    assert _stats(py) == _c_stats(c)
    freed = {s for s, z in ops if s >= 0 and not z}  # a freed slot's block may be merged away: not state
    live = [s for s in range(slots) if s not in freed]
    assert py.state([pl[s] for s in live]) == c.state([cl[s] for s in live])


@pytest.mark.parametrize("seed", range(6))
def test_decode_loops_the_same_steps_as_python(seed):
    """``decode``, k steps of a program shaped like a decode step (carried blocks that grow with the past,
    made before the old ones are freed, then moved into the carried slots), both paths."""
    rng = random.Random(seed)
    carried, fresh = 6, 12
    ops, moves = [], []
    for c in range(carried):
        ops.append((carried + c, (rng.randrange(MIB, 40 * MIB), rng.randrange(1, 200_000))))
        if rng.random() < 0.5:
            t = 2 * carried + rng.randrange(fresh - carried)
            ops += [(t, round_size(rng.randrange(1, 60 * MIB))), (t, 0)]
        ops.append((c, 0))
        moves.append((-3, (c, carried + c)))
    ops.append((2 * carried + fresh - 1, 0))  # a free of a slot never filled: nothing
    n = 2 * carried + fresh
    keep = list(range(carried))
    results = []
    for alloc in (CachingAllocator(), Allocator()):
        loc = [None] * n
        last = alloc.decode(ops + moves, loc, keep, 100, 1)
        last2 = alloc.decode(ops + moves, loc, keep, 101, 300)
        large = tuple(alloc._pools[False]) if isinstance(alloc, CachingAllocator) else alloc.pools()[0]
        results.append((last, last2, alloc.allocated, alloc.reserved, alloc.peak_allocated, alloc.peak_reserved,
                        large, alloc.state(loc[:carried])))
    assert results[0] == results[1]


def test_restore_matches_the_python_restore():
    weights = [3 * MIB, 40 * MIB, 700 * 1024, 12 * MIB + 512, 25 * MIB]
    loaded = CachingAllocator()
    for nbytes in weights:
        loaded.malloc(nbytes)
    snap = loaded.snapshot()
    py, c = CachingAllocator.restore(snap), Allocator.restore(snap)
    program_ops, slots = _random_program(3, ops=1500)
    pb, cb = [None] * slots, [None] * slots
    for slot, size in program_ops:
        if size:
            pb[slot], cb[slot] = py.malloc(size), c.malloc(size)
        else:
            py.free(pb[slot]), c.free(cb[slot])
    assert _stats(py) == _c_stats(c)


def test_a_size_past_2_62_raises_overflow_for_the_python_path():
    c = Allocator()
    with pytest.raises(OverflowError):
        c.malloc(2**62 + 1)
    with pytest.raises(OverflowError):
        c.run([(0, (2**62, 1))], [None], 0, 4)
    assert c.malloc(2**62) is not None  # at the limit: still C
    assert c.malloc(0) is None and c.malloc(-5) is None


def test_an_estimate_past_2_62_bytes_falls_back_to_the_same_python_answer():
    from estimator import Workload, load_model

    spec = load_model("qwen2.5-0.5b")
    # eager attention scores of about 2**66 bytes (batch x heads x context**2 x 4); past the C path's 2**62
    w = Workload(workload="forward", context=2**30, batch=1, attn="eager")
    assert program.simulate(spec, w, accelerate=True) == program.simulate(spec, w, accelerate=False)


def _random_workloads(n: int, seed: int = 0):
    from estimator import list_models

    rng = random.Random(seed)
    models = list_models()
    for _ in range(n):
        kind = rng.choice(["generate", "generate", "forward"])
        new = rng.choice([1, 2, 16, 77, 300]) if kind == "generate" else 0
        context = rng.randrange(new + 1, new + 3000)
        kw = dict(workload=kind, context=context, batch=rng.choice([1, 2, 3, 8, 33]), new_tokens=new,
                  attn=rng.choice(["sdpa", "sdpa", "eager"]), dtype=rng.choice(["bfloat16", "bfloat16", "float32"]))
        if kind == "generate":
            kw["cache"] = rng.choice(["dynamic", "dynamic", "static"])
        yield rng.choice(models), kw


def test_a_random_grid_of_estimates_is_byte_identical_on_both_paths(monkeypatch):
    """``estimate(...).as_dict()`` and ``features`` on the C and the Python replay, 60 random workloads
    over the catalogue (models, contexts, batches, new tokens, caches, attention, dtypes)."""
    from estimator import Workload, estimate, features, load_model
    from estimator.errors import UserError

    specs: dict = {}
    wrong = []
    for model, kw in _random_workloads(60):
        spec = specs.get(model) or specs.setdefault(model, load_model(model))
        out = []
        for accelerate in (False, True):
            monkeypatch.setattr(program, "ACCELERATE", accelerate)
            try:
                w = Workload(**kw)
                out.append((features(spec, w), estimate(spec, w).as_dict()))
            except UserError as e:  # a context past a model's positions: the same refusal on both
                out.append(str(e))
        if out[0] != out[1]:
            wrong.append(f"{model} {kw}")
    assert not wrong, wrong[:5]


def test_the_switch_forces_the_python_path(monkeypatch):
    monkeypatch.setattr(program, "ACCELERATE", False)
    assert not program.accelerated()
    seen = []
    real = CachingAllocator.restore.__func__

    def spy(cls, snap):
        seen.append(cls)
        return real(cls, snap)

    monkeypatch.setattr(CachingAllocator, "restore", classmethod(spy))
    from estimator import Workload, load_model

    program.simulate(load_model("qwen2.5-0.5b"), Workload(context=200, new_tokens=4))
    assert seen == [CachingAllocator]
