"""Regression tests for the confident wrong answers a new user ran into (issue "Wrong answers and bad input")."""

import json
import subprocess
import sys

import pytest

from estimator import Workload, estimate, load_model, max_batch, max_context
from estimator.coefficients import load_coefficients, select_coefficients
from estimator.errors import UserError
from estimator.estimate import OTHER_GPU_ABS_BYTES, OTHER_GPU_REL, bounds
from estimator.gpus import all_gpus, find_gpu
from estimator.quant import weights_bytes

GIB = 2**30


def vramcal(*args):
    return subprocess.run([sys.executable, "-m", "vramcal", *args], capture_output=True, text=True, timeout=120)


# 1. GPU names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["A100-40G", "A100 40", "a100 40g", "A100 40GB", "NVIDIA A100-SXM4-40GB",
                                  "a100-40gb"])
def test_a100_40_spellings_are_the_40gb_card(name):
    gpu = find_gpu(name)
    assert "40GB" in gpu.name
    assert 40 * 10**9 < gpu.memory_nvml_bytes < 44 * 10**9


@pytest.mark.parametrize("name", ["A100-80G", "a100 80", "NVIDIA A100-SXM4-80GB", "A100 80GB PCIe"])
def test_a100_80_spellings_are_the_80gb_card(name):
    assert "80GB" in find_gpu(name).name


def test_a_bare_a100_is_ambiguous_and_lists_both():
    with pytest.raises(UserError) as err:
        find_gpu("A100")
    assert "ambiguous" in str(err.value) and "40GB" in str(err.value) and "80GB" in str(err.value)


def test_every_name_and_alias_in_the_table_resolves_to_its_own_card():
    for gpu in all_gpus():
        for alias in (gpu.name, *gpu.aliases):
            found = find_gpu(alias)
            assert found.memory_bytes == gpu.memory_bytes, (alias, found.name, gpu.name)


def test_the_table_has_the_cards_people_plan_for():
    for name in ("T4", "L4", "A10G", "L40S", "A100 40GB", "A100 80GB", "H100 PCIe", "H100 SXM", "H100 NVL",
                 "H200", "B200", "RTX 3090", "RTX 4090", "RTX 5090", "RTX 6000 Ada", "MI300X"):
        find_gpu(name)
    for gpu in all_gpus():
        assert gpu.memory_torch_bytes is None or gpu.memory_torch_bytes <= gpu.memory_nvml_bytes, gpu.name


def test_reference_records_gpu_name_resolves_to_the_h100():
    # the 71 reference records were measured on "NVIDIA H100 80GB HBM3", 85,520,809,984 bytes by NVML
    gpu = find_gpu("NVIDIA H100 80GB HBM3")
    assert gpu.memory_nvml_bytes == 85_520_809_984


def test_max_context_on_a100_40g_is_the_40gb_cards():
    spec, w = load_model("llama-3.1-8b"), Workload(context=1024, batch=4)
    on_40 = max_context(spec, w, "A100-40G")["max_context"]
    on_80 = max_context(spec, w, "A100 80GB")["max_context"]
    # weights 16.06e9 bytes; 4 sequences x 128 KiB of KV per token: 40 GB leaves room for about 20k
    # tokens, 80 GB for about 64k (the wrong answer was 52,313 on the 40 GB card)
    assert 10_000 < on_40 < 22_000
    assert on_80 > 2 * on_40


# 2. GGUF under transformers ------------------------------------------------------------------------


def test_gguf_under_transformers_counts_dequantized_weights():
    spec = load_model("llama-3.1-8b")
    est = estimate(spec, Workload(context=2048, quant="gguf-q4_k_m"))
    assert est.weights_bytes == 8_030_261_248 * 2  # every parameter at bf16, as transformers holds them
    assert any("dequantizes" in n for n in est.notes)
    vllm = estimate(spec, Workload(context=2048, quant="gguf-q4_k_m", framework="vllm"))
    assert vllm.weights_bytes == weights_bytes(spec, "bfloat16", "gguf-q4_k_m")
    assert vllm.weights_bytes < est.weights_bytes / 3  # ~4.9 bits per weight


# 3. weight formats are not compute dtypes ----------------------------------------------------------


@pytest.mark.parametrize("dtype, hint", [("int4", "--quant gptq-int4"), ("int8", "--quant bnb-int8"),
                                         ("fp8", "--quant fp8")])
def test_weight_formats_are_refused_as_dtype(dtype, hint):
    r = vramcal("estimate", "llama-3.1-8b", "--dtype", dtype)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "not a compute dtype" in r.stderr and hint in r.stderr


# 4. another GPU's calibration is said and widens the interval --------------------------------------


