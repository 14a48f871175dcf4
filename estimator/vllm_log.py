"""vLLM's start-up log -> a `vramcal.record/1` record of kind `vllm_startup` (pure Python).

The lines read (vLLM prints GiB, labelled "GB" before 0.6.5):
  V0 worker (0.6.5-0.8.x) and some V1 builds: "model weights take X GiB; non_torch_memory takes Y GiB;
    PyTorch activation peak memory takes Z GiB; the rest of the memory reserved for KV Cache is W GiB",
    "total_gpu_memory (T GiB) x gpu_memory_utilization (U)";
  V0 0.6.4: "Memory profiling results: total_gpu_memory=T initial_memory_usage=.. peak_torch_memory=P
    non_torch_memory=N kv_cache_size=W gpu_memory_utilization=U";
  V1: "Model loading took X GiB", "Available KV cache memory: W GiB", "GPU KV cache size: N tokens",
    "Maximum concurrency for L tokens per request: C x";
  both: "# GPU blocks: N" (V0), "Graph capturing finished in S secs, took G GiB", the ValueError lines
    "max seq len (L) is larger than ... KV cache (N)" and "(X GiB KV cache is needed ... maximum model
    length is L", and the `vllm serve` command line's options.
"""

from __future__ import annotations

import re

GIB = 2**30
_NUM = r"(-?[0-9][0-9,]*\.?[0-9]*)"


def _f(text: str) -> float:
    return float(text.replace(",", ""))


def _i(text: str) -> int:
    return int(float(text.replace(",", "")))


def _gib(x: float) -> int:
    return int(round(x * GIB))


_PATTERNS = {
    # (key, regex, converter)
    # the 4-decimal "Loading model weights took" first: more precise than the 2-decimal summary line
    "weights": [rf"Loading model weights took\s+{_NUM}\s*GB", rf"model weights take\s+{_NUM}\s*Gi?B",
                rf"Model loading took\s+{_NUM}\s*Gi?B", rf"Loading model weights took\s+{_NUM}\s*GiB"],
    "weights_mb": [rf"Loading model weights took\s+{_NUM}\s*MB"],
    "non_torch": [rf"non_torch_memory(?: takes|=)\s*{_NUM}\s*Gi?B", rf"non_torch_memory\s+{_NUM}\s*GiB"],
    "activation": [rf"PyTorch activation peak memory(?: takes)?\s+{_NUM}\s*Gi?B"],
    "kv": [rf"reserved for KV Cache is\s+\**{_NUM}\s*Gi?B", rf"kv_cache_size={_NUM}\s*Gi?B",
           rf"Available KV cache memory:\s*{_NUM}\s*Gi?B", rf"available KV cache memory \({_NUM}\s*GiB\)"],
    "peak_torch": [rf"peak_torch_memory={_NUM}\s*Gi?B"],
    "total": [rf"total_gpu_memory \({_NUM}\s*GiB\)", rf"total_gpu_memory={_NUM}\s*GiB"],
    "util": [rf"gpu_memory_utilization \({_NUM}\)", rf"gpu_memory_utilization={_NUM}",
             rf"--gpu-memory-utilization[ =]{_NUM}"],
    "blocks": [rf"# (?:GPU|CUDA|cuda|gpu) blocks:\s*{_NUM}", rf"\bGPU blocks:\s*{_NUM}"],
    "tokens": [rf"GPU KV cache size:\s*{_NUM}\s*tokens"],
    "concurrency": [rf"Maximum concurrency for [0-9,]+ tokens per request:\s*{_NUM}x"],
    "concurrency_len": [rf"Maximum concurrency for ([0-9,]+) tokens per request"],
    "graphs": [rf"Graph capturing finished in [0-9.]+ secs?, took\s+{_NUM}\s*GiB"],
    "kv_needed": [rf"\({_NUM}\s*GiB KV cache is needed"],
    "est_len": [rf"estimated maximum model length is\s+{_NUM}"],
    "seq_len_error": [rf"max seq len \({_NUM}\) is larger than the maximum number of tokens that can be stored in KV cache \({_NUM}\)"],
    "max_model_len": [rf"--max-model-len[ =]{_NUM}", rf"max_model_len={_NUM}", rf"max seq len \({_NUM}\)"],
    "tp": [rf"(?:--tensor-parallel-size|-tp)[ =]{_NUM}", rf"tensor_parallel_size={_NUM}"],
    "max_num_seqs": [rf"--max-num-seqs[ =]{_NUM}"],
    "mnbt": [rf"--max-num-batched-tokens[ =]{_NUM}"],
    "block_size": [rf"--block-size[ =]{_NUM}"],
    "version": [r"vllm-openai:v([0-9][0-9a-z.+-]*)", r"vLLM(?: API server)? version ([0-9][0-9a-z.+-]*)", r"vllm ([0-9]+\.[0-9]+\.[0-9]+)"],
    "kv_cache_dtype": [r"--kv-cache-dtype[ =]([a-z0-9_]+)"],
    "dtype": [r"--dtype[ =]([a-z0-9]+)"],
}
_V1_MARKERS = ("Available KV cache memory", "GPU KV cache size", "EngineCore", "gpu_worker", "gpu_model_runner",
               "Model loading took")
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "half": "float16", "fp16": "float16",
           "float32": "float32", "float": "float32"}


