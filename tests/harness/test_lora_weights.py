"""LoRA adapter weights: ``estimator.lora`` against real peft adapters built on CPU and saved.

Reference: peft 0.21's own tensors (``get_peft_model``, ``add_adapter``, ``save_pretrained``): the bytes
vramcal counts must equal the adapter parameters peft holds and the data bytes of the safetensors file
peft writes (file size - 8 - header length), exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from estimator.errors import UserError  # noqa: E402
from estimator.families import spec_from_config  # noqa: E402
from estimator.lora import LoraSpec, read_adapter, safetensors_header, weight_bytes  # noqa: E402
from harness.trace import build_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 2048}


def tiny_config() -> dict:
    config = json.loads((REPO / "configs" / "models" / "llama-3.2-1b.json").read_text())
    config.update(TINY)
    config.update(bos_token_id=1, eos_token_id=2)
    return config


def peft_model(config: dict, lora: LoraSpec, dtype=torch.bfloat16):
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(build_config(config), dtype=dtype)
    targets = [n for n, _ in lora.ranks]
    r = lora.ranks[0][1]
    make = lambda: peft.LoraConfig(r=r, target_modules=targets, use_dora=lora.use_dora,  # noqa: E731
                                   modules_to_save=list(lora.modules_to_save) or None)
    model = peft.get_peft_model(base, make(), autocast_adapter_dtype=lora.dtype == "float32")
    for i in range(1, lora.adapters):
        model.add_adapter(f"extra{i}", make())
    return model


def data_bytes(path: Path) -> int:
    """The tensor bytes of a safetensors file: its size less the 8-byte length and the JSON header."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert safetensors_header(path)  # the header vramcal reads is the one peft wrote
    return len(raw) - 8 - length


CASES = {
    "r8-qv": LoraSpec.make(8, "q_proj,v_proj"),
    "r16-all": LoraSpec.make(16, "all-linear"),
    "r8-qv-x3": LoraSpec.make(8, "q_proj,v_proj", adapters=3),
    "r4-attn-bf16": LoraSpec.make(4, "q_proj,k_proj,v_proj,o_proj", dtype="bfloat16"),
    "r8-dora": LoraSpec.make(8, "q_proj,down_proj", use_dora=True),
    "r8-lm-head": LoraSpec.make(8, "q_proj", modules_to_save=("lm_head",)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_bytes_equal_peft_and_its_safetensors(name, tmp_path):
    lora = CASES[name]
    config = tiny_config()
    spec = spec_from_config(config, "llama-tiny")
    model = peft_model(config, lora)
    counted = weight_bytes(spec, lora, "bfloat16")
    held = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if "lora_" in n or "modules_to_save" in n)
    assert counted == held
    model.save_pretrained(tmp_path)
    files = sorted(tmp_path.rglob("adapter_model.safetensors"))
    assert len(files) == lora.adapters
    assert counted == sum(data_bytes(f) for f in files)
    # read back from the folder: the same bytes (per adapter, times the adapters loaded)
    read = read_adapter(str(tmp_path), adapters=lora.adapters, dtype=lora.dtype)
    assert dict(read.ranks) == dict(lora.ranks) and read.use_dora == lora.use_dora
    assert weight_bytes(spec, read, "bfloat16") == counted


def test_merged_adapter_costs_nothing():
    spec = spec_from_config(tiny_config(), "llama-tiny")
    assert weight_bytes(spec, LoraSpec.make(8, merged=True), "bfloat16") == 0


@pytest.mark.parametrize("make, match", [
    (lambda: LoraSpec.make(8, "q_prj"), "did you mean q_proj"),
    (lambda: LoraSpec.make(0), "--lora-rank"),
    (lambda: LoraSpec.make(8, adapters=0), "--lora-adapters"),
    (lambda: LoraSpec.make(8, dtype="int8"), "--lora-dtype"),
    (lambda: read_adapter("/nonexistent/adapter"), "not a folder"),
])
def test_bad_lora_input_is_one_user_error(make, match):
    with pytest.raises(UserError, match=match):
        make()


def test_unreadable_adapter_files(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        read_adapter(str(tmp_path))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(UserError, match="not JSON"):
        read_adapter(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(UserError, match="not a LoRA adapter"):
        read_adapter(str(tmp_path))


def test_cli_estimate_reads_an_adapter_folder(tmp_path):
    import subprocess
    import sys

    config = tiny_config()
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    lora = CASES["r16-all"]
    peft_model(config, lora).save_pretrained(tmp_path / "adapter")
    stored = data_bytes(tmp_path / "adapter" / "adapter_model.safetensors")
    r = subprocess.run([sys.executable, "-m", "vramcal", "estimate", str(tmp_path / "tiny.json"), "--context", "256",
                        "--lora", str(tmp_path / "adapter"), "--lora-adapters", "2", "--json"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["adapter_weights_bytes"] == 2 * stored
    assert d["inputs"]["lora"]["source"] == str(tmp_path / "adapter")
