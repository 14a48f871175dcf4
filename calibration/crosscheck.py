"""Cross-check: records measured by this harness against the H100 reference records, key by key.

    python -m calibration.crosscheck results/h200/smoke.jsonl [--reference FILE] [--tolerance 0.02]

Cases are matched on their case key without the GPU name (`estimator.records.case_key` with
``gpu_name`` left empty), so an H200's records meet the H100 reference's. Four figures per case, each a
fraction (measured - reference) / reference:

- ``nvml``: ``peak_nvml_bytes``, the process's device memory, CUDA context included;
- ``nvml-ctx``: the same less each side's ``context_bytes``: on another board, driver or torch build the
  CUDA context differs (716.8 MiB on the reference H100), the rest should not;
- ``reserved`` / ``allocated``: ``torch.cuda.max_memory_reserved/allocated()``, no context in them.

The verdict says, for each figure, how many matched cases are within the tolerance. Exit status 0 with
a verdict either way (a miss is a finding, not a failure of the command); 2 for bad input (an unreadable
records file, no case in common). Pure Python: reads records with `estimator.records`, imports no torch
or pandas.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from estimator.errors import UserError
from estimator.records import case_key, read_records

REFERENCE = Path(__file__).resolve().parent.parent / "results" / "reference" / "h100-transformers-5.17.jsonl"
MIB = 2**20
# figure -> how to read it from a record (bytes, or None when the record lacks it)
FIGURES = {
    "nvml": lambda r: r.get("peak_nvml_bytes"),
    "nvml-ctx": lambda r: (r["peak_nvml_bytes"] - r["context_bytes"]
                           if r.get("peak_nvml_bytes") is not None and r.get("context_bytes") is not None
                           else None),
    "reserved": lambda r: r.get("peak_reserved_bytes"),
    "allocated": lambda r: r.get("peak_allocated_bytes"),
}


def key_without_gpu(rec: dict) -> str:
    return case_key({**rec, "gpu_name": None})


def compare(measured: list[dict], reference: list[dict]) -> list[dict]:
    """One row per measured ok cuda record whose case the reference holds (its last record of that key):
    key, both records' figures and the fractional errors."""
    ref = {key_without_gpu(r): r for r in reference if r["status"] == "ok" and r["device"] == "cuda"}
    rows = []
    for rec in measured:
        if rec["status"] != "ok" or rec["device"] != "cuda":
            continue
        key = key_without_gpu(rec)
        if key not in ref:
            continue
        row = {"key": key, "gpu_name": rec["gpu_name"], "reference_gpu_name": ref[key]["gpu_name"], "errors": {}}
        for name, read in FIGURES.items():
            got, want = read(rec), read(ref[key])
            row[name] = (got, want)
            row["errors"][name] = (got - want) / want if got is not None and want else None
        rows.append(row)
    return rows


def report(rows: list[dict], tolerance: float, unmatched: int) -> list[str]:
    lines = [f"cross-check: {len(rows)} cases in common with the reference"
             + (f" ({unmatched} measured cases not in it)" if unmatched else "")]
    if not rows:
        return lines
    gpus = sorted({r["gpu_name"] for r in rows}), sorted({r["reference_gpu_name"] for r in rows})
    lines.append(f"measured on {', '.join(gpus[0])}; reference on {', '.join(gpus[1])}; errors are "
                 "(measured - reference) / reference")
    width = max(len(_short(r["key"])) for r in rows)
    lines.append(f"{'case':<{width}} " + " ".join(f"{name:>10}" for name in FIGURES) + "  nvml MiB (measured/ref)")
    for row in rows:
        cells = " ".join(f"{_pct(row['errors'][n]):>10}" for n in FIGURES)
        got, want = row["nvml"]
        lines.append(f"{_short(row['key']):<{width}} {cells}  {got / MIB:.0f}/{want / MIB:.0f}")
    contexts = sorted({(r["nvml"][0] - r["nvml-ctx"][0]) for r in rows if r["nvml-ctx"][0] is not None})
    if contexts:
        lines.append(f"CUDA context (context_bytes): measured {contexts[0] / MIB:.1f}-{contexts[-1] / MIB:.1f} MiB; "
                     f"reference {rows[0]['nvml'][1] / MIB - rows[0]['nvml-ctx'][1] / MIB:.1f} MiB")
    for name in FIGURES:
        errors = [r["errors"][name] for r in rows if r["errors"][name] is not None]
        if not errors:
            lines.append(f"{name:>10}: no figures")
            continue
        within = sum(abs(e) <= tolerance for e in errors)
        worst = max(errors, key=abs)
        verdict = "PASS" if within == len(errors) else "MISS"
        lines.append(f"{name:>10}: {verdict} {within}/{len(errors)} within {tolerance:.0%}; worst {worst:+.2%}, "
                     f"mean |error| {sum(map(abs, errors)) / len(errors):.2%}")
    return lines


def _short(key: str) -> str:
    """The key without the fields every cross-checked case shares (framework, device, empty GPU name)."""
    return key.replace("|transformers|cuda|-|", " ", 1)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2%}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibration.crosscheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", metavar="RESULTS.jsonl", help="records measured by this harness")
    parser.add_argument("--reference", default=str(REFERENCE), metavar="FILE",
                        help="reference records (default: results/reference/h100-transformers-5.17.jsonl)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="fraction (default 0.02: 2%%)")
    args = parser.parse_args(argv)
    try:
        if not 0 < args.tolerance < 1:
            raise UserError(f"--tolerance must be a fraction between 0 and 1, not {args.tolerance:g}")
        measured = read_records(args.records)
        reference = read_records(args.reference)
        rows = compare(measured, reference)
        if not rows:
            raise UserError(f"no ok cuda case of {', '.join(args.records)} is in {args.reference}; "
                            "measure configs/sweeps/h200-smoke.toml first")
    except UserError as exc:
        print(f"crosscheck: error: {exc}", file=sys.stderr)
        return 2
    unmatched = sum(r["status"] == "ok" and r["device"] == "cuda" for r in measured) - len(rows)
    print("\n".join(report(rows, args.tolerance, unmatched)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
