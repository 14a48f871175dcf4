"""Coverage: every causal-LM model type of the installed transformers, estimated and checked by its trace.

For each ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: the default config of its config class,
cut to a few layers (``shrink_layers``: every distinct layer kind kept, so a hybrid keeps an attention
layer), traced at two workloads (generate: context 256 x batch 2 with 8 new tokens; forward: 128 x 1),
and estimated by the engine `vramcal estimate --engine auto` would pick: the replay where the
estimator's families read the config, else the trace engine. The estimate is compared with the trace
on the peak allocated bytes, the KV cache at the end and the weights, with the uncalibrated coefficients
(`estimator.coefficients.DEFAULT`: factor 1, the 32 MiB cuBLAS workspace the trace also adds), so both
sides count the same things.

    python benchmarks/coverage.py --write docs/coverage.md [--jobs 2] [--types llama,olmo2] [--json rows.json]
    python benchmarks/coverage.py --from-json rows.json --write docs/coverage.md   # re-render only

Each type runs in its own forked process (a crash or a hang costs that type only, reported as a
failure). Prints a progress bar; writes the Markdown table with ``--write``, JSON rows with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LAYERS = 2  # layers kept (more when a model has more distinct layer kinds)
REPLAY_TOLERANCE = 0.01  # "estimated by the replay within 1%"
TRACE_TOLERANCE = 0.02  # the trace engine's estimate against its own trace
TIMEOUT_S = 600
WORKLOADS = {
    "generate": dict(context=256, batch=2, new_tokens=8, workload="generate"),
    "forward": dict(context=128, batch=1, new_tokens=0, workload="forward"),
}
_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers",
               "num_blocks")
# per-layer lists that say what kind a layer is (keep layers of each kind)
_KIND_KEYS = ("layer_types", "layers_block_type", "mlp_layer_types", "attention_layers", "attn_layers",
              "block_types", "indexer_types", "no_rope_layers")
_LINEAR_KINDS = {"linear_attention", "mamba", "mamba2", "conv", "recurrent"}
PER_KIND = 2  # layers kept of each distinct kind (Zamba ties its shared block across two hybrid layers)
# Values transformers' defaults leave None that the modeling code needs (real checkpoints set them).
_COMPLETIONS = {
    "head_dim": lambda d: d["hidden_size"] // d["num_attention_heads"],
    "num_key_value_heads": lambda d: d["num_attention_heads"],
    "num_experts_per_tok": lambda d: 2,
    "n_routed_experts": lambda d: 8,
    "n_shared_experts": lambda d: 1,
}
# Per-type completions of a default the modeling code cannot run as it is (data: why, and the value).
_TYPE_COMPLETIONS = {
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # None by default; indexed per layer
    "xmod": {"default_language": "en_XX"},  # the forward refuses to guess the language adapter
    # 1407 gives the experts' grouped_mm rows of 2,814 bytes, which CUDA refuses (16-byte alignment);
    # DeepSeek-V2-Lite has 1408
    "deepseek_v2": {"moe_intermediate_size": 1408},
}


def _is_index_list(v, n: int) -> bool:
    return (isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            and all(a < b for a, b in zip(v, v[1:])) and v[-1] < n and v[0] >= 0)


def _layer_key(k) -> int | None:
    """A dict key that names a layer (``5``, ``"05"``), as its index."""
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    if isinstance(k, str) and k.isdigit():
        return int(k)
    return None


def shrink_layers(d: dict, layers: int = LAYERS) -> tuple[dict, list[str]]:
    """A copy of config dict ``d`` cut to a few layers, and the changes made besides the cut.

    Kept: the first ``PER_KIND`` layers of every distinct kind (``layer_types``, ``layers_block_type``,
    ``mlp_layer_types``...), at least ``layers``; per-layer lists, patterns and layer-keyed dicts cut to the
    kept layers, index lists remapped, periodic patterns (Jamba) kept inside. A hybrid whose default has
    no attention layer (Bamba, GraniteMoeHybrid) gets its last kept layer made attention."""
    d = dict(d)
    changes: list[str] = []
    for key, value in list(d.items()):  # nested configs: the language model and any tower
        if isinstance(value, dict) and "model_type" in value:
            d[key], sub = shrink_layers(value, layers)
            changes += [f"{key}.{c}" for c in sub]
            for base in ("_name_or_path", "output_attentions"):  # not sub-config fields (DBRX refuses them)
                d[key].pop(base, None)
    for key, fill in _COMPLETIONS.items():
        if key in d and d[key] is None:
            try:
                d[key] = fill(d)
                changes.append(f"{key}={d[key]}")
            except (KeyError, TypeError, ZeroDivisionError):
                pass
    if isinstance(d.get("num_layers_per_stack"), int) and isinstance(d.get("H_cycles"), int):
        # HRM: num_hidden_layers counts cache slots, num_layers_per_stack x H_cycles x (L_cycles + 1)
        d["num_layers_per_stack"] = min(layers, d["num_layers_per_stack"])
        d["num_hidden_layers"] = d["num_layers_per_stack"] * d["H_cycles"] * (d.get("L_cycles", 1) + 1)
        return d, changes
    counts = [k for k in _COUNT_KEYS if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)]
    if not counts:
        return d, changes
    n = max(d[k] for k in counts)
    if n <= layers:
        return d, changes
    per_layer = {k: v for k, v in d.items() if isinstance(v, list) and len(v) == n and not _is_index_list(v, n)}
    per_layer.update({k: v for k, v in d.items() if isinstance(v, str) and len(v) == n and "pattern" in k})
    kinds = [k for k in _KIND_KEYS if k in per_layer and isinstance(per_layer[k], list)]
    pattern = [k for k in ("block_types",) if isinstance(d.get(k), list) and len(d[k]) < n]
    want = max(layers, *(len(d[k]) for k in pattern)) if pattern else layers
    keep: list[int] = []
    seen: dict[tuple, int] = {}
    for i in range(n):
        kind = tuple(str(per_layer[k][i]) for k in kinds)
        if seen.get(kind, 0) < PER_KIND:
            seen[kind] = seen.get(kind, 0) + 1
            keep.append(i)
    for i in range(n):  # too few kinds: the first layers too
        if len(keep) >= want:
            break
        if i not in keep:
            keep.append(i)
    keep.sort()
    for period_key, offset_key in (("attn_layer_period", "attn_layer_offset"),
                                   ("expert_layer_period", "expert_layer_offset")):
        # periodic attention/expert layers (Jamba): layer i is one when i % period == offset
        if isinstance(d.get(period_key), int) and isinstance(d.get(offset_key), int) and d[offset_key] >= len(keep):
            d[offset_key] = len(keep) - 1
            d[period_key] = max(len(keep), 2)
    for k, v in per_layer.items():
        d[k] = [v[i] for i in keep] if isinstance(v, list) else "".join(v[i] for i in keep)
    for k, v in list(d.items()):
        if k not in per_layer and _is_index_list(v, n) and k.endswith(("idxs", "indices", "_layers", "layer_ids")):
            d[k] = [keep.index(i) for i in v if i in keep]
        elif "layer" in k and isinstance(v, dict) and v and all(_layer_key(x) is not None and _layer_key(x) < n
                                                                for x in v):
            # settings by layer index (Gemma 4's per_layer_config {"05": ...}): renumbered, same spelling
            d[k] = {(f"{keep.index(_layer_key(x)):0{len(x)}d}" if isinstance(x, str) else keep.index(x)): y
                    for x, y in v.items() if _layer_key(x) in keep}
    for k in counts:
        d[k] = len(keep) if d[k] == n else max(1, round(d[k] * len(keep) / n))
    for key in ("first_k_dense_replace", "num_dense_layers"):
        if isinstance(d.get(key), int) and d[key] >= len(keep):
            d[key] = 1
    if isinstance(d.get("num_kv_shared_layers"), int) and d["num_kv_shared_layers"] >= len(keep):
        d["num_kv_shared_layers"] = 0
    # a hybrid needs an attention layer (its masks ask the cache for a sequence length)
    if "attn_layer_indices" in d and d["attn_layer_indices"] is None:
        d["attn_layer_indices"] = [len(keep) - 1]
        changes.append(f"attn_layer_indices=[{len(keep) - 1}]")
    for k in ("layer_types", "layers_block_type"):
        v = d.get(k)
        if isinstance(v, list) and v and set(v) <= _LINEAR_KINDS and k in per_layer:
            v[-1] = "full_attention" if k == "layer_types" else "attention"
            changes.append(f"{k}[-1]={v[-1]}")
    return d, changes


def default_config(model_type: str) -> tuple[dict, list[str]]:
    """The config class's defaults as a config.json dict, cut to a few layers; and what was completed."""
    from transformers import AutoConfig

    d = AutoConfig.for_model(model_type).to_dict()
    d["model_type"] = model_type
    d["is_decoder"] = True  # as a causal LM (BERT-like and Reformer heads refuse is_decoder=False)
    changes = []
    for key, value in _TYPE_COMPLETIONS.get(model_type, {}).items():
        d[key] = value
        changes.append(f"{key}={value}")
    d, more = shrink_layers(d)
    return d, changes + more


