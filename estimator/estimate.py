"""The estimate: exact terms (``estimator/terms.py``) combined by coefficients into the peak.

For transformers, the terms include the run replayed in the caching-allocator model
(``estimator/replay/``): ``sim_allocated`` and ``sim_reserved`` are the peaks above the weights of
``max_memory_allocated`` and ``max_memory_reserved``. The model of the peak, in bytes::

    allocated   = weights + sim_allocated_factor x sim_allocated + workspace_bytes
    reserve     = sim_reserve_factor x (sim_reserved - sim_allocated)     (allocator fragmentation)
    overhead    = overhead_bytes + reserve                          (CUDA context + allocator reserve)
    total       = allocated + overhead                              (the process's NVML peak)

Without a simulated program (vLLM), the analytic formula::

    kv          = kv_factor x KV cache held at that moment
    layer_ws    = act_hidden x hidden + act_qkv x qkv + act_mlp x mlp + act_moe x moe
                  + act_router x router + act_scores_eager x scores_eager + act_scores_math x scores_math
    head_ws     = act_head_hidden x hidden + act_logits x logits
    dynamic     = max over phases (prefill; each decode step) of kv + max(layer_ws, head_ws)
    allocated   = weights + dynamic                                  (torch.cuda.max_memory_allocated)
    overhead    = overhead_bytes + overhead_fraction x dynamic + weights_fraction x weights
    total       = allocated + overhead                               (the process's NVML peak)

``predict_parts`` is the one implementation of this formula; calibration fits the coefficients by
calling it, so the fitted model and the shipped estimator cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from estimator.coefficients import Coefficients, select_coefficients
from estimator.errors import UserError
from estimator.gpus import GPU, canonical_gpu_name, find_gpu, table_gpus
from estimator.positions import check_context
from estimator.quant import buffer_bytes, weights_bytes
from estimator.spec import ModelSpec
from estimator.terms import Workload, features

ACTIVATION_TERMS = (
    ("act_hidden", "hidden"),
    ("act_qkv", "qkv"),
    ("act_mlp", "mlp"),
    ("act_moe", "moe"),
    ("act_router", "router"),
    ("act_scores_eager", "scores_eager"),
    ("act_scores_math", "scores_math"),
)


def _working_set(f: Mapping[str, float], c: Mapping[str, float], suffix: str = "") -> float:
    layer = sum(c[name] * f.get(key + suffix, 0) for name, key in ACTIVATION_TERMS)
    head = c["act_head_hidden"] * f.get("hidden" + suffix, 0) + c["act_logits"] * f.get("logits" + suffix, 0)
    return max(layer, head)


def predict_parts(weights: float, f: Mapping[str, float], c: Mapping[str, float]) -> dict[str, float]:
    """Peak parts from exact features ``f`` and coefficient values ``c`` (plain floats, no rounding)."""
    if "sim_allocated_bytes" in f:
        dynamic = c["sim_allocated_factor"] * f["sim_allocated_bytes"] + c["workspace_bytes"]
        allocated = weights + dynamic
        # a non-default allocator setting: the reserve a run needs, not the cache it keeps where memory is
        # ample (``sim_needed_bytes``, estimator/allocator.py ``_PlainRun``)
        reserved = min(f["sim_reserved_bytes"], f.get("sim_needed_bytes", f["sim_reserved_bytes"]))
        reserve = c["sim_reserve_factor"] * max(reserved - f["sim_allocated_bytes"], 0)
        overhead = c["overhead_bytes"] + reserve
        return {
            "phase": "decode" if f.get("sim_peak_step", 0) > 0 else "prefill",
            "dynamic": dynamic,
            "allocated": allocated,
            "reserved": allocated + reserve,
            "overhead": overhead,
            "total": allocated + overhead,
        }
    kv_factor = c["kv_factor"]
    prefill = kv_factor * f.get("kv_prefill_bytes", 0) + _working_set(f, c)
    phases = {"prefill": prefill}
    if "hidden_decode" in f:
        phases["decode"] = kv_factor * f.get("kv_final_bytes", 0) + _working_set(f, c, "_decode")
    phase = max(phases, key=phases.get)
    dynamic = phases[phase]
    allocated = weights + dynamic
    overhead = c["overhead_bytes"] + c["overhead_fraction"] * dynamic + c["weights_fraction"] * weights
    return {
        "phase": phase,
        "dynamic": dynamic,
        "allocated": allocated,
        "reserved": allocated + c["overhead_fraction"] * dynamic + c["weights_fraction"] * weights,
        "overhead": overhead,
        "total": allocated + overhead,
    }


@dataclass(frozen=True)
class Estimate:
    model: str
    workload: Workload
    weights_bytes: int
    kv_cache_bytes: int  # what the cache holds at the end (exact)
    activation_bytes: int  # everything else alive at the peak: activations, logits, transient KV copies
    overhead_bytes: int  # CUDA context, workspaces, allocator reserve and fragmentation
    total_bytes: int  # the process's peak device memory
    low_bytes: int
    high_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    peak_phase: str
    num_parameters: int
    coefficients: Coefficients = field(repr=False)
    features: Mapping[str, int] = field(default_factory=dict, repr=False)
    # One line each: what the estimate rests on that is approximate or outside its calibration
    # (a context beyond the trained positions, coefficients from another GPU, a dequantized format...).
    notes: tuple[str, ...] = ()
    gpu: str | None = None  # the GPU low/high are for (None: the coefficients' own)
    beyond_trained_positions: bool = False  # context above max_position_embeddings (a rope model runs it)
    # Which engine answered: "replay" (estimator/replay/, pure Python) or "trace" (harness, fake tensors),
    # and the transformers version it answers for: the one the replay's program mirrors
    # (estimator.replay.TRANSFORMERS_VERSION), or the installed one the trace ran.
    engine: str = "replay"
    engine_version: str | None = None
    # Bytes each end of the interval moves out by, beyond the calibration's interval, for parts of the
    # estimate no measurement has calibrated (estimator/lora.py: LORA_WIDEN); stated in ``notes``.
    widen_bytes: int = 0
    compiled: bool = False  # generate compiles the decode step (``compiles``): uncalibrated, interval widened
    high_extra_bytes: int = 0  # added to the interval's high end for a known, unexplained miss (``awq_tied_extra``)

    def verdicts(self, gpus: tuple[GPU, ...] | None = None) -> list[dict]:
        """Per GPU: free memory after the estimate and a verdict (fits / tight / does not fit).

        ``memory_bytes`` is what a process can hold there (``estimator/gpus.py``); ``high_bytes`` is the
        interval's high end for that GPU, widened where the coefficients were fitted on another one.
        """
        rows = []
        for gpu in table_gpus() if gpus is None else gpus:
            high = bounds(self.total_bytes, self.coefficients, gpu, self.workload.alloc_conf, self.compiled,
                          self.widen_bytes)[1]
            high += self.high_extra_bytes
            if high <= gpu.memory_bytes:
                verdict = "fits"
            elif self.total_bytes <= gpu.memory_bytes:
                verdict = "tight"  # the point estimate fits, the interval's high end does not
            else:
                verdict = "does not fit"
            rows.append({"gpu": gpu.name, "memory_bytes": gpu.memory_bytes,
                         "free_bytes": gpu.memory_bytes - self.total_bytes, "high_bytes": high,
                         "calibrated": calibrated_for(self.coefficients, gpu),
                         "memory_approximate": gpu.approximate, "verdict": verdict})
        return rows

    def as_dict(self) -> dict:
        c = self.coefficients
        return {
            "model": self.model,
            "inputs": self.workload.as_dict(),
            "num_parameters": self.num_parameters,
            "total_bytes": self.total_bytes,
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "activation_bytes": self.activation_bytes,
            "overhead_bytes": self.overhead_bytes,
            "low_bytes": self.low_bytes,
            "high_bytes": self.high_bytes,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "peak_phase": self.peak_phase,
            "coefficients": {
                "source": c.source,
                "calibrated": c.calibrated,
                "framework": c.framework,
                "gpu": c.gpu,
                "interval": dict(c.interval),
            },
            "features": dict(self.features),
            "notes": list(self.notes),
            "gpu": self.gpu,
            "beyond_trained_positions": self.beyond_trained_positions,
            "engine": self.engine,
            "engine_version": self.engine_version,
            "widen_bytes": self.widen_bytes,
            **_extra_rows(self.features),
            "compiled_decode": self.compiled,
        }


# Coefficients fitted on one GPU, used for another: the CUDA context (717 MiB measured on the H100;
# a few hundred MiB to about 1 GiB across architectures and drivers), cuBLAS workspaces and the attention
# kernels a GPU can run differ. The interval widens by this stated rule, not by a fit (no such data yet):
# both ends move out by OTHER_GPU_ABS_BYTES plus OTHER_GPU_REL of the end. Tested in test_estimate.py.
OTHER_GPU_ABS_BYTES = 512 * 2**20
OTHER_GPU_REL = 0.03


# A PYTORCH_CUDA_ALLOC_CONF other than the one the coefficients were fitted on: the replay follows the
# allocator's rules for it (estimator/allocator.py, estimator/expandable.py), but ``sim_reserve_factor`` and
# the interval were fitted on another allocator's reserve (the H100 reference: the default settings). Until
# records under that setting are fitted, the interval widens by this stated rule, not by a fit: both ends
# move out by ALLOC_CONF_ABS_BYTES plus ALLOC_CONF_REL of the end (expandable segments keep the reserve within
# a few 20 MiB pages; max_split_size_mb can add GiBs, which the replay counts). Tested in test_alloc_conf.py.
ALLOC_CONF_ABS_BYTES = 256 * 2**20
ALLOC_CONF_REL = 0.03


# generate(..., cache_implementation="static") on CUDA compiles the decode step (transformers 5.17
# GenerationMixin._valid_auto_compile_criteria: a compileable cache, no disable_compile, a quantizer whose
# is_compileable is True; PreTrainedModel.get_compiled_call: not llama4) with CompileConfig's default mode
# "reduce-overhead": CUDA graphs, whose private memory pool keeps the decode step's high-water mark for as
# long as the graph lives, plus static copies of the step's inputs and its logits. The replay runs the
# eager step; none of this is derived without a GPU and no compiled GPU record exists yet, so the interval
# widens by this stated rule, not by a fit: the low end by COMPILE_LOW_REL (fused kernels may hold less),
# the high end by COMPILE_HIGH_REL plus COMPILE_ABS_BYTES (the pool, inductor's buffers, autotuning).
COMPILE_LOW_REL = 0.05
COMPILE_HIGH_REL = 0.10
COMPILE_ABS_BYTES = 2**30
_COMPILEABLE_QUANT = ("torchao", "fp8", "gguf", "compressed", "nvfp4")  # quantizers with is_compileable True


def compiles(workload: Workload, model_type: str | None = None) -> bool:
    """Whether transformers would compile this workload's decode step on a CUDA GPU."""
    if workload.compile != "auto" or workload.framework != "transformers":
        return False
    if workload.workload != "generate" or workload.cache != "static" or workload.new_tokens < 2:
        return False  # a DynamicCache is not compileable; a single new token never reaches the decode step
    if model_type and "llama4" in model_type:
        return False
    return not workload.quant or workload.quant.startswith(_COMPILEABLE_QUANT)


