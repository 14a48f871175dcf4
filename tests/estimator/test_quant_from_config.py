"""config.json's quantization_config picks the weight format (estimator.quant.quant_from_config).

Field names and defaults follow transformers 5.17's quantization configs (utils/quantization_config.py:
GPTQConfig, AwqConfig, FineGrainedFP8Config, BitsAndBytesConfig, TorchAoConfig, Mxfp4Config) and the
compressed-tensors ``config_groups`` schema that llm-compressor writes.
"""

import json

import pytest

from estimator.catalogue import CONFIG_DIR
from estimator.errors import UserError
from estimator.quant import normalize_quant, quant_from_config


def qc(**fields) -> dict:
    return {"model_type": "llama", "quantization_config": fields}


@pytest.mark.parametrize("fields, fmt, words", [
    (dict(quant_method="gptq", bits=4, group_size=128, desc_act=False), "gptq-int4", "gptq 4-bit, group 128"),
    (dict(quant_method="gptq", bits=4, group_size=32, desc_act=True), "gptq-int4-g32", "group 32, act-order"),
    (dict(quant_method="gptq", bits=8, group_size=-1), "gptq-int8-g-1", "gptq 8-bit, per channel"),
    (dict(quant_method="awq", bits=4, group_size=128, version="gemm"), "awq-int4", "awq 4-bit, group 128"),
    (dict(quant_method="awq", w_bit=4, q_group_size=64, version="gemv"), "awq-int4-g64", "gemv kernels"),
    (dict(quant_method="fp8", activation_scheme="dynamic", weight_block_size=[128, 128]), "fp8-block",
     "fp8, 128x128 blocks"),
    (dict(quant_method="fp8", weight_block_size=None), "fp8", "fp8, per-tensor scale"),
    (dict(quant_method="fbgemm_fp8"), "fp8-channel", "per-channel"),
    (dict(quant_method="mxfp4"), "mxfp4", "mxfp4"),
    (dict(quant_method="bitsandbytes", load_in_4bit=True, bnb_4bit_quant_type="nf4",
          bnb_4bit_use_double_quant=True), "bnb-nf4", "4-bit nf4, double quantization"),
    (dict(quant_method="bitsandbytes", load_in_4bit=True), "bnb-fp4-nodq", "4-bit fp4"),  # BitsAndBytesConfig defaults
    (dict(load_in_8bit=True), "bnb-int8", "8-bit"),  # written before quant_method existed
    (dict(quant_method="torchao", quant_type="int4_weight_only", quant_type_kwargs={"group_size": 64}),
     "torchao-int4wo-g64", "torchao int4 weight-only, group 64"),
    (dict(quant_method="torchao", quant_type={"default": {"_type": "Int8WeightOnlyConfig", "_data": {}}}),
     "torchao-int8wo", "int8 weight-only"),
    (dict(quant_method="compressed-tensors", format="float-quantized", config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}),
     "fp8-channel", "compressed-tensors (float-quantized) fp8, per-channel"),
    (dict(quant_method="compressed-tensors", format="float-quantized", config_groups={"group_0": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]}}}),
     "fp8-block", "128x128 blocks"),
    (dict(quant_method="compressed-tensors", format="pack-quantized", config_groups={"group_0": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}),
     "gptq-int4", "int4, group 128 (sized as the GPTQ int4 layout)"),
])
def test_quantization_config_picks_the_format(fields, fmt, words):
    name, source = quant_from_config(qc(**fields))
    assert name == fmt and normalize_quant(name) == name
    assert source.startswith("config.json quantization_config: ") and words in source


def test_no_quantization_config_means_no_format():
    assert quant_from_config({"model_type": "llama"}) == (None, "")
    assert quant_from_config({"model_type": "llama", "quantization_config": None}) == (None, "")


def test_catalogue_configs_carry_their_formats():
    gpt_oss = json.loads((CONFIG_DIR / "gpt-oss-20b.json").read_text())
    assert quant_from_config(gpt_oss)[0] == "mxfp4"
    deepseek = json.loads((CONFIG_DIR / "deepseek-v3.json").read_text())
    assert quant_from_config(deepseek)[0] == "fp8-block"


def test_wrapper_reads_its_own_or_its_text_configs_quantization():
    nested = {"model_type": "gemma3", "text_config": {"quantization_config": {"quant_method": "mxfp4"}}}
    assert quant_from_config(nested)[0] == "mxfp4"
    top = {**nested, "quantization_config": {"quant_method": "gptq", "bits": 8}}
    assert quant_from_config(top)[0] == "gptq-int8"


@pytest.mark.parametrize("fields, message", [
    (dict(quant_method="hqq"), r"quant_method 'hqq' is not supported; supported: gptq, awq, .*torchao"),
    (dict(quant_method="gptq", bits=3), r"gptq 3-bit is not supported; supported: 4-bit, 8-bit"),
    (dict(quant_method="gptq", bits="4"), r"'bits' must be an integer"),
    (dict(quant_method="gptq", bits=4, group_size=0), r"group size must be positive or -1"),
    (dict(quant_method="fp8", weight_block_size=[128, 64]), r"fp8 block \[128, 64\] is not supported"),
    (dict(quant_method="bitsandbytes"), r"without load_in_4bit or load_in_8bit"),
    (dict(quant_method="torchao", quant_type="float8_dynamic_activation_float8_weight"), r"torchao .* not supported"),
    (dict(quant_method="compressed-tensors", config_groups={"g": {"weights": {"num_bits": 4, "type": "float",
                                                                             "strategy": "tensor_group"}}}),
     r"compressed-tensors float 4-bit tensor_group weights are not supported"),
])
def test_unsupported_settings_are_user_errors_naming_the_supported_ones(fields, message):
    with pytest.raises(UserError, match=message):
        quant_from_config(qc(**fields))
