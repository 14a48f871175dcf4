"""Assisted generation: the replay of transformers' assisted loop (estimator/assisted.py) against real CPU runs.

Reference: ``generate(assistant_model=...)`` of transformers 5.17 measured by the harness on the CPU
(``harness.worker.Session``, the live-storage tracker) with a tiny llama and a smaller draft of the same
vocabulary. Random tied weights make both models repeat their last token, so every candidate is accepted:
the replay's ``accept="all"`` pattern is what runs, and the measured peak must agree within 1%. The replay
counts every tensor here (``min_bytes=1``), as the tracker does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from estimator import Workload  # noqa: E402
from estimator.assisted import simulate_assisted  # noqa: E402
from estimator.families import spec_from_config  # noqa: E402
from estimator.quant import buffer_bytes, weights_bytes  # noqa: E402
from harness.case import Case  # noqa: E402
from harness.worker import Session  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MAIN = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192, "bos_token_id": 1, "eos_token_id": 2}
DRAFT = dict(MAIN, num_hidden_layers=1, hidden_size=128, intermediate_size=256, head_dim=32)
CASES = [(504, 8, 4), (200, 40, 20), (64, 16, 3)]  # prompt, new tokens, candidates per step


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = json.loads((REPO / "configs" / "models" / "llama-3.2-1b.json").read_text())
    folder = tmp_path_factory.mktemp("models")
    out = []
    for name, sizes in (("main", MAIN), ("draft", DRAFT)):
        config = dict(base, **sizes)
        path = folder / f"{name}.json"
        path.write_text(json.dumps(config))
        out.append((str(path), spec_from_config(config, name)))
    return out


@pytest.fixture(scope="module")
def measured(models):
    (main, _), (draft, _) = models
    s = Session("cpu")
    try:
        return {(p, n, k): s.run_case(Case.make(main, device="cpu", context=p + n, new_tokens=n, assistant=draft,
                                                num_assistant_tokens=k)) for p, n, k in CASES}
    finally:
        s.close()


@pytest.mark.parametrize("prompt, new, k", CASES)
def test_measured_assisted_peak_within_1_percent_of_the_replay(models, measured, prompt, new, k):
    (_, main), (_, draft) = models
    rec = measured[(prompt, new, k)]
    assert rec["status"] == "ok", rec["error"]
    w = Workload(context=prompt + new, new_tokens=new)
    sim = simulate_assisted(main, draft, w, k, min_bytes=1, accept="all")
    weights = sum(weights_bytes(s, "bfloat16", None) + buffer_bytes(s) for s in (main, draft))
    assert weights == rec["weights_bytes"] + rec["assistant_weights_bytes"]
    estimated = weights + sim["sim_allocated_bytes"]
    assert abs(rec["peak_allocated_bytes"] - estimated) <= 0.01 * estimated, \
        f"measured {rec['peak_allocated_bytes'] / estimated - 1:+.2%}"
    # no candidate accepted runs more steps; the estimate takes the larger peak and widens by the difference
    none = simulate_assisted(main, draft, w, k, min_bytes=1, accept="none")["sim_allocated_bytes"]
    assert none >= sim["sim_allocated_bytes"] * 0.99


@pytest.mark.parametrize("prompt, new, k, accept", [(504, 8, 4, "all"), (200, 40, 20, "none"), (64, 16, 3, "all")])
def test_traced_assisted_peak_within_1_percent_of_the_replay(models, prompt, new, k, accept):
    """The assisted loop on the modeling code under fake tensors (harness/assisted_trace.py), both patterns."""
    from harness.trace import run_trace

    (main_path, main), (draft_path, draft) = models
    configs = [json.loads(Path(p).read_text()) for p in (main_path, draft_path)]
    w = Workload(context=prompt + new, new_tokens=new)
    weights = sum(weights_bytes(s, "bfloat16", None) + buffer_bytes(s) for s in (main, draft))
    estimated = weights + simulate_assisted(main, draft, w, k, min_bytes=1, accept=accept)["sim_allocated_bytes"]
    traced = run_trace(configs[0], context=prompt + new, batch=1, new_tokens=new, device_rules="cpu",
                       assisted=(configs[1], k, accept)).result.peak_allocated_bytes
    assert abs(traced - estimated) <= 0.01 * estimated, f"trace {traced / estimated - 1:+.2%}"


def test_traced_assisted_on_catalogue_models_with_gpu_rules():
    """llama-3.2-1b (2 layers) with a 1-layer copy as the draft, CUDA kernel rules: the trace and the replay."""
    from estimator import load_model
    from harness.trace import CUBLAS_WORKSPACE_BYTES, run_trace

    config = dict(load_model("llama-3.2-1b").config)
    config["num_hidden_layers"] = 2
    d_config = dict(config, num_hidden_layers=1)
    main, draft = spec_from_config(config, "main"), spec_from_config(d_config, "draft")
    w = Workload(context=1024, new_tokens=8)
    weights = sum(weights_bytes(s, "bfloat16", None) + buffer_bytes(s) for s in (main, draft))
    estimated = weights + simulate_assisted(main, draft, w, 5, min_bytes=1, accept="none")["sim_allocated_bytes"]
    traced = run_trace(config, context=1024, batch=1, new_tokens=8, assisted=(d_config, 5, "none"))
    peak = traced.result.peak_allocated_bytes - CUBLAS_WORKSPACE_BYTES
    assert abs(peak - estimated) <= 0.01 * estimated, f"trace {peak / estimated - 1:+.2%}"