def alloc_conf_calibrated(coefficients: Coefficients, alloc_conf: str) -> bool:
    """Whether ``coefficients`` were fitted under allocator settings that behave as ``alloc_conf``."""
    from estimator.alloc_conf import parse_alloc_conf

    if not coefficients.calibrated or coefficients.framework == "vllm":
        return True  # first-principles values know no allocator; vLLM's peak is not the replay's
    mine = parse_alloc_conf(alloc_conf or "").memory_settings()
    return mine == parse_alloc_conf(coefficients.alloc_conf or "").memory_settings()


def calibrated_for(coefficients: Coefficients, gpu: GPU | None) -> bool:
    """Whether ``coefficients`` were fitted on ``gpu`` (None: the estimate is for their own GPU)."""
    if not coefficients.calibrated:
        return False
    return gpu is None or canonical_gpu_name(coefficients.gpu) == gpu.name


def _extra_rows(f: Mapping[str, int]) -> dict[str, int]:
    """The estimate's own rows for LoRA adapters (``estimator/lora.py``), where the job has them."""
    out = {}
    if "lora_weights_bytes" in f:
        out.update(adapter_weights_bytes=f["lora_weights_bytes"], adapter_activation_bytes=f["lora_activation_bytes"])
    for key in ("draft_weights_bytes", "draft_kv_bytes", "verification_activation_bytes"):  # estimator/assisted.py
        if key in f:
            out[key] = f[key]
    return out


