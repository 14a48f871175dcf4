"""The H200 campaign (issue 16) as shipped: its sweep files parse and expand, the smoke sweep repeats
H100 reference cases exactly, the campaign's process groups come in the issue's order of value, the
time plan fits the budget's head, and benchmarks/gpu_campaign.sh runs end to end in its CPU dry run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.records import case_key, read_records
from harness.runner import process_groups
from harness.sweep import expand, load_sweep, order

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "configs" / "sweeps"
REFERENCE = REPO / "results" / "reference" / "h100-transformers-5.17.jsonl"
H100 = "NVIDIA H100 80GB HBM3"


def cases_of(name):
    sweep = load_sweep(SWEEPS / f"h200-{name}.toml")
    assert sweep.device == "cuda" and sweep.gpu == "h200" and sweep.out == f"results/h200/{name}.jsonl"
    return expand(sweep)[0]


def test_the_smoke_sweep_repeats_reference_cases_only():
    cases = cases_of("smoke")
    reference = {case_key(r) for r in read_records(REFERENCE)}
    keys = {c.key(H100) for c in cases}
    assert len(keys) == len(cases) == 42 and keys <= reference  # every one comparable key by key
    assert {c.model for c in cases} == {"qwen2.5-0.5b", "llama-3.2-1b", "llama-3.1-8b"}
    assert {c.dtype for c in cases} == {"bfloat16", "float16", "float32"} and {c.attn for c in cases} == {"sdpa", "eager"}
    assert all(c.alloc_conf == "" and c.compile == "off" for c in cases)


def test_the_campaign_covers_the_issue_in_its_order_of_value():
    cases = order(cases_of("campaign"))
    groups = process_groups(cases)
    first = {}
    for rank, group in enumerate(groups):
        for c in group:
            for what in ("expandable" if c.alloc_conf == "expandable_segments:True" else None,
                         "compiled" if c.compile == "auto" else None,
                         "static" if c.cache == "static" and c.compile == "off" else None,
                         "long" if c.new_tokens >= 256 else None,
                         "moe" if c.model in ("qwen3-30b-a3b", "olmoe-1b-7b") else None,
                         "mla" if c.model == "deepseek-v2-lite" else None,
                         "sliding" if c.model in ("gemma-2-2b", "gemma-3-1b", "mistral-7b") else None,
                         "32k" if c.context >= 32768 else None, "b32" if c.batch >= 32 else None,
                         "assisted" if c.assistant else None, "lookup" if c.prompt_lookup_num_tokens else None):
                if what:
                    first.setdefault(what, rank)
    assert set(first) == {"expandable", "compiled", "static", "long", "moe", "mla", "sliding", "32k", "b32",
                          "assisted", "lookup"}
    assert first["expandable"] == 0
    assert first["expandable"] <= first["compiled"] <= first["static"] <= first["long"] < first["moe"]
    assert first["moe"] <= first["mla"] <= first["sliding"] < first["32k"] <= first["assisted"]
    assert max(c.new_tokens for c in cases) == 1024
    assert not any(c.model.startswith("qwen3-next") for c in cases)  # 160 GB of bf16 weights: not on 141 GB
    lora = cases_of("lora")
    assert len(lora) == 2 and all(c.lora for c in lora)


def test_the_time_plan_puts_the_smoke_and_the_first_groups_inside_the_budget():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import campaign_plan
    finally:
        sys.path.pop(0)
    smoke = campaign_plan.plan(str(SWEEPS / "h200-smoke.toml"))
    assert sum(n for _, n, _ in smoke) == 42
    assert sum(s for _, _, s in smoke) < 180  # about 2 of the campaign's 7 minutes (420 s budget)
    campaign = campaign_plan.plan(str(SWEEPS / "h200-campaign.toml"))
    head = sum(s for _, _, s in smoke) + sum(s for _, _, s in campaign[:4])
    assert head < 420 and "expandable_segments" in campaign[1][0]


def test_the_campaign_script_dry_run_measures_a_tiny_cpu_sweep_end_to_end(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_campaign.sh"), str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**{k: v for k, v in os.environ.items() if k != "OUT"}, "CAMPAIGN_DRY_RUN": "1",
                                 "PYTHON": sys.executable, "CAMPAIGN_BUDGET_S": "300"})
    log = (out / "campaign.log").read_text()
    assert result.returncode == 0, log[-3000:]
    for line in ("sweep h200-smoke on cuda: 42 cases", "sweep h200-campaign on cuda:", "=== [",
                 "sweep tiny: 4 measured (4 ok, 0 oom, 0 error)", "throughput: 4 ok cases",
                 "nvml: PASS 71/71 within 2%", "estimated: ", "gpu_campaign: done in"):
        assert line in log, line
    assert len(read_records(out / "dry-cpu.jsonl")) == 4


def test_the_campaign_script_without_a_gpu_says_so_and_exits_2(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the campaign would run")
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_campaign.sh"), str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**{k: v for k, v in os.environ.items() if k not in ("OUT", "CAMPAIGN_DRY_RUN")},
                                 "PYTHON": sys.executable})
    assert result.returncode == 2
    assert "gpu_campaign: no CUDA GPU is visible here; nothing was measured" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr and not list(out.glob("*.jsonl"))