def classify(model_type: str) -> str | None:
    """Why a type cannot be traced as a text-only causal LM, before trying; None to try it."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.for_model(model_type)
    except Exception as exc:  # noqa: BLE001 - any config failure is the reason
        if "encoder" in str(exc):
            return f"encoder-decoder: its config needs the encoder's sub-configs ({_first_line(exc)})"
        return f"config: {_first_line(exc)}"
    if getattr(cfg, "is_encoder_decoder", False) and not _has_causal_decoder(model_type):
        return "encoder-decoder"
    return None


def _has_causal_decoder(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return bool(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:160]


# ---- one type ---------------------------------------------------------------------------------------
def run_type(model_type: str, config: dict | None = None) -> dict:
    """Trace and estimate one model type at both workloads; a row of the coverage table."""
    from estimator.coefficients import DEFAULT
    from estimator.engines import max_positions, replay_supports
    from estimator.estimate import estimate
    from estimator.families import spec_from_config
    from estimator.terms import Workload
    from harness.trace_estimate import estimate_from_trace, trace_workload

    row: dict = {"model_type": model_type, "status": "ok", "engine": None, "reason": None, "cases": {}}
    started = time.perf_counter()
    if config is None:
        reason = classify(model_type)
        if reason:
            row.update(status="skipped", reason=reason)
            return row
        try:
            config, row["completed"] = default_config(model_type)
        except Exception as exc:  # noqa: BLE001
            row.update(status="failed", reason=f"config: {_first_line(exc)}")
            return row
    spec = None
    row["engine"] = "replay" if replay_supports(config) else "trace"  # what --engine auto picks
    if row["engine"] == "replay":
        try:
            spec = spec_from_config(config, model_type)
        except Exception as exc:  # noqa: BLE001 - the replay refuses a config of a family it knows
            row.update(status="failed", reason=f"replay: {_first_line(exc)}")
            return row
    positions = max_positions(config)
    for label, kwargs in WORKLOADS.items():
        kwargs = dict(kwargs)
        if positions and positions < kwargs["context"]:  # learned positions (Blenderbot: 128)
            kwargs["context"] = positions
            row.setdefault("completed", []).append(f"{label} context {positions}")
        try:
            workload = Workload(dtype="bfloat16", attn="sdpa", **kwargs)
            run = trace_workload(config, workload)  # eager where the model has no sdpa path
            traced = estimate_from_trace(run, model_type, workload, DEFAULT)
            est = estimate(spec, workload, DEFAULT) if spec is not None else traced
        except Exception as exc:  # noqa: BLE001 - the first line of any failure is the table's reason
            row.update(status="failed", reason=_first_line(exc) + f" [{label}]")
            row["traceback"] = traceback.format_exc()
            row["where"] = _where(row["traceback"])
            break
        attn = run.result.attn
        truth = run.result.peak_allocated_bytes
        row["cases"][label] = {
            "attn": attn,
            "trace_peak_allocated_bytes": truth,
            "trace_weights_bytes": run.parameter_bytes,
            "trace_kv_bytes": run.cache_nbytes,
            "peak_allocated_bytes": est.peak_allocated_bytes,
            "weights_bytes": est.weights_bytes,
            "kv_cache_bytes": est.kv_cache_bytes,
            "peak_error": (est.peak_allocated_bytes - truth) / truth,
            "dynamic_error": _dynamic_error(est.peak_allocated_bytes - est.weights_bytes,
                                            truth - run.parameter_bytes),
            "trace_engine_peak_error": (traced.peak_allocated_bytes - truth) / truth,
            "kv_error": _relative(est.kv_cache_bytes, run.cache_nbytes),
            "weights_error": _relative(est.weights_bytes, run.parameter_bytes),
            "num_parameters": run.num_parameters,
            "seconds": run.result.duration_s,
        }
    row["seconds"] = round(time.perf_counter() - started, 2)
    if row["status"] == "ok":
        tolerance = REPLAY_TOLERANCE if row["engine"] == "replay" else TRACE_TOLERANCE
        worst = max(abs(c["peak_error"]) for c in row["cases"].values())
        row["worst_peak_error"] = worst
        row["within_tolerance"] = worst <= tolerance
    return row


def _relative(a: int, b: int) -> float:
    if b == 0:
        return 0.0 if a == 0 else float("inf")
    return (a - b) / b


def _dynamic_error(est: int, truth: int) -> float:
    return _relative(est, truth)


# ---- isolation --------------------------------------------------------------------------------------
def _child(model_type: str, conn) -> None:
    try:
        row = run_type(model_type)
    except BaseException as exc:  # noqa: BLE001
        row = {"model_type": model_type, "status": "failed", "reason": _first_line(exc), "cases": {}}
    conn.send(json.loads(json.dumps(row, default=str)))
    conn.close()


def run_isolated(model_type: str, timeout_s: float = TIMEOUT_S) -> dict:
    """`run_type` in a forked process: a crash, a hang or an out-of-memory fails that type only."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(model_type, child), daemon=True)
    proc.start()
    child.close()
    row = None
    if parent.poll(timeout_s):
        try:
            row = parent.recv()
        except EOFError:
            row = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return row or {"model_type": model_type, "status": "failed", "reason": f"timed out after {timeout_s:.0f} s",
                       "cases": {}}
    if row is None:
        return {"model_type": model_type, "status": "failed",
                "reason": f"worker died (exit code {proc.exitcode})", "cases": {}}
    return row


