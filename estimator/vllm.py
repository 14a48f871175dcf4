"""What vLLM does at start-up: the memory budget, the KV blocks it allocates, whether it starts.

Pure Python, no torch. The rules follow vLLM's V1 engine (vLLM 0.10 .. 0.19; read from
``vllm/v1/worker/gpu_worker.py`` ``determine_available_memory``, ``vllm/utils/mem_utils.py``
``memory_profiling``, ``vllm/v1/core/kv_cache_utils.py`` and ``vllm/v1/kv_cache_interface.py``)::

    requested   = gpu_memory_utilization x total                 (torch.cuda.mem_get_info()[1])
    non_kv      = weights + activation peak of profile_run + non-torch increase
    available   = requested - non_kv [- CUDA-graph estimate, with VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1]
    num_blocks  = available // page_size // group_size           (get_num_blocks)
    tokens      = num_blocks // len(kv_cache_groups) x block_size  (_report_kv_cache_config)

Exact here: the weights (parameter layout, vLLM's rotary cos/sin cache, tensor-parallel shards), the KV
page of every layer kind (full, sliding window, MLA latent, gated-delta-net / Mamba state), the grouping of
hybrid models, the block count, the token capacity and the concurrency. Not exact: the activation peak of
the profiling forward (``act_token_factor`` x the widest per-token working set at
``max_num_batched_tokens`` + ``act_logits_factor`` x the sampler's fp32 logits), the non-torch memory
(CUDA context deltas, NCCL, custom all-reduce) and the CUDA-graph pool. Those come from a vLLM
coefficients file (``results/coefficients/vllm-<gpu>.json``, fitted on vLLM's own start-up logs by
``vramcal calibrate --framework vllm``), else the defaults below, marked uncalibrated.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping

from estimator.errors import UserError

GIB = 2**30
RULES = "vLLM V1 engine 0.10-0.19 (gpu_worker.determine_available_memory, kv_cache_utils, kv_cache_interface)"

# name -> (first-principles default, meaning). A coefficients file overrides them.
COEFFICIENTS: dict[str, tuple[float, str]] = {
    "act_token_factor": (1.5, "bytes alive at the profile_run peak per byte of the widest per-token working set"),
    "act_logits_factor": (2.0, "copies of the sampler's fp32 logits (max_num_seqs x vocab) alive at its peak"),
    "non_torch_bytes": (0.15 * GIB, "non-torch memory increase at tensor parallel size 1 (CUDA context deltas, cuBLAS)"),
    "non_torch_tp_bytes": (0.35 * GIB, "non-torch memory increase at tensor parallel size > 1 (NCCL, custom all-reduce)"),
    "cuda_graph_bytes_per_layer_graph": (200 * 2**10, "CUDA-graph pool bytes per layer per captured batch size"),
}
DEFAULT_INTERVAL = {"low": -0.05, "high": 0.05}  # relative to the non-KV memory (weights + activations + ...)
UNCALIBRATED_INTERVAL = {"low": -0.15, "high": 0.15}
KV_CACHE_DTYPES = {"auto": None, "bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4,
                   "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class VllmSettings:
    """The `vllm serve` options that change memory. None: vLLM's default for this model and GPU."""

    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    tensor_parallel_size: int = 1
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False
    block_size: int | None = None
    estimate_cudagraphs: bool = False  # VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1 (default 0)

    def __post_init__(self):
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise UserError(f"--gpu-memory-utilization must be in (0, 1], got {u!r} "
                            "(vLLM's fraction of the GPU's total memory, default 0.9)")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise UserError(f"--tensor-parallel-size must be a positive integer, got {tp!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise UserError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")


