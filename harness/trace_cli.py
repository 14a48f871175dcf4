"""`vramcal trace`: the traced peak of one job, from fake tensors on the CPU (light at import: no torch)."""

from __future__ import annotations

import json

from estimator.cli import positive_int as _positive_int
from estimator.errors import UserError

GIB = 2**30


def register(sub) -> None:
    p = sub.add_parser(
        "trace", help="trace the exact tensor peak of a transformers run with fake tensors (no GPU)",
        description="Build MODEL at full size with fake tensors (no memory), run generate's prefill and "
                    "decode steps (or one forward), and report the peak of live allocator bytes, the "
                    "quantity torch.cuda.max_memory_allocated() reports.")
    p.add_argument("model", metavar="MODEL",
                   help="catalogue name (see `vramcal models`), config.json, checkpoint folder, or HF repo id")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32 (default bfloat16)")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic")
    p.add_argument("--workload", choices=("generate", "forward"), default="generate",
                   help="generate (prefill + decode, last-position logits) or forward (one pass, all logits)")
    p.add_argument("--context", type=_positive_int, default=4096,
                   help="tokens each sequence holds at the end, prompt + new tokens (default 4096)")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences in the batch (default 1)")
    p.add_argument("--new-tokens", type=_positive_int, default=16,
                   help="tokens generated per sequence, part of --context (default 16; ignored by forward)")
    p.add_argument("--max-cache-len", type=_positive_int, default=None,
                   help="static cache length (default: generate's, context - 1)")
    p.add_argument("--device-rules", choices=("cuda", "cpu"), default="cuda",
                   help="attention kernels and workspace of a CUDA GPU (default) or of the CPU")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_trace)


def cmd_trace(args) -> int:
    from estimator.dtypes import normalize_dtype
    from estimator.errors import require_extra

    # Checked before the heavy imports, so a typo fails in milliseconds.
    if normalize_dtype(args.dtype) not in ("bfloat16", "float16", "float32"):
        raise UserError(f"trace supports --dtype bfloat16, float16, float32; got {args.dtype!r}")
    if args.workload == "generate" and args.context <= args.new_tokens:
        raise UserError(f"--context {args.context} must exceed --new-tokens {args.new_tokens} "
                        "(context = prompt + new tokens)")
    config = resolve_config(args.model)
    from estimator.config import parse_config

    parse_config(config, args.model)  # a size no model can have fails here, before anything is built
    require_extra("torch", "harness")
    require_extra("transformers", "harness")
    from harness.trace import trace

    result = trace(config, dtype=args.dtype, attn=args.attn, cache=args.cache, workload=args.workload,
                   context=args.context, batch=args.batch, new_tokens=args.new_tokens,
                   device_rules=args.device_rules, max_cache_len=args.max_cache_len)
    if args.json:
        print(json.dumps({"model": args.model, **result.as_dict()}))
        return 0
    print(_table(args.model, result))
    return 0


def resolve_config(model: str) -> dict:
    """The raw config dict of MODEL, read even where the estimator's families do not know its type
    (``estimator.engines.resolve_config``, the one resolver both engines use)."""
    from estimator.engines import resolve_config as resolve

    return resolve(model)[0]


def _table(model: str, r) -> str:
    job = (f"{model} {r.dtype} {r.attn} {r.workload}"
           + (f" ({r.cache} cache)" if r.cache else "")
           + f", batch {r.batch}, context {r.context:,}"
           + (f" ({r.prompt_tokens:,} prompt + {r.new_tokens} new)" if r.workload == "generate" else ""))
    lines = [job, f"{'':<16}{'GiB':>10}{'bytes':>18}"]
    lines.append(f"{'peak allocated':<16}{r.peak_allocated_bytes / GIB:>10.3f}{r.peak_allocated_bytes:>18,}"
                 f"   in {r.peak_phase}")
    for name, value in r.breakdown.items():
        lines.append(f"  {name:<14}{value / GIB:>10.3f}{value:>18,}")
    lines.append(f"{'weights (exact)':<16}{r.weights_bytes / GIB:>10.3f}{r.weights_bytes:>18,}")
    lines.append(f"{'kv cache at end':<16}{r.kv_cache_bytes / GIB:>10.3f}{r.kv_cache_bytes:>18,}")
    if r.sdpa_backends:
        calls = ", ".join(f"{k} x{v}" for k, v in sorted(r.sdpa_backends.items()))
        lines.append(f"sdpa kernels ({r.device_rules} rules): {calls}")
    lines.append(f"traced in {r.duration_s:.1f} s")
    return "\n".join(lines)
