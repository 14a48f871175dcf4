"""The exact quantities the memory terms are built from, in bytes.

``features(spec, workload)`` returns a flat dict of integers: the KV cache the framework holds, and the
sizes of the tensors an inference step keeps alive at its peak (one layer's working set, the logits).
They are exact byte counts of tensors of known shape; how many of each are alive at once (the
activation coefficients), how much the cache grows transiently (``kv_factor``) and what the allocator and
the CUDA context add (``overhead_*``) are not exact, and come from a coefficients file
(``estimator/coefficients.py``). ``estimator/estimate.py`` combines the two.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.dtypes import COMPUTE_DTYPES, dtype_bytes, normalize_dtype
from estimator.errors import UserError
from estimator.lora import LoraSpec
from estimator.replay import simulate
from estimator.quant import normalize_quant
from estimator.spec import AttentionSpec, LayerSpec, ModelSpec

WORKLOADS = ("generate", "forward")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
CACHE_IMPLEMENTATIONS = ("dynamic", "static")
FRAMEWORKS = ("transformers", "vllm")
COMPILE_MODES = ("auto", "off")  # generate's compilation: what transformers does, or disable_compile=True


@dataclass(frozen=True)
class Workload:
    """One inference job. ``context`` is the tokens each sequence holds at the end (prompt + new tokens)."""

    context: int
    batch: int = 1
    new_tokens: int = 16
    workload: str = "generate"
    dtype: str = "bfloat16"
    quant: str | None = None
    kv_dtype: str | None = None  # None: the model's dtype
    attn: str = "sdpa"
    cache: str = "dynamic"
    framework: str = "transformers"
    max_cache_len: int | None = None  # static cache: tokens pre-allocated per sequence (default: context)
    alloc_conf: str = ""  # PYTORCH_CUDA_ALLOC_CONF, canonical (estimator/alloc_conf.py); "" for the defaults
    lora: LoraSpec | None = None  # peft LoRA adapters loaded (estimator/lora.py)
    compile: str = "off"  # "auto": generate compiles where transformers would (estimator/estimate.py compiles)
    # assisted generation (estimator/assisted.py): the draft model (a name load_model reads) and the
    # candidates per step, or prompt lookup decoding's candidates per step (no draft)
    assistant: str | None = None
    num_assistant_tokens: int | None = None
    prompt_lookup_num_tokens: int | None = None

    def __post_init__(self):
        for name in ("context", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"--{name} must be a positive integer, got {value!r}")
        if not isinstance(self.new_tokens, int) or self.new_tokens < 0:
            raise UserError(f"--new-tokens must be a non-negative integer, got {self.new_tokens!r}")
        _check_choice("workload", self.workload, WORKLOADS)
        _check_choice("attn", self.attn, ATTN_IMPLEMENTATIONS)
        _check_choice("cache", self.cache, CACHE_IMPLEMENTATIONS)
        _check_choice("framework", self.framework, FRAMEWORKS)
        _check_choice("compile", self.compile, COMPILE_MODES)
        _check_size("context", self.context)
        _check_size("batch", self.batch)
        if self.batch * max(self.context, self.max_cache_len or 0) > MAX_SIZE:
            # every token holds at least a byte of hidden state: 2**40 tokens is beyond any GPU, and the
            # replay's allocator keys tensors up to batch x context**2 x heads x 4 bytes far below 2**96
            raise UserError(f"--batch x --context = {self.batch * max(self.context, self.max_cache_len or 0):,} "
                            f"tokens is beyond any GPU (at most {MAX_SIZE:,} tokens in all)")
        if self.max_cache_len is not None:
            _check_size("max-cache-len", self.max_cache_len)
        object.__setattr__(self, "dtype", _compute_dtype(self.dtype))
        object.__setattr__(self, "quant", normalize_quant(self.quant))
        if self.kv_dtype is not None:
            object.__setattr__(self, "kv_dtype", normalize_dtype(self.kv_dtype))
        if self.workload == "forward":
            object.__setattr__(self, "new_tokens", 0)
        elif self.new_tokens >= self.context:
            raise UserError(
                f"--new-tokens ({self.new_tokens}) must be smaller than --context ({self.context}), "
                "which counts prompt + new tokens"
            )
        if self.max_cache_len is not None and self.max_cache_len < self.context:
            raise UserError(f"--max-cache-len ({self.max_cache_len}) is below --context ({self.context})")
        if self.max_cache_len is not None and self.cache != "static":
            raise UserError("--max-cache-len sizes a static cache; add --cache static, or drop it "
                            "(a dynamic cache grows to --context)")
        from estimator.alloc_conf import parse_alloc_conf

        object.__setattr__(self, "alloc_conf", parse_alloc_conf(self.alloc_conf or "").text)
        if self.lora is not None and not isinstance(self.lora, LoraSpec):
            raise UserError(f"lora must be an estimator.lora.LoraSpec, got {type(self.lora).__name__}")
        if self.assistant is not None or self.num_assistant_tokens is not None or self.prompt_lookup_num_tokens:
            from estimator.assisted import check_workload

            check_workload(self)
        if self.lora is not None and self.framework == "vllm":
            raise UserError("LoRA adapters are modelled for transformers + peft; vLLM's LoRA (max_loras slots) "
                            "is not: drop --lora*, or use --framework transformers")
        if self.framework == "vllm" and self.cache == "static":
            raise UserError("--cache static is transformers' StaticCache; vLLM keeps its own paged cache "
                            "(drop --cache, or use --framework transformers)")

    @property
    def prompt_tokens(self) -> int:
        return self.context - self.new_tokens

    @property
    def cache_tokens(self) -> int:
        """Tokens per sequence a cache holds at the end (a static cache: all it pre-allocated)."""
        if self.cache == "static" and self.workload == "generate":
            return self.max_cache_len or self.context
        return self.context

    @classmethod
    def from_record(cls, record: dict) -> "Workload":
        """The workload a ``vramcal.record/1`` measured."""
        workload = record["workload"]
        new = int(record.get("new_tokens") or 0) if workload == "generate" else 0
        return cls(
            context=int(record["prompt_tokens"]) + new,
            batch=int(record["batch_size"]),
            new_tokens=new,
            workload=workload,
            dtype=record["dtype"],
            quant=record.get("quantization"),
            attn=record.get("attn_implementation") or "sdpa",
            cache=record.get("cache_implementation") or "dynamic",
            framework=record.get("framework") or "transformers",
            alloc_conf=record.get("alloc_conf") or "",
            compile=record.get("compile") or "off",  # records before issue 11: disable_compile=True
            lora=_record_lora(record.get("lora")),
            assistant=record.get("assistant") if isinstance(record.get("assistant"), str) else None,
            num_assistant_tokens=_record_int(record.get("num_assistant_tokens")) if record.get("assistant") else None,
            prompt_lookup_num_tokens=_record_int(record.get("prompt_lookup_num_tokens")),
        )

    def as_dict(self) -> dict:
        return {
            "context": self.context,
            "batch": self.batch,
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "workload": self.workload,
            "dtype": self.dtype,
            "quant": self.quant,
            "kv_dtype": self.kv_dtype or self.dtype,
            "attn": self.attn,
            "cache": self.cache,
            "framework": self.framework,
            "max_cache_len": self.max_cache_len,
            "alloc_conf": self.alloc_conf,
            "lora": self.lora.as_dict() if self.lora else None,
            "compile": self.compile,
            "assistant": self.assistant,
            "num_assistant_tokens": self.num_assistant_tokens,
            "prompt_lookup_num_tokens": self.prompt_lookup_num_tokens,
        }


def _record_lora(text):
    from estimator.lora import from_text

    return from_text(text) if isinstance(text, str) else None  # absent, None, or a frame's NaN: none


def _record_int(value):
    return int(value) if isinstance(value, (int, float)) and value == value and value > 0 else None


# Products of sizes must stay countable in 64-bit bytes; far below that no GPU holds the job anyway.
MAX_SIZE = 2**40


def _check_size(name: str, value: int) -> None:
    if value > MAX_SIZE:
        raise UserError(f"--{name} {value:,} is beyond any GPU (at most {MAX_SIZE:,})")


_WEIGHT_FORMAT_HINT = {
    "int4": "--quant gptq-int4 (or awq-int4, bnb-nf4, torchao-int4wo)",
    "int8": "--quant bnb-int8 (or gptq-int8, torchao-int8wo)",
    "float8_e4m3fn": "--quant fp8 (or fp8-block)",
    "float8_e5m2": "--quant fp8",
}


def _compute_dtype(name: str) -> str:
    """The dtype a model computes in: bfloat16, float16 or float32. Weight formats go through --quant."""
    dtype = normalize_dtype(name)
    if dtype not in COMPUTE_DTYPES:
        hint = _WEIGHT_FORMAT_HINT.get(dtype, "--quant")
        raise UserError(f"--dtype {name} is not a compute dtype (allowed: {', '.join(COMPUTE_DTYPES)}); "
                        f"quantized weights go through {hint}, a quantized KV cache through --kv-dtype")
    return dtype


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}")


# ---------------------------------------------------------------------------------------------------
# KV cache


def kv_bytes_per_token(att: AttentionSpec, kv_bytes: float, framework: str) -> float:
    """Cache bytes one token adds to one layer (0 for layers with a fixed recurrent state)."""
    if att.kind in ("full", "sliding"):
        return att.num_kv_heads * (att.head_dim + (att.v_head_dim or att.head_dim)) * kv_bytes
    if att.kind == "mla":
        # Both keep the compressed latent plus the shared rotary key: vLLM's MLA backends, and
        # transformers 5.x (DeepseekV2/V3Attention update the cache "while the latent KV is still
        # compressed" and expand it with kv_b_proj on every forward).
        return (att.kv_lora_rank + att.qk_rope_head_dim) * kv_bytes
    return 0.0


def cached_tokens(att: AttentionSpec, tokens: int, workload: Workload) -> int:
    """Tokens one sequence's cache holds for this layer after ``tokens`` tokens."""
    if att.kind != "sliding" or not att.window:
        return tokens
    if workload.framework == "vllm":
        return min(tokens, att.window)
    if workload.cache == "static":  # StaticSlidingWindowLayer: min(window, max_cache_len)
        return min(tokens, att.window)
    # DynamicSlidingWindowLayer keeps the last window - 1 tokens (cache_utils.py, transformers 5.x)
    return min(tokens, att.window - 1)