def bounds(total: float, coefficients: Coefficients, gpu: GPU | None = None,
           alloc_conf: str = "", compiled: bool = False, widen: int = 0) -> tuple[int, int]:
    """(low, high) bytes of the interval around ``total`` for ``gpu`` under ``alloc_conf``; widened where
    borrowed (another GPU, other allocator settings), and by ``widen`` bytes at each end for uncalibrated
    parts."""
    iv = coefficients.interval
    low, high = total * (1 + iv["low"]) - widen, total * (1 + iv["high"]) + widen
    if coefficients.calibrated and not calibrated_for(coefficients, gpu):
        low = low * (1 - OTHER_GPU_REL) - OTHER_GPU_ABS_BYTES
        high = high * (1 + OTHER_GPU_REL) + OTHER_GPU_ABS_BYTES
    if not alloc_conf_calibrated(coefficients, alloc_conf):
        low = low * (1 - ALLOC_CONF_REL) - ALLOC_CONF_ABS_BYTES
        high = high * (1 + ALLOC_CONF_REL) + ALLOC_CONF_ABS_BYTES
    if compiled:
        low = low * (1 - COMPILE_LOW_REL)
        high = high * (1 + COMPILE_HIGH_REL) + COMPILE_ABS_BYTES
    return max(round(low), 0), round(high)


