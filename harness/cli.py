"""`vramcal measure` and `vramcal sweep`. Light at import time: torch is imported by the worker only."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "measure",
        help="measure one case on this machine's GPU (or CPU) and append its record to a .jsonl file",
        description="Measure one case in a fresh worker process and append one vramcal.record/1 line to --out. "
                    "--context counts prompt + new tokens (context 1024 with 16 new tokens: a 1008-token prompt).",
    )
    p.add_argument("model", help="catalogue name (configs/models), config.json, checkpoint folder or HF repo id")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: NVML + torch.cuda; cpu: live-tensor tracker (default: cuda)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32 (default: bfloat16)")
    p.add_argument("--attn", default="sdpa", help="attention implementation (default: sdpa)")
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic", help="generate only (default: dynamic)")
    p.add_argument("--workload", choices=("generate", "forward"), default="generate")
    p.add_argument("--context", type=int, default=1024, help="prompt + new tokens per sequence (default: 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=None, help="generate: greedy steps (default: 16)")
    p.add_argument("--quant", default=None, help="load-time quantization of a checkpoint folder: bnb-int8, bnb-nf4, "
                                                  "bnb-fp4, fp8-block (default: none)")
    p.add_argument("--alloc-conf", default=None,
                   help="PYTORCH_CUDA_ALLOC_CONF for the measuring process (default: as in this environment)")
    p.add_argument("--memory-limit-bytes", type=int, default=None,
                   help="cap the case's memory (cuda: memory fraction; cpu: tracker limit) to provoke an OOM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="record file to append to")
    p.add_argument("-v", "--verbose", action="store_true", help="show the worker's output")
    p.set_defaults(func=_measure)

    s = subparsers.add_parser(
        "sweep",
        help="measure every case of a sweep file (resumable: cases already in the output are skipped)",
        description="Run configs/sweeps/NAME.toml: one worker process per model, records appended as measured; "
                    "a rerun skips cases already in the output file. Exit status 1 if a case ended in error "
                    "(an OOM is a result, not an error).",
    )
    s.add_argument("sweep_file", metavar="SWEEP.toml")
    s.add_argument("--out", metavar="FILE.jsonl", help="record file (default: the sweep's `out`, else results/NAME.jsonl)")
    s.add_argument("--device", choices=("cuda", "cpu"), default=None, help="override the sweep's device")
    s.add_argument("--dry-run", action="store_true", help="list what would run and what is skipped; measure nothing")
    s.add_argument("--limit", type=int, default=None, metavar="N", help="measure at most N cases")
    s.add_argument("--retry-errors", action="store_true",
                   help="measure again cases whose only records have status error")
    s.add_argument("-v", "--verbose", action="store_true", help="show the workers' output")
    s.set_defaults(func=_sweep)


def _measure(args: argparse.Namespace) -> int:
    from estimator.errors import UserError
    from harness.case import Case, default_alloc_conf
    from harness.runner import run_cases
    from harness.sweep import summary_line

    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, not {args.batch}")
    alloc_conf = default_alloc_conf() if args.alloc_conf is None else args.alloc_conf
    case = Case.make(args.model, device=args.device, dtype=args.dtype, attn=args.attn, cache=args.cache,
                     workload=args.workload, context=args.context, batch=args.batch,
                     new_tokens=args.new_tokens, quant=args.quant, alloc_conf=alloc_conf,
                     memory_limit_bytes=args.memory_limit_bytes)
    gpu_name = None
    if case.device == "cuda":
        from harness.nvml import gpu_info

        gpu_name = gpu_info().name
    records = run_cases([case], args.out, gpu_name=gpu_name, seed=args.seed, echo_stderr=args.verbose)
    rec = records[-1]
    print(summary_line(case, rec))
    return 1 if rec["status"] == "error" else 0


def _sweep(args: argparse.Namespace) -> int:
    from estimator.errors import UserError
    from harness.sweep import run_sweep

    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit must be >= 0, not {args.limit}")
    sys.stdout.flush()
    return run_sweep(args.sweep_file, out=args.out, device=args.device, dry_run=args.dry_run, limit=args.limit,
                     retry_errors=args.retry_errors, verbose=args.verbose)
