"""Weight storage: exact bytes of every parameter, per dtype or quantization format.

A quantization format is one ``QuantFormat`` entry in ``_FORMATS``: a function giving the bytes of one
quantized matrix of shape (out_features, in_features) with its scales, zeros and indices, plus what the
format does with the rest of the model. Layouts, per matrix (n = in * out, g = group size,
G = ceil(in / g) groups):

- ``gptq-int4`` / ``gptq-int8`` (AutoGPTQ / gptqmodel QuantLinear, bits b): qweight int32 (in*b/32, out),
  qzeros int32 (G, out*b/32), scales fp16 (G, out), g_idx int32 (in,); bias fp16. g_idx is stored
  with or without act-order (desc_act), so its size does not depend on it.
- ``awq-int4`` (AutoAWQ WQLinear_GEMM): qweight int32 (in, out/8), qzeros int32 (G, out/8),
  scales fp16 (G, out); bias fp16.
- ``bnb-nf4`` / ``bnb-fp4`` (bitsandbytes Params4bit, blocksize 64): packed uint8 (n/2,), the 16-entry
  fp32 code; absmax fp32 per 64 weights, or with double quantization (the default here, as in the
  QLoRA recipe and most published bnb-4bit checkpoints): absmax uint8 per 64 weights + nested fp32
  absmax per 256 of those + the nested 256-entry fp32 code + an fp32 offset. ``-nodq`` turns it off.
- ``bnb-int8`` (LLM.int8, Int8Params): CB int8 (out, in) + SCB fp32 (out,).
- ``fp8``: float8_e4m3fn (out, in) + one fp32 scale; ``fp8-channel``: + fp32 (out,) (FBGEMM fp8);
  ``fp8-block``: + fp32 (ceil(out/128), ceil(in/128)) ``weight_scale_inv`` (DeepSeek-V3,
  transformers FP8Linear).
- ``torchao-int8wo``: int8 (out, in) + scale (out,) at the model dtype + int64 zero_point (out,)
  (AffineQuantizedTensor, PlainLayout). ``torchao-int4wo``: packed int4 (n/2 bytes) + bf16
  scale_and_zero (G, out, 2) (TensorCoreTiledLayout), g = 128.
- ``mxfp4`` (gpt-oss): routed experts only, uint8 blocks (n/2) + one e8m0 uint8 scale per 32 weights.
- ``gguf-*``: llama.cpp block types, bytes = out * in/QK * block_bytes (below), with llama-quantize's
  choice of type per tensor; see ``_gguf_model_bytes``.

Transformers-style loaders (all but GGUF) leave the lm_head, routers (``Linear.quantizable`` False),
embeddings and norms at the model dtype. In transformers 5 the routed experts of MoE models are fused
3-D parameters, not ``nn.Linear``: bitsandbytes and torchao only replace ``nn.Linear``, so those
formats leave experts at the model dtype.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, NamedTuple

from estimator.dtypes import dtype_bytes
from estimator.errors import UserError
from estimator.spec import Linear, ModelSpec

# (in_features, out_features, group_size, model dtype bytes) -> bytes of one stored matrix.
MatrixBytes = Callable[[int, int, int, float], int]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _nbytes(elems: int, elem_bytes: float) -> int:
    return math.ceil(elems * elem_bytes)


def _groups(in_features: int, group: int) -> int:
    """Number of quantization groups along the input dimension; group -1 means one per row."""
    return 1 if group == -1 else _cdiv(in_features, group)


# --- one quantized matrix, per format --------------------------------------------------------------


def _gptq(bits: int) -> MatrixBytes:
    def matrix(i: int, o: int, g: int, dt: float) -> int:
        G = _groups(i, g)
        qweight = _cdiv(i * bits, 32) * o * 4  # int32 (in*bits/32, out)
        qzeros = G * _cdiv(o * bits, 32) * 4  # int32 (G, out*bits/32)
        scales = G * o * 2  # fp16 (G, out)
        g_idx = i * 4  # int32 (in,)
        return qweight + qzeros + scales + g_idx

    return matrix


def _awq4(i: int, o: int, g: int, dt: float) -> int:
    G = _groups(i, g)
    return i * _cdiv(o, 8) * 4 + G * _cdiv(o, 8) * 4 + G * o * 2  # qweight, qzeros int32; scales fp16


_BNB4_BLOCK = 64  # Params4bit blocksize on CUDA
_BNB_NESTED_BLOCK = 256  # double quantization: absmax quantized to uint8 in blocks of 256


def _bnb4(double_quant: bool) -> MatrixBytes:
    def matrix(i: int, o: int, g: int, dt: float) -> int:
        n = i * o
        blocks = _cdiv(n, _BNB4_BLOCK)
        packed = _cdiv(n, 2)  # uint8, two 4-bit codes per byte
        code = 16 * 4  # quant_map: the 16 nf4/fp4 values, fp32
        if double_quant:
            # uint8 absmax + fp32 nested absmax + nested_quant_map (256 fp32) + fp32 offset
            absmax = blocks + _cdiv(blocks, _BNB_NESTED_BLOCK) * 4 + 256 * 4 + 4
        else:
            absmax = blocks * 4
        return packed + code + absmax

    return matrix


def _bnb_int8(i: int, o: int, g: int, dt: float) -> int:
    return i * o + o * 4  # CB int8 (out, in) + SCB fp32 (out,)


def _fp8_tensor(i: int, o: int, g: int, dt: float) -> int:
    return i * o + 4  # e4m3 (out, in) + fp32 scalar scale


def _fp8_channel(i: int, o: int, g: int, dt: float) -> int:
    return i * o + o * 4  # e4m3 (out, in) + fp32 (out, 1)


def _fp8_block(i: int, o: int, g: int, dt: float) -> int:
    return i * o + _cdiv(o, g) * _cdiv(i, g) * 4  # e4m3 (out, in) + fp32 (out/128, in/128)


def _torchao_int8wo(i: int, o: int, g: int, dt: float) -> int:
    return i * o + _nbytes(o, dt) + o * 8  # int8 data + scale at model dtype + int64 zero_point


def _torchao_int4wo(i: int, o: int, g: int, dt: float) -> int:
    return _cdiv(i * o, 2) + _groups(i, g) * o * 2 * 2  # packed int4 + bf16 scale_and_zero (G, out, 2)


def _mxfp4(i: int, o: int, g: int, dt: float) -> int:
    return _cdiv(i * o, 2) + o * _cdiv(i, 32)  # fp4 pairs per byte + e8m0 scale per 32


# --- GGUF -------------------------------------------------------------------------------------------

# ggml type -> (elements per block, bytes per block); ggml-common.h block structs.
GGML_BLOCKS: Mapping[str, tuple[int, int]] = MappingProxyType({
    "F32": (1, 4),
    "F16": (1, 2),
    "Q4_0": (32, 18),  # fp16 d + 16 B of nibbles: 4.5 bits/weight
    "Q4_1": (32, 20),  # + fp16 m: 5.0
    "Q5_0": (32, 22),  # fp16 d + 4 B high bits + 16 B: 5.5
    "Q5_1": (32, 24),  # 6.0
    "Q8_0": (32, 34),  # fp16 d + 32 int8: 8.5
    "Q4_K": (256, 144),  # fp16 d, dmin + 12 B 6-bit scales + 128 B: 4.5
    "Q5_K": (256, 176),  # + 32 B high bits: 5.5
    "Q6_K": (256, 210),  # 128 B low + 64 B high + 16 int8 scales + fp16 d: 6.5625
})
# llama-quantize's fallback when a row length is not a multiple of the K-quant's 256 (llama-quant.cpp).
_GGML_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def gguf_type_for(ggml_type: str, ncols: int) -> str:
    """The type llama-quantize actually writes for rows of ``ncols`` elements."""
    if ncols % GGML_BLOCKS[ggml_type][0]:
        ggml_type = _GGML_FALLBACK.get(ggml_type, "F16")
        if ncols % GGML_BLOCKS[ggml_type][0]:
            ggml_type = "F16"
    return ggml_type


def gguf_matrix_bytes(ggml_type: str, in_features: int, out_features: int) -> int:
    """Bytes of one (out, in) matrix stored as ``ggml_type``; rows are ``in_features`` long."""
    qk, block = GGML_BLOCKS[gguf_type_for(ggml_type, in_features)]
    return out_features * (in_features // qk) * block


def _use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp: the first and last eighth of the layers, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class GGUFMix:
    """One llama-quantize file type: a base type, plus the types it gives to sensitive tensors.

    ``attn_v`` / ``ffn_down``: (layer index, layer count) -> type, or None to keep the base type.
    """

    base: str
    attn_v: Callable[[int, int], str | None] = lambda i, n: None
    ffn_down: Callable[[int, int], str | None] = lambda i, n: None
    attn_output_8_experts: str | None = None  # Mixtral-style 8-expert models

    def head(self, ncols: int) -> str:
        """output.weight (and a tied token_embd): Q6_K, or Q8_0 for a Q8_0 file or rows the base can't split."""
        return "Q8_0" if self.base == "Q8_0" or ncols % GGML_BLOCKS[self.base][0] else "Q6_K"