def default_batch_limits(gpu_total_bytes: int, gpu_name: str | None) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) `vllm serve` picks (EngineArgs.get_batch_defaults,
    OPENAI_API_SERVER): 8192 / 1024 on GPUs of >= 70 GiB other than the A100, else 2048 / 256."""
    if gpu_total_bytes >= 70 * GIB and "a100" not in (gpu_name or "").lower():
        return 8192, 1024
    return 2048, 256


def cudagraph_capture_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """vLLM's default capture sizes: 1, 2, 4, 8..248 by 8, 256.. by 16 up to
    max_cudagraph_capture_size = min(2 x max_num_seqs, 512), never above max_num_batched_tokens."""
    top = min(2 * max_num_seqs, 512, max_num_batched_tokens)
    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, 513, 16))
    return [s for s in sizes if s <= top]


# ---------------------------------------------------------------------------------------------------
# KV cache pages per layer (vllm/v1/kv_cache_interface.py)


@dataclass(frozen=True)
class LayerPage:
    """One layer's KV cache spec as vLLM sees it on one GPU."""

    kind: str  # "full" (FullAttentionSpec), "sliding" (SlidingWindowSpec), "mla" (MLAAttentionSpec), "mamba"
    page_bytes: int  # bytes of one block of this layer (MambaSpec: the whole state, padded)
    block_size: int  # tokens per block (Mamba: the attention block size it is padded to)
    window: int | None = None
    bytes_per_token: int = 0  # attention layers: bytes one token adds; 0 for Mamba

    def max_bytes_per_request(self, max_model_len: int, max_num_batched_tokens: int) -> int:
        """``max_memory_usage_bytes``: the most one request at max_model_len holds in this layer."""
        if self.kind == "mamba":  # mamba_cache_mode "none": one state per request
            return self.page_bytes
        if self.kind == "sliding":
            tokens = min(self.window - 1 + max_num_batched_tokens, max_model_len)
            return (cdiv(tokens, self.block_size) + 1) * self.page_bytes
        return cdiv(max_model_len, self.block_size) * self.page_bytes


