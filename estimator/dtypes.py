"""Element types by their canonical (torch) names, the spellings users type for them, and their sizes.

Canonical names are torch's (``torch.bfloat16`` -> ``"bfloat16"``) so that a record written by the
harness and a CLI option name the same thing. ``int4`` is not a torch dtype: it names a packed 4-bit
storage (two elements per byte), used for KV caches and weight-only quantization.
"""

from __future__ import annotations

import difflib

from estimator.errors import UserError

# Canonical name -> bytes per element.
_BYTES: dict[str, float] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "int4": 0.5,
}

# CLI choices, widest first.
DTYPES: tuple[str, ...] = tuple(_BYTES)
# The dtypes a model computes in (the "dtype" of a quantized model is its compute dtype).
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")

_ALIASES: dict[str, str] = {
    "fp32": "float32", "f32": "float32", "float": "float32", "single": "float32",
    "bf16": "bfloat16",
    "fp16": "float16", "f16": "float16", "half": "float16",
    "fp8": "float8_e4m3fn", "float8": "float8_e4m3fn", "e4m3": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
    "fp8-e4m3": "float8_e4m3fn", "float8_e4m3": "float8_e4m3fn",
    "e5m2": "float8_e5m2", "fp8_e5m2": "float8_e5m2", "fp8-e5m2": "float8_e5m2",
    "i8": "int8", "i4": "int4",
}


def normalize_dtype(name: str) -> str:
    """The canonical name of a dtype spelled as users do ("bf16", "torch.float16", "half", "fp8")."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key in _BYTES:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    known = sorted(set(_BYTES) | set(_ALIASES))
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"unknown dtype {name!r}{hint}; allowed: {', '.join(DTYPES)} (or bf16, fp16, fp32, fp8)")


def dtype_bytes(name: str) -> float:
    """Bytes per element: 4, 2, 1, or 0.5 for packed int4."""
    return _BYTES[normalize_dtype(name)]
