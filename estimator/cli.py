"""`vramcal estimate`, `max-context`, `max-batch`, `models`: the light commands (no torch)."""

from __future__ import annotations

import argparse
import json

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


def add_workload_args(p: argparse.ArgumentParser, context_required: bool = False, default_context: int = 4096,
                      with_context: bool = True, with_batch: bool = True) -> None:
    """The options that describe one inference job (shared with the harness's `measure`).

    ``with_context`` / ``with_batch`` False: the command searches for that value (max-context,
    max-batch), so it takes no option for it (argparse refuses one given).
    """
    p.add_argument("model", metavar="MODEL",
                   help="catalogue name (see `vramcal models`), config.json, checkpoint folder, or HF repo id")
    p.add_argument("--dtype", default="bfloat16", help="weights/compute dtype: bfloat16, float16, float32 (default bfloat16)")
    p.add_argument("--quant", default=None, metavar="FORMAT",
                   help="weight quantization format, e.g. gptq-int4, awq-int4, bnb-nf4, bnb-int8, fp8, gguf-q4_k_m")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: the model's dtype); e.g. float8_e4m3fn")
    if not with_context:
        pass
    elif context_required:
        p.add_argument("--context", type=positive_int, required=True,
                       help="tokens each sequence holds at the end (prompt + new tokens)")
    else:
        p.add_argument("--context", type=positive_int, default=None,
                       help=f"tokens each sequence holds at the end, prompt + new tokens (default {default_context:,}, "
                            "or the model's maximum positions if fewer)")
    if with_batch:
        p.add_argument("--batch", type=positive_int, default=1, help="sequences in the batch (default 1)")
    p.add_argument("--new-tokens", type=non_negative_int, default=None,
                   help=f"tokens generated per sequence, part of --context (default {DEFAULT_NEW_TOKENS}; "
                        "generate only)")
    p.add_argument("--workload", choices=("generate", "forward"), default="generate",
                   help="generate (prefill + decode, last-position logits) or forward (one pass, all logits)")
    p.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa")
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic")
    p.add_argument("--max-cache-len", type=positive_int, default=None,
                   help="static cache: tokens pre-allocated per sequence (default: --context)")
    p.add_argument("--framework", choices=("transformers", "vllm"), default="transformers")
    p.add_argument("--compile", choices=("auto", "off"), default="auto",
                   help="generate's compilation: auto (default), what transformers does: on CUDA a static cache "
                        "compiles the decode step with CUDA graphs; off: generate(disable_compile=True)")
    p.add_argument("--alloc-conf", default=None, metavar="STR",
                   help="the PYTORCH_CUDA_ALLOC_CONF the run uses, e.g. expandable_segments:True (default: the "
                        "environment's PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF; '' for torch's defaults)")
    p.add_argument("--coefficients", default=None, metavar="FILE",
                   help="coefficients file (default: the one for --framework and --gpu under results/coefficients)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    from estimator import assisted, lora

    lora.add_args(p)
    assisted.add_args(p)


DEFAULT_NEW_TOKENS = 16


def new_tokens_from_args(args) -> int:
    """--new-tokens, refused where it means nothing (a forward pass generates none)."""
    if args.new_tokens is not None and args.workload == "forward":
        raise UserError("--new-tokens applies to --workload generate; a forward pass generates no tokens")
    if args.workload == "forward":
        return 0
    return DEFAULT_NEW_TOKENS if args.new_tokens is None else args.new_tokens


DEFAULT_CONTEXT = 4096


def quant_from_args(args, spec=None) -> str | None:
    """--quant, else the format the config's quantization_config names; ``--quant none``: unquantized."""
    from estimator.quant import normalize_quant

    if args.quant is not None:
        return normalize_quant(args.quant)
    if getattr(spec, "spec", None) is not None:  # an engines.Model answered by the replay
        spec = spec.spec
    if spec is not None and hasattr(spec, "default_quant"):
        if spec.default_quant_error:
            raise UserError(spec.default_quant_error)
        return spec.default_quant
    if isinstance(getattr(spec, "config", None), dict):  # the trace engine's model: its raw config
        from estimator.quant import quant_from_config

        return quant_from_config(spec.config)[0]
    return None


def workload_from_args(args, spec=None) -> "Workload":
    from estimator.terms import Workload

    if args.context is None:  # the default: 4,096 tokens, or fewer where the model has fewer positions
        args.context = min(DEFAULT_CONTEXT, getattr(spec, "max_position_embeddings", None) or DEFAULT_CONTEXT)
    return Workload(context=args.context, batch=args.batch, new_tokens=new_tokens_from_args(args),
                    workload=args.workload, dtype=args.dtype, quant=quant_from_args(args, spec), kv_dtype=args.kv_dtype,
                    attn=args.attn, cache=args.cache, framework=args.framework,
                    max_cache_len=args.max_cache_len, alloc_conf=alloc_conf_from_args(args),
                    lora=lora_from_args(args), compile=getattr(args, "compile", "off"),
                    assistant=args.assistant, num_assistant_tokens=args.num_assistant_tokens,
                    prompt_lookup_num_tokens=args.prompt_lookup_num_tokens)


def alloc_conf_from_args(args) -> str:
    """--alloc-conf, else the environment's setting, parsed strictly (estimator/alloc_conf.py)."""
    from estimator.alloc_conf import env_alloc_conf, parse_alloc_conf

    given = getattr(args, "alloc_conf", None)
    text = env_alloc_conf() if given is None else given
    try:
        return parse_alloc_conf(text).text
    except UserError as exc:
        if given is None:  # say where it came from, and how to get past it
            raise UserError(f"{exc} (from the environment; --alloc-conf '' estimates torch's defaults)") from None
        raise


def lora_from_args(args):
    from estimator.lora import from_args

    return from_args(args)


def _coefficients(args):
    from estimator.coefficients import load_coefficients, select_coefficients
    from estimator.gpus import find_gpu

    if args.coefficients:
        return load_coefficients(args.coefficients)
    gpu = find_gpu(args.gpu).name if getattr(args, "gpu", None) is not None else None
    return select_coefficients(args.framework, gpu)


def register(sub) -> None:
    from estimator import multigpu_cli
    from estimator.engines import add_engine_arg

    p = sub.add_parser("estimate", help="estimate peak VRAM of one job, with a verdict per GPU",
                       description="Estimate the peak GPU memory of one inference job.")
    add_workload_args(p)
    add_engine_arg(p)
    p.add_argument("--gpu", default=None, help="GPU whose coefficients to use and to list first (e.g. H100)")
    from estimator import vllm_cli

    vllm_cli.add_args(p)
    multigpu_cli.add_args(p)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("max-context", help="largest context that fits a GPU",
                       description="Largest context (prompt + new tokens) whose estimate fits the GPU.")
    add_workload_args(p, with_context=False)
    add_engine_arg(p)
    p.add_argument("--gpu", default=None, help="GPU name, e.g. H100, L4, RTX 4090 (or --gpus)")
    p.add_argument("--point", action="store_true", help="use the point estimate instead of the interval's high end")
    multigpu_cli.add_args(p)
    p.set_defaults(func=cmd_max_context)

    p = sub.add_parser("max-batch", help="largest batch that fits a GPU at a context",
                       description="Largest batch whose estimate at --context fits the GPU.")
    add_workload_args(p, context_required=True, with_batch=False)
    add_engine_arg(p)
    p.add_argument("--gpu", default=None, help="GPU name, e.g. H100, L4, RTX 4090 (or --gpus)")
    p.add_argument("--point", action="store_true", help="use the point estimate instead of the interval's high end")
    multigpu_cli.add_args(p)
    p.set_defaults(func=cmd_max_batch)

    p = sub.add_parser("models", help="list the model catalogue", description="List the catalogue models.")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=cmd_models)


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def _count(n: int) -> str:
    """Parameters for a reader: "8.03 B", "124.4 M", "38,656"."""
    if n >= 10**9:
        return f"{n / 1e9:,.2f} B"
    if n >= 10**6:
        return f"{n / 1e6:,.1f} M"
    return f"{n:,}"


