"""``--gpus`` on `vramcal estimate`, `max-context` and `max-batch`: one table per GPU (device_map="auto")."""

from __future__ import annotations

import json
import time
from dataclasses import replace

from estimator.errors import UserError

GIB = 2**30


def add_args(p) -> None:
    g = p.add_argument_group("several GPUs (from_pretrained device_map, transformers)")
    g.add_argument("--gpus", default=None, metavar="LIST",
                   help="GPUs in device order, e.g. 2xA100-80GB or H100,H100,L40S: place the model as "
                        "device_map does and estimate each GPU")
    g.add_argument("--max-memory", default=None, metavar="MAP",
                   help="from_pretrained's max_memory, e.g. 0=70GiB,1=75GiB,cpu=200GiB (default: each GPU's "
                        "memory less its CUDA context, as accelerate sees it)")
    g.add_argument("--device-map", default=None, choices=("auto", "balanced", "balanced_low_0", "sequential"),
                   help="from_pretrained's device_map strategy (default auto, the same as balanced)")


def check_args(args) -> bool:
    """Whether this is a --gpus run; the options that need --gpus refused without it."""
    if args.gpus is None:
        for option in ("max_memory", "device_map"):
            if getattr(args, option, None) is not None:
                raise UserError(f"--{option.replace('_', '-')} needs --gpus (e.g. --gpus 2xA100-80GB)")
        return False
    return True


def _setup(args):
    """Everything checked before any work: GPUs, max_memory, model, workload, coefficients."""
    from estimator import engines
    from estimator.cli import _coefficients, workload_from_args
    from estimator.multigpu import max_memory_for, parse_gpus

    if getattr(args, "engine", "auto") == "trace":
        raise UserError("--gpus runs on the replay engine only (--engine replay or auto)")
    gpus = parse_gpus(args.gpus)
    max_memory, user_set = max_memory_for(gpus, args.max_memory)
    model = engines.resolve_model(args.model, "replay")
    workload = workload_from_args(args, model)
    if getattr(args, "gpu", None) is None:
        args.gpu = gpus[0].name  # the coefficients for the first GPU's type
    return model.spec, gpus, max_memory, user_set, workload, _coefficients(args)


def _run(spec, workload, gpus, coefficients, max_memory, user_set, strategy):
    from estimator.multigpu import estimate_devices

    return estimate_devices(spec, workload, gpus, coefficients, max_memory, user_set, strategy)


def cmd_estimate(args) -> int:
    spec, gpus, max_memory, user_set, workload, coefficients = _setup(args)
    started = time.perf_counter()
    est = _run(spec, workload, gpus, coefficients, max_memory, user_set, args.device_map or "auto")
    seconds = time.perf_counter() - started
    if args.json:
        out = est.as_dict()
        out["seconds"] = round(seconds, 4)
        print(json.dumps(out, indent=2))
        return 0
    print("\n".join(render(est, spec, seconds)))
    return 0


def render(est, spec, seconds: float) -> list[str]:
    from estimator.cli import _describe, _gib, _note_lines, _table
    from estimator.multigpu import layer_ranges

    head = _describe_head(est, spec, _describe)
    rows = []
    for d in est.devices:
        e = d.as_dict()
        layers = layer_ranges(d.layers) + (f" (+{len(d.offloaded_layers)} offloaded)" if d.offloaded_layers else "")
        rows.append((f"{d.device}: {d.gpu.name}", layers, _gib(e["weights_bytes"]),
                     _gib(e["kv_cache_bytes"]), _gib(e["activation_bytes"]), _gib(e["overhead_bytes"]),
                     _gib(e["total_bytes"]), f"{_gib(e['low_bytes'])}..{_gib(e['high_bytes'])}",
                     _gib(e["memory_bytes"]), d.verdict))
    lines = head + [""]
    lines += _table(("GPU", "layers", "weights", "KV cache", "activations", "overhead", "total", "interval",
                     "memory", "verdict"), rows, "llrrrrrrrl")
    lines.append("  (GiB; overhead: a CUDA context and workspaces on each GPU, allocator reserve)")
    lines.append(f"  verdict: {est.verdict} (the worst GPU's), device_map={est.strategy!r}, "
                 f"replay per GPU in {seconds * 1000:.0f} ms")
    for where, names in est.offloaded.items():
        from estimator.multigpu import _names

        lines.append(f"  on {where}: {_names(names)}")
    lines += _note_lines(est.notes)
    return lines


def _describe_head(est, spec, describe) -> list[str]:
    from types import SimpleNamespace

    shim = SimpleNamespace(model=est.model, num_parameters=spec.num_parameters, workload=est.workload)
    return describe(shim, spec)


def _search(args, key: str, hi_default: int | None) -> int:
    from estimator.estimate import BATCH_WINDOW, CONTEXT_WINDOW, _largest, check_context

    from estimator.cli import DEFAULT_NEW_TOKENS

    if not hasattr(args, "context"):  # as estimator.cli._search_setup: the shortest run, searched upwards
        args.context = (args.new_tokens if args.new_tokens is not None else DEFAULT_NEW_TOKENS) + 1 \
            if args.workload == "generate" else 1
    if not hasattr(args, "batch"):
        args.batch = 1
    spec, gpus, max_memory, user_set, workload, coefficients = _setup(args)
    strategy = args.device_map or "auto"
    safe = not args.point
    worst: dict = {}

    def fits(n: int) -> bool:
        w = replace(workload, context=n, max_cache_len=None) if key == "context" else replace(workload, batch=n)
        est = _run(spec, w, gpus, coefficients, max_memory, user_set, strategy)
        ok = all((d.high_bytes if safe else d.total_bytes) <= d.gpu.memory_bytes for d in est.devices)
        if not ok:
            worst[n] = est
        return ok

    started = time.perf_counter()
    if key == "context":
        limit = spec.max_position_embeddings or 2**22
        lo = max(workload.new_tokens + 1, 1)
        if lo > limit:
            raise UserError(f"--new-tokens {workload.new_tokens} exceeds the model's {limit} positions")
        best = _largest(fits, lo, limit, CONTEXT_WINDOW)
    else:
        check_context(spec.model_type, spec.max_position_embeddings, workload.context, spec.name)
        best = _largest(fits, 1, 2**20, BATCH_WINDOW)
    seconds = time.perf_counter() - started
    names = ",".join(g.name for g in gpus)
    result = {f"max_{key}": best, "model": spec.name, "gpus": [g.name for g in gpus], "device_map": strategy,
              "basis": "point" if args.point else "high", "seconds": round(seconds, 3)}
    if key == "context":
        result["limited_by"] = "model" if best == spec.max_position_embeddings else "memory"
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    basis = "point estimate" if args.point else "interval high end, per GPU"
    what = f"at batch {workload.batch}" if key == "context" else f"at context {workload.context:,}"
    if best is None:
        print(f"{spec.name} on {names} {what}: does not fit even at {key} 1")
    else:
        print(f"{spec.name} on {names} (device_map={strategy!r}) {what}: max {key} {best:,}  [{basis}]")
    print(f"  per-GPU estimates are approximate (see `vramcal estimate --gpus`); searched in {seconds:.2f} s")
    return 0


def cmd_max_context(args) -> int:
    return _search(args, "context", None)


def cmd_max_batch(args) -> int:
    return _search(args, "batch", None)
