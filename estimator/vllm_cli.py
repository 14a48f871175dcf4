"""`vramcal estimate MODEL --framework vllm`: vLLM's start-up budget, KV capacity and whether it starts."""

from __future__ import annotations

import json

from estimator.errors import UserError

GIB = 2**30
# option dest -> default; any of them given with --framework transformers is refused
OPTIONS = ("gpu_memory_utilization", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
           "tensor_parallel_size", "kv_cache_dtype", "enforce_eager", "block_size", "estimate_cudagraphs")


def _fraction(text: str) -> float:
    import argparse

    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None


def add_args(p) -> None:
    from estimator.cli import positive_int

    g = p.add_argument_group("vLLM start-up (with --framework vllm)")
    g.add_argument("--gpu-memory-utilization", type=_fraction, default=None, metavar="U",
                   help="fraction of the GPU's total memory vLLM may use (default 0.9)")
    g.add_argument("--max-model-len", type=positive_int, default=None, metavar="N",
                   help="tokens per request (default: the model's maximum positions; --context is an alias)")
    g.add_argument("--max-num-seqs", type=positive_int, default=None, metavar="S")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=None, metavar="T")
    g.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=None, metavar="P")
    g.add_argument("--kv-cache-dtype", default=None, metavar="D", help="auto (the model's dtype), fp8, fp8_e5m2, ...")
    g.add_argument("--block-size", type=positive_int, default=None, metavar="B", help="tokens per KV block (default 16; MLA 64)")
    g.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    g.add_argument("--estimate-cudagraphs", action="store_true", default=None,
                   help="as VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1: CUDA-graph memory comes out of the KV budget")


def refuse_unless_vllm(args) -> None:
    given = [o for o in OPTIONS if getattr(args, o, None) is not None]
    if given:
        raise UserError(f"--{given[0].replace('_', '-')} is a vLLM option; add --framework vllm")


def settings_from_args(args):
    from estimator.vllm import VllmSettings

    if args.batch != 1:
        raise UserError("--batch has no meaning for vLLM's start-up; use --max-num-seqs")
    if args.kv_dtype and args.kv_cache_dtype:
        raise UserError("give --kv-cache-dtype or --kv-dtype, not both")
    kv = args.kv_cache_dtype or {"float8_e4m3fn": "fp8", "float8_e5m2": "fp8_e5m2"}.get(args.kv_dtype or "", args.kv_dtype) or "auto"
    return VllmSettings(
        gpu_memory_utilization=0.9 if args.gpu_memory_utilization is None else args.gpu_memory_utilization,
        max_model_len=args.max_model_len or args.context, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, tensor_parallel_size=args.tensor_parallel_size or 1,
        kv_cache_dtype=kv, enforce_eager=bool(args.enforce_eager), block_size=args.block_size,
        estimate_cudagraphs=bool(args.estimate_cudagraphs))


def cmd(args) -> int:
    from estimator import engines
    from estimator.cli import quant_from_args
    from estimator.gpus import find_gpu
    from estimator.terms import _compute_dtype
    from estimator.vllm import load_vllm_coefficients, select_vllm_coefficients, startup

    if args.gpu is None:
        raise UserError("--framework vllm needs --gpu (vLLM reserves a fraction of that GPU's memory)")
    gpu = find_gpu(args.gpu)
    settings = settings_from_args(args)
    model = engines.resolve_model(args.model, args.engine)
    spec = getattr(model, "spec", None)
    if spec is None:
        raise UserError(f"{args.model}: the vLLM start-up model needs an architecture the estimator's families read")
    dtype = _compute_dtype(args.dtype)
    quant = quant_from_args(args, spec)
    coefficients = load_vllm_coefficients(args.coefficients) if args.coefficients else select_vllm_coefficients(gpu.name)
    r = startup(spec, dtype, quant, gpu.memory_bytes, settings, coefficients, gpu.name)
    if args.json:
        out = {"model": spec.name, "gpu": gpu.as_dict(), "dtype": dtype, "quant": quant, "framework": "vllm",
               "vllm": r.as_dict()}
        print(json.dumps(out, indent=2))
        return 0
    s = r.settings
    print(f"{spec.name} on {gpu.name} ({r.total_bytes / GIB:.2f} GiB), vLLM, {dtype}" + (f" + {quant}" if quant else "")
          + f", TP {s.tensor_parallel_size}, max_model_len {s.max_model_len:,}, max_num_seqs {s.max_num_seqs}, "
          f"max_num_batched_tokens {s.max_num_batched_tokens:,}, KV {s.kv_cache_dtype}"
          + (", enforce-eager" if s.enforce_eager else ""))
    rows = [("gpu_memory_utilization x total", r.requested_bytes), ("- model weights", r.weights_bytes),
            ("- activation peak (profile run)", r.activation_peak_bytes), ("- non-torch memory", r.non_torch_bytes)]
    if r.cuda_graph_in_budget:
        rows.append(("- CUDA graphs", r.cuda_graph_bytes))
    rows.append(("= KV cache pool", r.kv_cache_bytes))
    w = max(len(a) for a, _ in rows)
    for label, value in rows:
        print(f"  {label:<{w}}  {value / GIB:>9.2f} GiB  {value:>16,}")
    if not r.cuda_graph_in_budget and r.cuda_graph_bytes:
        print(f"  CUDA graphs, captured after the KV cache (outside the budget): ~{r.cuda_graph_bytes / GIB:.2f} GiB")
    kinds = ", ".join(f"{n} {k}" for k, n in r.layer_kinds.items())
    print(f"  KV: {r.kv_bytes_per_token:,} bytes/token ({kinds}); block {r.block_size} tokens, page {r.page_bytes:,} bytes, "
          f"{r.num_groups} group(s) of {r.group_size} layers"
          + (f"; state {r.state_bytes_per_sequence:,} bytes/request" if r.state_bytes_per_sequence else ""))
    print(f"  GPU blocks: {r.num_gpu_blocks:,}   KV cache size: {r.kv_cache_tokens:,} tokens   "
          f"maximum concurrency at {s.max_model_len:,} tokens: {r.max_concurrency:.2f}x")
    c = r.coefficients
    lo, hi = r.low_kv_cache_bytes / GIB, r.high_kv_cache_bytes / GIB
    print(f"  KV pool interval: {lo:.2f} .. {hi:.2f} GiB   coefficients ({'calibrated' if c.calibrated else 'UNCALIBRATED'}): {c.source}")
    if r.starts:
        print("  starts: yes")
    else:
        print(f"  starts: NO: {r.reason}")
        if r.max_model_len_that_starts:
            print(f"  largest max_model_len that starts: {r.max_model_len_that_starts:,}")
        if r.utilization_needed:
            print(f"  gpu_memory_utilization that max_model_len {s.max_model_len:,} needs: {r.utilization_needed:.3f}")
    return 0
