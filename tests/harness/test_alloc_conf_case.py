"""The harness's alloc_conf: parsed as torch parses it (estimator/alloc_conf.py) and canonical, so the record
states the setting the estimator replays; a bad one is one line, exit 2, before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.errors import UserError
from harness.case import Case

REPO = Path(__file__).resolve().parents[2]


def vramcal(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    return subprocess.run([sys.executable, "-m", "vramcal", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def test_case_alloc_conf_is_canonical_and_strict():
    c = Case.make("qwen2.5-0.5b", context=1024, device="cuda", alloc_conf="max_split_size_mb:256, expandable_segments:True")
    assert c.alloc_conf == "expandable_segments:True,max_split_size_mb:256"
    assert c.record_fields()["alloc_conf"] == c.alloc_conf
    with pytest.raises(UserError, match="garbage_collection_threshold"):
        Case.make("qwen2.5-0.5b", context=1024, device="cuda", alloc_conf="garbage_collection_threshold:2")


def test_measure_with_a_bad_alloc_conf_is_refused_before_any_work(tmp_path):
    out = tmp_path / "r.jsonl"
    r = vramcal("measure", "qwen2.5-0.5b", "--context", "64", "--alloc-conf", "expandable_segments:yes", "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "expandable_segments" in r.stderr and not out.exists()


def test_sweep_with_a_bad_alloc_conf_measures_nothing(tmp_path):
    sweep = tmp_path / "s.toml"
    out = tmp_path / "r.jsonl"
    sweep.write_text(f"""
name = "bad-alloc"
device = "cuda"
out = {json.dumps(str(out))}
[[matrix]]
models = ["qwen2.5-0.5b"]
contexts = [64]
alloc_conf = ["max_split_size_mb:2"]
""")
    r = vramcal("sweep", sweep, "--dry-run")
    assert r.returncode == 2 and "max_split_size_mb" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
