"""Weight storage per dtype and quantization format, and safetensors header reading.

Pure and fast: specs are built by hand, layouts are computed by hand from the storage each library
allocates (cited per test), safetensors files are a few bytes written in tmp_path.
"""

import json
import struct
import subprocess
import sys

import pytest

from estimator.dtypes import DTYPES, dtype_bytes, normalize_dtype
from estimator.errors import UserError
from estimator.quant import (
    QUANT_FORMATS,
    buffer_bytes,
    gguf_matrix_bytes,
    normalize_quant,
    read_safetensors_sizes,
    read_safetensors_tensors,
    weights_bytes,
)
from estimator.spec import AttentionSpec, LayerSpec, Linear, MLPSpec, ModelSpec


def make_spec(linears, other=None, layers=1, hidden=64, vocab=100, **kw):
    layer = LayerSpec(AttentionSpec("full", 4, 2, 16, 16), MLPSpec("dense", 128))
    return ModelSpec("toy", "llama", vocab, hidden, (layer,) * layers, tuple(linears), other or {}, **kw)


def one_linear(i, o, count=1, bias=False, role="mlp"):
    return make_spec([Linear(role, i, o, count, bias=bias)])


def llama_3_1_8b():
    """Llama-3.1-8B by hand: 32 layers, hidden 4096, 32/8 heads of 128, MLP 14336, vocab 128256, untied."""
    h, L, I, V = 4096, 32, 14336, 128256
    layer = LayerSpec(AttentionSpec("full", 32, 8, 128, 128), MLPSpec("dense", I))
    linears = [
        Linear("attn", h, 4096, L), Linear("attn", h, 1024, 2 * L), Linear("attn", 4096, h, L),
        Linear("mlp", h, I, 2 * L), Linear("mlp", I, h, L),
        Linear("lm_head", h, V, quantizable=False),
    ]
    return ModelSpec("llama-3.1-8b", "llama", V, h, (layer,) * L, tuple(linears),
                     {"embedding": V * h, "norm": (2 * L + 1) * h})


# --- dtypes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling, canonical", [
    ("bf16", "bfloat16"), ("torch.bfloat16", "bfloat16"), ("BFloat16", "bfloat16"),
    ("fp16", "float16"), ("half", "float16"), ("float16", "float16"),
    ("fp32", "float32"), ("float", "float32"), ("float32", "float32"),
    ("fp8", "float8_e4m3fn"), ("float8_e4m3fn", "float8_e4m3fn"), ("float8_e5m2", "float8_e5m2"),
    ("int8", "int8"), ("int4", "int4"),
])
def test_normalize_dtype(spelling, canonical):
    assert normalize_dtype(spelling) == canonical
    assert canonical in DTYPES


def test_dtype_bytes():
    assert [dtype_bytes(d) for d in ("fp32", "bf16", "fp16", "fp8", "int8", "int4")] == [4, 2, 2, 1, 1, 0.5]


def test_unknown_dtype_names_allowed_values():
    with pytest.raises(UserError, match="bfloat16.*float16"):
        normalize_dtype("bf61")


# --- plain dtypes -------------------------------------------------------------------------------------


def test_weights_at_dtype_are_params_times_bytes():
    spec = make_spec([Linear("attn", 64, 64, 4, bias=True), Linear("lm_head", 64, 100, quantizable=False)],
                     {"embedding": 6400, "norm": 192})
    assert spec.num_parameters == 4 * (64 * 64 + 64) + 6400 + 6400 + 192
    assert weights_bytes(spec, "bf16") == 2 * spec.num_parameters
    assert weights_bytes(spec, "float32") == 4 * spec.num_parameters
    assert weights_bytes(spec, "fp8") == spec.num_parameters


def test_llama_3_1_8b_bf16_is_the_published_count_times_two():
    assert weights_bytes(llama_3_1_8b(), "bfloat16") == 2 * 8_030_261_248 == 16_060_522_496


def test_buffers_are_fp32():
    assert buffer_bytes(make_spec([], buffer_elems=64)) == 256


# --- GPTQ / AWQ ---------------------------------------------------------------------------------------

