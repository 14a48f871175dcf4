"""Which engine answers: the replay (``estimator/replay/``, pure Python) or the trace (``harness``, torch).

Both return the same ``Estimate``. ``--engine auto`` (the default) takes the replay when the estimator's
families read the model's config (fast: milliseconds, no torch), else the trace engine
(``harness/trace_estimate.py``: the real transformers model under fake tensors, seconds) when torch and
transformers are installed, else one line that names the extra to install. Nothing here imports torch
until a trace is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from estimator.errors import UserError

if TYPE_CHECKING:
    from estimator.spec import ModelSpec

ENGINES = ("auto", "replay", "trace")
INSTALL_HINT = "pip install 'vramcal[harness]'"
# keys a config gives its maximum positions under, in order of preference
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length",
                  "n_ctx")


def add_engine_arg(p) -> None:
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="replay (pure Python, the families the estimator knows), trace (any causal LM "
                        "transformers builds; needs torch), or auto (default: replay where it applies)")


# ---- the model --------------------------------------------------------------------------------------
def resolve_config(model: str) -> tuple[dict, str]:
    """The raw config dict of MODEL and its display name: a catalogue name, a config.json, a folder
    holding one, or a Hugging Face repo id (as ``catalogue.load_model`` names them), read even when the
    estimator's families do not know its ``model_type``."""
    from estimator import catalogue

    if not model or not model.strip():
        raise UserError("no model given; `vramcal models` lists the catalogue")
    listed = catalogue.CONFIG_DIR / f"{model.lower()}.json"
    if listed.is_file():
        return catalogue.read_config(listed), model.lower()
    path = Path(model).expanduser()
    if path.is_file():
        return catalogue.read_config(path), path.parent.name if path.name == "config.json" else path.stem
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"folder {path} holds no config.json")
        return catalogue.read_config(path / "config.json"), path.name
    if catalogue._REPO_ID.match(model):
        return catalogue._fetch_hf_config(model), model
    catalogue.load_model(model)  # raises the catalogue's error, with its close matches
    raise UserError(f"unknown model {model!r}")  # pragma: no cover - load_model raised


def replay_family(config: dict) -> str | None:
    """The estimator family that would read this config, or None: the model_type itself, or for a
    multimodal wrapper its language model's (``text_config``, or the wrapper's default one), resolved as
    ``estimator.config.parse_config`` resolves it."""
    from estimator.config import type_info
    from estimator.families import FAMILIES

    model_type = config.get("model_type")
    subs = type_info(model_type if isinstance(model_type, str) else None).get("sub_configs", {})
    text = config.get("text_config")
    if isinstance(text, dict) or (text is None and "text_config" in subs):
        family = (text or {}).get("model_type") or subs.get("text_config")
    else:
        family = model_type
    return family if isinstance(family, str) and family in FAMILIES else None


def replay_supports(config: dict) -> bool:
    return replay_family(config) is not None


def max_positions(config: dict) -> int | None:
    """The model's maximum positions from its (text) config, if it states them."""
    for cfg in (config.get("text_config"), config):
        if isinstance(cfg, dict):
            for key in _POSITION_KEYS:
                value = cfg.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


@dataclass(frozen=True)
class Model:
    """MODEL as the engines see it: its config, its display name, and the engine that answers for it."""

    name: str
    config: dict
    engine: str  # "replay" or "trace"
    spec: ModelSpec | None = None  # the replay's spec (None on the trace engine)

    @property
    def model_type(self) -> str | None:
        return self.spec.model_type if self.spec is not None else self.config.get("model_type")

    @property
    def max_position_embeddings(self) -> int | None:
        return self.spec.max_position_embeddings if self.spec is not None else max_positions(self.config)


def resolve_model(model: str, engine: str = "auto") -> Model:
    """MODEL resolved and its engine chosen: the replay where it applies (``--engine auto``) or where
    asked; the trace where asked or where the replay does not apply, if torch and transformers are
    installed. Otherwise one UserError naming the extra to install."""
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    config, name = resolve_config(model)
    supported = replay_supports(config)
    if engine == "replay" or (engine == "auto" and supported):
        if not supported:
            raise UserError(f"{model}: the replay engine does not know model_type "
                            f"{config.get('model_type')!r}; use --engine trace (needs {INSTALL_HINT})")
        from estimator.catalogue import load_model

        spec = load_model(model)
        if engine == "auto" and spec.uncounted_parts and _trace_available():
            # the replay knows the language model but not a tower's layout: the trace counts the real model
            return Model(name, config, "trace")
        return Model(spec.name, config, "replay", spec)
    from estimator.config import parse_config

    parse_config(config, name)  # a size no model can have fails here, before anything is built
    _require_trace(model, config, supported)
    return Model(name, config, "trace")


