"""calibration/crosscheck.py: records of another GPU meet the H100 reference key by key.

Synthetic "H200" records built from the reference with known shifts: a CUDA context 60 MiB larger
(peak_nvml_bytes and context_bytes both +60 MiB) must miss on nvml for the small models and pass on
nvml less the context; a reserved peak 3% higher must miss on reserved only."""

from __future__ import annotations

import json

from calibration.crosscheck import REFERENCE, compare, main
from estimator.records import read_records

MIB = 2**20


def h200_records(tmp_path, shift_context=60 * MIB, reserved_factor=1.0, n=12):
    out = tmp_path / "h200.jsonl"
    with open(out, "w") as handle:
        for rec in read_records(REFERENCE)[:n]:
            rec = dict(rec, gpu_name="NVIDIA H200", gpu_memory_bytes=150754820096)
            rec["context_bytes"] += shift_context
            rec["peak_nvml_bytes"] += shift_context + int(rec["peak_reserved_bytes"] * (reserved_factor - 1))
            rec["peak_reserved_bytes"] = int(rec["peak_reserved_bytes"] * reserved_factor)
            handle.write(json.dumps(rec) + "\n")
    return out


def test_a_larger_context_misses_on_nvml_and_passes_without_it(tmp_path, capsys):
    path = h200_records(tmp_path)
    rows = compare(read_records(path), read_records(REFERENCE))
    assert len(rows) == 12
    assert all(abs(r["errors"]["nvml-ctx"]) < 1e-12 and r["errors"]["allocated"] == 0 for r in rows)
    # qwen2.5-0.5b b1 1k: 1,779 MiB on the H100, +60 MiB = +3.4%
    assert max(r["errors"]["nvml"] for r in rows) > 0.03
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "nvml: MISS 4/12 within 2%" in out and "nvml-ctx: PASS 12/12 within 2%" in out
    assert "reserved: PASS 12/12" in out and "measured on NVIDIA H200; reference on NVIDIA H100 80GB HBM3" in out
    assert "CUDA context (context_bytes): measured 776.8-776.8 MiB; reference 716.8 MiB" in out


def test_a_higher_reserved_peak_misses_on_reserved(tmp_path, capsys):
    path = h200_records(tmp_path, shift_context=0, reserved_factor=1.03)
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "reserved: MISS 0/12 within 2%; worst +3.00%" in out and "allocated: PASS 12/12" in out


def test_no_case_in_common_or_a_missing_file_is_one_line_and_exit_2(tmp_path, capsys):
    path = h200_records(tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(dict(r, batch_size=r["batch_size"] + 100)) + "\n" for r in records))
    assert main([str(other)]) == 2
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    assert main([str(path), "--tolerance", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("crosscheck: error: ") for line in err)
