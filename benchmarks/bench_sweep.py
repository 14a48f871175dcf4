"""Cases per minute of a CPU sweep: serial (`vramcal sweep`) against Ray (`vramcal sweep --ray`).

Run: python benchmarks/bench_sweep.py [--models 4] [--cpus N]
A sweep of tiny 2-layer Qwen2 configs (one process group per model copy; 3 contexts x 2 batches each) is
run twice from the command line into fresh record files: serially, then on a new local Ray instance with
N CPUs (default: all of this machine's). Times are wall seconds of the whole command: planning, the
meta-device check, Ray's start-up and shutdown, every worker's torch import, the measuring. Both runs
must measure the same case keys and the same peaks, else the benchmark fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 4096, "max_window_layers": 2,
        "bos_token_id": 1, "eos_token_id": 2}


def write_sweep(folder: Path, models: int) -> Path:
    config = json.loads((REPO / "configs" / "models" / "qwen2.5-0.5b.json").read_text())
    config.update(TINY)
    paths = []
    for i in range(models):
        path = folder / f"qwen-tiny-{i}.json"
        path.write_text(json.dumps(config))
        paths.append(str(path))
    sweep = folder / "bench.toml"
    sweep.write_text(f'name = "bench"\ndevice = "cpu"\nskip_over_estimate = 0\nnew_tokens = [4]\n\n'
                     f'[[matrix]]\nmodels = {json.dumps(paths)}\ncontexts = [24, 40, 56]\nbatches = [1, 2]\n')
    return sweep


def run(sweep: Path, out: Path, *extra: str, env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "vramcal", "sweep", str(sweep), "--out", str(out), *extra],
                            cwd=REPO, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"bench_sweep: {' '.join(extra) or 'serial'} sweep failed ({result.returncode}): "
                 f"{result.stderr.strip().splitlines()[-1:]}")
    return seconds


def peaks(out: Path) -> dict[str, tuple]:
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return {r["case_key"]: (r["status"], r["peak_allocated_bytes"], r["kv_cache_bytes"]) for r in records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4, help="process groups (default: 4)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    args = parser.parse_args()
    env = {**os.environ, "VRAMCAL_RAY_LOCAL_CPUS": str(args.cpus),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sweep = write_sweep(tmp, args.models)
        serial_s = run(sweep, tmp / "serial.jsonl", env=env)
        ray_s = run(sweep, tmp / "ray.jsonl", "--ray", env=env)
        serial, on_ray = peaks(tmp / "serial.jsonl"), peaks(tmp / "ray.jsonl")
        if serial != on_ray:
            sys.exit("bench_sweep: the Ray sweep measured other cases or other peaks than the serial sweep")
    cases = len(serial)
    print(f"{cases} cases, {args.models} process groups, {os.cpu_count()} CPUs on this machine")
    print(f"serial:                 {serial_s:6.1f} s  {60 * cases / serial_s:6.1f} cases/min")
    print(f"ray (local, {args.cpus} CPUs):   {ray_s:6.1f} s  {60 * cases / ray_s:6.1f} cases/min")
    print("same case keys and peaks: yes")


if __name__ == "__main__":
    main()
