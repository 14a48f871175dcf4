"""`vramcal estimate`, `max-context`, `max-batch`, `models`: the light commands (no torch)."""

from __future__ import annotations

import argparse
import json
import sys

from estimator.errors import UserError

GIB = 2**30


def positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_workload_args(p: argparse.ArgumentParser, context_required: bool = False, default_context: int = 4096) -> None:
    """The options that describe one inference job (shared with the harness's `measure`)."""
    p.add_argument("model", metavar="MODEL",
                   help="catalogue name (see `vramcal models`), config.json, checkpoint folder, or HF repo id")
    p.add_argument("--dtype", default="bfloat16", help="weights/compute dtype: bfloat16, float16, float32 (default bfloat16)")
    p.add_argument("--quant", default=None, metavar="FORMAT",
                   help="weight quantization format, e.g. gptq-int4, awq-int4, bnb-nf4, bnb-int8, fp8, gguf-q4_k_m")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: the model's dtype); e.g. float8_e4m3fn")
    if context_required:
        p.add_argument("--context", type=positive_int, required=True,
                       help="tokens each sequence holds at the end (prompt + new tokens)")
    else:
        p.add_argument("--context", type=positive_int, default=default_context,
                       help=f"tokens each sequence holds at the end, prompt + new tokens (default {default_context})")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences in the batch (default 1)")
    p.add_argument("--new-tokens", type=non_negative_int, default=16,
                   help="tokens generated per sequence, part of --context (default 16)")
    p.add_argument("--workload", choices=("generate", "forward"), default="generate",
                   help="generate (prefill + decode, last-position logits) or forward (one pass, all logits)")
    p.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa")
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic")
    p.add_argument("--max-cache-len", type=positive_int, default=None,
                   help="static cache: tokens pre-allocated per sequence (default: --context)")
    p.add_argument("--framework", choices=("transformers", "vllm"), default="transformers")
    p.add_argument("--coefficients", default=None, metavar="FILE",
                   help="coefficients file (default: the one for --framework and --gpu under results/coefficients)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def workload_from_args(args) -> "Workload":
    from estimator.terms import Workload

    return Workload(context=args.context, batch=args.batch, new_tokens=args.new_tokens,
                    workload=args.workload, dtype=args.dtype, quant=args.quant, kv_dtype=args.kv_dtype,
                    attn=args.attn, cache=args.cache, framework=args.framework,
                    max_cache_len=args.max_cache_len)


def _coefficients(args):
    from estimator.coefficients import load_coefficients, select_coefficients
    from estimator.gpus import find_gpu

    if args.coefficients:
        return load_coefficients(args.coefficients)
    gpu = find_gpu(args.gpu).name if getattr(args, "gpu", None) else None
    return select_coefficients(args.framework, gpu)


def register(sub) -> None:
    p = sub.add_parser("estimate", help="estimate peak VRAM of one job, with a verdict per GPU",
                       description="Estimate the peak GPU memory of one inference job.")
    add_workload_args(p)
    p.add_argument("--gpu", default=None, help="GPU whose coefficients to use and to list first (e.g. H100)")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("max-context", help="largest context that fits a GPU",
                       description="Largest context (prompt + new tokens) whose estimate fits the GPU.")
    add_workload_args(p, default_context=1)
    p.add_argument("--gpu", required=True, help="GPU name, e.g. H100, L4, RTX 4090")
    p.add_argument("--point", action="store_true", help="use the point estimate instead of the interval's high end")
    p.set_defaults(func=cmd_max_context)

    p = sub.add_parser("max-batch", help="largest batch that fits a GPU at a context",
                       description="Largest batch whose estimate at --context fits the GPU.")
    add_workload_args(p, context_required=True)
    p.add_argument("--gpu", required=True, help="GPU name, e.g. H100, L4, RTX 4090")
    p.add_argument("--point", action="store_true", help="use the point estimate instead of the interval's high end")
    p.set_defaults(func=cmd_max_batch)

    p = sub.add_parser("models", help="list the model catalogue", description="List the catalogue models.")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=cmd_models)


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def _describe(est) -> list[str]:
    w = est.workload
    head = f"{est.model}: {est.num_parameters / 1e9:,.2f} B parameters, {w.dtype}"
    head += f" + {w.quant}" if w.quant else ""
    head += f", {w.attn} attention, {w.framework}"
    if w.workload == "generate":
        job = (f"generate: context {w.context:,} ({w.prompt_tokens:,} prompt + {w.new_tokens:,} new) x batch {w.batch},"
               f" {w.cache} cache, KV {w.kv_dtype or w.dtype}")
    else:
        job = f"forward: {w.context:,} tokens x batch {w.batch}, logits at every position"
    return [head, job]