def state_bytes_per_sequence(att: AttentionSpec, model_bytes: float) -> float:
    if att.kind not in ("linear", "ssm"):
        return 0.0
    ssm = att.state_elems * (4 if att.state_dtype == "float32" else model_bytes)
    return ssm + att.conv_state_elems * model_bytes  # the short-convolution state is in the model's dtype


def kv_cache_bytes(spec: ModelSpec, workload: Workload, tokens: int | None = None) -> int:
    """Bytes the cache holds for ``batch`` sequences of ``tokens`` tokens (default: the cache's size)."""
    if workload.workload == "forward":
        return 0
    tokens = workload.cache_tokens if tokens is None else tokens
    kv_b = dtype_bytes(workload.kv_dtype or workload.dtype)
    model_b = dtype_bytes(workload.dtype)
    total = 0.0
    for layer, count in spec.layer_groups:
        att = layer.attention
        per_layer = kv_bytes_per_token(att, kv_b, workload.framework) * cached_tokens(att, tokens, workload)
        total += count * (per_layer + state_bytes_per_sequence(att, model_b))
    return int(total * workload.batch)


# ---------------------------------------------------------------------------------------------------
# Attention paths


def scores_path(att: AttentionSpec, workload: Workload) -> str | None:
    """Which attention path materialises ``batch x heads x q x k`` scores on a CUDA GPU, if any.

    - eager: always (matmul, mask add, fp32 softmax, cast back).
    - sdpa: transformers passes ``enable_gqa=True`` when there is no mask and K/V head dims match and
      are <= 256; flash attention takes bf16/fp16; fp32 cannot use flash, and the memory-efficient kernel
      does not take ``enable_gqa``, so fp32 GQA falls back to the math kernel, which materialises
      the scores (the reference H100 data show it: fp32 sdpa grows as seq^2 on GQA models only).
      Head dims above 256, or K/V head dims that differ, also send GQA to the math kernel.
    - flash_attention_2, and vLLM's paged kernels: never.
    """
    if att.kind not in ("full", "sliding", "mla") or workload.framework == "vllm":
        return None
    if workload.attn == "eager":
        return "eager"
    if workload.attn == "sdpa":
        gqa = att.num_kv_heads and att.num_kv_heads < att.num_heads
        v_dim = att.v_head_dim or att.head_dim
        if gqa and (workload.dtype == "float32" or att.head_dim != v_dim or att.head_dim > 256):
            return "math"
    return None


