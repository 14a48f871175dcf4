"""How long `vramcal trace` takes: an 8B model at 16k context, and a 70B model at 32k.

Run: python benchmarks/bench_trace.py [--repeat N] [--skip-70b]
Prints wall seconds per case (median of N) with the traced peak. Target: the 8B at 16k well under 30 s
on a 2-core machine. Fake tensors allocate nothing, so the time is the Python/dispatch cost of every
op of the prefill and the 15 decode steps (about 60k aten ops for the 8B), not the model size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
CASES = [
    ("llama-3.1-8b", dict(context=16384, batch=1, new_tokens=16)),
    ("llama-3.1-70b", dict(context=32768, batch=1, new_tokens=16)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-70b", action="store_true")
    args = parser.parse_args()

    import torch  # noqa: F401  (imported once, outside the timings)

    from harness.trace import trace

    for name, workload in CASES:
        if args.skip_70b and "70b" in name:
            continue
        config = json.loads((CONFIGS / f"{name}.json").read_text())
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            result = trace(config, dtype="bfloat16", attn="sdpa", cache="dynamic", workload="generate", **workload)
            times.append(time.perf_counter() - started)
        print(f"{name:14s} generate ctx {workload['context']:>6,} batch {workload['batch']}: "
              f"{statistics.median(times):6.2f} s (median of {args.repeat}, min {min(times):.2f} s)  "
              f"peak {result.peak_allocated_bytes / 2**30:.2f} GiB in {result.peak_phase}", flush=True)


if __name__ == "__main__":
    main()