def _table(header: tuple[str, ...], rows: list[tuple], align: str) -> list[str]:
    """Columns as wide as their widest cell, so huge values never run together; align: 'l'/'r' per column."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for r in cells:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)]
        out.append("  " + "  ".join(parts).rstrip())
    return out


def _describe(est, spec=None) -> list[str]:
    from estimator.estimate import weight_format
    from estimator.replay import attention_used

    w = est.workload
    attn = attention_used(spec.model_type, w.attn) if spec is not None else w.attn
    head = f"{est.model}: {_count(est.num_parameters)} parameters, {w.dtype}"
    quant, _ = weight_format(w)
    if w.quant:
        head += f" + {w.quant}" + ("" if quant else f" (dequantized to {w.dtype})")
    head += f", {attn} attention" + (f" (no {w.attn} path in transformers for {spec.model_type})" if attn != w.attn else "")
    head += f", {w.framework}"
    parts = dict(getattr(spec, "parts", None) or {})
    if len(parts) > 1:  # a multimodal wrapper: say what was counted
        head += "\n  counted: " + " + ".join(f"{k.replace('_', ' ')} {_count(v)}" for k, v in parts.items())
    if w.workload == "generate":
        job = (f"generate: context {w.context:,} ({w.prompt_tokens:,} prompt + {w.new_tokens:,} new) x batch {w.batch},"
               f" {w.cache} cache, KV {w.kv_dtype or w.dtype}, allocator {w.alloc_conf or 'default'}")
    else:
        job = (f"forward: {w.context:,} tokens x batch {w.batch}, logits at every position, "
               f"allocator {w.alloc_conf or 'default'}")
    return [head, job]


def _coefficients_line(est) -> str:
    c = est.coefficients
    if not c.calibrated:
        return f"coefficients (UNCALIBRATED): {c.source}"
    return f"coefficients (calibrated on {c.gpu}, {c.framework}): {c.source}"


def _note_lines(notes) -> list[str]:
    return [f"  note: {n}" for n in notes]


def cmd_estimate(args) -> int:
    from estimator import engines, multigpu_cli, vllm_cli

    if args.framework == "vllm":
        return vllm_cli.cmd(args)
    vllm_cli.refuse_unless_vllm(args)
    if multigpu_cli.check_args(args):
        return multigpu_cli.cmd_estimate(args)
    from estimator.gpus import find_gpu, table_gpus

    first = find_gpu(args.gpu) if args.gpu is not None else None
    model = engines.resolve_model(args.model, args.engine)  # the replay's spec, or the trace engine's config
    spec = model.spec
    workload = workload_from_args(args, model)
    coefficients = _coefficients(args)
    est, seconds = engines.estimate(model, workload, coefficients, first)
    gpus = table_gpus()
    if first is not None:
        gpus = (first,) + tuple(g for g in gpus if g != first)
    if args.json:
        out = est.as_dict()
        out["gpus"] = est.verdicts(gpus)
        print(json.dumps(out, indent=2))
        return 0
    lines = _describe(est, spec) + [""]
    from estimator.lora import table_rows

    from estimator.assisted import table_rows as assisted_rows

    terms = [(label, _gib(value), f"{value:,}") for label, value in assisted_rows(est, table_rows(est))]
    lines += _table(("term", "GiB", "bytes"), terms, "lrr")
    # the interval's design coverage (what the calibration aimed at), else its measured coverage
    coverage = est.coefficients.interval.get("target") or est.coefficients.interval.get("coverage")
    label = f"{round(coverage * 100)}% interval" if coverage else "interval"
    where = "the forward pass" if est.workload.workload == "forward" else est.peak_phase
    lines.append(f"  {label}: {_gib(est.low_bytes)} .. {_gib(est.high_bytes)} GiB   (peak in {where})")
    lines.append("  " + _coefficients_line(est))
    lines.append("  " + engines.engine_line(est.engine, seconds, est.engine_version))
    lines += _note_lines(est.notes)
    lines.append("")
    rows = est.verdicts(gpus)
    table = [(r["gpu"] + ("" if r["calibrated"] or not est.coefficients.calibrated else " *"),
              _gib(r["memory_bytes"]) + ("~" if r["memory_approximate"] else ""), _gib(r["free_bytes"]), r["verdict"])
             for r in rows]
    lines += _table(("GPU", "memory GiB", "free GiB", "verdict"), table, "lrrl")
    if est.coefficients.calibrated and any(not r["calibrated"] for r in rows):
        lines.append(f"  * not calibrated on this GPU: coefficients from {est.coefficients.gpu}, interval widened")
    if any(r["memory_approximate"] for r in rows):
        lines.append("  ~ usable memory approximate: torch total from an OOM message or device properties, or the NVML total")
    print("\n".join(lines))
    return 0


def _search_setup(args):
    """Everything a search needs, checked before it starts: the GPU, the workload, the model."""
    from estimator.engines import resolve_model
    from estimator.gpus import find_gpu

    if args.gpu is None:
        raise UserError("give --gpu NAME (e.g. --gpu H100), or --gpus LIST for several GPUs")
    gpu = find_gpu(args.gpu)
    if not hasattr(args, "context"):
        args.context = max((args.new_tokens or 0) + 1, 1) if args.workload == "generate" else 1
        if args.workload == "generate" and args.new_tokens is None:
            args.context = DEFAULT_NEW_TOKENS + 1
    if not hasattr(args, "batch"):
        args.batch = 1
    workload = workload_from_args(args)
    spec = resolve_model(args.model, args.engine)  # an estimator.engines.Model: .name, and its engine
    return spec, gpu, workload


def _allocator_tag(workload) -> str:
    """", allocator SETTINGS" for a search's answer line under non-default allocator settings."""
    return f", allocator {workload.alloc_conf}" if workload.alloc_conf else ""


