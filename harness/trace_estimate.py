"""The traced engine: an `Estimate` for any causal LM transformers can build, from a trace.

The fast replay (``estimator/replay/``) writes out, family by family, the tensors a transformers run
allocates. For a family it does not know, this engine gets the same sequence from the real modeling
code: ``harness.trace.run_trace`` builds the model under fake tensors, drives generate (or one forward)
and records every storage allocation and free in order (``StorageTracker(record_events=True)``). The
sequence is fed, in order, through the caching-allocator model (``estimator/allocator.py``) as the replay
feeds its own, so the features mean what the replay's mean and calibrated coefficients apply unchanged
(``estimator.estimate.predict_parts``):

- the weights (parameters, then buffers, in the model's order) are allocated first, then the peaks are
  reset (the harness's ``reset_peak_memory_stats()`` after loading);
- the cuBLAS workspace is left out: the ``workspace_bytes`` coefficient carries it, as for the replay;
- every other storage is fed, the small pool's too. The replay leaves out tensors under 1 MiB for speed
  (``estimator.replay.MIN_TRACKED_BYTES``), and ``workspace_bytes`` absorbs them; measured on traces they add
  under 1 MiB to the peak of the calibration's models (0.6 MiB for qwen2.5-0.5b at 4k x 4), so the
  calibrated value applies unchanged, while for models of small width (hidden 768: mamba-130m, bart)
  they are several % of the peak, which the trace engine gets right;
- ``sim_allocated_bytes`` / ``sim_reserved_bytes`` are the allocator model's peaks above the weights,
  ``sim_peak_step`` the step of the allocated peak (0: prefill or forward, n: the n-th decode step).

Weights are the traced parameters' exact bytes, the KV cache the exact bytes the cache object holds at
the end (keys, values, and conv/recurrent states of linear-attention layers), buffers go with the
overhead as in the replay. Cost: one trace, about a second for a small model and a few seconds for an
8B at 16k context on two cores; `TraceProbe` caches traces by workload for searches.
"""

from __future__ import annotations

import time

from estimator.alloc_conf import parse_alloc_conf
from estimator.allocator import allocator_class, round_size
from estimator.coefficients import Coefficients, select_coefficients
from estimator.errors import UserError
from estimator.estimate import Estimate
from estimator.terms import Workload
from harness.trace import ATTN_IMPLEMENTATIONS, WORKSPACE, TraceRun, run_trace

ENGINE = "trace"


def simulate_events(tracker, min_bytes: int = 1, alloc_conf: str = "") -> dict[str, int]:
    """The replay's ``simulate`` features from a traced allocation sequence (see the module docstring).

    ``tracker`` ran with ``record_events=True``; ``min_bytes=estimator.replay.MIN_TRACKED_BYTES`` leaves
    out what the replay leaves out. Returns ``sim_allocated_bytes``, ``sim_reserved_bytes`` (peaks above
    the weights) and ``sim_peak_step``.
    """
    events, categories, marks = tracker.events, tracker.slot_categories, tracker.phase_marks
    if events is None:
        raise ValueError("the tracker did not record events (StorageTracker(record_events=True))")
    alloc = allocator_class(parse_alloc_conf(alloc_conf))()  # the model of the PYTORCH_CUDA_ALLOC_CONF asked
    loc: list = [None] * len(categories)
    base = None
    peak_step = 0
    bounds = [i for i, _ in marks] + [len(events)]
    for (start, phase), end in zip(marks, bounds[1:]):
        ops = []
        for slot, nbytes in events[start:end]:
            if not nbytes:
                ops.append((slot, 0))  # a free; slots never allocated in the model stay None and are skipped
            elif nbytes >= min_bytes and categories[slot] != WORKSPACE:
                ops.append((slot, round_size(nbytes)))
        if phase != "load" and base is None:
            alloc.reset_peak()  # torch.cuda.reset_peak_memory_stats() after loading the weights
            base = alloc.allocated
        before = alloc.peak_allocated
        alloc.run(ops, loc)
        if base is not None and alloc.peak_allocated > before:
            peak_step = int(phase.split()[1]) if phase.startswith("decode ") else 0
    if base is None:  # nothing ran after the load
        alloc.reset_peak()
        base = alloc.allocated
    return {
        "sim_allocated_bytes": alloc.peak_allocated - base,
        "sim_reserved_bytes": alloc.peak_reserved - base,
        "sim_peak_step": peak_step,
        **({"sim_needed_bytes": alloc.peak_needed - base} if getattr(alloc, "reports_needed", False) else {}),
    }


def check_workload(workload: Workload) -> None:
    """The options the trace engine answers; anything else is a UserError that names the replay."""
    if workload.framework != "transformers":
        raise UserError(f"the trace engine traces transformers; --framework {workload.framework} needs the "
                        "replay engine (--engine replay, for the families it knows)")
    if workload.quant:
        raise UserError(f"the trace engine does not trace quantized weights (--quant {workload.quant}); the "
                        "replay engine does (--engine replay, for the families it knows)")
    if workload.kv_dtype and workload.kv_dtype != workload.dtype:
        raise UserError(f"the trace engine keeps the KV cache in the model's dtype; --kv-dtype "
                        f"{workload.kv_dtype} needs the replay engine (--engine replay, for the families it knows)")
    if workload.assistant or workload.prompt_lookup_num_tokens:
        raise UserError("the trace engine does not trace assisted generation (its loop branches on token values); "
                        "the replay engine models it (--engine replay, for the families it knows)")
    if workload.attn not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"the trace engine traces --attn {' or '.join(ATTN_IMPLEMENTATIONS)}; got "
                        f"{workload.attn!r} (flash_attention_2 allocates like sdpa's flash kernel: use sdpa)")
    if workload.dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"the trace engine traces bfloat16, float16 or float32; got {workload.dtype!r}")


