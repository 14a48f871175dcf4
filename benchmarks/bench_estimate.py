"""How fast the estimator answers, as ratios to ``python -c "import torch"`` measured in the same run.

1. Cold start: ``vramcal estimate`` (a short and a long generation), ``max-batch`` and ``max-context`` as new
   processes, against ``python -c "import torch"`` (the floor any torch-based estimate would pay before
   doing anything), median of N runs each.
2. Latency: one estimate in a warm process (llama-3.1-8b; short and long generations), on the C allocator
   (``estimator/_replay.c``, when built) and on the Python replay (the reference), median of N.
3. Throughput: a grid (models x contexts x batches, 16 new tokens) through the Python API, in one process
   or split over ``--jobs`` processes: 3,000 points by default (seconds), ``--full`` for 100,000.

Run: python benchmarks/bench_estimate.py [--runs 3] [--full | --points N] [--jobs 1] [--python] [--json]
(``--python``: the Python replay everywhere, as ``VRAMCAL_PYTHON_REPLAY=1`` does.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=os.environ)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _grid(points: int) -> list[tuple[str, int, int]]:
    """``points`` (model, context, batch): every catalogue model, contexts 512 .. 65536 up to the model's
    positions (a model with learned positions refuses more), batches 1, 2, ..."""
    from estimator import list_models, load_model

    models = list_models()
    contexts = [512 * 2**i for i in range(8)]  # 512 .. 65536
    per_model = points // len(models)
    batches = list(range(1, per_model // len(contexts) + 2))

    def fitting(m: str) -> list[int]:
        limit = load_model(m).max_position_embeddings
        return [c for c in contexts if not limit or c <= limit] or [min(contexts[0], limit)]

    grid = list(itertools.islice(((m, c, b) for m in models for c in fitting(m) for b in batches), points))
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


CLI = {  # name -> vramcal arguments, timed from a cold start
    "estimate": ["estimate", "llama-3.1-8b", "--context", "8192", "--batch", "4"],
    "estimate_json": ["estimate", "llama-3.1-8b", "--context", "8192", "--json"],
    "estimate_4096new": ["estimate", "llama-3.1-8b", "--context", "8192", "--batch", "4", "--new-tokens", "4096"],
    "max_batch": ["max-batch", "llama-3.1-8b", "--gpu", "H100", "--context", "8192", "--new-tokens", "2048"],
    "max_context": ["max-context", "llama-3.1-8b", "--gpu", "H100", "--new-tokens", "1024"],
}


def latency(runs: int, python: bool) -> dict:
    """Median seconds of one estimate in a warm process (llama-3.1-8b at 8192 tokens), per replay path."""
    from estimator import Workload, estimate, load_model
    from estimator.replay import runner as program

    spec = load_model("llama-3.1-8b")
    cases = {
        "batch4_16new": Workload(context=8192, batch=4, new_tokens=16),
        "batch64_16new": Workload(context=8192, batch=64, new_tokens=16),
        "batch1_1024new": Workload(context=8192, batch=1, new_tokens=1024),
        "batch4_4096new": Workload(context=8192, batch=4, new_tokens=4096),
        "batch1_4096new_static": Workload(context=8192, batch=1, new_tokens=4096, cache="static"),
    }
    paths = ["python"] if python or not program.accelerated() else ["c", "python"]
    out: dict = {}
    for path in paths:
        program.ACCELERATE = path == "c"
        for name, workload in cases.items():
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                estimate(spec, workload)
                times.append(time.perf_counter() - t0)
            out.setdefault(name, {})[path] = statistics.median(times)
    program.ACCELERATE = not python
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--points", type=int, default=3_000, help="grid points (default 3,000)")
    parser.add_argument("--full", action="store_true", help="the full grid: 100,000 points")
    parser.add_argument("--jobs", type=int, default=1, help="processes for the grid (default 1)")
    parser.add_argument("--python", action="store_true", help="the Python replay everywhere (no C allocator)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.python:
        os.environ["VRAMCAL_PYTHON_REPLAY"] = "1"  # the CLI runs below, and this process
    from estimator.replay import runner as program

    program.ACCELERATE = not args.python

    vramcal = shutil.which("vramcal")
    cli = [vramcal] if vramcal else [sys.executable, "-m", "vramcal"]
    result: dict = {"accelerated": program.accelerated(),
                    "python_startup_s": time_command([sys.executable, "-c", "pass"], args.runs)}
    try:
        result["import_torch_s"] = time_command([sys.executable, "-c", "import torch"], args.runs)
    except subprocess.CalledProcessError:
        result["import_torch_s"] = None
    result["cli_s"] = {name: time_command(cli + argv, args.runs) for name, argv in CLI.items()}
    torch_s = result["import_torch_s"]
    result["cli_over_import_torch"] = {k: v / torch_s for k, v in result["cli_s"].items()} if torch_s else None
    result["latency_s"] = latency(args.runs, args.python)
    result["grid"] = grid_throughput(100_000 if args.full else args.points, args.jobs)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"replay: {'C allocator (estimator/_replay.c)' if result['accelerated'] else 'Python'}")
    print(f"python startup                {result['python_startup_s'] * 1000:8.0f} ms")
    if torch_s:
        print(f"python -c 'import torch'      {torch_s * 1000:8.0f} ms")
    for name, seconds in result["cli_s"].items():
        ratio = f"   {seconds / torch_s:.2f}x import torch" if torch_s else ""
        print(f"vramcal {name:21} {seconds * 1000:8.0f} ms{ratio}")
    for name, paths in result["latency_s"].items():
        cells = "   ".join(f"{path} {seconds * 1000:8.1f} ms" for path, seconds in paths.items())
        speedup = f"   ({paths['python'] / paths['c']:.0f}x)" if "c" in paths else ""
        print(f"llama-3.1-8b {name:22} {cells}{speedup}")
    g = result["grid"]
    print(f"grid: {g['points']:,} estimates over {g['models']} models in {g['seconds']:.1f} s "
          f"({g['per_second']:,.0f}/s, {g['per_estimate_ms']:.2f} ms each, {g['jobs']} process(es))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