def weight_format(workload: Workload) -> tuple[str | None, str | None]:
    """(the format the weights are held in on the GPU, a note when that differs from what was asked).

    transformers dequantizes a GGUF file on load (``from_pretrained(..., gguf_file=...)`` converts every
    tensor to torch at the requested dtype), so under transformers GGUF weights take the compute dtype's
    bytes; vLLM and llama.cpp keep them quantized.
    """
    quant = workload.quant
    if quant and quant.startswith("gguf") and workload.framework == "transformers":
        return None, (f"transformers dequantizes {quant} weights to {workload.dtype} on load: counted at "
                      f"{workload.dtype}, not at the GGUF file's size (vLLM keeps GGUF quantized: --framework vllm)")
    return quant, None


def estimate(spec: ModelSpec, workload: Workload, coefficients: Coefficients | None = None,
             gpu: str | GPU | None = None) -> Estimate:
    """The peak device memory of ``workload`` on ``spec``, with its breakdown and interval.

    ``gpu``: the GPU the interval is for (default: the coefficients' own GPU). Coefficients fitted on
    another GPU widen the interval (``bounds``) and the estimate says so in ``notes``.
    """
    target = find_gpu(gpu) if isinstance(gpu, str) else gpu
    if coefficients is None:
        coefficients = select_coefficients(workload.framework, target.name if target else None)
    notes: list[str] = []
    position_note = check_context(spec.model_type, spec.max_position_embeddings, workload.context, spec.name)
    if position_note:
        notes.append(position_note)
    if workload.quant and workload.quant == spec.default_quant and spec.default_quant_source:
        notes.append(f"weights {workload.quant}: {spec.default_quant_source} (--quant none counts them unquantized)")
    if workload.quant == "mxfp4" and workload.framework == "transformers":
        # transformers 5.x quantizer_mxfp4: without triton >= 3.4 and the `kernels` package, or below
        # compute capability 7.5, it sets dequantize=True and loads the experts in bf16
        notes.append("mxfp4 stays packed only with triton >= 3.4 and the `kernels` package on compute capability "
                     ">= 7.5; otherwise transformers dequantizes it to bf16 (estimate that with --quant none)")
    quant, quant_note = weight_format(workload)
    if quant_note:
        notes.append(quant_note)
    if spec.uncounted_parts:
        notes.append(f"not counted: {', '.join(spec.uncounted_parts)} (no layout known for it): the weights are the "
                     "language model's only, an under-estimate")
    notes += calibration_notes(coefficients, target, workload.framework)
    weights = weights_bytes(spec, workload.dtype, quant)  # parameters, as published counts them
    widen = 0
    if workload.lora is not None:  # peft adapters: their weights exactly, their forward replayed
        from estimator import lora

        lora.check_supported(spec, workload.lora, quant)
    if workload.assistant:  # the draft read and checked before any replay runs
        from estimator.assisted import check_draft

        check_draft(spec, workload)
    f = features(spec, workload)
    notes += alloc_conf_notes(coefficients, workload, f)
    if workload.lora is not None:
        weights += f["lora_weights_bytes"]
        note, widen = lora.note(workload.lora, f)
        notes.append(note)
    notes += compile_notes(workload, spec.model_type)
    extra, awq_note = awq_tied_extra(spec, workload)
    if awq_note:
        notes.append(awq_note)
    if workload.assistant or workload.prompt_lookup_num_tokens:  # both models, both caches, verification
        from estimator import assisted

        draft_weights, note, more = assisted.apply(spec, workload, f)
        weights += draft_weights
        notes.append(note)
        widen += more
    long_extra, long_note = long_sliding_extra(spec, workload, f)
    if long_note:
        notes.append(long_note)
    extra += long_extra
    # rotary tables and the like: a few KiB, counted with the overhead
    from estimator.replay import TRANSFORMERS_VERSION

    return assemble(spec.name, workload, weights, f, buffer_bytes(spec), spec.num_parameters, coefficients,
                    target, workload.attn, notes, position_note is not None, model_type=spec.model_type,
                    high_extra_bytes=extra, widen=widen, engine_version=TRANSFORMERS_VERSION)


