"""The trace engine: an Estimate for any causal LM transformers builds, and `--engine` in the CLI.

References: the replay (``estimator/replay/``), which the trace engine must agree with where both
apply; the trace's own peak (``harness/trace.py``, within 1% of 71 H100 records) and exact parameter
and cache sizes computed here from the config on the meta device.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from estimator import Workload, estimate, load_model  # noqa: E402
from estimator.coefficients import DEFAULT  # noqa: E402
from estimator.engines import _few_probe_search, resolve_model  # noqa: E402
from estimator.errors import UserError  # noqa: E402
from estimator.families import spec_from_config  # noqa: E402
from harness.trace import run_trace  # noqa: E402
from harness.trace_estimate import simulate_events, trace_estimate  # noqa: E402
from harness.tracker import StorageTracker  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GEN = Workload(context=512, batch=2, new_tokens=4)
FWD = Workload(context=256, batch=2, workload="forward")


def _llama_2_layers() -> dict:
    config = dict(load_model("llama-3.2-1b").config)
    config["num_hidden_layers"] = 2
    return config


def _unknown_2_layers() -> dict:
    """transformers' OLMo (1) defaults (hidden 4096, 32 heads, vocab 50304), 2 layers: a type the replay lacks."""
    d = transformers.AutoConfig.for_model("olmo", num_hidden_layers=2).to_dict()
    d["model_type"] = "olmo"
    return d


def _meta_counts(config: dict) -> tuple[int, int]:
    """(parameters, parameter bytes in bf16) of the model built on the meta device."""
    from harness.trace import build_config

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(build_config(config), dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    return n, 2 * n


# ---- the tracker's event log ----------------------------------------------------------------------------
def test_tracker_records_allocations_and_frees_in_order():
    tr = StorageTracker(record_events=True)
    with tr:
        with tr.phase("a"):
            x = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
            y = torch.empty(0)  # no event: the allocator ignores malloc(0)
            z = x.view(10, 100)  # a view: no event
            del x, z
        with tr.phase("b"):
            w = torch.empty(300, dtype=torch.uint8)
            del w
    assert tr.events == [(0, 4000), (0, 0), (1, 300), (1, 0)]
    assert tr.phase_marks == [(0, "a"), (2, "b")]
    assert tr.slot_categories == ["activations", "activations"]
    assert StorageTracker().events is None  # off by default: `vramcal trace` keeps no log
    del y


def test_simulate_events_replays_the_trace_in_the_allocator_model():
    # forward of a 2-layer llama: the allocator model's peak is the tracker's (512-byte blocks) plus the
    # whole-block remainders the caching allocator hands out, never less
    run = run_trace(_llama_2_layers(), workload="forward", context=256, batch=2, record_events=True)
    f = simulate_events(run.tracker)
    traced = run.result.peak_allocated_bytes - run.parameter_bytes - run.buffer_bytes - 32 * 2**20
    assert traced <= f["sim_allocated_bytes"] <= traced * 1.02 + 2**20
    assert f["sim_reserved_bytes"] >= f["sim_allocated_bytes"]
    assert f["sim_peak_step"] == 0


# ---- the engine against the replay ----------------------------------------------------------------------
@pytest.mark.parametrize("workload", [GEN, FWD, replace(GEN, cache="static")], ids=["generate", "forward", "static"])
def test_trace_engine_agrees_with_the_replay(workload):
    config = _llama_2_layers()
    spec = spec_from_config(config, "llama-2l")
    replayed = estimate(spec, workload)
    traced = trace_estimate(config, "llama-2l", workload)
    assert traced.engine == "trace" and traced.engine_version == transformers.__version__
    assert replayed.engine == "replay"
    assert traced.weights_bytes == replayed.weights_bytes
    assert traced.num_parameters == replayed.num_parameters == spec.num_parameters
    error = (traced.peak_allocated_bytes - replayed.peak_allocated_bytes) / replayed.peak_allocated_bytes
    assert abs(error) <= 0.02, f"peak allocated: trace engine {error:+.2%} from the replay"
    assert abs(traced.total_bytes - replayed.total_bytes) <= 0.03 * replayed.total_bytes
    # the cache holds context - 1 tokens at the end (the last token is never fed); the replay counts context
    assert abs(traced.kv_cache_bytes - replayed.kv_cache_bytes) <= replayed.kv_cache_bytes / 256 + 1
    assert traced.peak_phase == replayed.peak_phase


# ---- a model type the replay does not know ---------------------------------------------------------------
def test_unknown_type_gets_a_sane_trace_estimate():
    config = _unknown_2_layers()
    with pytest.raises(UserError, match="olmo"):
        spec_from_config(config, "olmo")  # the replay cannot read it
    est = trace_estimate(config, "olmo-2l", GEN, DEFAULT)
    n, weights = _meta_counts(config)
    cfg = transformers.AutoConfig.for_model("olmo")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # KV: 2 layers x (K, V) x batch 2 x kv heads x head dim x (context - 1) tokens x 2 bytes
    kv = 2 * 2 * 2 * cfg.num_key_value_heads * head_dim * (GEN.context - 1) * 2
    assert est.engine == "trace" and est.engine_version == transformers.__version__
    assert est.num_parameters == n and est.weights_bytes == weights
    assert est.kv_cache_bytes == kv
    assert est.weights_bytes + est.kv_cache_bytes < est.peak_allocated_bytes <= est.peak_reserved_bytes
    assert est.peak_allocated_bytes < est.total_bytes
    assert est.low_bytes < est.total_bytes < est.high_bytes
    assert est.activation_bytes > 0 and est.overhead_bytes > 0
    # with the first-principles coefficients, the estimate's peak allocated is the trace's own peak
    truth = est.features["trace_peak_allocated_bytes"]
    assert abs(est.peak_allocated_bytes - truth) <= 0.02 * truth
    assert est.as_dict()["engine"] == "trace"

    static = trace_estimate(config, "olmo-2l", replace(GEN, cache="static"), DEFAULT)
    # StaticCache(max_cache_len = context - 1), as generate makes it, and each layer's int64 length counter
    assert static.kv_cache_bytes == kv + 2 * 8


def test_linear_attention_states_count_as_cache():
    # Qwen3-Next's gated delta-net layers keep conv and recurrent states, made outside cache.update
    config = dict(load_model("qwen3-next-80b-a3b").config)
    config.update(num_hidden_layers=4, num_experts=16, layer_types=["linear_attention"] * 3 + ["full_attention"])
    spec = spec_from_config(config, "qwen3-next-4l")
    traced = trace_estimate(config, "qwen3-next-4l", GEN, DEFAULT)
    replayed = estimate(spec, GEN, DEFAULT)
    assert abs(traced.kv_cache_bytes - replayed.kv_cache_bytes) <= 0.01 * replayed.kv_cache_bytes


# ---- choosing the engine ---------------------------------------------------------------------------------
def test_engine_choice(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_unknown_2_layers()))
    assert resolve_model("llama-3.2-1b").engine == "replay"
    assert resolve_model("llama-3.2-1b", "trace").engine == "trace"
    model = resolve_model(str(path))
    assert model.engine == "trace" and model.spec is None and model.name == tmp_path.name
    assert model.max_position_embeddings == transformers.AutoConfig.for_model("olmo").max_position_embeddings
    with pytest.raises(UserError, match="replay engine does not know model_type 'olmo'"):
        resolve_model(str(path), "replay")


