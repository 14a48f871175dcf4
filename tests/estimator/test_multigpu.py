"""Several GPUs (estimator/multigpu.py): the per-GPU estimate of a device_map="auto" load.

The placement itself is checked against transformers in tests/harness/test_placement_accelerate.py;
here: the per-GPU terms add up to the single-GPU ones where they must (weights, KV cache exactly), one
GPU holding everything gives the single-GPU replay's numbers, and the CLI as a user runs it.
"""

import json
import subprocess
import sys
import time

import pytest

from estimator.catalogue import load_model
from estimator.coefficients import select_coefficients
from estimator.errors import UserError
from estimator.estimate import estimate
from estimator.multigpu import (CUDA_CONTEXT_BYTES, MULTI_GPU_ABS_BYTES, estimate_devices, layer_ranges,
                                max_memory_for, parse_gpus)
from estimator.placement import parse_max_memory, parse_size
from estimator.quant import buffer_bytes, weights_bytes
from estimator.terms import Workload, kv_cache_bytes

GIB = 2**30


def vramcal(*args):
    return subprocess.run([sys.executable, "-m", "vramcal", *args], capture_output=True, text=True, timeout=60)


def _workload(context=8192, batch=4, **kw):
    return Workload(context=context, batch=batch, new_tokens=16, workload="generate", dtype="bfloat16", quant=None,
                    kv_dtype=None, attn="sdpa", cache="dynamic", framework="transformers", **kw)


def _devices(model, gpus, context=8192, batch=4, max_memory=None, strategy="auto"):
    spec = load_model(model)
    g = parse_gpus(gpus)
    mm, user_set = max_memory_for(g, max_memory)
    c = select_coefficients("transformers", g[0].name)
    return spec, estimate_devices(spec, _workload(context, batch), g, c, mm, user_set, strategy)


def test_gpu_lists_resolve_strictly():
    assert [g.name for g in parse_gpus("2xA100-80GB")] == ["A100 80GB"] * 2
    assert [g.name for g in parse_gpus("H100,H100,L40S")] == ["H100 SXM 80GB"] * 2 + ["L40S"]
    assert [g.name for g in parse_gpus("2 x h100, l4")] == ["H100 SXM 80GB"] * 2 + ["L4"]
    for bad in ("2xA100", "FOO", "0xH100", "H100,,L4", "65xH100"):
        with pytest.raises(UserError):
            parse_gpus(bad)


def test_max_memory_units_follow_accelerate():
    # accelerate's convert_file_size_to_int: GiB = 2**30, GB = 10**9
    assert parse_size("70GiB") == 70 * GIB and parse_size("70GB") == 70 * 10**9 and parse_size("512MiB") == 2**29
    assert parse_max_memory("0=70GiB, 1=75GiB,cpu=1GB") == {0: 70 * GIB, 1: 75 * GIB, "cpu": 10**9}
    for bad in ("0=70", "x=1GiB", "0=1GiB,0=2GiB", "0:1GiB", "", "0=ten GiB"):
        if bad == "0=70":  # a plain integer is bytes, as in accelerate
            assert parse_max_memory(bad) == {0: 70}
            continue
        with pytest.raises(UserError):
            parse_max_memory(bad)
    with pytest.raises(UserError):
        max_memory_for(parse_gpus("H100"), "1=10GiB")
    default, user_set = max_memory_for(parse_gpus("2xH100"), None)
    assert not user_set and default[0] == parse_gpus("H100")[0].memory_bytes - CUDA_CONTEXT_BYTES


def test_per_gpu_terms_add_up_to_the_model():
    spec, est = _devices("llama-3.1-70b", "H100,H100,L40S")
    layers = sorted(l for d in est.devices for l in d.layers)
    assert layers == list(range(spec.num_layers))
    w = _workload()
    # weights (with the rotary buffers) and the KV cache split exactly
    assert sum(d.weights_bytes for d in est.devices) == weights_bytes(spec, "bfloat16") + buffer_bytes(spec)
    assert sum(d.estimate.kv_cache_bytes for d in est.devices) == kv_cache_bytes(spec, w)
    for d in est.devices:
        assert d.low_bytes < d.total_bytes < d.high_bytes
    # the whole is the worst GPU: the L40S (48 GB) gets a third of 141 GB of weights
    assert est.devices[2].verdict == "does not fit" and est.verdict == "does not fit"
    assert est.devices[0].verdict == "fits"


