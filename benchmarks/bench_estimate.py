"""How fast the estimator answers.

1. Cold start: `vramcal estimate` as a new process, against `python -c "import torch"` (the floor any
   torch-based estimate would pay before doing anything), median of N runs each.
2. Latency: one estimate in a warm process (llama-3.1-8b; a short and a long generation), median of N.
3. Throughput: a 100,000-point grid (models x contexts x batches, 16 new tokens) through the Python API,
   in one process or split over ``--jobs`` processes.

Run: python benchmarks/bench_estimate.py [--runs 5] [--points 100000] [--jobs 1] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def time_command(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _grid(points: int) -> list[tuple[str, int, int]]:
    from estimator import list_models

    models = list_models()
    contexts = [512 * 2**i for i in range(8)]  # 512 .. 65536
    per_model = points // len(models)
    batches = list(range(1, per_model // len(contexts) + 2))
    grid = list(itertools.islice(((m, c, b) for m in models for c in contexts for b in batches), points))
    # pad to exactly `points` by cycling (models x contexts x batches)
    while len(grid) < points:
        grid.extend(grid[: points - len(grid)])
    return grid


def _estimate_all(grid: list[tuple[str, int, int]]) -> float:
    """Seconds to estimate every (model, context, batch) of ``grid``, configs parsed beforehand."""
    from estimator import Workload, estimate, load_model

    specs = {m: load_model(m) for m in dict.fromkeys(m for m, _, _ in grid)}  # startup, not the grid
    t0 = time.perf_counter()
    for model, context, batch in grid:
        estimate(specs[model], Workload(context=context, batch=batch))
    return time.perf_counter() - t0


def grid_throughput(points: int = 100_000, jobs: int = 1) -> dict:
    grid = _grid(points)
    models = len({m for m, _, _ in grid})
    t0 = time.perf_counter()
    if jobs <= 1:
        _estimate_all(grid)
    else:  # interleaved shares, so that every process gets large and small models alike
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(_estimate_all, [grid[i::jobs] for i in range(jobs)]))
    elapsed = time.perf_counter() - t0
    return {"points": len(grid), "models": models, "jobs": jobs, "seconds": elapsed,
            "per_second": len(grid) / elapsed, "per_estimate_ms": elapsed / len(grid) * jobs * 1000}


def latency(runs: int) -> dict:
    """Median seconds of one estimate in a warm process (llama-3.1-8b at 8192 tokens)."""
    from estimator import Workload, estimate, load_model

    spec = load_model("llama-3.1-8b")
    cases = {
        "batch4_16new": Workload(context=8192, batch=4, new_tokens=16),
        "batch64_16new": Workload(context=8192, batch=64, new_tokens=16),
        "batch1_1024new": Workload(context=8192, batch=1, new_tokens=1024),
        "batch1_4096new": Workload(context=8192, batch=1, new_tokens=4096),
        "batch1_4096new_static": Workload(context=8192, batch=1, new_tokens=4096, cache="static"),
    }
    out = {}
    for name, workload in cases.items():
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            estimate(spec, workload)
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=1, help="processes for the grid (default 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    vramcal = shutil.which("vramcal")
    cli = [vramcal] if vramcal else [sys.executable, "-m", "vramcal"]
    result = {
        "cli_estimate_s": time_command(cli + ["estimate", "llama-3.1-8b", "--context", "8192", "--batch", "4"], args.runs),
        "cli_estimate_json_s": time_command(cli + ["estimate", "llama-3.1-8b", "--context", "8192", "--json"], args.runs),
        "python_startup_s": time_command([sys.executable, "-c", "pass"], args.runs),
    }
    try:
        result["import_torch_s"] = time_command([sys.executable, "-c", "import torch"], args.runs)
        result["cli_over_import_torch"] = result["cli_estimate_s"] / result["import_torch_s"]
    except subprocess.CalledProcessError:
        result["import_torch_s"] = None
    result["latency_s"] = latency(args.runs)
    result["grid"] = grid_throughput(args.points, args.jobs)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"python startup            {result['python_startup_s'] * 1000:8.0f} ms")
    print(f"vramcal estimate (table)  {result['cli_estimate_s'] * 1000:8.0f} ms")
    print(f"vramcal estimate --json   {result['cli_estimate_json_s'] * 1000:8.0f} ms")
    if result.get("import_torch_s"):
        print(f"python -c 'import torch'  {result['import_torch_s'] * 1000:8.0f} ms"
              f"   (estimate takes {result['cli_over_import_torch']:.0%} of it)")
    for name, seconds in result["latency_s"].items():
        print(f"llama-3.1-8b {name:22} {seconds * 1000:8.1f} ms")
    g = result["grid"]
    print(f"grid: {g['points']:,} estimates over {g['models']} models in {g['seconds']:.1f} s "
          f"({g['per_second']:,.0f}/s, {g['per_estimate_ms']:.1f} ms each, {g['jobs']} process(es))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