def test_few_probe_search_finds_the_boundary_in_few_probes():
    # affine (a dynamic cache) and quadratic (eager scores) memory profiles; a bisection takes ~17-20
    for a, b, c, hi in [(1e9, 3e5, 0.0, 131072), (5e8, 1e6, 0.0, 2**20), (1e9, 2e5, 40.0, 131072)]:
        f = lambda n: a + b * n + c * n * n  # noqa: E731
        for budget in (f(1) - 1, f(777), f(hi // 3) + 0.5, f(hi) + 1):
            calls = []
            got = _few_probe_search(lambda n: calls.append(n) or f(n), 1, hi, budget)
            assert got == _bisect(f, hi, budget)
            assert len(calls) <= 8, (a, b, c, budget, calls)


def _bisect(f, hi, budget):
    if f(1) > budget:
        return None
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if f(mid) <= budget else (lo, mid - 1)
    return lo


# ---- the CLI ---------------------------------------------------------------------------------------------
def _vramcal(*args, hide_torch: bool = False):
    code = "import sys\n"
    if hide_torch:  # as if the harness extra were not installed
        code += "sys.modules['torch'] = None\nsys.modules['transformers'] = None\n"
    code += "from vramcal.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_cli_estimate_of_an_unknown_type_uses_the_trace(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_unknown_2_layers()))
    r = _vramcal("estimate", str(path), "--context", "512", "--batch", "2", "--new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["engine"] == "trace" and out["engine_version"] == transformers.__version__
    assert out["weights_bytes"] == _meta_counts(_unknown_2_layers())[1]
    assert out["low_bytes"] <= out["total_bytes"] <= out["high_bytes"] and out["gpus"]

    text = _vramcal("estimate", str(path), "--context", "512", "--batch", "2", "--new-tokens", "4")
    assert text.returncode == 0, text.stderr
    assert "engine: trace (fake-tensor trace, transformers" in text.stdout
    replay = _vramcal("estimate", "llama-3.2-1b", "--json")
    assert json.loads(replay.stdout)["engine"] == "replay"


def test_cli_without_torch_names_the_extra(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_unknown_2_layers()))
    r = _vramcal("estimate", str(path), hide_torch=True)
    assert r.returncode == 2
    assert "pip install 'vramcal[harness]'" in r.stderr and "olmo" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    ok = _vramcal("estimate", "llama-3.2-1b", "--json", hide_torch=True)  # the replay needs no torch
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["engine"] == "replay"


def test_cli_max_batch_on_the_trace_engine(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_unknown_2_layers()))
    r = _vramcal("max-batch", str(path), "--gpu", "L4", "--context", "2048", "--new-tokens", "2", "--point",
                 "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["engine"] == "trace" and out["probes"] <= 8
    best = out["max_batch"]
    assert best and best > 1
    model = resolve_model(str(path))
    wl = Workload(context=2048, batch=best, new_tokens=2)
    from estimator.coefficients import select_coefficients
    from estimator.gpus import find_gpu

    gpu = find_gpu("L4")
    c = select_coefficients("transformers", gpu.name)
    assert trace_estimate(model.config, model.name, wl, c, gpu).total_bytes <= gpu.memory_bytes
    assert trace_estimate(model.config, model.name, replace(wl, batch=best + 1), c, gpu).total_bytes > gpu.memory_bytes