def run_all(types: list[str], jobs: int = 1, progress: bool = True, timeout_s: float = TIMEOUT_S) -> list[dict]:
    import logging
    from concurrent.futures import ThreadPoolExecutor

    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)  # failures are rows
    import transformers

    transformers.logging.set_verbosity_error()

    from tqdm import tqdm

    # import the heavy modules once in the parent, so every forked child starts warm
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import harness.trace_estimate  # noqa: F401

    rows: dict[str, dict] = {}
    with tqdm(total=len(types), unit="type", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar, \
            ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for row in pool.map(lambda t: run_isolated(t, timeout_s), types):
            rows[row["model_type"]] = row
            bar.set_postfix_str(f"{row['model_type']}: {row['status']}")
            bar.update()
    return [rows[t] for t in types]


def all_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# ---- the report -------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{x:+.2%}" if x == x and abs(x) != float("inf") else "n/a"


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "types": len(rows),
        "estimated": len(ok),
        "replay": sum(r["engine"] == "replay" for r in ok),
        "replay_within_1pct": sum(r["engine"] == "replay" and r["within_tolerance"] for r in ok),
        "trace": sum(r["engine"] == "trace" for r in ok),
        "trace_within_2pct": sum(r["engine"] == "trace" and r["within_tolerance"] for r in ok),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
    }


