"""Traced estimate: the tensor-memory peak of a real transformers run, at full size, with no memory.

The model is built from its config under `FakeTensorMode` (shapes, dtypes and strides, no storage), and
the run is driven the way `generate` drives it: one prefill forward with `logits_to_keep=1`, then
`new_tokens - 1` single-token decode forwards with the model's cache (dynamic or static), each followed
by the float32 copy of the last position's logits. `forward` is `model(input_ids, use_cache=False)` with
full logits. A `StorageTracker` follows every storage; the result is the peak of live allocator bytes
(`torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` with the model loaded).

GPU attention kernels (`device_rules="cuda"`): `F.scaled_dot_product_attention` is intercepted and its
CUDA backend chosen by torch's rules on an sm90 GPU (torch 2.11): flash (or cuDNN, same footprint)
allocates only its output and a float32 log-sum-exp, mem-efficient its output (and a padded additive
mask when one is given), math materialises the scores (see `_math_sdpa`). See docs/trace.md.

MoE experts run through transformers' own `grouped_mm` (prefill) and `batched_mm` (decode on GPU)
paths, whose shapes do not depend on routing: no assumption about the router is needed. The eager
per-expert loop (data-dependent shapes) is never used.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from estimator.errors import UserError
from harness.tracker import ACTIVATIONS, KV_CACHE, LOGITS, WEIGHTS, StorageTracker

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
CACHES = ("dynamic", "static")
WORKLOADS = ("generate", "forward")
DEVICE_RULES = ("cuda", "cpu")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# cuBLAS workspace on sm90 (CUBLAS_WORKSPACE_CONFIG default ":4096:8" = 8 x 4 MiB), allocated through the
# caching allocator by the first matmul and held for the process: it is in every max_memory_allocated.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20
WORKSPACE = "cuda_workspace"


@dataclass(frozen=True)
class TraceResult:
    """The traced peak of one case. Bytes are CUDA-allocator bytes (512-byte blocks) unless noted."""

    peak_allocated_bytes: int
    peak_phase: str  # "load", "prefill", "decode 3", "forward"
    breakdown: dict[str, int]  # live bytes by category at the peak: weights, kv_cache, activations, logits
    weights_bytes: int  # parameters + buffers, exact nbytes (as the harness records them)
    kv_cache_bytes: int  # bytes the cache holds at the end of the run
    model_type: str
    dtype: str
    attn: str
    cache: str | None
    workload: str
    context: int
    batch: int
    prompt_tokens: int
    new_tokens: int
    device_rules: str
    sdpa_backends: dict[str, int] = field(default_factory=dict)  # backend -> number of calls
    duration_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TraceRun:
    """A trace with what the traced estimate needs besides the `TraceResult` (harness/trace_estimate.py)."""

    result: TraceResult
    tracker: StorageTracker  # with `events` when run with record_events=True
    num_parameters: int  # sum(p.numel()) over the model's parameters
    parameter_bytes: int  # exact nbytes of the parameters
    buffer_bytes: int  # exact nbytes of the buffers (rotary tables, position ids...)
    cache_nbytes: int  # exact nbytes of every tensor the cache holds at the end (KV, conv/recurrent states)
    max_positions: int | None = None  # the (text) config's max_position_embeddings / n_positions, if any
    adapter_bytes: int = 0  # of the parameters: peft LoRA adapters' (harness/lora.py), 0 without


# ---- GPU attention kernels ------------------------------------------------------------------------
def cuda_sdpa_backend(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False) -> str:
    """The backend torch 2.11 picks on an sm90 GPU (flash/cuDNN first, then mem-efficient, then math).

    flash: fp16/bf16, no attn_mask, equal head dims <= 256, causal only when Lq == Lk, GQA allowed
    (with enable_gqa). mem-efficient: fp16/bf16/fp32, any mask, head dim divisible by 8 (half) or 4
    (fp32), but no GQA in torch 2.11 (equal head counts). Anything else: math.
    """
    low = q.dtype in (torch.float16, torch.bfloat16)
    dq, dk, dv = q.shape[-1], k.shape[-1], v.shape[-1]
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    gqa = not (hq == hk == hv)
    if gqa and not enable_gqa:
        return "math"  # broadcastable heads without enable_gqa: only math accepts them
    if (
        low
        and attn_mask is None
        and dq == dk == dv
        and dq <= 256
        and not (is_causal and q.shape[-2] != k.shape[-2])
        and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    ):
        return "flash"
    align = 8 if low else 4
    if (
        not gqa
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and dq == dk
        and dq % align == 0
        and dv % align == 0
    ):
        return "efficient"
    return "math"


def _bool_mask_to_additive(mask, dtype):
    """`convert_boolean_attn_mask`: where(~mask, -inf, 0) in the query's dtype (a new tensor)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask.logical_not(), -math.inf, torch.scalar_tensor(0.0, dtype=dtype))


