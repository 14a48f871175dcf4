"""The `compile` case axis (issue 11): "auto" is what transformers 5.17's generate does
(GenerationMixin._valid_auto_compile_criteria), "off" is disable_compile=True. Every case that may compile on
CUDA gets a worker of its own; the record says what was asked (`compile`) and what happened (`compiled`).
On the CPU transformers does not auto-compile (valid_hardware is CUDA/XPU/Neuron/TPU): a real tiny run shows
the record saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.errors import UserError
from estimator.records import case_key, read_records
from harness.case import Case
from harness.sweep import expand, load_sweep

REPO = Path(__file__).resolve().parents[2]
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 4096, "max_window_layers": 2,
        "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture
def tiny(tmp_path) -> Path:
    config = json.loads((REPO / "configs" / "models" / "qwen2.5-0.5b.json").read_text())
    config.update(TINY)
    path = tmp_path / "qwen-tiny.json"
    path.write_text(json.dumps(config))
    return path


def vramcal(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vramcal", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))


def test_compile_is_a_case_field_with_its_own_process_on_cuda():
    auto = [Case.make("qwen2.5-0.5b", context=c, device="cuda", cache="static", compile="auto") for c in (64, 128)]
    off = [Case.make("qwen2.5-0.5b", context=c, device="cuda", cache="static", compile="off") for c in (64, 128)]
    assert auto[0].process_group() != auto[1].process_group()  # a fresh worker per compiled case
    assert off[0].process_group() == off[1].process_group() != auto[0].process_group()
    assert auto[0].key() != off[0].key() and auto[0].record_fields()["compile"] == "auto"
    cpu = [Case.make("qwen2.5-0.5b", context=c, device="cpu", cache="static", compile="auto") for c in (64, 128)]
    assert cpu[0].process_group() == cpu[1].process_group()  # nothing compiles on the CPU
    assert Case.make("qwen2.5-0.5b", context=64, workload="forward", compile="auto").compile == "off"
    with pytest.raises(UserError, match="compile"):
        Case.make("qwen2.5-0.5b", context=64, compile="max-autotune")
    # a record from before the axis is a compile "off" case
    old = dict(off[0].record_fields())
    del old["compile"]
    assert case_key(old) == off[0].key()


def test_sweep_compile_axis_and_a_bad_value(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('name = "c"\ndevice = "cuda"\n[[matrix]]\nmodels = ["qwen2.5-0.5b"]\ncache = ["static"]\n'
                    'compile = ["auto", "off"]\ncontexts = [64]\n')
    cases, _ = expand(load_sweep(path))
    assert sorted(c.compile for c in cases) == ["auto", "off"]
    path.write_text(path.read_text().replace('["auto", "off"]', '["always"]'))
    with pytest.raises(UserError, match="compile"):
        load_sweep(path)


def test_cpu_measure_records_what_was_asked_and_that_nothing_compiled(tmp_path, tiny):
    out = tmp_path / "r.jsonl"
    for mode in ("auto", "off"):
        r = vramcal("measure", tiny, "--device", "cpu", "--cache", "static", "--context", "24", "--new-tokens", "4",
                    "--compile", mode, "--out", out)
        assert r.returncode == 0, r.stderr
    recs = read_records(out)
    assert [(x["compile"], x["compiled"], x["status"]) for x in recs] == [("auto", False, "ok"), ("off", False, "ok")]
    assert recs[0]["cache_class"] == "StaticCache"
    assert len({case_key(x) for x in recs}) == 2
