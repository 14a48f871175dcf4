"""Calibrate and validate carry the records' PYTORCH_CUDA_ALLOC_CONF: coefficients are fitted under one setting
and say which; the estimate widens its interval only for a setting the coefficients were not fitted on.
Synthetic records (conftest.py) whose features are replayed under the record's own setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")

ES = "expandable_segments:True"


def run(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    return subprocess.run([sys.executable, "-m", "vramcal", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, synth):
    models = ("qwen2.5-0.5b", "llama-3.2-1b")
    cases = [dict(workload="generate", batch_size=b, prompt_tokens=p, new_tokens=16, attn_implementation="sdpa",
                  dtype="bfloat16") for b, p in ((1, 1008), (4, 1008), (1, 4080), (4, 2032))]
    default = synth.make_records(models, cases)
    es = synth.make_records(models, [dict(c, alloc_conf=ES) for c in cases])
    return synth.write_jsonl(tmp_path_factory.mktemp("records") / "mixed.jsonl", default + es)


def test_es_records_replay_under_their_setting(synth):
    rec = synth.make_records(("llama-3.2-1b",), [dict(workload="generate", batch_size=4, prompt_tokens=2032,
                                                      new_tokens=16, attn_implementation="sdpa", dtype="bfloat16",
                                                      alloc_conf=ES)])[0]
    plain = synth.make_records(("llama-3.2-1b",), [dict(workload="generate", batch_size=4, prompt_tokens=2032,
                                                        new_tokens=16, attn_implementation="sdpa", dtype="bfloat16")])[0]
    assert rec["peak_reserved_bytes"] < plain["peak_reserved_bytes"]


def test_calibrate_refuses_mixed_settings_then_fits_one_and_states_it(tmp_path, mixed):
    r = run("calibrate", mixed, "--out", tmp_path / "c.json", "--no-cv")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--alloc-conf" in r.stderr, r.stderr
    r = run("calibrate", mixed, "--out", tmp_path / "c.json", "--no-cv", "--alloc-conf", ES)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["alloc_conf"] == ES
    assert data["provenance"]["records"]["left_out"] == {"alloc_conf default": 8}
    assert abs(data["coefficients"]["sim_reserve_factor"] - 0.9) < 0.05  # conftest.TRUE
    r = run("calibrate", mixed, "--out", tmp_path / "d.json", "--no-cv", "--alloc-conf", "")
    assert r.returncode == 0 and json.loads((tmp_path / "d.json").read_text())["alloc_conf"] == ""
    # the estimate under the fitted setting: no widening note; under another one: the note
    for coef, conf, widened in ((tmp_path / "c.json", ES, False), (tmp_path / "d.json", ES, True)):
        r = run("estimate", "qwen2.5-0.5b", "--coefficients", coef, "--alloc-conf", conf, "--json")
        assert r.returncode == 0, r.stderr
        notes = json.loads(r.stdout)["notes"]
        assert any("uncalibrated" in n for n in notes) == widened


def test_calibrate_bad_alloc_conf_is_refused_before_fitting(tmp_path, mixed):
    r = run("calibrate", mixed, "--out", tmp_path / "c.json", "--alloc-conf", "expandable_segments:maybe")
    assert r.returncode == 2 and "expandable_segments" in r.stderr and not (tmp_path / "c.json").exists()