def _fused_output(q, v):
    """Flash / mem-efficient output: allocated as (B, Lq, H, Dv) and returned as a (B, H, Lq, Dv) view."""
    b, h, lq = q.shape[0], q.shape[-3], q.shape[-2]
    return torch.empty((b, lq, h, v.shape[-1]), dtype=q.dtype).transpose(1, 2)


def _flash_sdpa(q, k, v):
    d = q.shape[-1]
    if d % 8:  # pad_last_dim<8>: padded copies of q, k, v; the output keeps the padded storage
        pad = 8 - d % 8
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out = _fused_output(q, v)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32)  # (B, H, Lq) log-sum-exp, always returned
    del lse
    return out[..., :d]


def _efficient_sdpa(q, k, v, attn_mask):
    mask = _bool_mask_to_additive(attn_mask, q.dtype)
    if mask is not None and any(s % 8 for s in mask.stride()[:-1]):
        # preprocess_mask -> pad_bias<8>: a padded copy, sliced back to the key length
        s = mask.shape[-1]
        mask = F.pad(mask, (0, -s % 8))[..., :s]
    out = _fused_output(q, v)  # no log-sum-exp without grad
    del mask
    return out


def _math_sdpa(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    """`_scaled_dot_product_attention_math` as CUDA runs it (an in-place mask add, `_safe_softmax`).

    Run explicitly rather than through the composite op because under fake tensors the composite takes
    its tensor-subclass branch (`attn.add(mask)`, out of place), which the GPU does not.
    """
    dtype = q.dtype
    mask = _bool_mask_to_additive(attn_mask, dtype)
    if dtype in (torch.float16, torch.bfloat16):  # the math backend accumulates in float32
        q, k, v = q.float(), k.float(), v.float()
        mask = mask.float() if mask is not None else None
    d = q.shape[-1]
    factor = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(d))
    q = q * factor
    if is_causal:
        lq, lk = q.shape[-2], k.shape[-2]
        mask = _bool_mask_to_additive(torch.ones(lq, lk, dtype=torch.bool).tril(), q.dtype)
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    attn = torch.matmul(q, k.transpose(-2, -1) * factor)  # (B, H, Lq, Lk): the quadratic term
    if mask is not None:
        attn.add_(mask)
    # _safe_softmax: softmax, then zero fully-masked rows in place
    out = torch.softmax(attn, -1)
    masked = attn.isneginf()
    masked_rows = masked.all(-1, keepdim=True)
    torch.where(masked_rows, torch.scalar_tensor(0.0, dtype=out.dtype), out, out=out)
    del masked, masked_rows, attn
    attn = out
    attn_low = attn.to(dtype)  # the op also returns the weights in the input dtype
    result = torch.matmul(attn, v).to(dtype)
    del attn_low
    return result