# AutoGPTQ / gptqmodel QuantLinear, bits=4, group g: qweight int32 (in/8, out), qzeros int32 (in/g, out/8),
# scales fp16 (in/g, out), g_idx int32 (in,), bias fp16 (out,).
I, O = 4096, 11008
GPTQ4_G128 = (I // 8 * O * 4) + (I // 128 * O // 8 * 4) + (I // 128 * O * 2) + I * 4


def test_gptq_int4_g128_one_linear():
    assert GPTQ4_G128 == 22_544_384 + 176_128 + 704_512 + 16_384
    assert weights_bytes(one_linear(I, O), "bfloat16", "gptq-int4") == GPTQ4_G128


def test_gptq_bias_is_fp16_whatever_the_dtype():
    assert weights_bytes(one_linear(I, O, bias=True), "float32", "gptq-int4") == GPTQ4_G128 + 2 * O


def test_gptq_group_size_by_suffix_or_parameter():
    g64 = (I // 8 * O * 4) + (I // 64 * O // 8 * 4) + (I // 64 * O * 2) + I * 4
    spec = one_linear(I, O)
    assert weights_bytes(spec, "bf16", "gptq-int4-g64") == g64
    assert weights_bytes(spec, "bf16", "gptq-int4", group_size=64) == g64
    per_channel = (I // 8 * O * 4) + (O // 8 * 4) + O * 2 + I * 4  # group_size -1: one group per row
    assert weights_bytes(spec, "bf16", "gptq-int4-g-1") == per_channel


def test_gptq_int8():
    expected = (I // 4 * O * 4) + (I // 128 * O // 4 * 4) + (I // 128 * O * 2) + I * 4
    assert weights_bytes(one_linear(I, O), "bf16", "gptq-int8") == expected


def test_awq_int4_gemm_layout():
    # AutoAWQ WQLinear_GEMM: qweight int32 (in, out/8), qzeros int32 (in/g, out/8), scales fp16 (in/g, out)
    expected = I * (O // 8) * 4 + (I // 128) * (O // 8) * 4 + (I // 128) * O * 2
    assert weights_bytes(one_linear(I, O), "bf16", "awq-int4") == expected


def test_unquantized_parts_stay_at_dtype():
    spec = make_spec([Linear("mlp", I, O), Linear("lm_head", I, 1000, quantizable=False),
                      Linear("router", I, 8, quantizable=False)], {"embedding": 1000 * I, "norm": I})
    rest = 2 * (1000 * I + 8 * I + 1000 * I + I)
    assert weights_bytes(spec, "bf16", "gptq-int4") == GPTQ4_G128 + rest


# --- bitsandbytes -------------------------------------------------------------------------------------


def test_bnb_nf4_double_quant():
    # Params4bit, blocksize 64: packed uint8 n/2; quant_map 16 fp32; double quant: absmax uint8 per block,
    # nested absmax fp32 per 256 blocks, nested_quant_map 256 fp32, offset fp32.
    n = 4096 * 4096
    blocks = n // 64
    expected = n // 2 + 64 + blocks + (blocks // 256) * 4 + 1024 + 4
    assert expected == 8_388_608 + 64 + 262_144 + 4_096 + 1_028
    assert weights_bytes(one_linear(4096, 4096), "bf16", "bnb-nf4") == expected
    assert weights_bytes(one_linear(4096, 4096), "bf16", "bnb-fp4") == expected


def test_bnb_nf4_without_double_quant_keeps_fp32_absmax():
    n = 4096 * 4096
    assert weights_bytes(one_linear(4096, 4096), "bf16", "bnb-nf4-nodq") == n // 2 + 64 + n // 64 * 4


def test_bnb_int8_is_int8_plus_fp32_row_scale():
    assert weights_bytes(one_linear(I, O), "bf16", "bnb-int8") == I * O + 4 * O


def test_bnb_leaves_fused_experts_and_bias_at_dtype():
    spec = make_spec([Linear("expert", 64, 128, 8), Linear("shared_expert", 64, 128, bias=True)])
    n = 64 * 128
    shared = n // 2 + 64 + n // 64 * 4 + 2 * 128  # nodq storage + bf16 bias
    assert weights_bytes(spec, "bf16", "bnb-nf4-nodq") == 2 * 8 * n + shared


# --- fp8, torchao, mxfp4 ------------------------------------------------------------------------------


def test_fp8_per_tensor_scale():
    assert weights_bytes(one_linear(I, O, count=3), "bf16", "fp8") == 3 * (I * O + 4)


def test_fp8_block_scales_deepseek_v3():
    # DeepSeek-V3 kv_a_proj_with_mqa: weight e4m3 (576, 7168), weight_scale_inv fp32 (5, 56)
    assert weights_bytes(one_linear(7168, 576), "bf16", "fp8-block") == 576 * 7168 + 5 * 56 * 4


def test_torchao_int4wo_scale_and_zero():
    assert weights_bytes(one_linear(I, O), "bf16", "torchao-int4wo") == I * O // 2 + (I // 128) * O * 2 * 2


def test_mxfp4_quantizes_experts_only():
    spec = make_spec([Linear("expert", 2880, 5760, 32), Linear("attn", 2880, 4096)])
    expert = 2880 * 5760 // 2 + 5760 * (2880 // 32)
    assert weights_bytes(spec, "bf16", "mxfp4") == 32 * expert + 2 * 2880 * 4096


# --- GGUF ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant, bits", [("gguf-q8_0", 8.5), ("gguf-q4_0", 4.5), ("gguf-q6_k", 6.5625),
                                         ("gguf-q5_k_s", 5.5), ("gguf-q4_k_s", 4.5)])
def test_gguf_bits_per_weight(quant, bits):
    # ggml-common.h: block_q8_0 = fp16 + 32 int8 (34 B / 32); block_q4_0 = fp16 + 16 B (18 B / 32);
    # block_q6_K 210 B / 256; block_q5_K 176 B / 256; block_q4_K 144 B / 256.
    spec = make_spec([Linear("mlp", 4096, 4096)], layers=0)  # no layers: no per-layer type bumps
    assert weights_bytes(spec, "bf16", quant) * 8 / (4096 * 4096) == bits


def test_gguf_k_quant_falls_back_on_rows_not_multiple_of_256():
    # llama-quant.cpp: Q4_K -> Q5_0, Q6_K -> Q8_0 when ncols % 256 != 0 (DeepSeek-V2-Lite experts, 1408)
    assert gguf_matrix_bytes("Q4_K", 1408, 2048) == 2048 * 1408 // 32 * 22
    assert gguf_matrix_bytes("Q6_K", 1408, 2048) == 2048 * 1408 // 32 * 34
    assert gguf_matrix_bytes("Q4_K", 1408 + 16, 10) == 10 * 1424 * 2  # not even a multiple of 32: F16


def test_gguf_q4_k_m_raises_half_of_down_and_v():
    # 8 layers: use_more_bits(i, 8) holds for i in {0, 3, 6, 7}, so 4 of 8 ffn_down and attn_v get Q6_K.
    h, inter, L = 256, 512, 8
    layer = LayerSpec(AttentionSpec("full", 4, 2, 64, 64), MLPSpec("dense", inter))
    linears = [Linear("attn", h, 256, L), Linear("attn", h, 128, 2 * L), Linear("attn", 256, h, L),
               Linear("mlp", h, inter, 2 * L), Linear("mlp", inter, h, L)]
    spec = ModelSpec("toy", "llama", 100, h, (layer,) * L, tuple(linears), {"norm": (2 * L + 1) * h})

    def q4k(i, o):
        return o * i // 256 * 144

    def q6k(i, o):
        return o * i // 256 * 210

    base = L * (q4k(h, 256) + 2 * q4k(h, 128) + q4k(256, h) + 2 * q4k(h, inter) + q4k(inter, h))
    bumps = 4 * (q6k(h, 128) - q4k(h, 128)) + 4 * (q6k(inter, h) - q4k(inter, h))
    norms = (2 * L + 1) * h * 4  # 1-D tensors are F32 in GGUF
    assert weights_bytes(spec, "bf16", "gguf-q4_k_m") == base + bumps + norms
    assert normalize_quant("Q4_K") == "gguf-q4_k_m"  # llama-quantize's alias


@pytest.mark.parametrize("quant, file_bytes", [("gguf-q4_k_m", 4.92e9), ("gguf-q8_0", 8.54e9)])
def test_gguf_llama_3_1_8b_matches_published_files(quant, file_bytes):
    # bartowski/Meta-Llama-3.1-8B-Instruct-GGUF: Q4_K_M 4.92 GB, Q8_0 8.54 GB (files also hold ~8 MB of
    # tokenizer metadata); within 0.5%.
    assert weights_bytes(llama_3_1_8b(), "bf16", quant) == pytest.approx(file_bytes, rel=5e-3)


# --- names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, canonical", [
    ("GPTQ", "gptq-int4"), ("gptq-int4-g128", "gptq-int4"), ("awq_int4_g64", "awq-int4-g64"),
    ("nf4", "bnb-nf4"), ("Q4_K_M", "gguf-q4_k_m"), ("gguf-q8_0", "gguf-q8_0"), ("none", None), (None, None),
])
def test_normalize_quant(name, canonical):
    assert normalize_quant(name) == canonical


def test_every_format_is_listed_and_normalizes_to_itself():
    assert {"gptq-int4", "awq-int4", "bnb-nf4", "bnb-int8", "fp8", "fp8-block", "gguf-q4_0"} <= set(QUANT_FORMATS)
    assert all(normalize_quant(n) == n for n in QUANT_FORMATS)


def test_unknown_format_suggests_a_close_name():
    with pytest.raises(UserError, match="did you mean gptq-int4.*known: "):
        normalize_quant("gptq-in4")
    with pytest.raises(UserError):
        weights_bytes(one_linear(64, 64), "bf16", "int3-magic")
    with pytest.raises(UserError, match="no group size"):
        normalize_quant("bnb-nf4-g64")


# --- stored bytes -------------------------------------------------------------------------------------


def test_stored_bytes_of_a_quantized_checkpoint_are_the_truth():
    stored = {"a.qweight": 1000, "a.scales": 24, "lm_head.weight": 500}
    spec = make_spec([Linear("mlp", 64, 64)], stored_bytes=stored,
                     config={"quantization_config": {"quant_method": "gptq"}})
    assert weights_bytes(spec, "bf16") == weights_bytes(spec, "bf16", "bnb-nf4") == 1524


def test_stored_bytes_of_an_unquantized_checkpoint_are_recast_to_dtype():
    spec = make_spec([Linear("mlp", 64, 64)], stored_bytes={"w": 64 * 64 * 4}, config={})  # an fp32 file
    assert weights_bytes(spec, "bf16") == 64 * 64 * 2


# --- safetensors headers ------------------------------------------------------------------------------


def write_safetensors(path, tensors, metadata=None):
    """A safetensors file by hand: u64 LE header length, JSON header, zeroed data."""
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_read_hand_written_shards_through_the_index(tmp_path):
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors",
                      {"a.weight": ("BF16", [4, 8], 64), "a.qweight": ("I32", [2, 8], 64)}, {"format": "pt"})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b.weight": ("F8_E4M3", [3, 5], 15)})
    write_safetensors(tmp_path / "consolidated.safetensors", {"ignored": ("F32", [1], 4)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "a.qweight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors"}}))
    assert read_safetensors_sizes(tmp_path) == {"a.weight": 64, "a.qweight": 64, "b.weight": 15}
    assert read_safetensors_tensors(tmp_path)["a.qweight"].dtype == "I32"