def test_one_gpu_holding_everything_is_the_single_gpu_replay():
    spec, est = _devices("qwen2.5-7b", "H100", context=4096, batch=2)
    single = estimate(spec, _workload(4096, 2), select_coefficients("transformers", "H100 SXM 80GB"), "H100")
    (d,) = est.devices
    assert d.layers == tuple(range(spec.num_layers)) and {"model.embed_tokens", "lm_head"} <= set(d.modules)
    assert d.estimate.kv_cache_bytes == single.kv_cache_bytes
    assert d.estimate.features == single.features
    # the same terms; buffers counted with the weights here, with the overhead there
    assert d.total_bytes == pytest.approx(single.total_bytes, abs=2)
    assert d.high_bytes >= single.high_bytes + MULTI_GPU_ABS_BYTES


def test_cpu_offload_is_named_and_runs_on_gpu_0():
    _, est = _devices("llama-3.1-70b", "2xA100-80GB", context=4096, batch=1, max_memory="0=30GiB,1=30GiB,cpu=200GiB")
    assert "cpu" in est.offloaded and "lm_head" in est.offloaded["cpu"]
    assert any("generate becomes slow" in n and "cpu:" in n for n in est.notes)
    d0, d1 = est.devices
    assert d0.offloaded_layers and d0.streamed_bytes > 0 and not d1.offloaded_layers
    assert set(d0.layers).isdisjoint(d0.offloaded_layers)
    assert d0.weights_bytes <= 30 * GIB and d1.weights_bytes <= 30 * GIB


def test_layer_ranges():
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and layer_ranges([]) == "-"


def test_estimate_70b_on_two_a100s_answers_per_gpu_in_under_a_second():
    started = time.perf_counter()
    r = vramcal("estimate", "llama-3.1-70b", "--gpus", "2xA100-80GB", "--context", "8192", "--batch", "4", "--json")
    wall = time.perf_counter() - started
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["seconds"] < 1.0 and wall < 10  # the estimate itself; the subprocess adds Python's start-up
    assert [d["device"] for d in out["devices"]] == [0, 1]
    for d in out["devices"]:
        assert {"device", "gpu", "max_memory_bytes", "layers", "weights_bytes", "kv_cache_bytes", "total_bytes",
                "fits"} <= set(d)
        assert d["gpu"] == "A100 80GB" and len(d["layers"]) == 40
    assert out["verdict"] in ("fits", "tight", "does not fit") and out["notes"]
    table = vramcal("estimate", "llama-3.1-70b", "--gpus", "2xA100-80GB", "--context", "8192", "--batch", "4")
    assert table.returncode == 0 and "0: A100 80GB" in table.stdout and "1: A100 80GB" in table.stdout
    assert "widened" in table.stdout


def test_max_context_and_max_batch_take_gpus():
    r = vramcal("max-batch", "llama-3.1-70b", "--gpus", "4xA100-80GB", "--context", "8192", "--json")
    assert r.returncode == 0, r.stderr
    best = json.loads(r.stdout)["max_batch"]
    assert best and best > 1
    _, est = _devices("llama-3.1-70b", "4xA100-80GB", context=8192, batch=best)
    assert all(d.high_bytes <= d.gpu.memory_bytes for d in est.devices)
    _, over = _devices("llama-3.1-70b", "4xA100-80GB", context=8192, batch=best + 1)
    assert any(d.high_bytes > d.gpu.memory_bytes for d in over.devices)
    r = vramcal("max-context", "llama-3.1-8b", "--gpus", "2xL4", "--json")
    assert r.returncode == 0, r.stderr and json.loads(r.stdout)["max_context"] > 1000


@pytest.mark.parametrize("args", [
    ("estimate", "llama-3.1-8b", "--gpus", "2xA100"),
    ("estimate", "llama-3.1-8b", "--gpus", "H100", "--max-memory", "3=1GiB"),
    ("estimate", "llama-3.1-8b", "--max-memory", "0=1GiB"),
    ("estimate", "llama-3.1-8b", "--gpus", "H100", "--quant", "gptq-int4"),
    ("estimate", "llama-3.1-8b", "--gpus", "H100", "--device-map", "everywhere"),
    ("max-context", "llama-3.1-8b"),
    ("max-batch", "llama-3.1-8b", "--context", "1024", "--gpus", "1xNOPE"),
])
def test_bad_input_is_one_line_exit_2(args):
    r = vramcal(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("extra", [["--lora-rank", "16"], ["--assistant", "llama-3.2-1b"],
                                   ["--prompt-lookup-num-tokens", "5"],
                                   ["--cache", "static", "--compile", "auto"]])
def test_options_not_modelled_over_several_gpus_are_refused_in_one_line(extra):
    r = subprocess.run([sys.executable, "-m", "vramcal", "estimate", "llama-3.1-70b", "--gpus", "2xA100-80GB",
                        "--context", "4096", *extra], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--gpus with" in r.stderr
