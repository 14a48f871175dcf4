"""On two or more CUDA GPUs: a device_map case measured per GPU, against the estimator's per-GPU estimate.

Skipped without two visible GPUs. The worker must see exactly the case's GPUs, so this test sets
CUDA_VISIBLE_DEVICES for its worker to the first two. Run: `pytest -m multigpu tests/harness/test_gpu_multigpu.py`.
"""

from __future__ import annotations

import os

import pytest

from estimator.records import read_records, validate_record

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


def _two_gpus():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")


@pytest.mark.parametrize("strategy", ["auto", "sequential"])
def test_device_map_record_per_gpu_and_estimate(tmp_path, monkeypatch, strategy):
    _two_gpus()
    from estimator.catalogue import load_model
    from estimator.coefficients import select_coefficients
    from estimator.gpus import find_gpu
    from estimator.multigpu import estimate_devices, max_memory_for
    from estimator.terms import Workload
    from harness.case import Case
    from harness.nvml import gpu_info
    from harness.runner import run_cases

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join((visible or "0,1").split(",")[:2]))
    name = gpu_info().name
    case = Case.make("llama-3.2-1b", context=1024, batch=4, device_map=strategy, gpus=2)
    out = tmp_path / "two.jsonl"
    (rec,) = run_cases([case], out, gpu_name=name)
    validate_record(rec)
    assert read_records(out)[0]["case_key"] == rec["case_key"]
    assert rec["status"] == "ok", rec["error"]
    assert len(rec["devices"]) == 2
    assert sum(d["weights_bytes"] for d in rec["devices"]) + rec["offloaded_weights_bytes"] == rec["weights_bytes"]
    assert rec["peak_nvml_bytes"] == sum(d["peak_nvml_bytes"] for d in rec["devices"])

    gpu = find_gpu(name)
    spec = load_model("llama-3.2-1b")
    w = Workload(context=1024, batch=4, new_tokens=16, workload="generate", dtype="bfloat16", quant=None,
                 kv_dtype=None, attn="sdpa", cache="dynamic", framework="transformers")
    mm, user_set = max_memory_for((gpu, gpu), None)
    est = estimate_devices(spec, w, (gpu, gpu), select_coefficients("transformers", gpu.name), mm, user_set, strategy)
    for measured, estimated in zip(rec["devices"], est.devices):
        # the placement: each GPU holds the weights the estimator put there
        assert measured["weights_bytes"] == estimated.weights_bytes
        # the per-GPU interval holds the per-GPU NVML peak
        assert estimated.low_bytes <= measured["peak_nvml_bytes"] <= estimated.high_bytes