def trace_workload(config: dict, workload: Workload) -> TraceRun:
    """Trace ``workload`` with the allocation sequence recorded. A model without an sdpa path in
    transformers (Mamba, gpt-oss...) is traced with eager attention, which is what it runs when asked for
    sdpa (``run.result.attn`` says which)."""
    check_workload(workload)
    context, new_tokens = workload.context, workload.new_tokens
    if workload.workload == "generate" and new_tokens == 0:
        context, new_tokens = context + 1, 1  # a prefill of `context` tokens and nothing else
    kwargs = dict(dtype=workload.dtype, cache=workload.cache, workload=workload.workload, context=context,
                  batch=workload.batch, new_tokens=new_tokens, max_cache_len=workload.max_cache_len,
                  record_events=True, lora=workload.lora)
    try:
        return run_trace(config, attn=workload.attn, **kwargs)
    except UserError as exc:
        if workload.attn != "sdpa" or "does not support --attn sdpa" not in str(exc):
            raise
    return run_trace(config, attn="eager", **kwargs)


def estimate_from_trace(run: TraceRun, name: str, workload: Workload, coefficients: Coefficients,
                        gpu=None, config: dict | None = None) -> Estimate:
    """The `Estimate` of a recorded trace: `predict_parts` on the allocator model's replay of it.

    ``gpu`` (a GPU or None): the GPU the interval is for, as in ``estimator.estimate.estimate``, whose
    notes this mirrors (positions, calibration)."""
    import transformers

    from estimator.estimate import alloc_conf_notes, assemble, calibration_notes, compile_notes
    from estimator.positions import check_context

    attn = run.result.attn
    notes = []
    if attn != workload.attn:
        notes.append(f"no {workload.attn} path in transformers for {run.result.model_type}: traced with {attn}")
    position_note = check_context(run.result.model_type, run.max_positions, workload.context, name)
    if position_note:
        notes.append(position_note)
    notes += calibration_notes(coefficients, gpu, workload.framework)
    f = simulate_events(run.tracker, alloc_conf=workload.alloc_conf)
    notes += alloc_conf_notes(coefficients, workload, f)
    notes += compile_notes(workload, run.result.model_type)
    f["kv_final_bytes"] = run.cache_nbytes
    f["trace_peak_allocated_bytes"] = run.result.peak_allocated_bytes  # the tracker's own peak (512-byte blocks)
    widen = 0
    if workload.lora is not None:  # the adapters' rows: their traced bytes, and the run without them
        from dataclasses import replace

        from estimator import lora

        base = simulate_events(trace_workload(config, replace(workload, lora=None)).tracker)
        f["lora_weights_bytes"] = run.adapter_bytes
        f["lora_activation_bytes"] = max(f["sim_allocated_bytes"] - base["sim_allocated_bytes"], 0)
        note, widen = lora.note(workload.lora, f)
        notes.append(note)
    # buffers: rotary tables and the like, counted with the overhead as in the replay
    return assemble(name, workload, run.parameter_bytes, f, run.buffer_bytes, run.num_parameters, coefficients,
                    gpu, attn, notes, position_note is not None, engine=ENGINE,
                    engine_version=transformers.__version__, widen=widen, model_type=run.result.model_type)


def trace_estimate(config: dict, name: str, workload: Workload, coefficients: Coefficients | None = None,
                   gpu=None) -> Estimate:
    """The peak device memory of ``workload`` on the model of ``config`` (a config.json dict), traced.
    ``gpu``: a GPU name or ``estimator.gpus.GPU`` the interval is for (default: the coefficients' own)."""
    from estimator.gpus import find_gpu

    target = find_gpu(gpu) if isinstance(gpu, str) else gpu
    if coefficients is None:
        coefficients = select_coefficients(workload.framework, target.name if target else None)
    return estimate_from_trace(trace_workload(config, workload), name, workload, coefficients, target, config)


class TraceProbe:
    """`trace_estimate` for one model with its estimates cached by workload, for searches that probe
    the same context or batch more than once (max-context, max-batch)."""

    def __init__(self, config: dict, name: str):
        self.config, self.name = config, name
        self._cache: dict[tuple, Estimate] = {}
        self.traces = 0
        self.seconds = 0.0

    def __call__(self, workload: Workload, coefficients: Coefficients, gpu=None) -> Estimate:
        key = (workload, id(coefficients), getattr(gpu, "name", gpu))
        est = self._cache.get(key)
        if est is None:
            started = time.perf_counter()
            est = trace_estimate(self.config, self.name, workload, coefficients, gpu)
            self.seconds += time.perf_counter() - started
            self.traces += 1
            self._cache[key] = est
        return est
