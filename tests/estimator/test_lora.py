"""LoRA in the estimate (pure): rows, merged adapters, refusals, the CLI. Exactness against real peft runs
is checked in tests/harness/test_lora_weights.py and tests/harness/test_lora_estimate.py."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from estimator import Workload, estimate, load_model
from estimator.errors import UserError
from estimator.lora import LORA_WIDEN, LoraSpec, weight_bytes

ROOT = Path(__file__).resolve().parents[2]
W = Workload(context=2048, batch=2)


def test_llama_8b_rank_16_q_v_weights_by_hand():
    spec = load_model("llama-3.1-8b")
    # per layer: q 16 x (4096 + 4096), v 16 x (4096 + 1024); 32 layers; float32 (peft's autocast)
    assert weight_bytes(spec, LoraSpec.make(16), "bfloat16") == 32 * 16 * (8192 + 5120) * 4
    assert weight_bytes(spec, LoraSpec.make(16, adapters=3), "bfloat16") == 3 * 32 * 16 * (8192 + 5120) * 4


def test_rows_add_up_and_merged_costs_nothing():
    spec = load_model("qwen2.5-0.5b")
    base = estimate(spec, W)
    lora = estimate(spec, replace(W, lora=LoraSpec.make(32, "all-linear", adapters=2)))
    d = lora.as_dict()
    assert d["adapter_weights_bytes"] == weight_bytes(spec, lora.workload.lora, "bfloat16") > 0
    assert d["adapter_activation_bytes"] > 0
    assert lora.weights_bytes == base.weights_bytes + d["adapter_weights_bytes"]
    assert lora.total_bytes > base.total_bytes + d["adapter_weights_bytes"]
    assert lora.widen_bytes == round(LORA_WIDEN * d["adapter_activation_bytes"])
    assert lora.high_bytes - lora.total_bytes > base.high_bytes - base.total_bytes
    assert any("LoRA" in n and "widened" in n for n in lora.notes)
    merged = estimate(spec, replace(W, lora=LoraSpec.make(32, "all-linear", merged=True)))
    assert merged.total_bytes == base.total_bytes and merged.widen_bytes == 0
    assert merged.as_dict()["adapter_weights_bytes"] == 0 == merged.as_dict()["adapter_activation_bytes"]


def test_inactive_adapters_cost_weights_only():
    spec = load_model("qwen2.5-0.5b")
    one = estimate(spec, replace(W, lora=LoraSpec.make(16, "all-linear")))
    three = estimate(spec, replace(W, lora=LoraSpec.make(16, "all-linear", adapters=3)))
    assert three.features["lora_weights_bytes"] == 3 * one.features["lora_weights_bytes"]
    assert three.features["lora_activation_bytes"] == one.features["lora_activation_bytes"]


@pytest.mark.parametrize("model, lora, match", [
    ("phi-3-mini", LoraSpec.make(8), "fused projections"),
    ("qwen3-30b-a3b", LoraSpec.make(8, "gate_proj"), "moe MLP"),
    ("llama-3.1-8b", LoraSpec.make(8, use_dora=True), "DoRA"),
])
def test_unmodelled_cases_are_refused(model, lora, match):
    with pytest.raises(UserError, match=match):
        estimate(load_model(model), replace(W, lora=lora))


def test_quantized_base_is_refused():
    with pytest.raises(UserError, match="QLoRA"):
        estimate(load_model("llama-3.1-8b"), replace(W, quant="bnb-nf4", lora=LoraSpec.make(8)))


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "vramcal", *argv], capture_output=True, text=True, cwd=ROOT)


def test_cli_rows_and_json():
    r = _cli("estimate", "qwen2.5-0.5b", "--lora-rank", "8", "--lora-targets", "q_proj,k_proj", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["adapter_weights_bytes"] > 0 and "adapter_activation_bytes" in d
    assert d["inputs"]["lora"]["ranks"] == {"q_proj": 8, "k_proj": 8}
    r = _cli("estimate", "qwen2.5-0.5b", "--lora-rank", "8")
    assert r.returncode == 0 and "adapter weights" in r.stdout and "adapter activations" in r.stdout


@pytest.mark.parametrize("argv, match", [
    (["--lora-targets", "q_proj"], "needs --lora-rank"),
    (["--lora-rank", "8", "--lora-targets", "qproj"], "did you mean q_proj"),
    (["--lora-rank", "0"], "positive integer"),
    (["--lora", "/nonexistent"], "not a folder"),
    (["--lora-rank", "8", "--lora-dtype", "int4"], "--lora-dtype"),
    (["--lora-rank", "8", "--framework", "vllm"], "vLLM"),
])
def test_cli_bad_lora_input_is_one_line_exit_2(argv, match):
    r = _cli("estimate", "qwen2.5-0.5b", *argv)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2  # argparse adds its usage line


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen3-8b"])
def test_c_and_python_replays_agree_with_adapters(model):
    from estimator.replay.runner import _CAllocator, simulate

    if _CAllocator is None:
        pytest.skip("the C accelerator is not built")
    w = Workload(context=3000, batch=2, new_tokens=40, lora=LoraSpec.make(64, "all-linear", dtype="bfloat16"))
    spec = load_model(model)
    assert simulate(spec, w, accelerate=True) == simulate(spec, w, accelerate=False)