def _trace_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def _require_trace(model: str, config: dict, supported: bool) -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        why = "" if supported else f"the replay engine does not know model_type {config.get('model_type')!r}; "
        raise UserError(f"{model}: {why}the trace engine needs torch and transformers: {INSTALL_HINT}") from None


# ---- estimates --------------------------------------------------------------------------------------
def estimate(model: Model, workload, coefficients=None, gpu=None):
    """``(Estimate, seconds)`` for ``model`` by its engine; ``gpu`` as in ``estimator.estimate.estimate``."""
    started = time.perf_counter()
    if model.engine == "replay":
        from estimator.estimate import estimate as replay_estimate

        est = replay_estimate(model.spec, workload, coefficients, gpu)
    else:
        from harness.trace_estimate import trace_estimate

        est = trace_estimate(model.config, model.name, workload, coefficients, gpu)
    return est, time.perf_counter() - started


def _replay_version() -> str:
    """The transformers release whose modeling code the replay's program mirrors."""
    from estimator.replay import TRANSFORMERS_VERSION

    return TRANSFORMERS_VERSION


def engine_line(engine: str, seconds: float, version: str | None = None, probes: int | None = None) -> str:
    """One line for the text output: which engine answered, and how long it took."""
    if engine == "replay":
        what = f"allocator replay of transformers {version or _replay_version()}, no torch"
    else:
        what = f"fake-tensor trace, transformers {version}"
    took = f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"
    count = f", {probes} traces" if probes else ""
    return f"engine: {engine} ({what}){count}, {took}"


# ---- searches ---------------------------------------------------------------------------------------
def _replayed(search, model: Model, workload, gpu: str, coefficients, safe: bool, started: float) -> dict:
    """A replay search's result with the fields the trace engine's searches add."""
    result = search(model.spec, workload, gpu, coefficients, safe=safe)
    return {**result, "engine": "replay", "engine_version": _replay_version(), "probes": None,
            "seconds": time.perf_counter() - started}


def max_context(model: Model, workload, gpu: str, coefficients=None, safe: bool = True) -> dict:
    """``estimator.estimate.max_context`` by ``model``'s engine, plus ``engine``, ``engine_version``,
    ``probes`` (traces run) and ``seconds``. The trace engine searches with few traces
    (``_few_probe_search``), cached by workload."""
    from estimator.gpus import find_gpu

    started = time.perf_counter()
    if model.engine == "replay":
        from estimator.estimate import max_context as replay_max_context

        return _replayed(replay_max_context, model, workload, gpu, coefficients, safe, started)
    from harness.trace_estimate import TraceProbe

    target = find_gpu(gpu)
    probe = TraceProbe(model.config, model.name)
    coefficients = coefficients or _coefficients_for(workload, target)
    positions = model.max_position_embeddings
    limit = positions or 2**20
    lo = max(workload.new_tokens + 1, 1)
    if lo > limit:
        raise UserError(f"--new-tokens {workload.new_tokens} exceeds the model's {limit} positions")

    def bytes_at(n: int) -> int:
        e = probe(replace(workload, context=n, max_cache_len=None), coefficients, target)
        return e.high_bytes if safe else e.total_bytes

    best = _few_probe_search(bytes_at, lo, limit, target.memory_bytes)
    return {"max_context": best, "limited_by": "model" if best == limit else "memory",
            "model_max_positions": positions, "memory_bytes": target.memory_bytes,
            "coefficients": coefficients.source, "engine": "trace", "engine_version": _transformers_version(),
            "probes": probe.traces, "seconds": time.perf_counter() - started}