def _more_bits(t: str) -> Callable[[int, int], str | None]:
    return lambda i, n: t if _use_more_bits(i, n) else None


# --- the registry ------------------------------------------------------------------------------------


def _quantizes(lin: Linear) -> bool:
    return lin.quantizable


def _quantizes_linear_modules(lin: Linear) -> bool:
    # bitsandbytes / torchao replace nn.Linear only; transformers 5 stores routed experts as 3-D params
    return lin.quantizable and lin.role != "expert"


def _quantizes_experts(lin: Linear) -> bool:
    return lin.quantizable and lin.role == "expert"


@dataclass(frozen=True)
class QuantFormat:
    name: str
    description: str
    matrix_bytes: MatrixBytes  # one quantized (out, in) weight with its scales/zeros/indices
    group_size: int | None = None  # default group (or fp8 block edge); None: the format has none
    bias_bytes: float | None = None  # per bias element of a quantized linear; None: the model dtype
    quantizes: Callable[[Linear], bool] = _quantizes
    gguf: GGUFMix | None = None  # llama.cpp file types store the whole model their own way


def _gguf(name: str, description: str, mix: GGUFMix) -> QuantFormat:
    return QuantFormat(name, description, lambda i, o, g, dt: gguf_matrix_bytes(mix.base, i, o), gguf=mix)


_FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("gptq-int4", "GPTQ 4-bit, group 128 (-g<N> to change, -g-1 per channel)", _gptq(4), 128, 2),
        QuantFormat("gptq-int8", "GPTQ 8-bit, group 128 (-g<N> to change)", _gptq(8), 128, 2),
        QuantFormat("awq-int4", "AWQ 4-bit GEMM layout, group 128 (-g<N> to change)", _awq4, 128, 2),
        QuantFormat("bnb-nf4", "bitsandbytes NF4, double quantization", _bnb4(True),
                    quantizes=_quantizes_linear_modules),
        QuantFormat("bnb-nf4-nodq", "bitsandbytes NF4, no double quantization", _bnb4(False),
                    quantizes=_quantizes_linear_modules),
        QuantFormat("bnb-fp4", "bitsandbytes FP4, double quantization", _bnb4(True),
                    quantizes=_quantizes_linear_modules),
        QuantFormat("bnb-fp4-nodq", "bitsandbytes FP4, no double quantization", _bnb4(False),
                    quantizes=_quantizes_linear_modules),
        QuantFormat("bnb-int8", "bitsandbytes LLM.int8 (int8 + fp32 row scale)", _bnb_int8,
                    quantizes=_quantizes_linear_modules),
        QuantFormat("fp8", "FP8 e4m3, one fp32 scale per tensor", _fp8_tensor),
        QuantFormat("fp8-channel", "FP8 e4m3, fp32 scale per output channel (FBGEMM)", _fp8_channel),
        QuantFormat("fp8-block", "FP8 e4m3, fp32 scale per 128x128 block (DeepSeek-V3)", _fp8_block, 128),
        QuantFormat("torchao-int8wo", "torchao int8 weight-only, per channel", _torchao_int8wo,
                    quantizes=_quantizes_linear_modules),
        QuantFormat("torchao-int4wo", "torchao int4 weight-only, group 128 (-g<N> to change)", _torchao_int4wo, 128,
                    quantizes=_quantizes_linear_modules),
        QuantFormat("mxfp4", "MXFP4 routed experts (gpt-oss), e8m0 scale per 32", _mxfp4,
                    quantizes=_quantizes_experts),
        _gguf("gguf-q4_0", "GGUF Q4_0 (4.5 bits/weight), output Q6_K", GGUFMix("Q4_0")),
        _gguf("gguf-q4_k_s", "GGUF Q4_K_S (Q4_K 4.5 bits/weight, some Q5_K)", GGUFMix(
            "Q4_K", attn_v=lambda i, n: "Q5_K" if i < 4 else None,
            ffn_down=lambda i, n: "Q5_K" if i < n // 8 else None, attn_output_8_experts="Q5_K")),
        _gguf("gguf-q4_k_m", "GGUF Q4_K_M (Q4_K, Q6_K for half of attn_v/ffn_down)", GGUFMix(
            "Q4_K", attn_v=_more_bits("Q6_K"), ffn_down=_more_bits("Q6_K"), attn_output_8_experts="Q5_K")),
        _gguf("gguf-q5_k_s", "GGUF Q5_K_S (Q5_K, 5.5 bits/weight)", GGUFMix("Q5_K")),
        _gguf("gguf-q5_k_m", "GGUF Q5_K_M (Q5_K, Q6_K for half of attn_v/ffn_down)", GGUFMix(
            "Q5_K", attn_v=_more_bits("Q6_K"), ffn_down=_more_bits("Q6_K"))),
        _gguf("gguf-q6_k", "GGUF Q6_K (6.5625 bits/weight)", GGUFMix("Q6_K")),
        _gguf("gguf-q8_0", "GGUF Q8_0 (8.5 bits/weight)", GGUFMix("Q8_0")),
    )
}
QUANT_FORMATS: Mapping[str, str] = MappingProxyType({n: f.description for n, f in _FORMATS.items()})

