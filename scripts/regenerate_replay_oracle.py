"""Write tests/estimator/data/program_oracle.json from the plain replay (estimator/replay/reference.py).

Run only when the modelled program itself changes (a new tensor, a new family's layout), never to make the
speed-equivalence test pass: that test holds the fast replay to these numbers.

    PYTHONPATH=. python scripts/regenerate_replay_oracle.py [--check]

``--check``: write nothing; report the cases where the plain replay and the stored oracle differ (exit 1).
The grid is ``oracle_cases()`` of tests/estimator/test_program_speed_equivalence.py (its frozen model list).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = ROOT / "tests" / "estimator" / "test_program_speed_equivalence.py"


def _grid():
    spec = importlib.util.spec_from_file_location("speed_equivalence", TEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the stored oracle, write nothing")
    args = parser.parse_args(argv)

    from estimator import Workload, load_model
    from estimator.replay.reference import simulate_reference

    grid = _grid()
    specs: dict = {}
    cases: dict[str, list[int]] = {}
    started = time.perf_counter()
    for n, (model, kwargs) in enumerate(grid.oracle_cases()):
        spec = specs.get(model) or specs.setdefault(model, load_model(model))
        result = simulate_reference(spec, Workload(**kwargs))
        cases[grid.case_key(model, kwargs)] = [result[k] for k in grid.KEYS]
        if n % 100 == 0:
            print(f"{n} cases, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.check:
        stored = json.loads(grid.ORACLE.read_text())["cases"]
        wrong = [k for k in cases if stored.get(k) != cases[k]] + [k for k in stored if k not in cases]
        for key in wrong[:20]:
            print(f"{key}: reference {cases.get(key)} != oracle {stored.get(key)}")
        print(f"{len(cases)} cases, {len(wrong)} differ, {time.perf_counter() - started:.0f} s", file=sys.stderr)
        return 1 if wrong else 0
    doc = {"about": "sim_allocated_bytes, sim_reserved_bytes, sim_peak_step of the plain replay "
                    "(estimator/replay/reference.py); see tests/estimator/test_program_speed_equivalence.py",
           "keys": list(grid.KEYS), "cases": cases}
    grid.ORACLE.parent.mkdir(exist_ok=True)
    grid.ORACLE.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{len(cases)} cases in {time.perf_counter() - started:.0f} s -> {grid.ORACLE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