def calibration_notes(coefficients: Coefficients, target: GPU | None, framework: str) -> list[str]:
    """What the interval rests on, where it is not the calibration's own GPU (one line, or none)."""
    if not coefficients.calibrated:
        return [f"no calibration for {framework}: first-principles coefficients, "
                f"interval {coefficients.interval['low']:+.0%}..{coefficients.interval['high']:+.0%}"]
    if not calibrated_for(coefficients, target):
        return [f"coefficients fitted on {coefficients.gpu} ({coefficients.framework}); {target.name} has none: "
                f"interval widened by {OTHER_GPU_REL:.0%} + {OTHER_GPU_ABS_BYTES // 2**20} MiB at each end"]
    return []


def awq_tied_extra(spec: ModelSpec, workload: Workload) -> tuple[int, str | None]:
    """(bytes added to the high end, the note) for AWQ weights on a model with tied embeddings.

    Qwen's published Qwen2.5 table (benchmarks/qwen25_quant.py; AutoAWQ 0.2.6, transformers 4.46) has the AWQ
    checkpoints of the tied-embedding sizes (0.5B, 1.5B, 3B) 20-27% above this estimate's allocated peak at a
    1-token input, about 0.8 x the embedding's bytes, while GPTQ of the same models, AWQ at 6k-30k inputs and
    AWQ of the untied sizes agree within a few percent. The mechanism is not identified (not a persistent
    copy: the long-input rows would show it), so it is not modelled: the high end rises by one embedding."""
    from estimator.dtypes import dtype_bytes

    quant = workload.quant or ""
    if workload.framework != "transformers" or not quant.startswith("awq") or not spec.tie_word_embeddings:
        return 0, None
    extra = int(spec.vocab_size * spec.hidden_size * dtype_bytes(workload.dtype))
    return extra, (f"{quant} with tied embeddings: published AutoAWQ figures (Qwen2.5 0.5B-3B) run up to 27% above "
                   f"this estimate at short inputs (mechanism not identified): interval high end raised by the "
                   f"embedding's {extra / 2**30:,.2f} GiB")