_ALIASES = {
    "gptq": "gptq-int4", "gptq-4bit": "gptq-int4", "gptq-8bit": "gptq-int8",
    "awq": "awq-int4", "awq-4bit": "awq-int4",
    "nf4": "bnb-nf4", "fp4": "bnb-fp4", "bnb-4bit": "bnb-nf4", "bnb-8bit": "bnb-int8", "llm-int8": "bnb-int8",
    "fp8-tensor": "fp8", "fp8-per-tensor": "fp8", "fp8-e4m3": "fp8",
    "fp8-blockwise": "fp8-block", "fp8-block128": "fp8-block", "fp8-per-channel": "fp8-channel",
    "int8wo": "torchao-int8wo", "int4wo": "torchao-int4wo",
    "torchao-int8": "torchao-int8wo", "torchao-int4": "torchao-int4wo",
    # llama-quantize's own aliases: Q4_K means Q4_K_M, Q5_K means Q5_K_M
    "gguf-q4_k": "gguf-q4_k_m", "gguf-q5_k": "gguf-q5_k_m",
}
# Bare GGUF type names ("Q4_K_M") are accepted as well.
_ALIASES.update({n.removeprefix("gguf-"): n for n in _FORMATS if n.startswith("gguf-")})
_ALIASES.update({"q4_k": "gguf-q4_k_m", "q5_k": "gguf-q5_k_m"})


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


_LOOKUP = {_key(n): n for n in _FORMATS} | {_key(a): n for a, n in _ALIASES.items()}
_GROUP_SUFFIX = re.compile(r"^(?P<base>.+?)-g(?P<group>-1|[1-9][0-9]*)$")
_NONE = ("", "none", "no", "null")


def _resolve(name: str, group_size: int | None = None) -> tuple[QuantFormat, int | None]:
    """(format, group size) for a user spelling; a ``-g<N>`` suffix or ``group_size`` sets the group."""
    key = _key(str(name))
    fmt_name = _LOOKUP.get(key)
    group = None
    if fmt_name is None and (m := _GROUP_SUFFIX.match(key)):
        fmt_name = _LOOKUP.get(m["base"])
        group = int(m["group"])
        if fmt_name is not None and _FORMATS[fmt_name].group_size is None:
            raise UserError(f"quantization format {fmt_name} has no group size; drop the '-g{group}' suffix")
    if fmt_name is None:
        close = difflib.get_close_matches(key, list(_LOOKUP), n=1)
        hint = f" (did you mean {_LOOKUP[close[0]]}?)" if close else ""
        raise UserError(f"unknown quantization format {name!r}{hint}; known: {', '.join(_FORMATS)}")
    fmt = _FORMATS[fmt_name]
    if group_size is not None:
        if fmt.group_size is None:
            raise UserError(f"quantization format {fmt_name} has no group size")
        if group_size != -1 and group_size <= 0:
            raise UserError(f"group size must be a positive integer or -1, got {group_size}")
        group = group_size
    if group is None:
        group = fmt.group_size
    # Quantizers and their kernels (GPTQ/exllama/marlin, AWQ, fp8 block scaling) take power-of-two
    # groups: 32, 64, 128, 256..., or -1 for one group per output channel.
    if group is not None and group != -1 and (group < 16 or group & (group - 1)):
        raise UserError(f"group size {group} of {fmt.name} is not a power of two >= 16 (e.g. 32, 64, 128), nor -1")
    if fmt.name == "fp8-block" and group == -1:
        raise UserError("fp8-block needs a positive block size")
    return fmt, group


def normalize_quant(name: str | None) -> str | None:
    """Canonical name of a quantization format ("GPTQ" -> "gptq-int4", "awq-int4-g64" kept as such).

    None, "" and "none" mean no quantization and give None. A non-default group size stays in the
    name as ``-g<N>``; the default is dropped ("gptq-int4-g128" -> "gptq-int4").
    """
    if name is None or _key(str(name)) in _NONE:
        return None
    fmt, group = _resolve(name)
    return fmt.name if group == fmt.group_size else f"{fmt.name}-g{group}"