def cmd_estimate(args) -> int:
    from estimator.catalogue import load_model
    from estimator.estimate import estimate
    from estimator.gpus import GPUS, find_gpu

    spec = load_model(args.model)
    workload = workload_from_args(args)
    coefficients = _coefficients(args)
    est = estimate(spec, workload, coefficients)
    gpus = GPUS
    if args.gpu:
        first = find_gpu(args.gpu)
        gpus = (first,) + tuple(g for g in GPUS if g != first)
    if args.json:
        out = est.as_dict()
        out["gpus"] = est.verdicts(gpus)
        print(json.dumps(out, indent=2))
        return 0
    lines = _describe(est) + [""]
    lines.append(f"  {'term':<13}{'GiB':>10}{'bytes':>18}")
    for label, value in (("weights", est.weights_bytes), ("KV cache", est.kv_cache_bytes),
                         ("activations", est.activation_bytes), ("overhead", est.overhead_bytes)):
        lines.append(f"  {label:<13}{_gib(value):>10}{value:>18,}")
    lines.append(f"  {'total':<13}{_gib(est.total_bytes):>10}{est.total_bytes:>18,}")
    # the interval's design coverage (what the calibration aimed at), else its measured coverage
    coverage = est.coefficients.interval.get("target") or est.coefficients.interval.get("coverage")
    label = f"{round(coverage * 100)}% interval" if coverage else "interval"
    lines.append(f"  {label}: {_gib(est.low_bytes)} .. {_gib(est.high_bytes)} GiB   (peak in {est.peak_phase})")
    c = est.coefficients
    status = "calibrated" if c.calibrated else "UNCALIBRATED"
    lines.append(f"  coefficients ({status}): {c.source}")
    lines.append("")
    lines.append(f"  {'GPU':<12}{'memory GiB':>12}{'free GiB':>11}  verdict")
    for row in est.verdicts(gpus):
        lines.append(f"  {row['gpu']:<12}{_gib(row['memory_bytes']):>12}{_gib(row['free_bytes']):>11}  {row['verdict']}")
    print("\n".join(lines))
    return 0


def cmd_max_context(args) -> int:
    from estimator.catalogue import load_model
    from estimator.estimate import max_context
    from estimator.gpus import find_gpu

    spec = load_model(args.model)
    gpu = find_gpu(args.gpu)
    args.context = max(args.context, args.new_tokens + 1)
    result = max_context(spec, workload_from_args(args), gpu.name, _coefficients(args), safe=not args.point)
    result.update(model=spec.name, gpu=gpu.name, batch=args.batch, basis="point" if args.point else "high")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["max_context"] is None:
        print(f"{spec.name} does not fit {gpu.name} at batch {args.batch} even with the shortest context")
        return 0
    note = " (the model's maximum positions)" if result["limited_by"] == "model" else ""
    print(f"{spec.name} on {gpu.name} at batch {args.batch}: max context {result['max_context']:,} tokens{note}"
          f"  [{'point estimate' if args.point else 'interval high end'}]")
    return 0


def cmd_max_batch(args) -> int:
    from estimator.catalogue import load_model
    from estimator.estimate import max_batch
    from estimator.gpus import find_gpu

    spec = load_model(args.model)
    gpu = find_gpu(args.gpu)
    result = max_batch(spec, workload_from_args(args), gpu.name, _coefficients(args), safe=not args.point)
    result.update(model=spec.name, gpu=gpu.name, context=args.context, basis="point" if args.point else "high")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["max_batch"] is None:
        print(f"{spec.name} does not fit {gpu.name} at context {args.context:,} even with batch 1")
        return 0
    print(f"{spec.name} on {gpu.name} at context {args.context:,}: max batch {result['max_batch']:,}"
          f"  [{'point estimate' if args.point else 'interval high end'}]")
    return 0


def cmd_models(args) -> int:
    from estimator.catalogue import list_models, load_model

    rows = []
    for name in list_models():
        spec = load_model(name)
        kinds = sorted({l.attention.kind for l in spec.layers})
        moe = any(l.mlp.kind == "moe" for l in spec.layers)
        rows.append({"name": name, "model_type": spec.model_type, "num_parameters": spec.num_parameters,
                     "layers": spec.num_layers, "attention": "+".join(kinds), "moe": moe,
                     "max_position_embeddings": spec.max_position_embeddings})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<24}{'type':<18}{'parameters':>18}{'layers':>8}  attention")
    for r in rows:
        kind = r["attention"] + (" + MoE" if r["moe"] else "")
        print(f"{r['name']:<24}{r['model_type']:<18}{r['num_parameters']:>18,}{r['layers']:>8}  {kind}")
    return 0
