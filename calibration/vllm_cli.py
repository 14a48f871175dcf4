"""`vramcal import-vllm-log LOG --model M [--gpu G] --out FILE.jsonl`: vLLM's start-up profile as a record."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("import-vllm-log", help="turn a vLLM start-up log into a vllm_startup record",
                       description="Read vLLM's memory-profiling lines from a log (or '-' for stdin) and append one "
                                   "vramcal.record/1 record of kind vllm_startup, for `vramcal calibrate --framework vllm`.")
    p.add_argument("log", metavar="LOG", help="vLLM's start-up log, or - for stdin")
    p.add_argument("--model", required=True, help="catalogue name, config.json or HF repo id of the model served")
    p.add_argument("--gpu", default=None, help="GPU it ran on (its total memory, when the log does not print it)")
    p.add_argument("--vllm-version", default=None, help="vLLM version (default: from the log, else 'unknown')")
    p.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: the log's --dtype, else bfloat16)")
    p.add_argument("--quant", default=None, help="weight quantization format (vramcal's names)")
    for opt in ("max-model-len", "max-num-seqs", "max-num-batched-tokens", "tensor-parallel-size"):
        p.add_argument(f"--{opt}", type=int, default=None, help="the setting, when the log does not show it")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="records file to append to")
    p.add_argument("--json", action="store_true", help="also print the record")
    p.set_defaults(func=cmd)


def cmd(args) -> int:
    import json
    import sys
    from pathlib import Path

    from estimator.vllm_log import record_from_log
    from estimator.errors import UserError
    from estimator.records import append_record
    from estimator.terms import _compute_dtype

    if args.log == "-":
        text, source = sys.stdin.read(), "stdin"
    else:
        try:
            text, source = Path(args.log).read_text(errors="replace"), str(args.log)
        except OSError as exc:
            raise UserError(f"cannot read {args.log}: {exc.strerror or exc}") from None
    overrides = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                 "max_num_batched_tokens": args.max_num_batched_tokens,
                 "tensor_parallel_size": args.tensor_parallel_size, "gpu_memory_utilization": args.gpu_memory_utilization}
    rec = record_from_log(text, args.model, args.gpu, source, args.vllm_version,
                          _compute_dtype(args.dtype) if args.dtype else None, args.quant, overrides)
    append_record(args.out, rec)
    v = rec["vllm"]
    print(f"{args.out}: vllm_startup record for {args.model} ({v['engine']}, vLLM {rec['framework_version']}): "
          + ", ".join(f"{k} {v[k] / 2**30:.2f} GiB" for k in ("weights_bytes", "activation_peak_bytes", "non_torch_bytes",
                                                              "kv_cache_bytes") if v.get(k) is not None))
    if args.json:
        print(json.dumps(rec, indent=2))
    return 0