def _kv_heads_per_gpu(num_kv_heads: int, tp: int) -> int:
    """KV heads one GPU holds: divided by TP, replicated when there are fewer heads than GPUs."""
    return max(1, num_kv_heads // tp)


def check_tensor_parallel(spec, tp: int) -> None:
    """vLLM's refusals: attention heads must divide by TP (ModelConfig.verify_with_parallel_config), and
    KV heads must divide by TP or TP by them (QKVParallelLinear)."""
    if tp == 1:
        return
    for layer in spec.layers:
        att = layer.attention
        if att.kind in ("full", "sliding", "mla") and att.num_heads % tp:
            raise UserError(f"--tensor-parallel-size {tp}: vLLM refuses it, the {att.num_heads} attention heads "
                            f"of {spec.name} do not divide by it")
        if att.kind in ("full", "sliding") and att.num_kv_heads and att.num_kv_heads % tp and tp % att.num_kv_heads:
            raise UserError(f"--tensor-parallel-size {tp}: vLLM refuses it, the {att.num_kv_heads} KV heads of "
                            f"{spec.name} neither divide by it nor divide it")


def _gdn_state_bytes(config: Mapping, tp: int, model_bytes: int, ssm_bytes: int) -> int:
    """MambaStateShapeCalculator.gated_delta_net_state_shape: conv state (conv_dim / tp, kernel - 1) and
    temporal state (num_v_heads / tp, head_v_dim, head_k_dim), conv_dim = k_dim x k_heads x 2 + v_dim x v_heads."""
    cfg = config.get("text_config") or config
    nk, nv = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
    dk, dv = int(cfg["linear_key_head_dim"]), int(cfg["linear_value_head_dim"])
    kernel = int(cfg.get("linear_conv_kernel_dim", 4))
    conv_dim = dk * nk * 2 + dv * nv
    if conv_dim % tp or nv % tp:
        raise UserError(f"--tensor-parallel-size {tp}: vLLM refuses it, the linear-attention heads ({nv}) do not divide by it")
    return (conv_dim // tp) * (kernel - 1) * model_bytes + (nv // tp) * dv * dk * ssm_bytes


def layer_pages(spec, dtype: str, settings: VllmSettings) -> list[LayerPage]:
    """Every layer's page on one GPU, block sizes as vLLM sets them (hybrid Mamba models pad)."""
    tp = settings.tensor_parallel_size
    model_b = _DTYPE_BYTES[dtype]
    kv_b = KV_CACHE_DTYPES[settings.kv_cache_dtype] or model_b
    has_mla = any(l.attention.kind == "mla" for l in spec.layers)
    # MLA backends on Hopper+ (FlashMLA / CUTLASS MLA) need 64-token blocks; vLLM raises the default to 64
    block = settings.block_size or (64 if has_mla else 16)
    per_token: list[tuple[str, int, int | None]] = []  # (kind, bytes per token, window) or mamba state
    for layer in spec.layers:
        att = layer.attention
        if att.kind in ("full", "sliding"):
            heads = _kv_heads_per_gpu(att.num_kv_heads, tp)
            # FullAttentionSpec.real_page_size_bytes: block x heads x (head_size + head_size_v) x dtype
            per_token.append((att.kind if att.window else "full", heads * (att.head_dim + (att.v_head_dim or att.head_dim)) * kv_b,
                              att.window))
        elif att.kind == "mla":
            # MLAAttentionSpec: one "head" of kv_lora_rank + qk_rope_head_dim, no K/V pair, on every TP rank
            per_token.append(("mla", (att.kv_lora_rank + att.qk_rope_head_dim) * kv_b, None))
        elif att.kind == "linear":
            ssm = (spec.config.get("text_config") or spec.config).get("mamba_ssm_dtype")
            ssm_b = _DTYPE_BYTES.get(str(ssm), model_b)  # mamba_ssm_cache_dtype "auto": the model's dtype
            per_token.append(("mamba", _gdn_state_bytes(spec.config, tp, model_b, ssm_b), None))
        else:
            raise UserError(f"{spec.name}: vLLM's cache for {att.kind} layers is not modelled yet")
    attn = [b for k, b, _ in per_token if k != "mamba"]
    mamba = [b for k, b, _ in per_token if k == "mamba"]
    if mamba and attn:
        # _align_hybrid_block_size (mamba_cache_mode "none"): attention blocks grow until one attention page
        # holds a Mamba state; the Mamba page is padded to exactly that attention page
        align = max(16, block)
        one = max(attn)
        block = max(block, align * cdiv(max(mamba), align * one))
        mamba_page = block * one
    elif mamba:
        mamba_page = max(mamba)
    pages = []
    for kind, b, window in per_token:
        if kind == "mamba":
            pages.append(LayerPage("mamba", mamba_page, block))
        else:
            pages.append(LayerPage(kind, block * b, block, window, b))
    return pages


# ---------------------------------------------------------------------------------------------------
# Groups and blocks (vllm/v1/core/kv_cache_utils.py)


@dataclass(frozen=True)
class KVLayout:
    """How vLLM splits the layers into KV cache groups sharing one block pool."""

    groups: tuple[tuple[LayerPage, int], ...]  # (spec, layers in the group)
    group_size: int  # layers per group: the pools one block spans (get_num_blocks' num_layers)
    page_bytes: int  # one block of one layer (uniform after unify_kv_cache_spec_page_size)
    uniform_type: bool = False  # one group of full-attention layers with different page sizes

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes over all pools (what num_blocks divides the budget by)."""
        if self.uniform_type:
            return sum(p.page_bytes for p, _ in self.groups)
        return self.page_bytes * self.group_size

    @property
    def min_block_size(self) -> int:
        return min(p.block_size for p, _ in self.groups)

    def num_blocks(self, available: int) -> int:
        return max(int(available // self.block_bytes), 0) if available > 0 else 0

    def tokens(self, num_blocks: int) -> int:
        n_groups = 1 if self.uniform_type else len(self.groups)
        return num_blocks // n_groups * self.min_block_size

    def bytes_per_request(self, max_model_len: int, mnbt: int) -> int:
        """_max_memory_usage_bytes_from_groups: what one max_model_len request needs."""
        if self.uniform_type:
            return sum(p.max_bytes_per_request(max_model_len, mnbt) for p, _ in self.groups)
        blocks = sum(cdiv(p.max_bytes_per_request(max_model_len, mnbt), self.page_bytes) for p, _ in self.groups)
        return self.group_size * self.page_bytes * blocks

    def max_concurrency(self, num_blocks: int, max_model_len: int, mnbt: int) -> float:
        """get_max_concurrency_for_kv_cache_config."""
        if self.uniform_type:
            per_req = sum(p.max_bytes_per_request(max_model_len, mnbt) for p, _ in self.groups)
            blocks = cdiv(per_req, self.block_bytes)
        else:
            per_req = self.group_size * sum(p.max_bytes_per_request(max_model_len, mnbt) for p, _ in self.groups)
            blocks = cdiv(per_req, self.page_bytes * self.group_size)
        return num_blocks / blocks if blocks else 0.0


def kv_layout(pages: list[LayerPage]) -> KVLayout:
    """get_kv_cache_groups: one group when every layer is the same (or the same type with different sizes),
    else page sizes unified and layers split into groups of equal size (the n:1 pattern's 1)."""
    if not pages:
        raise UserError("the model has no layers with a KV cache; vLLM's attention-free path is not modelled")
    kinds = {("full" if p.kind == "mla" else p.kind, p.window) for p in pages}
    if len(set(pages)) == 1:
        return KVLayout(((pages[0], len(pages)),), len(pages), pages[0].page_bytes)
    if len(kinds) == 1 and pages[0].kind != "mamba":  # UniformTypeKVCacheSpecs
        return KVLayout(tuple((p, 1) for p in pages), 1, max(p.page_bytes for p in pages), uniform_type=True)
    top = max(p.page_bytes for p in pages)
    unified = []
    for p in pages:  # unify_kv_cache_spec_page_size: smaller pages get proportionally larger blocks
        if p.page_bytes != top:
            if top % p.page_bytes:
                raise UserError("vLLM cannot unify this model's KV page sizes (NotImplementedError in vLLM)")
            r = top // p.page_bytes
            p = replace(p, page_bytes=top, block_size=p.block_size * r)
        unified.append(p)
    counts: dict[LayerPage, int] = {}
    for p in unified:
        counts[p] = counts.get(p, 0) + 1
    size = min(counts.values())
    if max(counts.values()) < size * 1.5:
        size = max(counts.values())
    groups = []
    for p, n in counts.items():
        for _ in range(cdiv(n, size)):
            groups.append((p, size))
    return KVLayout(tuple(groups), size, top)


# ---------------------------------------------------------------------------------------------------
# Weights and the profiling forward


def rotary_cache_bytes(spec, dtype: str) -> int:
    """vLLM's RotaryEmbedding cos_sin_cache: (max_position_embeddings, rotary_dim) in the model dtype,
    one cache shared by the layers (get_rope is cached)."""
    att = next((l.attention for l in spec.layers if l.attention.kind in ("full", "sliding", "mla")), None)
    if att is None or not spec.max_position_embeddings:
        return 0
    rot = att.qk_rope_head_dim if att.kind == "mla" else int(att.head_dim * spec.partial_rotary_factor)
    return spec.max_position_embeddings * rot * _DTYPE_BYTES[dtype]


def weights_per_gpu(spec, dtype: str, quant: str | None, tp: int) -> int:
    """Weights on one GPU: everything sharded by TP except norms; KV projections replicated when there are
    fewer KV heads than GPUs; plus the rotary cache."""
    from estimator.quant import weights_bytes

    total = weights_bytes(spec, dtype, quant)
    out = total
    if tp > 1:
        params = max(spec.num_parameters, 1)
        per_param = total / params
        norms = spec.other_params.get("norm", 0) * _DTYPE_BYTES[dtype]
        out = (total - norms) / tp + norms
        att = next((l.attention for l in spec.layers if l.attention.kind in ("full", "sliding")), None)
        if att is not None and att.num_kv_heads and att.num_kv_heads < tp:
            kv_rows = att.num_kv_heads * att.head_dim
            kv = sum(l.weight_params for l in spec.linears if l.role == "attn" and l.out_features == kv_rows)
            out += kv * per_param * (1 / att.num_kv_heads - 1 / tp)
    return int(out) + rotary_cache_bytes(spec, dtype)


def per_token_width(spec, tp: int) -> int:
    """Elements per token of the widest working set in one layer of the profiling forward, on one GPU:
    the hidden state plus the larger of the fused qkv output and the MLP's gate_up + activation output."""
    widest = 0
    for layer, _ in spec.layer_groups:
        att, mlp = layer.attention, layer.mlp
        qkv = (att.num_heads * att.head_dim + 2 * max(att.num_kv_heads, 1) * (att.v_head_dim or att.head_dim)) // tp
        if mlp.kind == "dense":
            width = 3 * mlp.intermediate_size // tp
        elif mlp.kind == "moe":
            width = 3 * (mlp.top_k * mlp.intermediate_size + mlp.shared_intermediate_size) // tp
        else:
            width = 0
        widest = max(widest, qkv, width)
    return spec.hidden_size + widest


def activation_features(spec, dtype: str, quant: str | None, tp: int, mnbt: int, max_num_seqs: int) -> dict[str, int]:
    """Exact sizes the activation coefficients multiply: ``act_token_bytes`` (max_num_batched_tokens x the
    widest per-token working set, activation dtype) and ``act_logits_bytes`` (the sampler's dummy run:
    min(max_num_seqs, max_num_batched_tokens) x vocab fp32 logits)."""
    a = max(_DTYPE_BYTES[dtype], 2)
    return {"act_token_bytes": mnbt * per_token_width(spec, tp) * a,
            "act_logits_bytes": min(max_num_seqs, mnbt) * spec.vocab_size * 4}


# ---------------------------------------------------------------------------------------------------
# Coefficients


@dataclass(frozen=True)
class VllmCoefficients:
    values: Mapping[str, float] = field(default_factory=dict)
    calibrated: bool = False
    gpu: str | None = None
    source: str = "built-in first-principles defaults (uncalibrated)"
    interval: Mapping[str, float] = field(default_factory=lambda: dict(UNCALIBRATED_INTERVAL))
    calibrated_terms: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = set(self.values) - set(COEFFICIENTS)
        if unknown:
            raise UserError(f"unknown vLLM coefficient(s) {', '.join(sorted(unknown))} in {self.source}")
        merged = {k: v[0] for k, v in COEFFICIENTS.items()}
        merged.update({k: float(v) for k, v in self.values.items()})
        object.__setattr__(self, "values", merged)


def load_vllm_coefficients(path) -> VllmCoefficients:
    """A ``vramcal.coefficients/1`` file whose ``vllm_startup`` object holds the vLLM terms (its
    top-level ``coefficients`` stay empty, so the transformers reader loads it harmlessly)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        block = data["vllm_startup"]
        return VllmCoefficients(values=block["coefficients"], calibrated=bool(block.get("calibrated")),
                                gpu=data.get("gpu"), source=str(path),
                                interval=block.get("interval") or dict(UNCALIBRATED_INTERVAL),
                                calibrated_terms=tuple(block.get("calibrated_terms") or ()))
    except FileNotFoundError:
        raise UserError(f"coefficients file {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a vLLM coefficients file ({exc})") from None


def select_vllm_coefficients(gpu: str | None) -> VllmCoefficients:
    """results/coefficients/vllm-*.json for this GPU, else any vLLM file (interval widened), else defaults."""
    from estimator.gpus import canonical_gpu_name
    from estimator.resources import coefficients_dir

    files = []
    for p in sorted(Path(coefficients_dir()).glob("vllm-*.json")):
        files.append(load_vllm_coefficients(p))
    for c in files:
        if gpu and canonical_gpu_name(c.gpu) == canonical_gpu_name(gpu):
            return c
    if files:
        c = files[0]
        wide = {"low": min(c.interval["low"] * 2, UNCALIBRATED_INTERVAL["low"]),
                "high": max(c.interval["high"] * 2, UNCALIBRATED_INTERVAL["high"])}
        return replace(c, interval=wide, source=f"{c.source} (fitted on {c.gpu}; not calibrated on {gpu})",
                       calibrated=False)
    return VllmCoefficients()


# ---------------------------------------------------------------------------------------------------
# The start-up


@dataclass(frozen=True)
class VllmStartup:
    model: str
    gpu: str | None
    total_bytes: int
    settings: VllmSettings  # with vLLM's defaults filled in
    requested_bytes: int
    weights_bytes: int
    activation_peak_bytes: int
    non_torch_bytes: int
    cuda_graph_bytes: int
    cuda_graph_in_budget: bool
    kv_cache_bytes: int  # the KV pool: available memory for KV cache (may be negative)
    kv_bytes_per_token: int  # bytes one token adds over all attention layers on one GPU
    state_bytes_per_sequence: int  # Mamba / linear-attention state per request
    block_size: int
    page_bytes: int
    group_size: int
    num_groups: int
    num_gpu_blocks: int
    kv_cache_tokens: int
    max_concurrency: float
    bytes_per_request: int
    starts: bool
    reason: str
    max_model_len_that_starts: int | None
    utilization_needed: float | None
    coefficients: VllmCoefficients
    layer_kinds: Mapping[str, int] = field(default_factory=dict)

    @property
    def low_kv_cache_bytes(self) -> int:
        non_kv = self.requested_bytes - self.kv_cache_bytes
        return int(self.requested_bytes - non_kv * (1 + self.coefficients.interval["high"]))

    @property
    def high_kv_cache_bytes(self) -> int:
        non_kv = self.requested_bytes - self.kv_cache_bytes
        return int(self.requested_bytes - non_kv * (1 + self.coefficients.interval["low"]))

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in (
            "weights_bytes", "activation_peak_bytes", "non_torch_bytes", "cuda_graph_bytes", "cuda_graph_in_budget",
            "requested_bytes", "kv_cache_bytes", "kv_bytes_per_token", "state_bytes_per_sequence", "block_size",
            "page_bytes", "group_size", "num_groups", "num_gpu_blocks", "kv_cache_tokens", "bytes_per_request",
            "starts", "reason", "max_model_len_that_starts", "utilization_needed")}
        out["max_concurrency"] = round(self.max_concurrency, 4)
        out["low_kv_cache_bytes"] = self.low_kv_cache_bytes
        out["high_kv_cache_bytes"] = self.high_kv_cache_bytes
        out["layer_kinds"] = dict(self.layer_kinds)
        out["settings"] = asdict(self.settings)
        out["total_bytes"] = self.total_bytes
        out["rules"] = RULES
        out["coefficients"] = {"calibrated": self.coefficients.calibrated, "source": self.coefficients.source,
                               "values": dict(self.coefficients.values), "interval": dict(self.coefficients.interval)}
        return out


def resolve_settings(spec, settings: VllmSettings, total_bytes: int, gpu_name: str | None) -> VllmSettings:
    """vLLM's defaults filled in: max_model_len from the config, batch limits from the GPU."""
    mnbt, seqs = default_batch_limits(total_bytes, gpu_name)
    max_len = settings.max_model_len or spec.max_position_embeddings or 2048
    if settings.max_model_len and spec.max_position_embeddings and settings.max_model_len > spec.max_position_embeddings:
        raise UserError(f"--max-model-len {settings.max_model_len:,} is above {spec.name}'s maximum positions "
                        f"({spec.max_position_embeddings:,}); vLLM refuses it (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 overrides)")
    seqs = settings.max_num_seqs or seqs
    mnbt = settings.max_num_batched_tokens or mnbt
    if mnbt < seqs:
        if settings.max_num_batched_tokens:
            raise UserError(f"--max-num-batched-tokens ({mnbt}) must be >= --max-num-seqs ({seqs}); vLLM refuses it")
        mnbt = seqs
    return replace(settings, max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=mnbt)


def non_kv_parts(spec, dtype: str, quant: str | None, s: VllmSettings, c: Mapping[str, float]) -> dict[str, int]:
    """The profiled terms: weights, activation peak, non-torch memory, CUDA-graph pool (bytes, one GPU)."""
    tp = s.tensor_parallel_size
    f = activation_features(spec, dtype, quant, tp, s.max_num_batched_tokens, s.max_num_seqs)
    graphs = 0 if s.enforce_eager else len(cudagraph_capture_sizes(s.max_num_seqs, s.max_num_batched_tokens))
    return {
        "weights_bytes": weights_per_gpu(spec, dtype, quant, tp),
        "activation_peak_bytes": int(c["act_token_factor"] * f["act_token_bytes"] + c["act_logits_factor"] * f["act_logits_bytes"]),
        "non_torch_bytes": int(c["non_torch_tp_bytes"] if tp > 1 else c["non_torch_bytes"]),
        "cuda_graph_bytes": int(c["cuda_graph_bytes_per_layer_graph"] * spec.num_layers * graphs),
        "capture_sizes": graphs,
    }


def startup(spec, dtype: str, quant: str | None, total_bytes: int, settings: VllmSettings,
            coefficients: VllmCoefficients | None = None, gpu_name: str | None = None) -> VllmStartup:
    """What vLLM does at start-up on one GPU of ``total_bytes`` (cudaMemGetInfo total)."""
    coefficients = coefficients or VllmCoefficients()
    check_tensor_parallel(spec, settings.tensor_parallel_size)
    s = resolve_settings(spec, settings, total_bytes, gpu_name)
    parts = non_kv_parts(spec, dtype, quant, s, coefficients.values)
    pages = layer_pages(spec, dtype, s)
    layout = kv_layout(pages)
    requested = int(total_bytes * s.gpu_memory_utilization)
    graphs_in = s.estimate_cudagraphs and not s.enforce_eager

    def available_at(util: float) -> int:
        return int(total_bytes * util) - parts["weights_bytes"] - parts["activation_peak_bytes"] - \
            parts["non_torch_bytes"] - (parts["cuda_graph_bytes"] if graphs_in else 0)

    def fits(max_len: int, available: int) -> bool:
        # check_enough_kv_cache_memory, less the null block the BlockPool holds back
        return available > 0 and layout.bytes_per_request(max_len, s.max_num_batched_tokens) <= available - layout.block_bytes

    available = available_at(s.gpu_memory_utilization)
    blocks = layout.num_blocks(available)
    starts = fits(s.max_model_len, available)
    reason = "ok"
    if available <= 0:
        reason = ("no memory left for the KV cache: weights + activations + non-torch memory exceed "
                  "gpu_memory_utilization x total")
    elif not starts:
        reason = (f"max seq len ({s.max_model_len:,}) is larger than the maximum number of tokens that can be "
                  f"stored in KV cache ({layout.tokens(blocks):,})")
    elif not graphs_in and parts["cuda_graph_bytes"] > total_bytes - requested:
        starts = False
        reason = (f"CUDA graphs (~{parts['cuda_graph_bytes'] / GIB:.2f} GiB, captured after the KV cache) do not fit "
                  f"in the {1 - s.gpu_memory_utilization:.0%} vLLM leaves; lower --gpu-memory-utilization or --enforce-eager")
    best_len = None
    if not fits(1, available):
        best_len = 0
    elif not fits(s.max_model_len, available):
        lo, hi = 1, s.max_model_len
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid, available) else (lo, mid - 1)
        best_len = lo
    need = None
    if not fits(s.max_model_len, available):
        for milli in range(1, 1001):
            if fits(s.max_model_len, available_at(milli / 1000)):
                need = milli / 1000
                break
    kinds: dict[str, int] = {}
    for p in pages:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    return VllmStartup(
        model=spec.name, gpu=gpu_name, total_bytes=total_bytes, settings=s, requested_bytes=requested,
        weights_bytes=parts["weights_bytes"], activation_peak_bytes=parts["activation_peak_bytes"],
        non_torch_bytes=parts["non_torch_bytes"], cuda_graph_bytes=parts["cuda_graph_bytes"],
        cuda_graph_in_budget=graphs_in, kv_cache_bytes=available,
        kv_bytes_per_token=sum(p.bytes_per_token for p in pages),
        state_bytes_per_sequence=sum(p.page_bytes for p in pages if p.kind == "mamba"),
        block_size=layout.min_block_size, page_bytes=layout.page_bytes, group_size=layout.group_size,
        num_groups=1 if layout.uniform_type else len(layout.groups), num_gpu_blocks=blocks,
        kv_cache_tokens=layout.tokens(blocks),
        max_concurrency=layout.max_concurrency(blocks, s.max_model_len, s.max_num_batched_tokens),
        bytes_per_request=layout.bytes_per_request(s.max_model_len, s.max_num_batched_tokens),
        starts=starts, reason=reason, max_model_len_that_starts=best_len, utilization_needed=need,
        coefficients=coefficients, layer_kinds=kinds)


def kv_pool_from_available(spec, dtype: str, settings: VllmSettings, available: int) -> dict[str, int]:
    """Blocks and tokens vLLM makes of a given KV budget (to check a log's own numbers)."""
    layout = kv_layout(layer_pages(spec, dtype, settings))
    blocks = layout.num_blocks(available)
    return {"num_gpu_blocks": blocks, "kv_cache_tokens": layout.tokens(blocks), "block_bytes": layout.block_bytes}
