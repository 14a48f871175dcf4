"""device_map cases in the harness, on the CPU: the case, its key, the sweep setting, the record schema,
and the config build path (random weights, transformers' own _get_device_map, accelerate's
dispatch_model) run for real on a tiny model. The measurement on several GPUs is in test_gpu_multigpu.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.errors import UserError
from estimator.records import case_key, validate_record
from harness.case import Case

REPO = Path(__file__).resolve().parents[2]
TINY = {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    config = json.loads((REPO / "configs" / "models" / "llama-3.2-1b.json").read_text())
    config.update(TINY, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("models") / "llama-tiny.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_case_validates_device_map_and_gpus(tiny):
    case = Case.make(tiny, context=32, device_map="auto", gpus=2)
    assert case.key().endswith("|device_map=auto|gpus=2")
    single = Case.make(tiny, context=32)
    assert "device_map" not in single.key()  # keys of records measured before the fields are unchanged
    assert case.process_group() != single.process_group() and case.build_group() != single.build_group()
    for kw in ({"gpus": 2}, {"device_map": "auto", "device": "cpu"}, {"device_map": "everywhere"},
               {"device_map": "auto", "gpus": 0}, {"device_map": "auto", "memory_limit_bytes": 2**30}):
        with pytest.raises(UserError):
            Case.make(tiny, context=32, **kw)


def test_sweep_gpus_setting(tmp_path, tiny):
    from harness.sweep import expand, load_sweep

    path = tmp_path / "two.toml"
    path.write_text(f'device = "cuda"\ngpus = 2\n[[matrix]]\nmodels = ["{tiny}"]\ncontexts = [32, 64]\n')
    sweep = load_sweep(path)
    assert sweep.gpus == 2 and sweep.device_map == "auto"
    cases, _ = expand(sweep)
    assert {(c.gpus, c.device_map) for c in cases} == {(2, "auto")}
    for bad in ('gpus = 0', 'gpus = 2\ndevice = "cpu"', 'gpus = 2\ndevice_map = "all"', 'gpus = true',
                'gpus = 2\nmemory_limit_bytes = 1000'):
        path.write_text(f'{bad}\n[[matrix]]\nmodels = ["{tiny}"]\ncontexts = [32]\n')
        with pytest.raises(UserError):
            load_sweep(path)


def test_a_device_map_record_fits_the_schema(tiny):
    from harness.worker import base_record

    case = Case.make(tiny, context=32, device_map="balanced", gpus=2)
    devices = [{"index": i, "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_uuid": f"GPU-{i}", "gpu_memory_bytes": 85 * 2**30,
                "baseline_nvml_bytes": 0, "context_bytes": 500 * 2**20} for i in range(2)]
    env = {"framework": "transformers", "framework_version": "5.17.0", "torch_version": "2.13", "gpu_name": devices[0]["gpu_name"],
           "gpu_memory_bytes": 85 * 2**30, "context_bytes": 500 * 2**20, "harness_version": "0.1.0",
           "python_version": "3.11", "cuda_version": "12.8", "driver_version": "570", "gpu_uuid": "GPU-0",
           "baseline_nvml_bytes": 0, "env": {}, "devices": devices}
    rec = base_record(case, env)
    assert rec["case_key"] == case.key(env["gpu_name"]) == case_key(rec)
    per = [dict(d, peak_allocated_bytes=1000, peak_reserved_bytes=2**21, peak_nvml_bytes=2**29, weights_bytes=900,
                nvml_samples=3) for d in devices]
    rec.update(status="ok", weights_bytes=1800, peak_allocated_bytes=2000, peak_reserved_bytes=2**22,
               peak_nvml_bytes=2**30, duration_s=0.1, devices=per, hf_device_map={"model.layers.0": "0", "lm_head": "1"},
               offloaded_weights_bytes=0)
    validate_record(rec)
    rec["devices"][0]["peak_vram"] = 1  # a field the schema does not know
    with pytest.raises(UserError):
        validate_record(rec)


def test_config_build_places_with_transformers_and_runs(tiny):
    pytest.importorskip("accelerate")
    torch = pytest.importorskip("torch")
    from harness.backends import transformers as backend
    from harness.multigpu import device_map_of, weights_by_device

    case = Case.make(tiny, context=24, new_tokens=4, device_map="auto", batch=2)
    model = backend.build(case, "cuda")  # the device_map path never touches the device argument
    placed = device_map_of(model)
    expected_devices = {"0"} if torch.cuda.is_available() else {"cpu"}
    assert placed and set(placed.values()) <= expected_devices | {"cpu", "disk"}
    assert sum(weights_by_device(model).values()) == backend.weights_bytes(model)
    if not torch.cuda.is_available():  # all on the CPU: generate runs through accelerate's hooks
        run = backend.run(model, case, "cpu")
        assert run.kv_cache_bytes > 0


@pytest.mark.parametrize("args", [("--gpus", "0"), ("--device-map", "auto", "--device", "cpu"),
                                  ("--gpus", "2", "--memory-limit-bytes", "1000")])
def test_measure_refuses_bad_gpu_options_in_one_line(tmp_path, tiny, args):
    r = subprocess.run([sys.executable, "-m", "vramcal", "measure", tiny, "--out", str(tmp_path / "r.jsonl"), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "gpus" in r.stderr or "device_map" in r.stderr or "memory_limit" in r.stderr
    assert not (tmp_path / "r.jsonl").exists()
