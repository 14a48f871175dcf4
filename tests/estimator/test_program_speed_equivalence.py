"""The optimized replay (estimator/replay/, estimator/allocator.py) against a frozen oracle.

``data/program_oracle.json`` holds ``sim_allocated_bytes``, ``sim_reserved_bytes`` and ``sim_peak_step`` of
``features(spec, workload)`` for every case of ``oracle_cases()``, computed by the plain event-by-event
replay (every layer of every forward, every decode step) before the replay learned to skip repeated
work. The optimized replay must reproduce every number exactly: the shortcuts are exact or not taken; so must
the C allocator (``estimator/_replay.c``), when it is built (``VRAMCAL_REQUIRE_ACCELERATOR=1``: fail, not
skip, when it is not, as CI sets).

gpt-oss-120b's cases were regenerated (by the Python replay, which reproduced every other case unchanged)
when the replay started loading every parameter (``ModelSpec.parameter_tensors``): its experts' biases
are tensors above the tracked size.

Regenerate (only when the modelled program itself changes, never to make this test pass):
``python tests/estimator/test_program_speed_equivalence.py`` (minutes).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from estimator import Workload, list_models, load_model
from estimator.terms import features

ORACLE = Path(__file__).resolve().parent / "data" / "program_oracle.json"
KEYS = ("sim_allocated_bytes", "sim_reserved_bytes", "sim_peak_step")


def oracle_cases() -> list[tuple[str, dict]]:
    """(model, Workload keyword arguments): every catalogue model x workload x attention x dtype x cache
    at a few shapes (1, 16 and 300 new tokens), plus large batches, flash-attention-2, a static cache with
    room to spare and, for models with sliding windows, prompts past the window and generations that
    cross it."""
    cases = []
    for model in list_models():
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


if __name__ == "__main__":
    specs: dict = {}
    started = time.perf_counter()
    cases = {}
    for n, (model, kwargs) in enumerate(oracle_cases()):
        cases[case_key(model, kwargs)] = _sim(model, kwargs, specs)
        if n % 100 == 0:
            print(n, f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    ORACLE.parent.mkdir(exist_ok=True)
    doc = {"about": "sim_allocated_bytes, sim_reserved_bytes, sim_peak_step of estimator.terms.features; "
                    "see tests/estimator/test_program_speed_equivalence.py",
           "keys": list(KEYS), "cases": cases}
    ORACLE.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{len(cases)} cases in {time.perf_counter() - started:.0f} s -> {ORACLE}", file=sys.stderr)
