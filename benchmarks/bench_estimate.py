"""How fast the estimator answers.

1. Cold start: `vramcal estimate` as a new process, against `python -c "import torch"` (the floor any
   torch-based estimate would pay before doing anything), median of N runs each.
2. Throughput: a 100,000-point grid (models x contexts x batches) through the Python API.

Run: python benchmarks/bench_estimate.py [--runs 5] [--json]
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


def grid_throughput(points: int = 100_000) -> dict:
    from estimator import Workload, estimate, list_models, load_model

    models = list_models()
    specs = [load_model(m) for m in models]  # parsing configs is part of startup, not the grid
    contexts = [512 * 2**i for i in range(8)]  # 512 .. 65536
    per_model = points // len(specs)
    batches = list(range(1, per_model // len(contexts) + 2))
    grid = list(itertools.islice(
        ((s, c, b) for s in specs for c in contexts for b in batches), points))
    # pad to exactly `points` by cycling (models x contexts x batches)
    while len(grid) < points:
        grid.extend(grid[: points - len(grid)])
    t0 = time.perf_counter()
    for spec, context, batch in grid:
        estimate(spec, Workload(context=context, batch=batch))
    elapsed = time.perf_counter() - t0
    return {"points": len(grid), "models": len(specs), "seconds": elapsed, "per_second": len(grid) / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--points", type=int, default=100_000)
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
    result["grid"] = grid_throughput(args.points)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"python startup            {result['python_startup_s'] * 1000:8.0f} ms")
    print(f"vramcal estimate (table)  {result['cli_estimate_s'] * 1000:8.0f} ms")
    print(f"vramcal estimate --json   {result['cli_estimate_json_s'] * 1000:8.0f} ms")
    if result.get("import_torch_s"):
        print(f"python -c 'import torch'  {result['import_torch_s'] * 1000:8.0f} ms"
              f"   (estimate takes {result['cli_over_import_torch']:.0%} of it)")
    g = result["grid"]
    print(f"grid: {g['points']:,} estimates over {g['models']} models in {g['seconds']:.1f} s "
          f"({g['per_second']:,.0f}/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
