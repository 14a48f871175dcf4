"""`vramcal measure` and `vramcal sweep`. Light at import time: torch is imported by the worker only."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "measure",
        help="measure one case on this machine's GPU (or CPU) and append its record to a .jsonl file",
        description="Measure one case in a fresh worker process and append one vramcal.record/1 line to --out. "
                    "--context counts prompt + new tokens (context 1024 with 16 new tokens: a 1008-token prompt). "
                    "A case already in --out is skipped unless --repeat. Bad input (an unknown model, a config "
                    "that cannot be built, a context beyond learned position embeddings, an unusable --out) "
                    "exits 2 before anything is measured; an OOM or a crash while measuring is a record.",
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
    p.add_argument("--compile", choices=("auto", "off"), default="off",
                   help="generate's compilation: auto, what transformers does (on CUDA a static cache compiles the "
                        "decode step with CUDA graphs; the case runs in a fresh process), or off, "
                        "disable_compile=True (default, as the reference records)")
    p.add_argument("--memory-limit-bytes", type=int, default=None,
                   help="cap the case's memory (cuda: memory fraction; cpu: tracker limit) to provoke an OOM")
    p.add_argument("--device-map", default=None, choices=("auto", "balanced", "balanced_low_0", "sequential"),
                   help="place the model with from_pretrained's device_map over --gpus GPUs (per-GPU peaks)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs the device_map uses (default 1; set "
                   "CUDA_VISIBLE_DEVICES to exactly that many)")
    p.add_argument("--seed", type=int, default=0)
    from estimator.lora import add_args as add_lora_args

    add_lora_args(p)
    p.add_argument("--assistant", default=None, metavar="DRAFT",
                   help="assisted generation: the draft model (catalogue name, config.json or checkpoint folder)")
    p.add_argument("--num-assistant-tokens", type=int, default=None, metavar="K",
                   help="candidate tokens the draft proposes per step (default 20, transformers' default)")
    p.add_argument("--prompt-lookup-num-tokens", type=int, default=None, metavar="N",
                   help="prompt lookup decoding: candidate tokens per step (no second model)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="record file to append to")
    p.add_argument("--repeat", action="store_true",
                   help="measure the case again when --out already holds it (default: say so and skip it, "
                        "as a sweep does)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the worker's output")
    p.set_defaults(func=_measure)

    s = subparsers.add_parser(
        "sweep",
        help="measure every case of a sweep file (resumable: cases already in the output are skipped)",
        description="Run configs/sweeps/NAME.toml: one worker process per model, records appended as measured; "
                    "a rerun skips cases already in the output file. Before anything is measured, every case is "
                    "checked (output file, contexts against learned position embeddings, model builds): bad "
                    "input exits 2. Exit status 1 if a case ended in error (an OOM is a result, not an error).",
    )
    s.add_argument("sweep_file", metavar="SWEEP.toml")
    s.add_argument("--out", metavar="FILE.jsonl", help="record file (default: the sweep's `out`, else results/NAME.jsonl)")
    s.add_argument("--device", choices=("cuda", "cpu"), default=None, help="override the sweep's device")
    s.add_argument("--dry-run", action="store_true", help="list what would run and what is skipped; measure nothing")
    s.add_argument("--limit", type=int, default=None, metavar="N", help="measure at most N cases")
    s.add_argument("--retry-errors", action="store_true",
                   help="measure again cases whose only records have status error")
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the process groups as Ray tasks (one GPU each; CPU sweeps: one CPU): no ADDRESS "
                        "starts a local Ray instance, else join a cluster (auto, ray://HOST:10001); needs the "
                        "ray extra")
    s.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no case after SECONDS from the sweep's start: the case in flight is measured and "
                        "recorded, the rest are left for a rerun (exit 0, with a summary); not with --ray")
    s.add_argument("-v", "--verbose", action="store_true", help="show the workers' output")
    s.set_defaults(func=_sweep)


def _measure(args: argparse.Namespace) -> int:
    """Everything that can be wrong with the input is checked before the worker measures: the options,
    the model and its positions, --out and the records already in it; then the worker builds the model
    on the meta device (a config it cannot build: exit 2, nothing written) before it measures."""
    from estimator.errors import UserError, require_extra
    from estimator.paths import check_output_file
    from estimator.records import case_key
    from harness.case import Case, check_positions, default_alloc_conf
    from harness.runner import run_cases
    from harness.sweep import EstimateFilter, existing_records, summary_line

    require_extra("jsonschema", "harness")  # the record is validated before it is appended
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, not {args.batch}")
    alloc_conf = default_alloc_conf() if args.alloc_conf is None else args.alloc_conf
    case = Case.make(args.model, device=args.device, dtype=args.dtype, attn=args.attn, cache=args.cache,
                     workload=args.workload, context=args.context, batch=args.batch,
                     new_tokens=args.new_tokens, quant=args.quant, alloc_conf=alloc_conf,
                     memory_limit_bytes=args.memory_limit_bytes,
                     device_map=args.device_map or ("auto" if (args.gpus or 1) > 1 else None),
                     gpus=1 if args.gpus is None else args.gpus, lora=_lora_text(args),
                     compile=args.compile, assistant=args.assistant,
                     num_assistant_tokens=args.num_assistant_tokens,
                     prompt_lookup_num_tokens=args.prompt_lookup_num_tokens)
    note = check_positions(case)
    out = check_output_file(args.out, "--out")
    existing = existing_records(out)
    gpu_name = None
    if case.device == "cuda":
        from harness.nvml import gpu_info

        gpu_name = gpu_info().name
    key = case.key(gpu_name)
    before = [(i, r) for i, r in enumerate(existing, 1) if case_key(r) == key]
    if before and not args.repeat:
        line, rec = before[-1]
        print(f"already measured: {case.label()} is record {line} of {out} (status {rec['status']}); "
              "--repeat measures it again")
        return 0
    if note:
        print(f"vramcal: note: {note}", file=sys.stderr)
    records = run_cases([case], out, gpu_name=gpu_name, seed=args.seed, echo_stderr=args.verbose,
                        check_first=True)
    rec = records[-1]
    print(summary_line(case, rec, EstimateFilter(case.device, None, 0).estimate_bytes(case)))
    return 1 if rec["status"] == "error" else 0


def _lora_text(args) -> str | None:
    """--lora-rank / --lora PATH (estimator.lora.from_args) as the case's canonical text."""
    from estimator.lora import from_args
    from harness.lora import to_text

    return to_text(from_args(args))


def _sweep(args: argparse.Namespace) -> int:
    from estimator.errors import UserError
    from harness.sweep import run_sweep

    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit must be >= 0, not {args.limit}")
    if args.time_budget is not None and not args.time_budget > 0:
        raise UserError(f"--time-budget must be a number of seconds > 0, not {args.time_budget:g}")
    sys.stdout.flush()
    return run_sweep(args.sweep_file, out=args.out, device=args.device, dry_run=args.dry_run, limit=args.limit,
                     retry_errors=args.retry_errors, verbose=args.verbose, ray=args.ray,
                     time_budget_s=args.time_budget)
