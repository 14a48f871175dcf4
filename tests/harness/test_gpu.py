"""On a CUDA GPU: the harness reproduces the reference H100 records within 2%, and OOM is data there too.

Skipped without a GPU (NVML finds none). The cross-check needs the reference's GPU (NVIDIA H100 80GB HBM3):
`peak_nvml_bytes` includes the CUDA context, which depends on the board, driver and torch build.
Run: `pytest -m gpu tests/harness/test_gpu.py` (a few minutes on an H100: 45 reference cases).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from estimator.errors import UserError
from estimator.records import case_key, read_records, validate_record

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "results" / "reference" / "h100-transformers-5.17.jsonl"  # its README: the method
TOLERANCE = 0.02


def gpu():
    from harness.nvml import gpu_info

    try:
        return gpu_info()
    except UserError as exc:
        pytest.skip(f"no CUDA GPU: {exc}")


def case_of(rec: dict):
    from harness.case import Case

    generate = rec["workload"] == "generate"
    return Case.make(rec["model"], device="cuda", dtype=rec["dtype"], attn=rec["attn_implementation"],
                     cache=rec["cache_implementation"], workload=rec["workload"],
                     context=rec["prompt_tokens"] + rec["new_tokens"],
                     new_tokens=rec["new_tokens"] if generate else None, batch=rec["batch_size"],
                     alloc_conf=rec["alloc_conf"])


def test_reference_cases_within_2_percent(tmp_path):
    info = gpu()
    assert REFERENCE.is_file(), f"the reference records are missing: {REFERENCE}"
    from harness.runner import run_cases
    from harness.sweep import order

    reference = read_records(REFERENCE)
    if info.name != reference[0]["gpu_name"]:
        pytest.skip(f"the reference was measured on {reference[0]['gpu_name']}, this GPU is {info.name}")
    # the two small models (every kind of reference case), and the 8B model's smaller cases
    chosen = [r for r in reference if r["model"] in ("qwen2.5-0.5b", "llama-3.2-1b")
              or (r["model"] == "llama-3.1-8b" and r["batch_size"] * r["prompt_tokens"] <= 4 * 4080)]
    measured = run_cases(order([case_of(r) for r in chosen]), tmp_path / "h100.jsonl", gpu_name=info.name)
    by_key = {case_key(r): r for r in measured}
    misses = []
    for ref in chosen:
        got = by_key[case_key(ref)]
        validate_record(got)
        assert got["status"] == "ok", got["error"]
        assert got["weights_bytes"] == ref["weights_bytes"]
        error = got["peak_nvml_bytes"] / ref["peak_nvml_bytes"] - 1
        if abs(error) > TOLERANCE:
            misses.append(f"{case_key(ref)}: {got['peak_nvml_bytes']} vs {ref['peak_nvml_bytes']} ({error:+.1%})")
    assert not misses, f"{len(misses)} of {len(chosen)} cases beyond {TOLERANCE:.0%}:\n" + "\n".join(misses)


def test_cuda_record_fields_and_oom_is_data(tmp_path):
    info = gpu()
    from harness.case import Case
    from harness.runner import run_cases

    small = Case.make("qwen2.5-0.5b", device="cuda", context=1024, batch=1)
    # ~1 GB of weights, a 4 GB cap: a (16, 16k) eager generate cannot fit
    capped = Case.make("qwen2.5-0.5b", device="cuda", attn="eager", context=16384, batch=16,
                       memory_limit_bytes=4 * 2**30)
    after = Case.make("qwen2.5-0.5b", device="cuda", context=4096, batch=4)
    ok, oom, ok2 = run_cases([small, capped, after], tmp_path / "out.jsonl", gpu_name=info.name)
    for rec in (ok, oom, ok2):
        validate_record(rec)
    assert ok["status"] == ok2["status"] == "ok" and oom["status"] == "oom"
    assert ok["gpu_name"] == info.name and ok["gpu_memory_bytes"] == info.memory_bytes
    assert ok["context_bytes"] > 0 and ok["nvml_samples"] > 0 and ok["num_alloc_retries"] == 0
    assert ok["peak_nvml_bytes"] >= ok["peak_reserved_bytes"] >= ok["peak_allocated_bytes"] > ok["weights_bytes"]
    assert ok["kv_cache_bytes"] == 2 * 24 * 2 * 64 * 1 * 1023 * 2  # qwen2.5-0.5b: 24 layers, 2 KV heads of 64
    assert ok["driver_version"] and ok["cuda_version"] and ok["gpu_uuid"].startswith(("GPU-", "MIG-"))
    assert ok2["peak_allocated_bytes"] < 4 * 2**30  # nothing of the OOM case is left behind