def test_read_single_file_and_empty_folder(tmp_path):
    assert read_safetensors_sizes(tmp_path) == {}
    write_safetensors(tmp_path / "model.safetensors", {"w": ("F16", [2, 3], 12)})
    assert read_safetensors_sizes(tmp_path) == {"w": 12}


def test_read_file_written_by_the_safetensors_package(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    st.save_file({"x": torch.zeros(3, 5, dtype=torch.bfloat16), "q": torch.zeros(7, dtype=torch.int32),
                  "f": torch.zeros(2, 2, dtype=torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    assert read_safetensors_sizes(tmp_path) == {"x": 30, "q": 28, "f": 4}


@pytest.mark.parametrize("content", [
    b"\x01\x02",  # shorter than the length field
    struct.pack("<Q", 1 << 40) + b"{}",  # length beyond the file
    struct.pack("<Q", 5) + b"{not}",  # not JSON
    struct.pack("<Q", 2) + b"[]",  # not an object
])
def test_corrupt_header_is_a_user_error_naming_the_file(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match="corrupt safetensors header in .*model.safetensors") as exc:
        read_safetensors_sizes(tmp_path)
    assert "\n" not in str(exc.value)


def test_offsets_that_disagree_with_the_shape_or_the_file_are_corrupt(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"w": ("F32", [2, 3], 20)})  # 2*3*4 = 24
    with pytest.raises(UserError, match="does not fill"):
        read_safetensors_sizes(tmp_path)
    raw = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))  # data cut short
    with pytest.raises(UserError, match="outside"):
        read_safetensors_sizes(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(UserError, match="missing"):
        read_safetensors_sizes(tmp_path)


def test_import_stays_light():
    code = "import estimator.quant, estimator.dtypes, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
