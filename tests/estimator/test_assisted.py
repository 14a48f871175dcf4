"""Assisted generation in the estimate (pure): rows, refusals, the CLI. Measured agreement is in
tests/harness/test_assisted_estimate.py."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from estimator import Workload, estimate, load_model
from estimator.errors import UserError
from estimator.quant import weights_bytes
from estimator.terms import kv_cache_bytes

ROOT = Path(__file__).resolve().parents[2]
W = Workload(context=2048, new_tokens=32)


def test_rows_draft_weights_kv_and_verification():
    main, draft = load_model("llama-3.1-8b"), load_model("llama-3.2-1b")
    plain = estimate(main, W)
    est = estimate(main, replace(W, assistant="llama-3.2-1b", num_assistant_tokens=5))
    d = est.as_dict()
    assert d["draft_weights_bytes"] == weights_bytes(draft, "bfloat16", None)
    assert d["draft_kv_bytes"] == kv_cache_bytes(draft, W) > 0
    assert d["verification_activation_bytes"] >= 0
    assert est.weights_bytes == plain.weights_bytes + d["draft_weights_bytes"]
    assert est.total_bytes >= plain.total_bytes + d["draft_weights_bytes"] + d["draft_kv_bytes"]
    assert any("assisted generation" in n and "widened" in n for n in est.notes)
    assert d["inputs"]["assistant"] == "llama-3.2-1b" and d["inputs"]["num_assistant_tokens"] == 5


def test_more_candidates_cost_more_verification():
    main = load_model("qwen2.5-0.5b")
    few = estimate(main, replace(W, assistant="qwen2.5-0.5b", num_assistant_tokens=2))
    many = estimate(main, replace(W, assistant="qwen2.5-0.5b", num_assistant_tokens=64))
    assert many.features["sim_allocated_bytes"] >= few.features["sim_allocated_bytes"]


@pytest.mark.parametrize("kw, match", [
    ({"assistant": "llama-3.2-1b", "batch": 2}, "batch 1 only"),
    ({"num_assistant_tokens": 4}, "needs --assistant"),
    ({"assistant": "llama-3.2-1b", "prompt_lookup_num_tokens": 4}, "give one"),
    ({"assistant": "llama-3.2-1b", "cache": "static"}, "dynamic cache"),
    ({"assistant": "llama-3.2-1b", "framework": "vllm"}, "vLLM"),
])
def test_bad_assisted_workloads(kw, match):
    with pytest.raises(UserError, match=match):
        replace(W, **kw)


def test_different_vocabularies_are_refused():
    with pytest.raises(UserError, match="different tokenizers"):
        estimate(load_model("llama-3.1-8b"), replace(W, assistant="qwen2.5-0.5b"))


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "vramcal", *argv], capture_output=True, text=True, cwd=ROOT)


def test_cli_rows_json_and_refusals():
    r = _cli("estimate", "qwen2.5-1.5b", "--assistant", "qwen2.5-0.5b", "--num-assistant-tokens", "4",
             "--context", "1024")
    assert r.returncode == 0, r.stderr
    assert "draft weights" in r.stdout and "draft KV cache" in r.stdout and "verification activations" in r.stdout
    d = json.loads(_cli("estimate", "qwen2.5-1.5b", "--prompt-lookup-num-tokens", "8", "--json").stdout)
    assert d["draft_weights_bytes"] == 0 and d["inputs"]["prompt_lookup_num_tokens"] == 8
    r = _cli("max-batch", "qwen2.5-1.5b", "--gpu", "L4", "--context", "1024", "--assistant", "qwen2.5-0.5b")
    assert r.returncode == 2 and "batch 1 only" in r.stderr and "Traceback" not in r.stderr
    r = _cli("estimate", "qwen2.5-1.5b", "--assistant", "no-such-draft")
    assert r.returncode == 2 and "Traceback" not in r.stderr