# --- weights ------------------------------------------------------------------------------------------


def checkpoint_is_quantized(spec: ModelSpec) -> bool:
    """A config.json that says how its checkpoint was quantized (GPTQ, AWQ, bnb, fp8, mxfp4...)."""
    return bool((spec.config or {}).get("quantization_config"))


def weights_bytes(spec: ModelSpec, dtype: str, quant: str | None = None, *, group_size: int | None = None) -> int:
    """Bytes of all parameters once loaded: exact, integer.

    Without ``quant``: every parameter at ``dtype``. With one: quantized linears in the format's storage
    (scales, zeros, g_idx, absmax included), the rest at ``dtype`` (see the module docstring).

    A quantized checkpoint read from safetensors headers (``spec.stored_bytes`` and a
    ``quantization_config`` in its config) is the truth: the sum of the stored tensors, whatever
    ``quant`` says. Unquantized checkpoints are counted from the config instead, because the loader
    casts them to ``dtype`` (an fp32 GPT-2 file loaded in bf16 holds half its file size) and drops
    stale tensors a file may carry.
    """
    dt = dtype_bytes(dtype)
    if spec.stored_bytes and checkpoint_is_quantized(spec):
        return sum(spec.stored_bytes.values())
    if normalize_quant(quant) is None:
        return _nbytes(spec.num_parameters, dt)
    fmt, group = _resolve(quant, group_size)
    if fmt.gguf is not None:
        return _gguf_model_bytes(fmt.gguf, spec, dt)
    return _transformers_model_bytes(fmt, group, spec, dt)


def _transformers_model_bytes(fmt: QuantFormat, group: int | None, spec: ModelSpec, dt: float) -> int:
    bias_b = dt if fmt.bias_bytes is None else fmt.bias_bytes
    total = 0
    for lin in spec.linears:
        if fmt.quantizes(lin):
            total += lin.count * fmt.matrix_bytes(lin.in_features, lin.out_features, group, dt)
            total += _nbytes(lin.bias_params, bias_b)
        else:
            total += _nbytes(lin.weight_params + lin.bias_params, dt)
    return total + _nbytes(sum(spec.other_params.values()), dt)


