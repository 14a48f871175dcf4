"""vLLM backend: start vLLM's engine on a GPU, read its start-up memory profile, record it.

Not a per-case `run` backend like transformers: vLLM's question is its start-up (the KV pool it sizes),
so this module provides ``measure_startup(model, **engine_args) -> record`` (kind ``vllm_startup``).
The engine's own log lines are captured and read by the same parser as ``vramcal import-vllm-log``
(estimator/vllm_log.py is pure Python), so a harness record and an imported log are the same thing.
vllm is imported inside the function; without it the error names the extra.
"""

from __future__ import annotations

import io
import logging

NAME = "vllm"


def version() -> str:
    from estimator.errors import require_extra

    return require_extra("vllm", "vllm").__version__


def measure_startup(model: str, hf_model: str | None = None, gpu_memory_utilization: float = 0.9,
                    max_model_len: int | None = None, max_num_seqs: int | None = None,
                    max_num_batched_tokens: int | None = None, tensor_parallel_size: int = 1,
                    kv_cache_dtype: str = "auto", enforce_eager: bool = False, dtype: str = "bfloat16",
                    load_format: str = "dummy") -> dict:
    """Start ``vllm.LLM`` (dummy weights by default: memory is what matters), capture its log, return a record."""
    from estimator.errors import require_extra

    vllm = require_extra("vllm", "vllm")
    import torch

    from estimator.vllm_log import record_from_log

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("vllm")
    logger.addHandler(handler)
    try:
        llm = vllm.LLM(model=hf_model or model, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, tensor_parallel_size=tensor_parallel_size,
                       kv_cache_dtype=kv_cache_dtype, enforce_eager=enforce_eager, dtype=dtype,
                       load_format=load_format)
        cache = llm.llm_engine.vllm_config.cache_config
        extra = {"num_gpu_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
                 "max_model_len": llm.llm_engine.vllm_config.model_config.max_model_len,
                 "max_num_seqs": llm.llm_engine.vllm_config.scheduler_config.max_num_seqs,
                 "max_num_batched_tokens": llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens,
                 "tensor_parallel_size": tensor_parallel_size, "gpu_memory_utilization": gpu_memory_utilization,
                 "enforce_eager": enforce_eager, "kv_cache_dtype": kv_cache_dtype}
        del llm
    finally:
        logger.removeHandler(handler)
    rec = record_from_log(buffer.getvalue(), model, torch.cuda.get_device_name(0), source="harness/backends/vllm.py",
                          vllm_version=vllm.__version__, dtype=dtype, overrides=extra)
    rec["gpu_memory_bytes"] = torch.cuda.mem_get_info()[1]
    return rec
