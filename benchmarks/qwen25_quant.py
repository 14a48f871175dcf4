"""The estimate's allocated peak against Qwen's published Qwen2.5 memory table (issue 11, part 3).

Rows: ``results/reference/external/qwen2.5-speed-benchmark.jsonl`` (a copy of ``../shared/reference/external``'s, from
the repository, or ``--rows``): Qwen2.5-0.5B..72B-Instruct in BF16, GPTQ-Int8, GPTQ-Int4 and AWQ, batch 1,
inputs of 1..30,720 tokens plus 2,048 generated, flash_attention_2, on A100 80GB with transformers 4.46,
AutoGPTQ 0.7.1, AutoAWQ 0.2.6. The published figure is ``torch.cuda.max_memory_allocated()`` summed over the
GPUs used, / 1024**3 (GiB, printed "GB"), so the comparison is with the estimate's ``peak_allocated_bytes``
(no CUDA context, no allocator reserve). Rows on several GPUs (72B, ``device_map="auto"``) are printed
but kept out of the summary: each GPU holds its own activations at its own peak and the published figure
sums those peaks, which a one-device estimate does not model (multi-GPU estimates: issue 14, ``--gpus``).
The published figures carry two decimals (0.97 GB): rows under 2 GiB have up to 0.5% rounding of their own.

Prints each row's error, (estimate - published) / published, and per format the median absolute error and the
worst under-estimate; the issue's target is every format's median within 2% and no row under by more than 5%.
``--json`` prints the summary as one object. Run: ``python benchmarks/qwen25_quant.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS = REPO / "results" / "reference" / "external" / "qwen2.5-speed-benchmark.jsonl"
QUANT = {"BF16": None, "GPTQ-Int8": "gptq-int8", "GPTQ-Int4": "gptq-int4", "AWQ": "awq-int4"}
GIB = 2**30


def catalogue_name(model: str) -> str:
    """"Qwen2.5-0.5B-Instruct" -> "qwen2.5-0.5b"."""
    return model.removesuffix("-Instruct").lower()


def estimate_row(row: dict) -> int:
    from estimator import Workload, estimate, load_model

    w = Workload(context=row["input_length"] + row["output_length"], new_tokens=row["output_length"],
                 batch=row["batch_size"], quant=QUANT[row["quantization"]], attn="flash_attention_2", compile="off")
    return estimate(load_model(catalogue_name(row["model"])), w).peak_allocated_bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=str(ROWS), help="the published rows (JSONL)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    by_format: dict[str, list[float]] = {}
    lines = []
    for row in rows:
        published = row["memory"] * GIB
        est = estimate_row(row)
        err = est / published - 1
        if row["num_gpus"] == 1:
            by_format.setdefault(row["quantization"], []).append(err)
        lines.append(f"{row['model']:<24}{row['quantization']:<11}{row['input_length']:>7}{row['num_gpus']:>3}"
                     f"{row['memory']:>9.2f}{est / GIB:>9.2f}{err:>+9.1%}")
    summary = {fmt: {"rows": len(e), "median_abs_error": statistics.median(abs(x) for x in e),
                     "worst_underestimate": min(e), "worst_overestimate": max(e)} for fmt, e in by_format.items()}
    met = all(s["median_abs_error"] <= 0.02 and s["worst_underestimate"] >= -0.05 for s in summary.values())
    if args.json:
        print(json.dumps({"formats": summary, "target_met": met}, indent=2))
        return 0
    print(f"{'model':<24}{'format':<11}{'input':>7}{'gpu':>3}{'pub GiB':>9}{'est GiB':>9}{'error':>9}")
    print("\n".join(lines))
    print()
    print("single-GPU rows only (multi-GPU rows above: published sums of per-GPU peaks, not modelled)")
    print(f"{'format':<11}{'rows':>5}{'median |err|':>14}{'worst under':>13}{'worst over':>12}")
    for fmt, s in summary.items():
        print(f"{fmt:<11}{s['rows']:>5}{s['median_abs_error']:>14.2%}{s['worst_underestimate']:>+13.1%}"
              f"{s['worst_overestimate']:>+12.1%}")
    print(f"target (median <= 2%, no row under -5%): {'met' if met else 'not met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