# Long prompts on models with sliding-window layers: the replay against `vramcal trace` (transformers 5.17,
# fake tensors, the same allocator model; --compile off, batch 1, 16 new tokens), simulated allocated peak
# above the weights. It ran -34.1% at 32k on gemma-3-1b and -17.9% on gemma-2-2b until the replay modelled
# the memory-efficient kernel's additive copy of each sliding layer's boolean mask (estimator/replay/
# attention.py ``additive_mask``), the batch-broadcast boolean mask, MQA's view-only repeat_kv and Gemma 3's
# second (cos, sin) pair: now within 0.3% at 4k, 16k and 32k for both (tests/harness/test_long_sliding.py);
# mistral-7b (-9.2% at 32k before), phi-3-mini and gpt-oss-20b (eager) match the trace at 32k within 0.01%.
# Families not checked against traces at long prompts keep the raise: beyond LONG_SLIDING_PROMPT tokens
# the high end rises by LONG_SLIDING_REL of the replayed activations.
LONG_SLIDING_PROMPT = 8192
LONG_SLIDING_REL = 0.60
# model_types whose sliding layers were matched to traces at long prompts
LONG_SLIDING_CHECKED = frozenset({"gemma2", "gemma3_text", "mistral", "phi3", "gpt_oss"})


def long_sliding_extra(spec: ModelSpec, workload: Workload, f) -> tuple[int, str | None]:
    """(bytes added to the high end, the note) for a long prompt on a model with sliding-window layers of a
    family the replay was not checked on at long prompts (``LONG_SLIDING_CHECKED``)."""
    sliding = any(layer.attention.kind == "sliding" for layer, _ in spec.layer_groups)
    if (workload.framework != "transformers" or not sliding or workload.prompt_tokens <= LONG_SLIDING_PROMPT
            or spec.model_type in LONG_SLIDING_CHECKED):
        return 0, None
    extra = int(LONG_SLIDING_REL * f.get("sim_allocated_bytes", 0))
    return extra, (f"sliding-window layers at a {workload.prompt_tokens:,}-token prompt: the replay of "
                   f"{spec.model_type} is not checked against traces beyond {LONG_SLIDING_PROMPT:,} tokens "
                   f"(gemma-2/3 ran up to 34% under at 32k before their masks were modelled): interval high end "
                   f"raised by {LONG_SLIDING_REL:.0%} of the activations ({extra / 2**30:,.2f} GiB); "
                   "--engine trace follows transformers' own code")


def compile_notes(workload: Workload, model_type: str | None = None) -> list[str]:
    """The line an estimate of a compiled decode step carries (``compiles``)."""
    if not compiles(workload, model_type):
        return []
    return [f"static cache with --compile auto: on CUDA generate compiles the decode step (CUDA graphs, "
            f"mode reduce-overhead); its graph pool and static buffers are not modelled (uncalibrated): interval "
            f"widened by -{COMPILE_LOW_REL:.0%} / +{COMPILE_HIGH_REL:.0%} + {COMPILE_ABS_BYTES // 2**30} GiB "
            f"(--compile off estimates generate(disable_compile=True))"]


CACHED_NOTE_BYTES = 2**30  # cached segments beyond the needed reserve worth a note


