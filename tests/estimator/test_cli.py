"""The light CLI as a user runs it: subprocesses, exit codes, one-line errors, JSON."""

import json
import subprocess
import sys

import pytest

GIB = 2**30


def vramcal(*args):
    return subprocess.run([sys.executable, "-m", "vramcal", *args], capture_output=True, text=True, timeout=60)


def test_estimate_json_matches_the_issue():
    r = vramcal("estimate", "llama-3.1-8b", "--context", "8192", "--batch", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["weights_bytes"] == 16_060_522_496
    assert out["kv_cache_bytes"] == 4 * GIB
    assert out["low_bytes"] <= out["total_bytes"] <= out["high_bytes"]
    assert out["inputs"]["context"] == 8192 and out["inputs"]["batch"] == 4
    assert {g["gpu"] for g in out["gpus"]} >= {"H100 SXM 80GB", "L4", "MI300X"}
    verdicts = {g["gpu"]: g["verdict"] for g in out["gpus"]}
    # 26.99e9 bytes (25.1 GiB): an 80 GB card holds it, a 24 GB one does not
    assert verdicts["H100 SXM 80GB"] == "fits" and verdicts["L4"] == "does not fit"


def test_estimate_table_labels_gib_and_gives_verdicts():
    r = vramcal("estimate", "qwen2.5-7b", "--context", "4096", "--gpu", "l4")
    assert r.returncode == 0, r.stderr
    assert "GiB" in r.stdout and "KV cache" in r.stdout and "verdict" in r.stdout
    assert "coefficients" in r.stdout
    gpu_lines = [l for l in r.stdout.splitlines() if l.strip().startswith("L4 ")]
    # Qwen2.5-7B bf16 at 4k: 15.2 GB of weights alone, about 17.5 GiB in all: fits a 22.5 GiB L4,
    # and --gpu lists it first
    assert gpu_lines and gpu_lines[0].rstrip().endswith(" fits")
    table = [l for l in r.stdout.splitlines() if "verdict" in l]
    following = r.stdout.splitlines()[r.stdout.splitlines().index(table[0]) + 1]
    assert following.strip().startswith("L4")


@pytest.mark.parametrize("args, needle", [
    (["estimate", "llama-3.1-8"], "did you mean"),
    (["estimate", "llama-3.1-8b", "--context", "0"], "positive integer"),
    (["estimate", "llama-3.1-8b", "--batch", "-2"], "positive integer"),
    (["estimate", "llama-3.1-8b", "--gpu", "voodoo2"], "unknown GPU"),
    (["estimate", "llama-3.1-8b", "--quant", "gptq-int3"], "quant"),
    (["max-batch", "llama-3.1-8b", "--gpu", "h100"], "--context"),
    (["estimate", "/nonexistent/config.json"], "unknown model"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    r = vramcal(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr


def test_config_missing_a_key_names_it(tmp_path):
    cfg = json.loads(open("configs/models/llama-3.2-1b.json").read())
    del cfg["hidden_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    r = vramcal("estimate", str(path))
    assert r.returncode == 2
    assert "hidden_size" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_folder_with_a_config_is_a_model(tmp_path):
    (tmp_path / "config.json").write_text(open("configs/models/qwen2.5-0.5b.json").read())
    r = vramcal("estimate", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["weights_bytes"] == 494_032_768 * 2  # Qwen2.5-0.5B, tied embeddings


def test_hub_repo_id_offline_fails_in_one_line(tmp_path):
    import os
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", VRAMCAL_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "vramcal", "estimate", "someorg/some-model"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "Hugging Face Hub" in r.stderr


def test_models_lists_the_catalogue():
    r = vramcal("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) >= 25
    by_name = {row["name"]: row for row in rows}
    assert by_name["llama-3.1-8b"]["num_parameters"] == 8_030_261_248


def test_max_context_and_max_batch_json():
    r = vramcal("max-context", "llama-3.1-8b", "--gpu", "L4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["max_context"] > 1000
    r = vramcal("max-batch", "llama-3.1-8b", "--gpu", "H100", "--context", "8192", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["max_batch"] >= 16


def test_importing_estimator_stays_light():
    code = ("import sys, estimator, estimator.cli, vramcal.cli; vramcal.cli.build_parser();"
            "heavy = {'torch', 'transformers', 'pandas', 'scipy', 'numpy', 'accelerate', 'pynvml'};"
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_replay_states_the_transformers_version_it_mirrors():
    from estimator.replay import TRANSFORMERS_VERSION

    r = vramcal("estimate", "qwen2.5-0.5b", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["engine"] == "replay" and out["engine_version"] == TRANSFORMERS_VERSION == "5.17"
    r = vramcal("estimate", "qwen2.5-0.5b")
    assert r.returncode == 0, r.stderr
    assert f"engine: replay (allocator replay of transformers {TRANSFORMERS_VERSION}, no torch)" in r.stdout