def max_batch(model: Model, workload, gpu: str, coefficients=None, safe: bool = True) -> dict:
    """``estimator.estimate.max_batch`` by ``model``'s engine (see ``max_context``)."""
    from estimator.gpus import find_gpu
    from estimator.positions import check_context

    started = time.perf_counter()
    if model.engine == "replay":
        from estimator.estimate import max_batch as replay_max_batch

        return _replayed(replay_max_batch, model, workload, gpu, coefficients, safe, started)
    from harness.trace_estimate import TraceProbe

    target = find_gpu(gpu)
    note = check_context(model.model_type, model.max_position_embeddings, workload.context, model.name)
    probe = TraceProbe(model.config, model.name)
    coefficients = coefficients or _coefficients_for(workload, target)

    def bytes_at(n: int) -> int:
        e = probe(replace(workload, batch=n), coefficients, target)
        return e.high_bytes if safe else e.total_bytes

    best = _few_probe_search(bytes_at, 1, 2**20, target.memory_bytes)
    return {"max_batch": best, "memory_bytes": target.memory_bytes, "coefficients": coefficients.source,
            "beyond_trained_positions": note is not None, "notes": [note] if note else [],
            "engine": "trace", "engine_version": _transformers_version(), "probes": probe.traces,
            "seconds": time.perf_counter() - started}


def _coefficients_for(workload, gpu):
    from estimator.coefficients import select_coefficients

    return select_coefficients(workload.framework, gpu.name)


def _few_probe_search(bytes_at, lo: int, hi: int, budget: int) -> int | None:
    """Largest ``n`` in ``[lo, hi]`` with ``bytes_at(n) <= budget`` and ``bytes_at(n + 1) > budget`` (or
    ``n == hi``); None if ``lo`` does not fit. For an expensive ``bytes_at`` (a trace per call).

    The memory is affine in the context or the batch, or quadratic where attention scores are
    materialised (eager, sdpa's math kernel), so the polynomial through the last three probes (two at
    first) solved for the budget lands next to the boundary, and the guess's neighbour confirms it:
    4-6 probes where a bisection takes 20. A step that does not halve the bracket is followed by a
    bisection step, so any profile converges. Unlike the replay's search, the values below the answer
    are not all checked: the allocator's non-monotone reserve may make a few of them not fit.
    """
    values: dict[int, int] = {}
    order: list[int] = []

    def fits(n: int) -> bool:
        if n not in values:
            values[n] = bytes_at(n)
            order.append(n)
        return values[n] <= budget

    if not fits(lo):
        return None
    if fits(hi):
        return hi
    a, b = lo, hi  # a fits, b does not
    bisect = False
    while b - a > 1:
        width = b - a
        n = (a + b) // 2 if bisect else _interpolate([(x, values[x]) for x in order[-3:]], values, budget, a, b)
        guessed = not bisect
        if fits(n):
            a = n
            if guessed and b - a > 1:  # the guess's neighbour above: usually the boundary
                if not fits(a + 1):
                    return a
                a += 1
        else:
            b = n
            if guessed and b - a > 1:
                if fits(b - 1):
                    return b - 1
                b -= 1
        bisect = guessed and (b - a) * 2 > width
    return a


def _interpolate(points: list[tuple[int, int]], values: dict[int, int], budget: int, a: int, b: int) -> int:
    """Where the polynomial through ``points`` (2 or 3) reaches ``budget``, inside ``(a, b)``; else the
    straight line between the bracket's ends."""
    if len(points) == 3:
        (x0, v0), (x1, v1), (x2, v2) = points
        d1 = (v1 - v0) / (x1 - x0)
        d2 = ((v2 - v1) / (x2 - x1) - d1) / (x2 - x0)
        qa, qb, qc = d2, d1 - d2 * (x0 + x1), v0 - d1 * x0 + d2 * x0 * x1 - budget
        if qa:
            disc = qb * qb - 4 * qa * qc
            roots = [] if disc < 0 else [(-qb + sign * disc ** 0.5) / (2 * qa) for sign in (1, -1)]
        else:
            roots = [-qc / qb] if qb else []
        inside = [r for r in roots if a < r < b]
        if inside:
            return min(max(int(inside[0]), a + 1), b - 1)
    fa, fb = values[a], values[b]
    return min(max(a + int((budget - fa) * (b - a) / max(fb - fa, 1)), a + 1), b - 1)


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:  # pragma: no cover
        return None
    return transformers.__version__