def markdown(rows: list[dict], versions: dict) -> str:
    s = summary(rows)
    lines = [
        "# Coverage: every causal LM of the installed transformers",
        "",
        "Generated by `python benchmarks/coverage.py --write docs/coverage.md` (do not edit by hand) with "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        f"**{s['estimated']} of {s['types']} model types estimated**: {s['replay']} by the replay "
        f"({s['replay_within_1pct']} within 1% of the trace), {s['trace']} by the trace engine "
        f"({s['trace_within_2pct']} within 2%); {s['skipped']} skipped, {s['failed']} failed.",
        "",
        "How: each `model_type` of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built from its config class's "
        f"defaults, cut to the first {PER_KIND} layers of every distinct layer kind (`layer_types`, "
        "`layers_block_type`, `mlp_layer_types`...; so a hybrid keeps its attention layers), traced with "
        "fake tensors (`harness/trace.py`), and estimated by the engine `vramcal estimate --engine auto` picks: "
        "the replay (`estimator/replay/`) where the estimator's families read the config, else the trace "
        "engine (`harness/trace_estimate.py`: the traced allocations and frees, in order, through the "
        "allocator model). Workloads: generate, context 256 x batch 2 with 8 new tokens (dynamic cache), and "
        "forward, 128 x 1 (both capped at a model's learned positions); bf16, sdpa (eager where transformers "
        "has no sdpa path for the model).",
        "",
        "Errors are (estimate - trace) / trace, with the uncalibrated coefficients (`sim_allocated_factor` 1 "
        "and the 32 MiB cuBLAS workspace the trace adds too), so both sides count the same bytes: *peak* is "
        "the peak allocated bytes, *dynamic* the same above the weights. *KV* compares the bytes the cache "
        "holds at the end (the replay counts `context` tokens, the cache holds `context - 1`: +0.39% at 256), "
        "*weights* the parameters' bytes. *config* lists what the default config needed to run: values "
        "transformers leaves None (`head_dim`, `num_experts_per_tok`...), an attention layer for a hybrid "
        "whose default has none, a context cut to the learned positions.",
        "",
        "## Estimated",
        "",
        "| model type | engine | parameters (cut) | peak gen / fwd | dynamic gen / fwd | KV | weights | within | config |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        if r["status"] != "ok":
            continue
        g, f = r["cases"]["generate"], r["cases"]["forward"]
        kv = "exact" if g["kv_error"] == 0 else _pct(g["kv_error"])
        w = "exact" if g["weights_error"] == 0 else _pct(g["weights_error"])
        attn = "" if g["attn"] == "sdpa" else f" ({g['attn']})"
        within = f"{'yes' if r['within_tolerance'] else 'no'} ({'1%' if r['engine'] == 'replay' else '2%'})"
        changes = ", ".join(f"`{c}`" for c in r.get("completed") or ())
        lines.append(f"| {r['model_type']}{attn} | {r['engine']} | {g['num_parameters']:,} | {_pct(g['peak_error'])} / "
                     f"{_pct(f['peak_error'])} | {_pct(g['dynamic_error'])} / {_pct(f['dynamic_error'])} | {kv} | {w} | "
                     f"{within} | {changes} |")
    lines += ["", "## Not estimated", "",
              "Skipped: encoder-decoder configs that cannot be built without their encoder's. Failed: the "
              "exception's first line and where it was raised (the last transformers frame). "
              "`DataDependentOutputException` / `DynamicOutputShapeException`: the model's code reads tensor "
              "values (routing sizes, asserts on ids), which fake tensors do not have.",
              "", "| model type | status | reason | where |", "| --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] == "ok":
            continue
        reason = str(r.get("reason") or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['model_type']} | {r['status']} | {reason} | {r.get('where') or ''} |")
    lines.append("")
    return "\n".join(lines)


def _where(tb: str) -> str | None:
    """``models/git/modeling_git.py: forward``: the last transformers frame of a traceback."""
    last = None
    for line in tb.splitlines():
        line = line.strip()
        if line.startswith("File ") and "/transformers/" in line:
            path = line.split('"')[1].split("/transformers/", 1)[1]
            if not path.startswith(_PLUMBING) and not path.endswith("configuration_utils.py"):
                last = f"{path}: {line.rsplit(' in ', 1)[-1]}"
    return last


# transformers frames that only pass a call on (attribute lookups, decorators, checks)
_PLUMBING = ("utils/", "integrations/heterogeneity/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="write the Markdown report (docs/coverage.md)")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    parser.add_argument("--jobs", type=int, default=1, help="processes at once (default 1)")
    parser.add_argument("--types", default=None, help="comma-separated model types (default: all)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per type")
    parser.add_argument("--from-json", metavar="FILE", help="render rows a previous --json run wrote, run nothing")
    args = parser.parse_args(argv)

    import torch
    import transformers

    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        for r in rows:
            if r.get("traceback"):
                r["where"] = _where(r["traceback"])
    else:
        types = args.types.split(",") if args.types else all_types()
        rows = run_all(types, jobs=args.jobs, timeout_s=args.timeout)
    s = summary(rows)
    print(json.dumps(s))
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['model_type']}: {r['status']}: {r.get('reason')}", file=sys.stderr)
        elif not r["within_tolerance"]:
            print(f"  {r['model_type']}: {r['engine']} off by {r['worst_peak_error']:+.2%}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.write:
        versions = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}
        Path(args.write).write_text(markdown(rows, versions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