def _gguf_model_bytes(mix: GGUFMix, spec: ModelSpec, dt: float) -> int:
    """The tensors of a llama.cpp file of type ``mix``, from llama-quant.cpp's rules.

    Quantized: every 2-D weight (experts included) at the base type; output.weight at Q6_K (Q8_0 for a
    Q8_0 file), as is a tied token embedding; an untied token embedding at the base type. Kept F32 by
    convert_hf_to_gguf: 1-D tensors (norms, biases, A_log...), routers (ffn_gate_inp), position
    embeddings and the "other" parameters (conv kernels). Other non-quantizable linears at ``dtype``.

    Approximation: mixes raise attn_v and ffn_down per layer by layer index, applied here to the V slice
    of each full/sliding attention layer and to each layer's down projections (dense, every expert,
    shared expert). Fused-QKV files (Phi-3, GPT-2) raise the whole fused tensor, MLA files their kv_b,
    and llama-quantize's 70B rule (attn_v Q4_K -> Q5_K) is not applied; these move the total by well
    under 1%.
    """
    h = spec.hidden_size
    total = 0
    for lin in spec.linears:
        if lin.role == "lm_head":
            total += lin.count * gguf_matrix_bytes(mix.head(lin.in_features), lin.in_features, lin.out_features)
        elif lin.quantizable:
            total += lin.count * gguf_matrix_bytes(mix.base, lin.in_features, lin.out_features)
        elif lin.role == "router":
            total += lin.weight_params * 4
        else:
            total += _nbytes(lin.weight_params, dt)
        total += lin.bias_params * 4
    other = dict(spec.other_params)
    token_embd = min(other.pop("embedding", 0), spec.vocab_size * h)
    if token_embd:
        t = mix.head(h) if spec.tie_word_embeddings else mix.base
        total += gguf_matrix_bytes(t, h, token_embd // h)
    total += (spec.embedding_params - token_embd) * 4 + sum(other.values()) * 4
    return total + _gguf_mix_delta(mix, spec)


def _gguf_mix_delta(mix: GGUFMix, spec: ModelSpec) -> int:
    """Bytes the mix adds over its base type for attn_v / attn_k / attn_output / ffn_down."""
    h, base = spec.hidden_size, mix.base

    def delta(t: str | None, i: int, o: int) -> int:
        return 0 if t is None else gguf_matrix_bytes(t, i, o) - gguf_matrix_bytes(base, i, o)

    eight_experts = max((l.mlp.num_experts for l in spec.layers), default=0) == 8
    attn = [l.attention for l in spec.layers if l.attention.kind in ("full", "sliding")]
    total = 0
    for i, a in enumerate(attn):
        v_dim = a.v_head_dim or a.head_dim
        if eight_experts:  # attn_v and attn_k to Q8_0 whatever the mix
            total += delta("Q8_0", h, a.num_kv_heads * v_dim) + delta("Q8_0", h, a.num_kv_heads * a.head_dim)
            total += delta(mix.attn_output_8_experts, a.num_heads * v_dim, h)
        else:
            total += delta(mix.attn_v(i, len(attn)), h, a.num_kv_heads * v_dim)
    mlps = [l.mlp for l in spec.layers if l.mlp.kind != "none"]
    for i, m in enumerate(mlps):
        t = mix.ffn_down(i, len(mlps))
        if t is None:
            continue
        if m.kind == "moe":
            total += m.num_experts * delta(t, m.intermediate_size, h)
            if m.shared_intermediate_size:
                total += delta(t, m.shared_intermediate_size, h)
        else:
            total += delta(t, m.intermediate_size, h)
    return total


def buffer_bytes(spec: ModelSpec) -> int:
    """Non-parameter buffers (rotary inv_freq, ...), fp32."""
    return spec.buffer_elems * 4


# --- safetensors headers ------------------------------------------------------------------------------

# safetensors dtype -> bytes per element (sub-byte F4/F6 types are not checked against their shape)
_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit


class StoredTensor(NamedTuple):
    dtype: str  # safetensors dtype: "BF16", "I32", "F8_E4M3", ...
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors one ``.safetensors`` file holds, from its header alone (the data is not read).

    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}, then the data buffer.
    """
    path = Path(path)

    def corrupt(why: str) -> UserError:
        return UserError(f"corrupt safetensors header in {path}: {why}")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise corrupt(f"header length {n} exceeds the file ({size} bytes)")
            raw = f.read(n)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_size = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = isinstance(dtype, str) and all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise corrupt(f"bad entry for tensor {name!r}")
        if not begin <= end <= data_size:
            raise corrupt(f"tensor {name!r} data_offsets [{begin}, {end}] outside the {data_size}-byte data")
        item = _ST_ITEMSIZE.get(dtype)
        if item is not None and math.prod(shape) * item != end - begin:
            raise corrupt(f"tensor {name!r}: {dtype} {list(shape)} does not fill {end - begin} bytes")
        tensors[name] = StoredTensor(dtype, shape, end - begin)
    return tensors


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"unreadable safetensors index {index}: {exc}") from None
        files = [folder / n for n in names]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise UserError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    if (folder / "model.safetensors").is_file():  # ignore side files such as consolidated.safetensors
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


def read_safetensors_tensors(folder: Path) -> dict[str, StoredTensor]:
    """dtype, shape and stored bytes of every tensor of a checkpoint folder (or one file), headers only.

    Shards come from ``model.safetensors.index.json`` when present, else ``model.safetensors``, else
    every ``*.safetensors`` in the folder. An empty folder gives {}.
    """
    folder = Path(folder)
    files = [folder] if folder.is_file() else _shard_files(folder)
    tensors: dict[str, StoredTensor] = {}
    for path in files:
        for name, t in read_safetensors_header(path).items():
            if name in tensors:
                raise UserError(f"tensor {name!r} appears in more than one shard ({path})")
            tensors[name] = t
    return tensors


def read_safetensors_sizes(folder: Path) -> dict[str, int]:
    """Exact stored bytes per tensor name, from the safetensors headers of a folder (see above)."""
    return {name: t.nbytes for name, t in read_safetensors_tensors(folder).items()}


# --- the format a config.json's quantization_config names ----------------------------------------------

# quant_method values (transformers' QuantizationMethod) that quant_from_config maps to a format here
SUPPORTED_QUANT_METHODS = ("gptq", "awq", "fp8", "fbgemm_fp8", "mxfp4", "compressed-tensors", "bitsandbytes",
                           "torchao")


def quant_from_config(config: Mapping) -> tuple[str | None, str]:
    """(format, where it came from) for the ``quantization_config`` of a config.json.

    The format is a ``normalize_quant`` name ("gptq-int4", "awq-int4-g64", "fp8-block", "mxfp4"...), or
    None when the config has no quantization_config; the text says where it came from in one line
    ("config.json quantization_config: gptq 4-bit, group 128, act-order"). A multimodal wrapper's
    top-level quantization_config wins over its text_config's. A method or setting vramcal cannot size
    raises a UserError naming the supported ones.
    """
    qc = config.get("quantization_config") if isinstance(config, Mapping) else None
    if not qc and isinstance(config, Mapping) and isinstance(config.get("text_config"), Mapping):
        qc = config["text_config"].get("quantization_config")
    if not qc:
        return None, ""
    if not isinstance(qc, Mapping):
        raise UserError(f"config.json quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method is None and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        method = "bitsandbytes"  # configs written before quant_method existed
    reader = _QUANT_READERS.get(str(method).lower().replace("_", "-") if method is not None else "")
    if reader is None:
        raise UserError(f"config.json quantization_config: quant_method {method!r} is not supported; supported: "
                        f"{', '.join(SUPPORTED_QUANT_METHODS)} (or pass --quant to choose a format)")
    fmt, detail = reader(qc)
    return normalize_quant(fmt), f"config.json quantization_config: {detail}"


def _qc_int(qc: Mapping, *keys: str, default=None):
    """The first of ``keys`` present in a quantization_config, as an int (bits, group sizes)."""
    for key in keys:
        if qc.get(key) is not None:
            value = qc[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"config.json quantization_config: '{key}' must be an integer, got {value!r}")
            return value
    return default


def _bits(method: str, bits: int, allowed: tuple[int, ...]) -> int:
    if bits not in allowed:
        raise UserError(f"config.json quantization_config: {method} {bits}-bit is not supported; "
                        f"supported: {', '.join(f'{b}-bit' for b in allowed)} (or pass --quant)")
    return bits


def _group_suffix(group: int) -> str:
    if group != -1 and group <= 0:
        raise UserError(f"config.json quantization_config: group size must be positive or -1, got {group}")
    return f"-g{group}"


def _group_text(group: int) -> str:
    return "per channel" if group == -1 else f"group {group}"


def _qc_gptq(qc: Mapping) -> tuple[str, str]:
    # AutoGPTQ / gptqmodel / transformers GPTQConfig: bits, group_size (-1: one group per row), desc_act
    bits = _bits("gptq", _qc_int(qc, "bits", "w_bit", default=4), (4, 8))
    group = _qc_int(qc, "group_size", "q_group_size", default=128)
    act = ", act-order" if qc.get("desc_act") else ""  # g_idx is stored either way: same bytes
    return f"gptq-int{bits}{_group_suffix(group)}", f"gptq {bits}-bit, {_group_text(group)}{act}"


def _qc_awq(qc: Mapping) -> tuple[str, str]:
    # transformers AwqConfig (bits, group_size, version/backend) and AutoAWQ's own (w_bit, q_group_size)
    bits = _bits("awq", _qc_int(qc, "bits", "w_bit", default=4), (4,))
    group = _qc_int(qc, "group_size", "q_group_size", default=128)
    version = str(qc.get("version") or qc.get("format") or "gemm").lower()
    layout = "" if version == "gemm" else f", {version} kernels (sized as the GEMM layout)"
    return f"awq-int4{_group_suffix(group)}", f"awq {bits}-bit, {_group_text(group)}{layout}"


def _fp8_block(block, source: str = "fp8") -> tuple[str, str]:
    if not block:
        return "fp8", f"{source}, per-tensor scale"
    if (not isinstance(block, (list, tuple)) or len(block) != 2 or len(set(block)) != 1
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise UserError(f"config.json quantization_config: fp8 block {block!r} is not supported; "
                        "supported: square blocks [N, N] (or pass --quant)")
    return f"fp8-block-g{block[0]}", f"{source}, {block[0]}x{block[1]} blocks"


def _qc_fp8(qc: Mapping) -> tuple[str, str]:
    # transformers FineGrainedFP8Config: weight_block_size, default (128, 128); null: one scale per tensor
    return _fp8_block(qc.get("weight_block_size", [128, 128]))


def _qc_fbgemm_fp8(qc: Mapping) -> tuple[str, str]:
    return "fp8-channel", "fbgemm fp8, per-channel scale"


def _qc_mxfp4(qc: Mapping) -> tuple[str, str]:
    return "mxfp4", "mxfp4 experts"


def _qc_bnb(qc: Mapping) -> tuple[str, str]:
    # transformers BitsAndBytesConfig defaults: bnb_4bit_quant_type "fp4", bnb_4bit_use_double_quant False
    if qc.get("load_in_8bit") and not qc.get("load_in_4bit"):
        return "bnb-int8", "bitsandbytes 8-bit (LLM.int8)"
    if not qc.get("load_in_4bit"):
        raise UserError("config.json quantization_config: bitsandbytes without load_in_4bit or load_in_8bit; "
                        "supported: 4-bit (nf4, fp4) and 8-bit (or pass --quant)")
    kind = str(qc.get("bnb_4bit_quant_type") or "fp4").lower()
    if kind not in ("nf4", "fp4"):
        raise UserError(f"config.json quantization_config: bnb_4bit_quant_type {kind!r} is not supported; "
                        "supported: nf4, fp4")
    double = bool(qc.get("bnb_4bit_use_double_quant", False))
    name = f"bnb-{kind}" + ("" if double else "-nodq")
    return name, f"bitsandbytes 4-bit {kind}" + (", double quantization" if double else "")


# torchao configs (transformers TorchAoConfig): a quant_type string with quant_type_kwargs, or a serialized
# AOBaseConfig {"default": {"_type": "Int4WeightOnlyConfig", "_data": {...}}}
_TORCHAO_TYPES = {"int4_weight_only": "torchao-int4wo", "int4weightonlyconfig": "torchao-int4wo",
                  "int8_weight_only": "torchao-int8wo", "int8weightonlyconfig": "torchao-int8wo"}


def _qc_torchao(qc: Mapping) -> tuple[str, str]:
    quant_type, kwargs = qc.get("quant_type"), qc.get("quant_type_kwargs") or {}
    if isinstance(quant_type, Mapping):  # serialized config objects, per module fqn ("default" for all)
        entry = quant_type.get("default") or next(iter(quant_type.values()), {})
        quant_type, kwargs = (entry or {}).get("_type"), (entry or {}).get("_data") or {}
    fmt = _TORCHAO_TYPES.get(str(quant_type).lower())
    if fmt is None:
        raise UserError(f"config.json quantization_config: torchao {quant_type!r} is not supported; supported: "
                        "int4_weight_only (Int4WeightOnlyConfig), int8_weight_only (Int8WeightOnlyConfig)")
    if fmt == "torchao-int8wo":
        return fmt, "torchao int8 weight-only"
    group = _qc_int(kwargs, "group_size", default=128)
    return f"{fmt}{_group_suffix(group)}", f"torchao int4 weight-only, {_group_text(group)}"


def _qc_compressed_tensors(qc: Mapping) -> tuple[str, str]:
    # llm-compressor / compressed-tensors: config_groups {name: {weights: {num_bits, type, strategy,
    # group_size, block_structure}, targets}}; the first group that quantizes weights decides.
    groups = qc.get("config_groups") or {}
    weights = next((g.get("weights") for g in groups.values() if isinstance(g, Mapping) and g.get("weights")), None)
    fmt_name = qc.get("format") or "compressed-tensors"
    if not isinstance(weights, Mapping):
        raise UserError("config.json quantization_config: compressed-tensors without quantized weights in "
                        "config_groups is not supported (or pass --quant)")
    bits, kind = weights.get("num_bits"), str(weights.get("type") or "int").lower()
    strategy = str(weights.get("strategy") or "tensor").lower()
    source = f"compressed-tensors ({fmt_name})"
    if kind == "float" and bits == 8:
        if strategy == "block":
            return _fp8_block(weights.get("block_structure") or [128, 128], f"{source} fp8")
        if strategy == "channel":
            return "fp8-channel", f"{source} fp8, per-channel scale"
        if strategy == "tensor":
            return "fp8", f"{source} fp8, per-tensor scale"
    if kind == "int" and bits == 4 and strategy in ("group", "channel"):
        group = _qc_int(weights, "group_size", default=128) if strategy == "group" else -1
        # packed int4 + per-group scales: the GPTQ layout's bytes within its g_idx and zeros (< 1%)
        return (f"gptq-int4{_group_suffix(group)}",
                f"{source} int4, {_group_text(group)} (sized as the GPTQ int4 layout)")
    if kind == "int" and bits == 8 and strategy == "channel":
        # int8 (out, in) + a scale per output channel: the same bytes as fp8 with per-channel scales
        return "fp8-channel", f"{source} int8, per-channel scale (1 byte per weight + a scale per row)"
    raise UserError(f"config.json quantization_config: compressed-tensors {kind} {bits}-bit {strategy} weights "
                    "are not supported; supported: fp8 (tensor, channel, block), int4 (group, channel), "
                    "int8 (channel) (or pass --quant)")


_QUANT_READERS: dict[str, Callable[[Mapping], tuple[str, str]]] = {
    "gptq": _qc_gptq,
    "awq": _qc_awq,
    "fp8": _qc_fp8,
    "fbgemm-fp8": _qc_fbgemm_fp8,
    "mxfp4": _qc_mxfp4,
    "compressed-tensors": _qc_compressed_tensors,
    "bitsandbytes": _qc_bnb,
    "torchao": _qc_torchao,
}
