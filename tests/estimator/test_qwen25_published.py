"""The estimate against Qwen's published Qwen2.5 memory table (benchmarks/qwen25_quant.py; rows in
results/reference/external/qwen2.5-speed-benchmark.jsonl, a copy of ../shared/reference/external's;
transformers 4.46 on A100, max_memory_allocated). The rows ship with the repository: a missing file fails."""

import importlib.util
import json
from pathlib import Path

import pytest

from estimator.catalogue import load_model
from estimator.estimate import estimate
from estimator.terms import Workload

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "qwen25_quant.py"


def _bench():
    spec = importlib.util.spec_from_file_location("qwen25_quant", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_format_median_within_2_percent_and_where_rows_miss(capsys):
    bench = _bench()
    assert Path(bench.ROWS).is_file(), f"{bench.ROWS} is missing"
    assert bench.main(["--json"]) == 0
    formats = json.loads(capsys.readouterr().out)["formats"]
    assert set(formats) == {"BF16", "GPTQ-Int8", "GPTQ-Int4", "AWQ"}
    for fmt, s in formats.items():
        assert s["median_abs_error"] <= 0.02, fmt
        if fmt != "AWQ":
            assert s["worst_underestimate"] >= -0.05, fmt
    # the one miss left: AWQ on the tied-embedding sizes at a 1-token input (-27% for 0.5B), not modelled
    assert -0.30 < formats["AWQ"]["worst_underestimate"] < -0.05


def test_awq_on_tied_embeddings_says_so_and_raises_the_high_end():
    spec = load_model("qwen2.5-0.5b")
    w = Workload(context=2049, new_tokens=2048, quant="awq-int4", dtype="float16")
    e = estimate(spec, w)
    embedding = spec.vocab_size * spec.hidden_size * 2
    assert e.high_extra_bytes == embedding and any("tied embeddings" in n for n in e.notes)
    plain = estimate(spec, Workload(context=2049, new_tokens=2048, quant="gptq-int4", dtype="float16"))
    assert plain.high_extra_bytes == 0
    # 0.68 GiB allocated published for Qwen2.5-0.5B-Instruct-AWQ at input 1: above the allocated estimate,
    # within it plus the raise (the interval itself is at the NVML level, CUDA context included)
    assert e.peak_allocated_bytes < 0.68 * 2**30 <= e.peak_allocated_bytes + e.high_extra_bytes
    assert estimate(load_model("qwen2.5-7b"), Workload(context=2049, new_tokens=2048, quant="awq-int4")).high_extra_bytes == 0