def _find(key: str, text: str):
    for pattern in _PATTERNS[key]:
        m = re.search(pattern, text)
        if m:
            return m
    return None


def parse_log(text: str) -> dict:
    """The memory figures (bytes) and settings a vLLM start-up log shows; absent ones are None."""
    def val(key, conv=_f):
        m = _find(key, text)
        return conv(m.group(1)) if m else None

    weights = val("weights")
    if weights is None and val("weights_mb") is not None:
        weights = val("weights_mb") / 1024  # "MB" in 0.3.x is MiB
    engine = "v1" if any(m in text for m in _V1_MARKERS) else "v0"
    err = _find("seq_len_error", text)
    out = {
        "engine": engine,
        "weights_bytes": _gib(weights) if weights is not None else None,
        "non_torch_bytes": _gib(val("non_torch")) if val("non_torch") is not None else None,
        "activation_peak_bytes": _gib(val("activation")) if val("activation") is not None else None,
        "kv_cache_bytes": _gib(val("kv")) if val("kv") is not None else None,
        "peak_torch_bytes": _gib(val("peak_torch")) if val("peak_torch") is not None else None,
        "total_gpu_bytes": _gib(val("total")) if val("total") is not None else None,
        "num_gpu_blocks": val("blocks", _i),
        "kv_cache_tokens": val("tokens", _i) if val("tokens") is not None else (_i(err.group(2)) if err else None),
        "max_concurrency": val("concurrency"),
        "cuda_graph_bytes": _gib(val("graphs")) if val("graphs") is not None else None,
        "kv_needed_bytes": _gib(val("kv_needed")) if val("kv_needed") is not None else None,
        "estimated_max_model_len": val("est_len", _i),
        "gpu_memory_utilization": val("util"),
        "max_model_len": val("max_model_len", _i) or val("concurrency_len", _i),
        "tensor_parallel_size": val("tp", _i) or 1,
        "max_num_seqs": val("max_num_seqs", _i),
        "max_num_batched_tokens": val("mnbt", _i),
        "block_size": val("block_size", _i),
        "enforce_eager": True if "--enforce-eager" in text or "enforce_eager=True" in text else None,
        "kv_cache_dtype": (_find("kv_cache_dtype", text).group(1) if _find("kv_cache_dtype", text) else "auto"),
    }
    if out["activation_peak_bytes"] is None and out["peak_torch_bytes"] is not None and weights is not None:
        # 0.6.4: peak_torch_memory includes the weights
        out["activation_peak_bytes"] = max(out["peak_torch_bytes"] - out["weights_bytes"], 0)
    if "larger than the maximum number of tokens" in text or "KV cache is needed" in text or \
            (out["kv_cache_bytes"] is not None and out["kv_cache_bytes"] <= 0):
        out["starts"] = False
    elif out["kv_cache_tokens"] or out["num_gpu_blocks"]:
        out["starts"] = True
    else:
        out["starts"] = None
    m = _find("version", text)
    out["_version"] = m.group(1) if m else None
    m = _find("dtype", text)
    out["_dtype"] = _DTYPES.get(m.group(1)) if m else None
    return out


def record_from_log(text: str, model: str, gpu: str | None = None, source: str = "", vllm_version: str | None = None,
                    dtype: str | None = None, quantization: str | None = None, overrides: dict | None = None) -> dict:
    """One `vllm_startup` record. ``overrides``: settings the log does not show (max_model_len, tp, ...)."""
    from estimator.errors import UserError
    from estimator.gpus import find_gpu

    parsed = parse_log(text)
    version = vllm_version or parsed.pop("_version") or "unknown"
    parsed.pop("_version", None)
    log_dtype = parsed.pop("_dtype")
    for k, v in (overrides or {}).items():
        if v is not None:
            parsed[k] = v
    if parsed["weights_bytes"] is None and parsed["kv_cache_bytes"] is None and parsed["num_gpu_blocks"] is None \
            and parsed["kv_cache_tokens"] is None:
        raise UserError("no vLLM memory-profiling lines in the log (looked for 'model weights take', "
                        "'Available KV cache memory', 'GPU KV cache size', '# GPU blocks')")
    card = find_gpu(gpu) if gpu else None
    total = parsed["total_gpu_bytes"] or (card.memory_bytes if card else None)
    return {
        "schema": "vramcal.record/1", "kind": "vllm_startup", "model": model, "framework": "vllm",
        "framework_version": str(version), "gpu_name": card.name if card else gpu,
        "gpu_memory_bytes": total, "dtype": dtype or log_dtype or "bfloat16", "quantization": quantization,
        "source": source, "vllm": parsed,
    }


def engine_of(version: str) -> str:
    """The engine a vLLM version runs by default: V1 from 0.8 (V0 removed in 0.11)."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    if not m:
        return "v1"
    return "v1" if (int(m.group(1)), int(m.group(2))) >= (0, 8) else "v0"