def cmd_max_context(args) -> int:
    from estimator import multigpu_cli
    from estimator.engines import engine_line, max_context

    if multigpu_cli.check_args(args):
        return multigpu_cli.cmd_max_context(args)
    spec, gpu, workload = _search_setup(args)
    result = max_context(spec, workload, gpu.name, _coefficients(args), safe=not args.point)
    result.update(alloc_conf=workload.alloc_conf, model=spec.name, gpu=gpu.name, batch=args.batch, basis="point" if args.point else "high")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["max_context"] is None:
        print(f"{spec.name} does not fit {gpu.name} at batch {args.batch} even with the shortest context")
        return 0
    note = " (the model's maximum positions)" if result["limited_by"] == "model" else ""
    print(f"{spec.name} on {gpu.name} at batch {args.batch}: max context {result['max_context']:,} tokens{note}"
          f"  [{'point estimate' if args.point else 'interval high end'}{_allocator_tag(workload)}]")
    print(engine_line(result["engine"], result["seconds"], result["engine_version"], result["probes"]))
    return 0


def cmd_max_batch(args) -> int:
    from estimator import multigpu_cli
    from estimator.engines import engine_line, max_batch

    if multigpu_cli.check_args(args):
        return multigpu_cli.cmd_max_batch(args)
    spec, gpu, workload = _search_setup(args)
    if workload.assistant or workload.prompt_lookup_num_tokens:
        raise UserError("transformers' assisted generation runs batch 1 only: max-batch does not apply "
                        "(max-context does)")
    result = max_batch(spec, workload, gpu.name, _coefficients(args), safe=not args.point)
    result.update(alloc_conf=workload.alloc_conf, model=spec.name, gpu=gpu.name, context=args.context, basis="point" if args.point else "high")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for line in _note_lines(result.get("notes", ())):
        print(line.strip())
    if result["max_batch"] is None:
        print(f"{spec.name} does not fit {gpu.name} at context {args.context:,} even with batch 1")
        return 0
    print(f"{spec.name} on {gpu.name} at context {args.context:,}: max batch {result['max_batch']:,}"
          f"  [{'point estimate' if args.point else 'interval high end'}{_allocator_tag(workload)}]")
    print(engine_line(result["engine"], result["seconds"], result["engine_version"], result["probes"]))
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
