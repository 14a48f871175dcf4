"""The estimate: exact terms (``estimator/terms.py``) combined by coefficients into the peak.

For transformers, the terms include the run replayed in the caching-allocator model
(``estimator/program.py``): ``sim_allocated`` and ``sim_reserved`` are the peaks above the weights of
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
from estimator.gpus import GPU, GPUS, find_gpu
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
        reserve = c["sim_reserve_factor"] * max(f["sim_reserved_bytes"] - f["sim_allocated_bytes"], 0)
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

    def verdicts(self, gpus: tuple[GPU, ...] = GPUS) -> list[dict]:
        """Per GPU: free memory after the estimate and a verdict (fits / tight / does not fit)."""
        rows = []
        for gpu in gpus:
            if self.high_bytes <= gpu.memory_bytes:
                verdict = "fits"
            elif self.total_bytes <= gpu.memory_bytes:
                verdict = "tight"  # the point estimate fits, the interval's high end does not
            else:
                verdict = "does not fit"
            rows.append({"gpu": gpu.name, "memory_bytes": gpu.memory_bytes,
                         "free_bytes": gpu.memory_bytes - self.total_bytes, "verdict": verdict})
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
        }


def estimate(spec: ModelSpec, workload: Workload, coefficients: Coefficients | None = None,
             gpu: str | None = None) -> Estimate:
    """The peak device memory of ``workload`` on ``spec``, with its breakdown and interval."""
    if coefficients is None:
        coefficients = select_coefficients(workload.framework, find_gpu(gpu).name if gpu else None)
    c = coefficients.for_attn(workload.attn)
    weights = weights_bytes(spec, workload.dtype, workload.quant)  # parameters, as published counts them
    f = features(spec, workload)
    parts = predict_parts(weights, f, c)
    buffers = buffer_bytes(spec)  # rotary tables and the like: a few KiB, counted with the overhead
    total = round(parts["total"] + buffers)
    kv = f.get("kv_final_bytes", 0)
    overhead = round(parts["overhead"] + buffers)
    interval = coefficients.interval
    return Estimate(
        model=spec.name,
        workload=workload,
        weights_bytes=weights,
        kv_cache_bytes=kv,
        activation_bytes=total - weights - kv - overhead,
        overhead_bytes=overhead,
        total_bytes=total,
        low_bytes=round(total * (1 + interval["low"])),
        high_bytes=round(total * (1 + interval["high"])),
        peak_allocated_bytes=round(parts["allocated"] + buffers),
        peak_reserved_bytes=round(parts["reserved"] + buffers),
        peak_phase=parts["phase"],
        num_parameters=spec.num_parameters,
        coefficients=coefficients,
        features=f,
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
    so a plain bisection can stop at a value that fits just above values that do not. Bisection finds a
    boundary; then an exact downward scan moves the answer below any failing value until ``window``
    consecutive values fit. The answer is conservative within that window: a user can run any value in
    ``[n - window, n]``.
    """
    seen: dict[int, bool] = {}

    def ok(n: int) -> bool:
        if n not in seen:
            seen[n] = fits(n)
        return seen[n]

    if not ok(lo):
        return None
    a, b = lo, hi
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
    gpu_name = None if isinstance(gpu, int) else find_gpu(gpu).name
    if coefficients is None:
        coefficients = select_coefficients(workload.framework, gpu_name)
    from dataclasses import replace

    limit = spec.max_position_embeddings or 2**22
    lo = max(workload.new_tokens + 1, 1)
    if lo > limit:
        raise UserError(f"--new-tokens {workload.new_tokens} exceeds the model's {limit} positions")

    def fits(n: int) -> bool:
        e = estimate(spec, replace(workload, context=n, max_cache_len=None), coefficients)
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
    gpu_name = None if isinstance(gpu, int) else find_gpu(gpu).name
    if coefficients is None:
        coefficients = select_coefficients(workload.framework, gpu_name)
    from dataclasses import replace

    def fits(n: int) -> bool:
        e = estimate(spec, replace(workload, batch=n), coefficients)
        return (e.high_bytes if safe else e.total_bytes) <= budget

    best = _largest(fits, 1, 2**20, BATCH_WINDOW)
    return {"max_batch": best, "memory_bytes": budget, "coefficients": coefficients.source}