def alloc_conf_notes(coefficients: Coefficients, workload: Workload, features=None) -> list[str]:
    """What the estimate says about the allocator settings: the ones it does not model, and a reserve
    fitted under other settings (the interval then widens, ``bounds``)."""
    from estimator.alloc_conf import describe, parse_alloc_conf

    conf = parse_alloc_conf(workload.alloc_conf or "")
    out = conf.notes()
    if features is not None and "sim_needed_bytes" in features:
        cached = features["sim_reserved_bytes"] - features["sim_needed_bytes"]
        if cached > CACHED_NOTE_BYTES:
            out.append(f"allocator {describe(conf)}: with unlimited memory the allocator would keep {cached / 2**30:,.2f} "
                       "GiB more of cached segments that it frees when cudaMalloc fails; counted is the reserve the "
                       "run needs (approximate): where memory is ample, NVML shows up to that much more")
    if workload.framework == "vllm" and not conf.is_default:
        out.append(f"PYTORCH_CUDA_ALLOC_CONF {describe(conf)}: not modelled for vLLM (its KV cache is one "
                   "allocation made at start-up)")
    elif not alloc_conf_calibrated(coefficients, workload.alloc_conf):
        fitted = describe(parse_alloc_conf(coefficients.alloc_conf or ""))
        out.append(f"allocator {describe(conf)}: replayed by its rules, but the reserve coefficient was fitted "
                   f"under {fitted} settings (uncalibrated): interval widened by {ALLOC_CONF_REL:.0%} + "
                   f"{ALLOC_CONF_ABS_BYTES // 2**20} MiB at each end")
    return out


def assemble(name: str, workload: Workload, weights: int, f: Mapping[str, int], buffers: int, num_parameters: int,
             coefficients: Coefficients, target: GPU | None, attn: str, notes, beyond_positions: bool,
             engine: str = "replay", engine_version: str | None = None, model_type: str | None = None,
             high_extra_bytes: int = 0, widen: int = 0) -> Estimate:
    """The Estimate of either engine from its exact features ``f`` (``kv_final_bytes``, ``sim_*``)."""
    parts = predict_parts(weights, f, coefficients.for_attn(attn))
    total = round(parts["total"] + buffers)
    kv = f.get("kv_final_bytes", 0)
    overhead = round(parts["overhead"] + buffers)
    compiled = compiles(workload, model_type)
    low, high = bounds(total, coefficients, target, workload.alloc_conf, compiled, widen)
    high += high_extra_bytes
    return Estimate(
        model=name,
        workload=workload,
        weights_bytes=weights,
        kv_cache_bytes=kv,
        activation_bytes=total - weights - kv - overhead,
        overhead_bytes=overhead,
        total_bytes=total,
        low_bytes=low,
        high_bytes=high,
        peak_allocated_bytes=round(parts["allocated"] + buffers),
        peak_reserved_bytes=round(parts["reserved"] + buffers),
        peak_phase=parts["phase"],
        num_parameters=num_parameters,
        coefficients=coefficients,
        features=f,
        notes=tuple(notes),
        gpu=target.name if target else None,
        beyond_trained_positions=beyond_positions,
        engine=engine,
        engine_version=engine_version,
        widen_bytes=widen,
        compiled=compiled,
        high_extra_bytes=high_extra_bytes,
    )


# ---------------------------------------------------------------------------------------------------
# Inversion: the largest context or batch that fits


CONTEXT_WINDOW = 64  # tokens below max_context that must all fit too
BATCH_WINDOW = 16  # batch sizes below max_batch that must all fit too