# ---------------------------------------------------------------------------------------------------
# Activation features


def _layer_features(layer: LayerSpec, tokens: int, q_len: int, k_len: int, batch: int, a: float,
                    workload: Workload) -> dict[str, float]:
    """Sizes of one layer's intermediate tensors for a step over ``tokens`` = batch x q_len tokens."""
    att, mlp = layer.attention, layer.mlp
    f = {"qkv": 0.0, "mlp": 0.0, "moe": 0.0, "router": 0.0, "scores_eager": 0.0, "scores_math": 0.0}
    if att.kind in ("full", "sliding", "mla"):
        v_dim = att.v_head_dim or att.head_dim
        kv_heads = att.num_heads if att.kind == "mla" else att.num_kv_heads
        f["qkv"] = tokens * (att.num_heads * att.head_dim + kv_heads * (att.head_dim + v_dim)) * a
        path = scores_path(att, workload)
        if path:
            f[f"scores_{path}"] = batch * att.num_heads * q_len * k_len * a
    elif att.kind in ("linear", "ssm"):
        # projections of the mixer's inputs: count them like a q/k/v of the hidden size, times 2
        f["qkv"] = tokens * 2 * max(att.num_heads * att.head_dim, 1) * a
    if mlp.kind == "dense":
        f["mlp"] = tokens * mlp.intermediate_size * a
    elif mlp.kind == "moe":
        # routed tokens x top_k through one expert width, plus the shared experts as a dense MLP
        f["moe"] = tokens * mlp.top_k * mlp.intermediate_size * a
        f["mlp"] = tokens * mlp.shared_intermediate_size * a
        f["router"] = tokens * mlp.num_experts * 4  # router logits and softmax in fp32
    return f


