"""How long the GPU campaign's sweeps take on one GPU, estimated on the CPU before the GPU is used.

    python benchmarks/campaign_plan.py configs/sweeps/h200-smoke.toml configs/sweeps/h200-campaign.toml \
        [--budget 480]

Expands each sweep as `vramcal sweep` does (harness/sweep.py: `expand`, `order`, the estimate filter
against the sweep's GPU), then adds up a time model of the harness on a Hopper GPU:

- a case the H100 reference holds (results/reference/h100-transformers-5.17.jsonl, same key without
  the GPU name) takes the reference's ``duration_s`` (0.1-5.3 s there);
- another generate case: ``CASE_S`` plus one decode step per new token, ``STEP_S`` for a dense model
  and ``MOE_STEP_S`` for a mixture of experts (a guess: transformers' eager generate loop is
  Python-bound near 25 ms a step for these sizes; the expert dispatch of MoE layers is slower);
  a forward: ``FORWARD_S``; a compiled case (compile = "auto"): ``COMPILE_S`` more for torch.compile;
- each worker process: ``PROCESS_S`` (interpreter, torch and transformers imports, CUDA context, the
  NVML baseline); each model build: ``BUILD_S`` plus the estimate's bytes at ``INIT_BYTES_PER_S``
  (random weights initialised on the GPU, harness/backends/transformers.py);
- each sweep: ``CHECK_S`` for the meta-device check of every model before anything is measured.

The constants are assumptions, not measurements: the campaign's throughput line (`vramcal sweep`
prints it) is what to believe once it has run. Prints one line per process group, the cumulative time
and, with --budget, the group a time budget of that many seconds cuts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from estimator.errors import UserError  # noqa: E402
from estimator.gpus import find_gpu  # noqa: E402
from estimator.records import case_key, read_records  # noqa: E402
from harness.runner import process_groups  # noqa: E402
from harness.sweep import EstimateFilter, expand, load_sweep, order  # noqa: E402

REFERENCE = Path(__file__).resolve().parent.parent / "results" / "reference" / "h100-transformers-5.17.jsonl"
CASE_S = 1.5
STEP_S = 0.025
MOE_STEP_S = 0.08
FORWARD_S = 0.5
COMPILE_S = 60.0
PROCESS_S = 15.0
BUILD_S = 2.0
INIT_BYTES_PER_S = 10 * 10**9
CHECK_S = 10.0
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def reference_durations() -> dict[str, float]:
    return {case_key({**r, "gpu_name": None}): r["duration_s"] for r in read_records(REFERENCE)}


def case_seconds(case, durations: dict[str, float], moe: bool) -> float:
    key = case_key({**case.record_fields(), "gpu_name": None})
    if key in durations:
        seconds = durations[key]
    elif case.workload == "forward":
        seconds = FORWARD_S
    else:
        seconds = CASE_S + case.new_tokens * (MOE_STEP_S if moe else STEP_S) * (2 if case.assistant else 1)
    return seconds + (COMPILE_S if case.compile == "auto" else 0.0)


def plan(path: str) -> list[tuple[str, int, float]]:
    """(label, cases, seconds) per process group of the sweep, in the order they run, then the check."""
    sweep = load_sweep(path)
    cases, _ = expand(sweep)
    memory = find_gpu(sweep.gpu).memory_bytes if sweep.gpu else None
    flt = EstimateFilter(sweep.device, memory, sweep.skip_over_estimate)
    estimates = {c: flt.estimate_bytes(c) for c in cases}
    kept = [c for c in order(cases) if not flt.skip_reason(estimates[c])]
    durations = reference_durations()
    rows = [(f"{sweep.name}: meta-device check", 0, CHECK_S)]
    for group in process_groups(kept):
        config = group[0].read_config()
        moe = any(config.get(k) for k in MOE_KEYS) or any(config.get("text_config", {}).get(k) for k in MOE_KEYS)
        seconds = PROCESS_S
        built = set()
        for case in group:
            if case.build_group() not in built:
                built.add(case.build_group())
                seconds += BUILD_S + (estimates[case] or 0) / INIT_BYTES_PER_S
            seconds += case_seconds(case, durations, moe)
        first = group[0]
        label = f"{sweep.name}: {first.model}" + (f" [{first.alloc_conf}]" if first.alloc_conf else "")
        label += " compile:auto" if first.compile == "auto" else ""
        rows.append((label, len(group), seconds))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", metavar="SWEEP.toml")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="show where a time budget of SECONDS (from the first sweep's start) cuts")
    args = parser.parse_args(argv)
    try:
        rows = [row for path in args.sweeps for row in plan(path)]
    except UserError as exc:
        print(f"campaign_plan: error: {exc}", file=sys.stderr)
        return 2
    total = 0.0
    cut = None
    for label, n, seconds in rows:
        total += seconds
        mark = ""
        if args.budget is not None and cut is None and total > args.budget:
            cut, mark = label, "  <- the budget ends here"
        print(f"{total:7.0f} s  {seconds:6.1f} s  {n:3d} cases  {label}{mark}")
    cases = sum(n for _, n, _ in rows)
    print(f"estimated: {cases} cases in {total:.0f} s ({total / 60:.1f} min) of measuring, before the machine's start")
    if args.budget is not None:
        print(f"budget {args.budget:.0f} s: " + (f"cut at {cut}" if cut else "everything fits"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