class CudaAttention(TorchFunctionMode):
    """Runs `F.scaled_dot_product_attention` with the allocations of the CUDA kernel torch would pick."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        p = dict(zip(names, args)) | kwargs
        q, k, v = p["query"], p["key"], p["value"]
        mask, causal = p.get("attn_mask"), bool(p.get("is_causal", False))
        gqa = bool(p.get("enable_gqa", False))
        backend = cuda_sdpa_backend(q, k, v, mask, p.get("dropout_p", 0.0), causal, gqa)
        self.calls[backend] = self.calls.get(backend, 0) + 1
        if backend == "flash":
            return _flash_sdpa(q, k, v)
        if backend == "efficient":
            return _efficient_sdpa(q, k, v, mask)
        return _math_sdpa(q, k, v, mask, causal, p.get("scale"), gqa)


# ---- building the model ---------------------------------------------------------------------------
def _torch_dtype(dtype: str) -> torch.dtype:
    from estimator.dtypes import normalize_dtype

    name = normalize_dtype(dtype)
    if name not in _DTYPES:
        raise UserError(f"trace supports dtypes {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[name]


def build_config(config: dict):
    """A transformers config object from a config.json dict (or a record's `config`)."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise UserError("the config has no model_type")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as exc:
        raise UserError(f"transformers cannot build a {model_type!r} config: {exc}") from None


@contextlib.contextmanager
def _no_weight_init():
    """Skip the weights' random initialisation: fake tensors have no values to initialise, and some init
    functions read them (`trunc_normal_` checks `mask.any()`, which fake tensors cannot answer). Shapes,
    dtypes and tied weights are unchanged (`init_weights` still ties them)."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.initialize_weights
    PreTrainedModel.initialize_weights = lambda self: None
    try:
        yield
    finally:
        PreTrainedModel.initialize_weights = original


def build_fake_model(config: dict, dtype: torch.dtype, attn: str, fake_mode):
    """The full-size model with fake parameters (no memory), in eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = build_config(config)
    try:
        with fake_mode, _no_weight_init():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    except ValueError as exc:
        if "attention implementation" in str(exc) or "attn_implementation" in str(exc):
            raise UserError(f"{type(cfg).__name__.removesuffix('Config')} does not support --attn {attn} in "
                            "transformers; try --attn eager") from None
        raise UserError(f"transformers cannot build this model: {str(exc).splitlines()[0]}") from None
    # MoE experts: transformers' default on a GPU is grouped_mm; its eager per-expert loop has
    # data-dependent shapes (nonzero / where on the routing), which fake tensors cannot follow.
    if getattr(model, "_can_set_experts_implementation", lambda: False)():
        current = model.get_experts_implementation()
        if any(v == "eager" for v in current.values()):
            model.set_experts_implementation({k: "grouped_mm" if v == "eager" else v for k, v in current.items()})
    return model.eval()


# ---- instrumentation ------------------------------------------------------------------------------
@contextlib.contextmanager
def _kv_cache_category(cache, tracker: StorageTracker):
    """Storages made inside `cache.update` (torch.cat for dynamic, the zeros of a static layer)."""
    if cache is None:  # a cache the model makes itself: its storages stay activations in the breakdown
        yield
        return
    original = cache.update

    def update(*args, **kwargs):
        with tracker.category(KV_CACHE):
            return original(*args, **kwargs)

    cache.update = update
    try:
        yield
    finally:
        del cache.update


@contextlib.contextmanager
def _logits_category(model, tracker: StorageTracker):
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    stack = contextlib.ExitStack()

    def enter(module, args):
        stack.enter_context(tracker.category(LOGITS))

    def leave(module, args, output):  # must return None: a hook's return value replaces the output
        stack.close()

    pre = head.register_forward_pre_hook(enter)
    post = head.register_forward_hook(leave)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


@contextlib.contextmanager
def _mask_decisions(known: dict):
    """Give transformers' mask code the answers it would compute from data on a real device.

    Two checks read tensor values, which fake tensors do not have, so transformers treats fake tensors
    as "tracing" and always builds a 4D mask, which a real run does not:
    - `find_packed_sequence_indices` (forward without cache): our position ids are one plain range per
      row, never packed sequences, so the answer is None;
    - `_ignore_causal_mask_sdpa` with a StaticCache, whose length is a tensor: we know the int.
    """
    from transformers import masking_utils

    original_ignore = masking_utils._ignore_causal_mask_sdpa
    original_packed = masking_utils.find_packed_sequence_indices

    def ignore(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if isinstance(q_offset, torch.Tensor):
            q_offset = known["past"]
        if isinstance(kv_offset, torch.Tensor):
            kv_offset = 0
        return original_ignore(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    masking_utils._ignore_causal_mask_sdpa = ignore
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = original_ignore
        masking_utils.find_packed_sequence_indices = original_packed


@contextlib.contextmanager
def _grouped_mm_bf16_only():
    """torch's grouped_mm meta kernel accepts bf16 only; other dtypes take transformers' own fallback op
    (`transformers::grouped_mm_fallback`, which has a fake kernel). Both allocate just the (S, out) output."""
    from transformers.integrations import moe

    original = moe._can_use_grouped_mm
    moe._can_use_grouped_mm = lambda input, weight, offs: weight.dtype == torch.bfloat16 and original(
        input, weight, offs)
    try:
        yield
    finally:
        moe._can_use_grouped_mm = original


@contextlib.contextmanager
def _experts_implementation(model, name: str | None):
    """Switch MoE experts to `name` (as generate's `_optimize_model_for_decode` does on a GPU)."""
    try:
        original = model.get_experts_implementation()
    except AttributeError:
        original = None
    switch = name and original and any(v == "grouped_mm" for v in original.values())
    if switch:
        model.set_experts_implementation({k: name if v == "grouped_mm" else v for k, v in original.items()})
    try:
        yield
    finally:
        if switch:
            model.set_experts_implementation(original)


# ---- the run ---------------------------------------------------------------------------------------
# Where `generate` finds a model's cache in its outputs, and the keyword it passes it back under
# (GenerationMixin._update_model_kwargs_for_generation, ALL_CACHE_NAMES).
_CACHE_OUTPUTS = (("past_key_values", "past_key_values"), ("cache_params", "cache_params"), ("state", "state"),
                  ("mems", "past_key_values"), ("past_buckets_states", "past_key_values"))


def _forward_keywords(model) -> tuple[set, bool]:
    """The keyword arguments the model's forward names, and whether it takes **kwargs."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return set(params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _cache_keyword(model, names: set) -> str | None:
    """The keyword the model takes its cache under, as `generate` names it (None: no cache at all)."""
    preferred = "cache_params" if "mamba" in type(model).__name__.lower() else "past_key_values"
    for name in (preferred,) + tuple(kw for _, kw in _CACHE_OUTPUTS):
        if name in names:
            return name
    return None


def _generate(model, tracker, batch, prompt, new_tokens, cache_kind, max_cache_len, decode_experts, known):
    """Prefill + decode steps, keeping the same tensors alive as `GenerationMixin._sample` does.

    The cache is built up front (DynamicCache or StaticCache) and passed under the keyword generate uses
    (`cache_params` for Mamba-named classes); a model generate builds no cache for
    (`_supports_default_dynamic_cache()` False: MiniMax, RWKV, xLSTM, XLNet, Reformer) makes its own in
    the prefill, which is passed back from its outputs; a model whose forward takes no cache gets the
    whole sequence at every step, as generate gives it.
    """
    from transformers import DynamicCache, StaticCache

    text_config = model.config.get_text_config(decoder=True)
    vocab = text_config.vocab_size
    eos = getattr(model.generation_config, "eos_token_id", None)
    names, any_kwargs = _forward_keywords(model)
    keyword = _cache_keyword(model, names)
    prebuilt = keyword is not None and getattr(model, "_supports_default_dynamic_cache", lambda: True)()
    cache = None
    if prebuilt and cache_kind == "static":
        cache = StaticCache(config=text_config, max_cache_len=max_cache_len)
    elif prebuilt:
        cache = DynamicCache(config=text_config)
    takes = {k: k in names or any_kwargs for k in ("position_ids", "use_cache", "logits_to_keep", "return_dict")}
    input_ids = torch.zeros((batch, prompt), dtype=torch.long)
    # The 2D all-ones attention mask generate keeps (and grows); the model gets None, which is what
    # transformers' mask code turns an all-ones mask into (sdpa's is_causal path, no 4D mask).
    attention_mask = torch.ones((batch, prompt), dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    unfinished = torch.ones(batch, dtype=torch.long)
    next_token_logits = next_token_scores = None
    with _kv_cache_category(cache, tracker):
        for step in range(new_tokens):
            phase = "prefill" if step == 0 else f"decode {step}"
            with tracker.phase(phase), _experts_implementation(model, decode_experts if step else None):
                seq = input_ids.shape[1] if step == 0 or keyword is None else 1
                ids = input_ids[:, -seq:].clone(memory_format=torch.contiguous_format)
                pos = position_ids[:, -seq:].clone(memory_format=torch.contiguous_format)
                known["past"] = 0 if step == 0 or keyword is None else prompt + step - 1
                kwargs = {"position_ids": pos, "use_cache": True, "logits_to_keep": 1, "return_dict": True}
                kwargs = {k: v for k, v in kwargs.items() if takes[k]}
                if keyword is not None:
                    kwargs[keyword] = cache
                outputs = model(input_ids=ids, **kwargs)
                del ids, pos, kwargs
                if keyword is not None and not prebuilt:  # the model's own cache, for the next step
                    cache = next((outputs[out] for out, _ in _CACHE_OUTPUTS
                                  if out in outputs and outputs[out] is not None), None)
                position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=-1)
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
                with tracker.category(LOGITS):
                    # the previous step's logits and scores are still referenced here, as in _sample
                    next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
                    next_token_scores = _min_new_tokens_processor(next_token_logits, vocab, eos)
                next_tokens = torch.argmax(next_token_scores, dim=-1)
                if eos is not None:  # has_eos_stopping_criteria; pad_token_id taken as 0
                    next_tokens = next_tokens * unfinished + 0 * (1 - unfinished)
                input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
                del outputs
    return cache


def _min_new_tokens_processor(scores, vocab, eos):
    """MinNewTokensLengthLogitsProcessor (min_new_tokens = new_tokens, with an eos token): a masked copy."""
    if eos is None:
        return scores
    vocab_tensor = torch.arange(vocab)
    eos_mask = torch.isin(vocab_tensor, torch.tensor(eos if isinstance(eos, list) else [eos]))
    processed = scores.clone()
    processed = torch.where(eos_mask, -math.inf, scores)
    return processed


def trace_model(
    model,
    *,
    workload: str = "generate",
    batch: int = 1,
    prompt: int = 1008,
    new_tokens: int = 16,
    cache: str = "dynamic",
    max_cache_len: int | None = None,
    device_rules: str = "cuda",
    tracker: StorageTracker | None = None,
    assisted: tuple | None = None,
) -> tuple[StorageTracker, dict]:
    """Run one workload on an already-built model (fake or real tensors) under a `StorageTracker`.

    The caller enters `FakeTensorMode` for a fake model. Returns the tracker (peak, phase, breakdown)
    and facts about the run: `kv_cache_bytes` held at the end, `sdpa_backends` used.
    """
    tracker = tracker or StorageTracker()
    with tracker.phase("load"):
        tracker.track_existing(model, WEIGHTS)
        if assisted is not None and assisted[0] is not None:  # (draft, k, accept): the draft's weights too
            tracker.track_existing(assisted[0], WEIGHTS)
        workspace = None  # held to the end, like the process-wide cuBLAS workspace
        if device_rules == "cuda":
            with tracker, tracker.category(WORKSPACE):
                workspace = torch.empty(CUBLAS_WORKSPACE_BYTES, dtype=torch.uint8)
    attention = CudaAttention() if device_rules == "cuda" else contextlib.nullcontext()
    decode_experts = "batched_mm" if device_rules == "cuda" else None
    known = {"past": 0}
    with torch.no_grad(), tracker, attention, _logits_category(model, tracker), _mask_decisions(known), \
            _grouped_mm_bf16_only():
        if workload == "forward":
            input_ids = torch.zeros((batch, prompt), dtype=torch.long)
            with tracker.phase("forward"):
                out = model(input_ids, use_cache=False)
            del out, input_ids
            kv_cache_bytes = cache_nbytes = 0
        elif assisted is not None:  # harness/assisted_trace.py: the assisted loop, acceptance given
            from harness.assisted_trace import assisted_generate

            kv = assisted_generate(model, assisted[0], tracker, prompt, new_tokens, assisted[1], assisted[2], known)
            cache_nbytes = _held_nbytes(kv)
            kv_cache_bytes = cache_nbytes  # the main cache (the breakdown's KV holds the draft's too)
            del kv
        else:
            kv = _generate(model, tracker, batch, prompt, new_tokens, cache,
                           max_cache_len or prompt + new_tokens - 1, decode_experts, known)
            kv_cache_bytes = tracker.breakdown().get(KV_CACHE, 0)
            cache_nbytes = _held_nbytes(kv)
            del kv
    del workspace
    return tracker, {"kv_cache_bytes": kv_cache_bytes, "sdpa_backends": dict(getattr(attention, "calls", {})),
                     "cache_nbytes": cache_nbytes}


def _held_nbytes(obj) -> int:
    """Exact nbytes of the distinct storages a cache object holds (its layers' keys, values and states)."""
    storages: dict[int, int] = {}
    seen: set[int] = set()

    def walk(o, depth: int) -> None:
        if depth > 6 or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            storages[s._cdata] = s.nbytes()
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v, depth + 1)
        elif hasattr(o, "__dict__") and not isinstance(o, (type, torch.nn.Module)):
            for v in vars(o).values():
                walk(v, depth + 1)

    walk(obj, 0)
    return sum(storages.values())


def trace(
    config: dict,
    *,
    dtype: str = "bfloat16",
    attn: str = "sdpa",
    cache: str | None = "dynamic",
    workload: str = "generate",
    context: int = 1024,
    batch: int = 1,
    new_tokens: int = 16,
    device_rules: str = "cuda",
    max_cache_len: int | None = None,
    lora=None,
) -> TraceResult:
    """Trace one case from a config dict. `context` is prompt + new tokens (generate) or the sequence
    length (forward); `max_cache_len` (static cache) defaults to generate's `max_length - 1`."""
    return run_trace(config, dtype=dtype, attn=attn, cache=cache, workload=workload, context=context,
                     batch=batch, new_tokens=new_tokens, device_rules=device_rules,
                     max_cache_len=max_cache_len, lora=lora).result


def run_trace(
    config: dict,
    *,
    dtype: str = "bfloat16",
    attn: str = "sdpa",
    cache: str | None = "dynamic",
    workload: str = "generate",
    context: int = 1024,
    batch: int = 1,
    new_tokens: int = 16,
    device_rules: str = "cuda",
    max_cache_len: int | None = None,
    record_events: bool = False,
    lora=None,
    assisted: tuple | None = None,
) -> TraceRun:
    """`trace`, keeping the tracker (with the allocation sequence when `record_events`) and the model's
    parameter count, parameter and buffer bytes, and the bytes the cache holds at the end."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _check_choice("attn", attn, ATTN_IMPLEMENTATIONS)
    _check_choice("workload", workload, WORKLOADS)
    _check_choice("device-rules", device_rules, DEVICE_RULES)
    torch_dtype = _torch_dtype(dtype)
    if workload == "forward":
        new_tokens, cache = 0, None
    else:
        cache = cache or "dynamic"
        _check_choice("cache", cache, CACHES)
        if new_tokens < 1:
            raise UserError(f"--new-tokens must be at least 1 for generate; got {new_tokens}")
    prompt = context - new_tokens
    if batch < 1 or prompt < 1:
        raise UserError(f"need batch >= 1 and context > new tokens; got batch {batch}, context {context}")
    if max_cache_len is not None and max_cache_len < context - 1:
        raise UserError(f"--max-cache-len {max_cache_len} cannot hold context - 1 = {context - 1} tokens")

    started = time.perf_counter()
    fake_mode = FakeTensorMode()
    model = build_fake_model(config, torch_dtype, attn, fake_mode)
    if lora is not None:  # the real peft LoRA layers, on fake tensors (an estimator.lora.LoraSpec)
        from harness.lora import apply_lora

        with fake_mode:
            model = apply_lora(model, lora, fake_mode)
    if assisted is not None:  # (the draft's config or None for prompt lookup, k, accept "none" / "all")
        draft = build_fake_model(assisted[0], torch_dtype, attn, fake_mode) if assisted[0] is not None else None
        assisted = (draft,) + tuple(assisted[1:])
    with fake_mode:
        tracker, facts = trace_model(model, workload=workload, batch=batch, prompt=prompt,
                                     new_tokens=new_tokens, cache=cache, max_cache_len=max_cache_len,
                                     device_rules=device_rules, tracker=StorageTracker(record_events=record_events),
                                     assisted=assisted)
    storages = {t.untyped_storage()._cdata: t.untyped_storage() for t in (*model.parameters(), *model.buffers())}
    params = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in model.parameters()}
    categories = (WEIGHTS, KV_CACHE, ACTIVATIONS, LOGITS) + ((WORKSPACE,) if device_rules == "cuda" else ())
    result = TraceResult(
        peak_allocated_bytes=tracker.peak_bytes,
        peak_phase=tracker.peak_phase,
        breakdown={c: tracker.peak_breakdown.get(c, 0) for c in categories},
        weights_bytes=sum(s.nbytes() for s in storages.values()),
        kv_cache_bytes=facts["kv_cache_bytes"],
        model_type=str(config.get("model_type")),
        dtype=str(torch_dtype).removeprefix("torch."),
        attn=attn,
        cache=cache,
        workload=workload,
        context=context,
        batch=batch,
        prompt_tokens=prompt,
        new_tokens=new_tokens,
        device_rules=device_rules,
        sdpa_backends=facts["sdpa_backends"],
        duration_s=round(time.perf_counter() - started, 3),
    )
    return TraceRun(
        result=result,
        tracker=tracker,
        num_parameters=sum(p.numel() for p in model.parameters()),
        parameter_bytes=sum(params.values()),
        buffer_bytes=sum(s.nbytes() for k, s in storages.items() if k not in params),
        cache_nbytes=facts["cache_nbytes"],
        max_positions=_max_positions(model.config),
        adapter_bytes=_adapter_bytes(model) if lora is not None else 0,
    )


def _adapter_bytes(model) -> int:
    from harness.lora import adapter_bytes

    return adapter_bytes(model)


def _max_positions(config) -> int | None:
    text = config.get_text_config(decoder=True)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}")