def features(spec: ModelSpec, workload: Workload) -> dict[str, int]:
    """Exact byte sizes for the estimate; coefficients turn them into bytes alive at the peak.

    Keys: ``kv_prefill_bytes`` / ``kv_final_bytes`` (cache after the prompt / at the end),
    ``kv_layer_bytes`` (the largest layer's share of the final cache), and for the prefill step:
    ``hidden`` (tokens x hidden), ``qkv``, ``mlp`` (dense width), ``moe`` (routed tokens x expert
    width), ``router``, ``scores_eager``/``scores_math`` (batch x heads x q x k where materialised),
    ``logits`` (positions whose logits are computed x vocab, model dtype); ``*_decode`` variants for one
    decode step. All in bytes at the activation dtype (the model's dtype; quantized models compute
    in it too). For transformers, also ``sim_allocated_bytes`` / ``sim_reserved_bytes``: the peaks of the
    whole run replayed in the caching-allocator model (``estimator/replay/``), and
    ``sim_peak_step`` (0: the prefill or the forward; n: the n-th decode step).
    """
    a = dtype_bytes(workload.dtype)
    if workload.quant and a < 2:  # fp8/int weights still run their activations in 16-bit
        a = 2.0
    b = workload.batch
    prompt = workload.prompt_tokens
    out: dict[str, float] = {}

    if workload.workload == "forward":
        out["kv_prefill_bytes"] = 0
        out["kv_final_bytes"] = 0
        out["kv_layer_bytes"] = 0
    else:
        if workload.cache == "static":
            out["kv_prefill_bytes"] = kv_cache_bytes(spec, workload)
        else:
            out["kv_prefill_bytes"] = kv_cache_bytes(spec, workload, tokens=prompt)
        out["kv_final_bytes"] = kv_cache_bytes(spec, workload)
        kv_b = dtype_bytes(workload.kv_dtype or workload.dtype)
        out["kv_layer_bytes"] = b * max(
            (
                kv_bytes_per_token(l.attention, kv_b, workload.framework)
                * cached_tokens(l.attention, workload.cache_tokens, workload)
                + state_bytes_per_sequence(l.attention, a)
                for l in _distinct_layers(spec)
            ),
            default=0,
        )

    def step(tokens_q: int, k_len: int) -> dict[str, float]:
        worst: dict[str, float] = {}
        for layer in _distinct_layers(spec):
            for key, value in _layer_features(layer, b * tokens_q, tokens_q, k_len, b, a, workload).items():
                worst[key] = max(worst.get(key, 0.0), value)
        worst["hidden"] = b * tokens_q * spec.hidden_size * a
        return worst

    prefill_len = prompt
    prefill = step(prefill_len, prefill_len)
    logit_positions = prefill_len if workload.workload == "forward" else 1
    prefill["logits"] = b * logit_positions * spec.vocab_size * a
    out.update(prefill)
    if workload.workload == "generate" and workload.new_tokens > 0:
        decode = step(1, workload.context)
        decode["logits"] = b * spec.vocab_size * a
        out.update({f"{k}_decode": v for k, v in decode.items()})
    if workload.framework == "transformers":
        # The whole run replayed in the caching-allocator model: peak allocated and reserved bytes above
        # the weights, fragmentation included (estimator/replay/).
        out.update(simulate(spec, workload))
        if workload.lora is not None:  # the adapters' own share, against the same run without them
            out.update(lora_features(spec, workload, out["sim_allocated_bytes"]))
    return {k: int(v) for k, v in out.items()}


def lora_features(spec: ModelSpec, workload: Workload, sim_allocated: int) -> dict[str, int]:
    """``lora_weights_bytes`` (exact) and ``lora_activation_bytes``: the replay's allocated peak with the
    adapters less the same run without them (what peft's forward adds at the peak; 0 when merged)."""
    from dataclasses import replace

    from estimator.lora import weight_bytes

    base = simulate(spec, replace(workload, lora=None))["sim_allocated_bytes"]
    return {"lora_weights_bytes": weight_bytes(spec, workload.lora, workload.dtype),
            "lora_activation_bytes": max(sim_allocated - base, 0)}


def _distinct_layers(spec: ModelSpec) -> tuple[LayerSpec, ...]:
    """The model's layer kinds, each once (most models have one or two)."""
    return tuple(layer for layer, _ in spec.layer_groups)