def _largest(fits, lo: int, hi: int, window: int) -> int | None:
    """Largest ``n`` in ``[lo, hi]`` such that ``n`` and the ``window`` values below it all fit (all values
    down to ``lo`` when it is closer), and ``n + 1`` does not fit or ``n == hi``; None if ``lo`` does not fit.

    The estimate is not monotone: the allocator model's reserve jumps by up to a few GiB between
    neighbouring contexts or batches (a tensor crossing a 2 MiB rounding changes how the segments fragment),
    so a plain bisection can stop at a value that fits just above values that do not. A galloping search
    (``lo``, then doubling) brackets a boundary without probing far above the answer (a batch of 2**19 costs
    as much as one of 33 and is mostly wasted), bisection finds it; then an exact downward scan moves the
    answer below any failing value until ``window`` consecutive values fit. The answer is conservative
    within that window: a user can run any value in ``[n - window, n]``.
    """
    seen: dict[int, bool] = {}

    def ok(n: int) -> bool:
        if n not in seen:
            seen[n] = fits(n)
        return seen[n]

    if not ok(lo):
        return None
    a, b = lo, hi
    while a < b:  # gallop: a fits; the first value that fails bounds the bisection
        up = min(b, max(a + 1, 2 * a))
        if not ok(up):
            b = up - 1
            break
        a = up
    while a < b:  # invariant: a fits; values above b were seen to fail (or b == hi)
        mid = (a + b + 1) // 2
        if ok(mid):
            a = mid
        else:
            b = mid - 1
    n, m, run = a, a - 1, 0
    while run < window and m >= lo:
        if ok(m):
            run += 1
        else:  # m fails: the answer lies below it, and must itself fit
            n, run = m - 1, 0
        m -= 1
    return n


def _budget(gpu: str | int) -> int:
    return gpu if isinstance(gpu, int) else find_gpu(gpu).memory_bytes


def max_context(spec: ModelSpec, workload: Workload, gpu: str | int,
                coefficients: Coefficients | None = None, safe: bool = True) -> dict:
    """Largest ``context`` (prompt + new tokens) whose estimate fits ``gpu``, and such that the
    ``CONTEXT_WINDOW`` contexts below it fit too (``_largest``: the estimate is not monotone in the
    context, so a bisection alone can answer a context that fits above shorter ones that do not).

    ``safe``: compare the interval's high end with the memory (the answer a launch can rely on);
    otherwise the point estimate. The search stops at the model's ``max_position_embeddings``.
    """
    budget = _budget(gpu)
    target = None if isinstance(gpu, int) else find_gpu(gpu)
    if coefficients is None:
        coefficients = select_coefficients(workload.framework, target.name if target else None)
    from dataclasses import replace

    limit = spec.max_position_embeddings or 2**22
    lo = max(workload.new_tokens + 1, 1)
    if lo > limit:
        raise UserError(f"--new-tokens {workload.new_tokens} exceeds the model's {limit} positions")

    def fits(n: int) -> bool:
        e = estimate(spec, replace(workload, context=n, max_cache_len=None), coefficients, target)
        return (e.high_bytes if safe else e.total_bytes) <= budget

    best = _largest(fits, lo, limit, CONTEXT_WINDOW)
    return {"max_context": best, "limited_by": "model" if best == limit else "memory",
            "model_max_positions": spec.max_position_embeddings, "memory_bytes": budget,
            "coefficients": coefficients.source}


def max_batch(spec: ModelSpec, workload: Workload, gpu: str | int,
              coefficients: Coefficients | None = None, safe: bool = True) -> dict:
    """Largest ``batch`` whose estimate at ``workload.context`` fits ``gpu``, and such that the
    ``BATCH_WINDOW`` batch sizes below it fit too (see ``max_context``)."""
    budget = _budget(gpu)
    target = None if isinstance(gpu, int) else find_gpu(gpu)
    if coefficients is None:
        coefficients = select_coefficients(workload.framework, target.name if target else None)
    from dataclasses import replace

    # refuse a context the model cannot run before searching (and keep the note for one it can)
    note = check_context(spec.model_type, spec.max_position_embeddings, workload.context, spec.name)

    def fits(n: int) -> bool:
        e = estimate(spec, replace(workload, batch=n), coefficients, target)
        return (e.high_bytes if safe else e.total_bytes) <= budget

    best = _largest(fits, 1, 2**20, BATCH_WINDOW)
    return {"max_batch": best, "memory_bytes": budget, "coefficients": coefficients.source,
            "beyond_trained_positions": note is not None, "notes": [note] if note else []}