def test_coefficients_of_another_gpu_widen_the_interval_by_the_stated_rule():
    spec, w = load_model("qwen2.5-7b"), Workload(context=4096)
    c = select_coefficients("transformers", None)
    assert c.calibrated and find_gpu(c.gpu).name == find_gpu("H100").name
    own = estimate(spec, w, c, "H100")
    other = estimate(spec, w, c, "L4")
    assert own.total_bytes == other.total_bytes
    iv = c.interval
    assert own.high_bytes == round(own.total_bytes * (1 + iv["high"]))
    assert other.high_bytes == round(own.total_bytes * (1 + iv["high"]) * (1 + OTHER_GPU_REL) + OTHER_GPU_ABS_BYTES)
    assert other.low_bytes == round(own.total_bytes * (1 + iv["low"]) * (1 - OTHER_GPU_REL) - OTHER_GPU_ABS_BYTES)
    assert not own.notes and any("fitted on" in n and "L4" in n for n in other.notes)
    rows = {r["gpu"]: r for r in own.verdicts()}
    assert rows[find_gpu("H100").name]["calibrated"] and not rows["L4"]["calibrated"]
    assert rows["L4"]["high_bytes"] == other.high_bytes


def test_the_text_output_says_where_the_coefficients_come_from():
    r = vramcal("estimate", "qwen2.5-7b", "--gpu", "L4")
    assert r.returncode == 0, r.stderr
    assert "calibrated on H100" in r.stdout and "L4 has none" in r.stdout
    assert "L4 *" in r.stdout  # the verdict row is marked as borrowing another GPU's calibration


def test_a_widened_verdict_can_turn_fits_into_tight():
    c = select_coefficients("transformers", None)
    total = 20 * GIB
    _, high_own = bounds(total, c, None)
    _, high_other = bounds(total, c, find_gpu("L4"))
    assert high_other - high_own >= OTHER_GPU_ABS_BYTES


# 5. contexts beyond the model's positions ----------------------------------------------------------


def test_learned_positions_refuse_a_longer_context():
    r = vramcal("estimate", "gpt2", "--context", "5000")
    assert r.returncode == 2 and "learned absolute position" in r.stderr and "1,024" in r.stderr
    r = vramcal("max-batch", "gpt2", "--gpu", "H100", "--context", "5000")
    assert r.returncode == 2 and "learned absolute position" in r.stderr


def test_rope_models_beyond_their_positions_answer_and_say_so():
    r = vramcal("estimate", "llama-3.1-8b", "--context", "200000", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["beyond_trained_positions"] is True
    assert any("131,072" in n for n in out["notes"])
    r = vramcal("estimate", "llama-3.1-8b", "--context", "200000")
    assert "beyond llama-3.1-8b's 131,072 trained positions" in r.stdout
    within = estimate(load_model("llama-3.1-8b"), Workload(context=8192))
    assert not within.beyond_trained_positions and not within.notes


def test_absurd_contexts_are_refused():
    r = vramcal("estimate", "llama-3.1-8b", "--context", str(10**30))
    assert r.returncode == 2 and "beyond any" in r.stderr


def test_default_context_fits_the_models_positions():
    r = vramcal("estimate", "gpt2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["inputs"]["context"] == 1024


# Options accepted and ignored ----------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["max-context", "llama-3.1-8b", "--gpu", "H100", "--context", "5"], "unrecognized arguments: --context"),
    (["max-batch", "llama-3.1-8b", "--gpu", "H100", "--context", "4096", "--batch", "3"], "unrecognized arguments: --batch"),
    (["estimate", "llama-3.1-8b", "--max-cache-len", "9000"], "--cache static"),
    (["estimate", "llama-3.1-8b", "--framework", "vllm", "--cache", "static"], "vLLM"),
    (["estimate", "llama-3.1-8b", "--workload", "forward", "--new-tokens", "100"], "--new-tokens applies"),
    (["estimate", "llama-3.1-8b", "--gpu", ""], "no GPU name"),
    (["estimate", "llama-3.1-8b", "--quant", "gptq-int4-g7"], "power of two"),
])
def test_options_that_would_be_ignored_are_refused(args, needle):
    r = vramcal(*args)
    assert r.returncode == 2, r.stdout
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


# Output that said the wrong thing ------------------------------------------------------------------


def test_gpt_oss_says_eager_and_forward_says_forward():
    r = vramcal("estimate", "gpt-oss-20b", "--context", "2048")
    assert r.returncode == 0, r.stderr
    assert "eager attention" in r.stdout.splitlines()[0]
    r = vramcal("estimate", "qwen2.5-0.5b", "--workload", "forward", "--context", "2048")
    assert "peak in the forward pass" in r.stdout and "prefill" not in r.stdout


def test_tiny_models_and_huge_values_print_readably(tmp_path):
    cfg = json.loads(open("configs/models/llama-3.2-1b.json").read())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=1000)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = vramcal("estimate", str(tmp_path), "--context", "64")
    assert r.returncode == 0, r.stderr
    assert "0.00 B parameters" not in r.stdout
    params = 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64 + 1000 * 64 * (1 if cfg.get("tie_word_embeddings") else 2)
    assert f"{params:,} parameters" in r.stdout.splitlines()[0]
    r = vramcal("estimate", "llama-3.1-405b", "--context", "131072", "--batch", "4096")
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        if line.strip().startswith(("weights", "KV cache", "total")):
            assert len(line.split()) >= 3, line  # label, GiB and bytes stay separate columns
