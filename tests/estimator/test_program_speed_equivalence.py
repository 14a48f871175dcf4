"""The optimized replay (estimator/replay/, estimator/allocator.py) against a frozen oracle.

``data/program_oracle.json`` holds ``sim_allocated_bytes``, ``sim_reserved_bytes`` and ``sim_peak_step`` for
every case of ``oracle_cases()``, computed by the plain replay (``estimator/replay/reference.py``: every
layer of every forward, every decode step, the Python allocator). The optimized replay must reproduce every
number exactly: the shortcuts are exact or not taken; so must the C allocator (``estimator/_replay.c``),
when it is built (``VRAMCAL_REQUIRE_ACCELERATOR=1``: fail, not skip, when it is not, as CI sets). The grid's
models are frozen here (``ORACLE_MODELS``), so adding a catalogue config changes nothing.

Regenerate (only when the modelled program itself changes, never to make this test pass):
``python scripts/regenerate_replay_oracle.py`` (a few minutes on one core).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from estimator import Workload, load_model
from estimator.terms import features

ORACLE = Path(__file__).resolve().parent / "data" / "program_oracle.json"
KEYS = ("sim_allocated_bytes", "sim_reserved_bytes", "sim_peak_step")
# The catalogue when the oracle was written; a model added to configs/models/ later is not in the grid.
ORACLE_MODELS = (
    "deepseek-v2-lite", "deepseek-v3", "gemma-2-27b", "gemma-2-2b", "gemma-2-9b", "gemma-3-1b", "gpt-oss-120b",
    "gpt-oss-20b", "gpt2", "gpt2-medium", "llama-3.1-405b", "llama-3.1-70b", "llama-3.1-8b", "llama-3.2-1b",
    "llama-3.2-3b", "mistral-7b", "mixtral-8x7b", "olmoe-1b-7b", "phi-3-mini", "qwen2.5-0.5b", "qwen2.5-1.5b",
    "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-3b", "qwen2.5-72b", "qwen2.5-7b", "qwen3-0.6b", "qwen3-1.7b",
    "qwen3-14b", "qwen3-30b-a3b", "qwen3-32b", "qwen3-4b", "qwen3-8b", "qwen3-next-80b-a3b",
)


def oracle_cases() -> list[tuple[str, dict]]:
    """(model, Workload keyword arguments): every catalogue model x workload x attention x dtype x cache
    at a few shapes (1, 16 and 300 new tokens), plus large batches, flash-attention-2, a static cache with
    room to spare and, for models with sliding windows, prompts past the window and generations that
    cross it."""
    cases = []
    for model in ORACLE_MODELS:
        spec = load_model(model)
        for attn in ("sdpa", "eager"):
            for dtype in ("bfloat16", "float32"):
                common = dict(attn=attn, dtype=dtype)
                for context, batch in ((300, 1), (1500, 3)):
                    cases.append((model, dict(workload="forward", context=context, batch=batch, **common)))
                for cache in ("dynamic", "static"):
                    for context, batch, new in ((200, 1, 1), (700, 2, 16), (1300, 1, 300)):
                        cases.append((model, dict(workload="generate", context=context, batch=batch,
                                                  new_tokens=new, cache=cache, **common)))
        cases += [
            (model, dict(workload="generate", context=8192, batch=4, new_tokens=16)),
            (model, dict(workload="generate", context=512, batch=64, new_tokens=16)),
            (model, dict(workload="generate", context=600, batch=2, new_tokens=40, attn="flash_attention_2")),
            (model, dict(workload="forward", context=1000, batch=2, attn="flash_attention_2")),
            (model, dict(workload="generate", context=700, batch=2, new_tokens=16, cache="static",
                         max_cache_len=1024)),
        ]
        windows = sorted({l.attention.window for l in spec.layers if l.attention.kind == "sliding"
                          and l.attention.window})
        for w in windows:
            crossing = max(w + 100, 400)  # the prompt ends before the window, the generation past it
            cases += [
                (model, dict(workload="generate", context=w + 300, batch=1, new_tokens=16)),
                (model, dict(workload="generate", context=crossing, batch=1, new_tokens=300)),
                (model, dict(workload="generate", context=crossing, batch=1, new_tokens=300, attn="eager")),
                (model, dict(workload="generate", context=crossing, batch=1, new_tokens=300, cache="static")),
                (model, dict(workload="forward", context=w + 300, batch=1)),
            ]
    return cases


def case_key(model: str, kwargs: dict) -> str:
    return model + " " + " ".join(f"{k}={kwargs[k]}" for k in sorted(kwargs))


def _sim(model: str, kwargs: dict, specs: dict) -> list[int]:
    spec = specs.get(model) or specs.setdefault(model, load_model(model))
    f = features(spec, Workload(**kwargs))
    return [f[k] for k in KEYS]


@pytest.fixture(scope="module")
def oracle() -> dict:
    return json.loads(ORACLE.read_text())


def test_oracle_covers_the_grid(oracle):
    assert set(oracle["cases"]) == {case_key(m, kw) for m, kw in oracle_cases()}


@pytest.mark.parametrize("accelerate", [False, True], ids=["python", "c"])
def test_optimized_replay_reproduces_the_oracle_exactly(oracle, accelerate, monkeypatch):
    """On both paths: the Python replay (the reference) and the C allocator (``estimator/_replay.c``)."""
    from estimator.replay import runner as program

    if accelerate and program._CAllocator is None:
        if os.environ.get("VRAMCAL_REQUIRE_ACCELERATOR"):
            pytest.fail("the C accelerator (estimator/_replay.c) is not built")
        pytest.skip("the C accelerator is not built (python setup.py build_ext --inplace)")
    monkeypatch.setattr(program, "ACCELERATE", accelerate)
    specs: dict = {}
    wrong = []
    for model, kwargs in oracle_cases():
        key = case_key(model, kwargs)
        got = _sim(model, kwargs, specs)
        if got != oracle["cases"][key]:
            wrong.append(f"{key}: {got} != {oracle['cases'][key]}")
    assert not wrong, f"{len(wrong)} cases differ, e.g.\n" + "\n".join(wrong[:10])


# One case per kind of piece the fast path shortcuts (sliding windows crossing, a static cache, the gated
# delta rule's chunk loop, MLA, MoE, the reduced decode layers of small dense models), run the plain way
# here too: the oracle's source, not only its frozen numbers.
DIRECT = [
    ("qwen2.5-0.5b", dict(workload="generate", context=300, batch=2, new_tokens=40)),
    ("gemma-2-2b", dict(workload="generate", context=4196, batch=1, new_tokens=12, attn="eager")),
    ("mistral-7b", dict(workload="generate", context=700, batch=1, new_tokens=20, cache="static", max_cache_len=1024)),
    ("qwen3-next-80b-a3b", dict(workload="generate", context=300, batch=1, new_tokens=8)),
    ("deepseek-v2-lite", dict(workload="forward", context=600, batch=2, dtype="float32")),
    ("olmoe-1b-7b", dict(workload="generate", context=200, batch=3, new_tokens=16)),
]


@pytest.mark.parametrize("model, kwargs", DIRECT, ids=[m for m, _ in DIRECT])
def test_fast_replay_is_the_reference_replay(model, kwargs):
    from estimator.replay import simulate
    from estimator.replay.reference import simulate_reference

    spec, workload = load_model(model), Workload(**kwargs)
    assert simulate(spec, workload) == simulate_reference(spec, workload)
