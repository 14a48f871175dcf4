"""`vramcal calibrate` and `vramcal validate`. Light at import time: pandas/scipy/matplotlib load in the
handlers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    c = subparsers.add_parser(
        "calibrate",
        help="fit the estimator's coefficients to measured records (scipy) and write a coefficients file",
        description="Fit the non-exact coefficients of the estimator on the records of one framework and GPU "
                    "(bounded robust least squares against peak_nvml_bytes, using peak_allocated/reserved_bytes "
                    "for the allocator's terms). Records with status oom/error are left out and counted. The file "
                    "holds provenance: sources with sha256, record counts, library versions, residuals, the "
                    "prediction interval and leave-one-model-out figures.",
    )
    c.add_argument("records", nargs="+", metavar="RESULTS.jsonl", help="vramcal.record/1 files")
    c.add_argument("--framework", default="transformers", help="framework whose records to fit (default: transformers)")
    c.add_argument("--gpu", default=None, metavar="NAME",
                   help="GPU whose records to fit, e.g. H100 (default: the records' GPU when there is only one)")
    c.add_argument("--alloc-conf", default=None, metavar="STR",
                   help="PYTORCH_CUDA_ALLOC_CONF whose records to fit ('' for torch's defaults; default: the "
                        "records' setting when there is only one); the file states it")
    c.add_argument("--out", required=True, metavar="FILE.json", help="coefficients file to write, e.g. "
                                                                      "results/coefficients/transformers-h100.json")
    c.add_argument("--no-cv", action="store_true", help="skip the leave-one-model-out figures (faster)")
    c.set_defaults(func=_calibrate)

    v = subparsers.add_parser(
        "validate",
        help="compare the estimator's predictions with measured records (summary, subgroups, report)",
        description="Predict every record's peak with the coefficients of its framework and GPU (or --coefficients) "
                    "and compare with peak_nvml_bytes. Errors are fractions: (predicted - measured) / measured.",
    )
    v.add_argument("records", nargs="+", metavar="RESULTS.jsonl", help="vramcal.record/1 files")
    v.add_argument("--coefficients", default=None, metavar="FILE",
                   help="coefficients file for every record (default: results/coefficients by framework and GPU)")
    v.add_argument("--report", default=None, metavar="DIR", help="write report.md, report.html and figures to DIR "
                                                                 "(includes leave-one-model-out)")
    v.add_argument("--json", action="store_true", help="print one JSON object: summary, subgroups, rows")
    v.add_argument("--cv", action="store_true", help="also refit leave-one-model-out and report those errors")
    v.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: GPU records against the estimate's total (default); cpu: CPU tracker records "
                        "(live tensor bytes) against the estimate's allocated peak without the cuBLAS workspace")
    v.set_defaults(func=_validate)


# ---------------------------------------------------------------------------------------------------


def _one_alloc_conf(data, left_out: dict, wanted):
    """The records of one allocator setting (``wanted``, else the only one there is): coefficients are fitted,
    and say they were, under one ``PYTORCH_CUDA_ALLOC_CONF`` (``Coefficients.alloc_conf``). Others are left
    out and counted."""
    from estimator.alloc_conf import describe, parse_alloc_conf
    from estimator.errors import UserError

    if data.empty:
        return data, left_out, "" if wanted is None else wanted.text
    confs = (data["alloc_conf"] if "alloc_conf" in data else data["model"].map(lambda _: "")).fillna("")
    settings = confs.map(lambda t: parse_alloc_conf(t).memory_settings())
    if wanted is None:
        distinct = sorted({describe(parse_alloc_conf(t)) for t in confs})
        if len(set(settings)) > 1:
            raise UserError(f"records under several allocator settings ({', '.join(distinct)}): choose one with "
                            "--alloc-conf ('' for torch's defaults)")
        wanted = parse_alloc_conf(confs.iloc[0])
    keep = settings == wanted.memory_settings()
    left_out = dict(left_out)
    for text, n in confs[~keep].map(lambda t: describe(parse_alloc_conf(t))).value_counts().items():
        left_out[f"alloc_conf {text}"] = int(n)
    return data[keep], left_out, "" if wanted.is_default else wanted.text


def _require(report: bool = False) -> None:
    """The calibration extra's modules, checked before any work: a missing one is one line naming the extra."""
    from estimator.errors import require_extra

    for module in ("pandas", "numpy", "scipy", "jsonschema", "tqdm") + (("matplotlib",) if report else ()):
        require_extra(module, "calibration")


def _load(paths):
    _require()
    from calibration.data import frame, read_sources

    records, sources = read_sources(paths)
    return frame(records, progress=len(records) > 200), sources


def _versions(df) -> dict:
    import numpy
    import pandas
    import scipy

    from vramcal import __version__

    def values(col):
        return sorted({str(v) for v in df[col].dropna()}) if col in df else []

    return {"framework_version": values("framework_version"), "torch_version": values("torch_version"),
            "fit": {"vramcal": __version__, "scipy": scipy.__version__, "numpy": numpy.__version__,
                    "pandas": pandas.__version__}}


def _rounded(d: dict, digits: int = 6) -> dict:
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in d.items()}


CPU_HINT = ("CPU records measure live tensor bytes, with no NVML peak, reserve or CUDA context to fit GPU "
            "coefficients on; score them with `vramcal validate --device cpu`")


def _cpu_left_out(left_out: dict) -> int:
    return int(left_out.get("device cpu", 0))


def _calibrate(args: argparse.Namespace) -> int:
    import datetime as dt

    from estimator.errors import UserError
    from estimator.gpus import find_gpu
    from estimator.paths import check_output_file

    out = check_output_file(args.out, "--out")  # before the fit, which a bad path would throw away
    if args.framework == "vllm":  # vLLM start-up records: calibration/vllm_fit.py
        from calibration.vllm_fit import calibrate_cli

        return calibrate_cli(args)
    gpu = find_gpu(args.gpu).name if args.gpu else None
    from estimator.alloc_conf import parse_alloc_conf

    wanted = None if args.alloc_conf is None else parse_alloc_conf(args.alloc_conf)  # checked before any work
    _require()
    from calibration.data import usable
    from calibration.fit import SeedFormula, StructuredModel
    from calibration.validate import lomo, meets_goal, summary

    df, sources = _load(args.records)
    if gpu is None:
        gpus = sorted({g for g in df.loc[(df.get("device") == "cuda") & (df["framework"] == args.framework), "gpu"]
                       .dropna()})
        if len(gpus) > 1:
            raise UserError(f"records of several GPUs ({', '.join(gpus)}): choose one with --gpu")
        gpu = gpus[0] if gpus else None
    data, left_out = usable(df, args.framework, gpu)
    data, left_out, alloc_conf = _one_alloc_conf(data, left_out, wanted)
    if data.empty:
        if _cpu_left_out(left_out):
            raise UserError(f"no GPU records to fit in {', '.join(args.records)}: {_cpu_left_out(left_out)} "
                            f"CPU record(s) left out; {CPU_HINT}")
        raise UserError(f"no usable {args.framework} records on {gpu or 'a GPU'} in {', '.join(args.records)} "
                        f"(left out: {left_out or 'none'})")
    model = StructuredModel().fit(data)
    seed = SeedFormula().fit(data)
    residuals = {"in_sample": _rounded(summary(model.residuals_)),
                 "seed_formula_in_sample": _rounded(summary(seed.residuals_))}
    figures = {}
    if not args.no_cv and data["model"].nunique() >= 2:
        lo, _ = lomo(data, StructuredModel, desc="leave-one-model-out")
        s = summary(lo["lomo_error"], lo["lomo_low_bytes"], lo["lomo_high_bytes"], data["peak_nvml_bytes"])
        figures = {"summary": _rounded(s), "goal_met": meets_goal(s),
                   "by_model": {m: _rounded(summary(lo.loc[g.index, "lomo_error"], lo.loc[g.index, "lomo_low_bytes"],
                                                    lo.loc[g.index, "lomo_high_bytes"], g["peak_nvml_bytes"]))
                                for m, g in data.groupby("model")}}
        slo, _ = lomo(data, SeedFormula, desc="seed formula, leave-one-model-out")
        figures["seed_formula"] = _rounded(summary(slo["lomo_error"]))
        residuals["leave_one_model_out"] = figures["summary"]
    framework_gpu = f"{args.framework} on {gpu}" + (f" under {alloc_conf}" if alloc_conf else "")
    provenance = {
        "description": f"fitted by `vramcal calibrate` on {len(data)} {framework_gpu} records",
        "sources": sources,
        "records": {"total": int(len(df)), "used": int(len(data)), "left_out": left_out,
                    "models": sorted(data["model"].unique().tolist())},
        "versions": _versions(data),
        "gpu": gpu,
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "fit": {"method": "scipy.optimize.least_squares (trf, bounded), loss soft_l1, f_scale 0.02; residuals "
                          "relative to peak_nvml_bytes at the allocated, reserved and NVML levels",
                "fitted": model.fitted_, "not_identified": model.not_identified_, "cost": model.cost_,
                "success": model.success_},
        "residuals": residuals,
        "leave_one_model_out": figures,
        "seed_formula": {"coefficients": _rounded(seed.coef_), "guesses": SeedFormula.GUESSES,
                         "in_sample": residuals["seed_formula_in_sample"],
                         "leave_one_model_out": figures.get("seed_formula")},
    }
    coef = model.coefficients(framework=args.framework, gpu=gpu, source=str(args.out), provenance=provenance,
                              alloc_conf=alloc_conf)
    data_out = coef.to_json()
    data_out["interval"] = _rounded(interval_entry(model.interval_, figures.get("summary")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data_out, indent=2) + "\n")
    ins = residuals["in_sample"]
    print(f"wrote {out}: {len(data)} records ({framework_gpu}), left out {left_out or 'none'}")
    if _cpu_left_out(left_out):
        print(f"  {CPU_HINT}")
    for name in model.fitted_:
        value = model.coef_[name]
        shown = f"{value / 2**20:.1f} MiB" if name.endswith("_bytes") else f"{value:.4f}"
        print(f"  {name:22s} {shown}")
    print(f"  not identified (kept at defaults): {', '.join(model.not_identified_) or 'none'}")
    print(f"  in-sample: median |error| {100 * ins['median_abs_error']:.2f}%, p90 {100 * ins['p90_abs_error']:.2f}%, "
          f"worst under {100 * ins['worst_underestimate']:.2f}%")
    if figures:
        s = figures["summary"]
        print(f"  leave-one-model-out: median |error| {100 * s['median_abs_error']:.2f}%, p90 "
              f"{100 * s['p90_abs_error']:.2f}%, worst under {100 * s['worst_underestimate']:.2f}%, coverage "
              f"{100 * s['interval_coverage']:.1f}%")
    print(f"  interval: {100 * model.interval_['low']:+.2f}% .. {100 * model.interval_['high']:+.2f}% "
          f"({model.interval_.get('from')} residuals)")
    return 0


def interval_entry(interval: dict, lomo_summary: dict | None) -> dict:
    """The interval as the coefficients file states it. ``coverage`` is the held-out figure: the fraction
    of records inside the interval when each model is predicted, point and interval, by a fit without it
    (``leave_one_model_out.summary.interval_coverage``, the figure the README quotes); None without the
    leave-one-model-out figures (--no-cv, one model). ``StructuredModel.interval_["coverage"]`` is the
    fraction of the residuals the interval was cut from that fall inside it: at least the target by
    construction (the conformal rank), so it says nothing about a model the fit has not seen."""
    entry = {k: v for k, v in interval.items() if k != "coverage"}
    held_out = (lomo_summary or {}).get("interval_coverage")
    return {"low": entry.pop("low"), "high": entry.pop("high"), "coverage": held_out, **entry}


# ---------------------------------------------------------------------------------------------------


def validation(paths, coefficients: str | None = None, cv: bool = False, progress: bool = True,
               device: str = "cuda"):
    """(result dict, rows frame) of ``vramcal validate``; the rows frame feeds the report's figures.

    ``device="cpu"`` scores CPU tracker records instead (``cpu_validation``)."""
    _require()
    import pandas as pd

    from calibration.data import usable
    from calibration.fit import SeedFormula, StructuredModel, WeightsTimes
    from calibration.validate import lomo, meets_goal, predict_with, rows_frame, summarize, summary
    from estimator.coefficients import load_coefficients, select_coefficients
    from estimator.errors import UserError

    fixed = load_coefficients(coefficients) if coefficients else None

    def coefficients_for(row):
        return fixed or select_coefficients(row["framework"], row["gpu"])

    df, sources = _load(paths)
    if device == "cpu":
        return cpu_validation(df, sources, coefficients_for, paths)
    data, left_out = usable(df)
    if data.empty:
        if _cpu_left_out(left_out):
            raise UserError(f"no GPU records in {', '.join(map(str, paths))}: {_cpu_left_out(left_out)} CPU "
                            "record(s), which validate scores with --device cpu (live tensor bytes against the "
                            "estimate's allocated peak)")
        raise UserError(f"no usable records in {', '.join(map(str, paths))} (left out: {left_out or 'none'})")

    total, low, high, parts = predict_with(coefficients_for, data)
    rows = rows_frame(data, total, low, high)
    rows["coefficients"] = parts["coefficients"]
    rows["pred_allocated_bytes"] = parts["allocated"]
    rows["pred_reserved_bytes"] = parts["reserved"]
    rows["weights_bytes_pred"] = data["est_weights_bytes"]
    rows["kv_bytes_pred"] = data.get("f:kv_final_bytes", 0)
    rows["overhead_bytes_pred"] = parts["overhead"]
    rows["activation_bytes_pred"] = (rows["pred_total_bytes"] - rows["weights_bytes_pred"] - rows["kv_bytes_pred"]
                                     - rows["overhead_bytes_pred"])
    rows["times12_total_bytes"] = WeightsTimes().predict(data)
    result = summarize(rows)
    result.update({"left_out": left_out, "sources": sources,
                   "coefficients_used": sorted({_relative(c) for c in rows["coefficients"]})})
    if cv:
        frames, seeds, in_seed = [], [], []
        for _, group in data.groupby(["framework", "gpu"], dropna=False):
            if group["model"].nunique() < 2:
                continue
            lo, _ = lomo(group, StructuredModel, progress=progress)
            slo, _ = lomo(group, SeedFormula, progress=progress, desc="seed formula, leave-one-model-out")
            lo["seed_lomo_total_bytes"] = slo["lomo_total_bytes"]
            frames.append(lo)
            seed = SeedFormula().fit(group)
            in_seed.append(pd.Series(seed.predict(group), index=group.index))
            seeds.append(seed.coef_)
        if frames:
            lo = pd.concat(frames)
            rows = rows.join(lo)
            rows["seed_total_bytes"] = pd.concat(in_seed)
            cv_rows = rows.dropna(subset=["lomo_total_bytes"]).copy()
            cv_rows["error"] = cv_rows["lomo_error"]
            cv_rows["low_bytes"], cv_rows["high_bytes"] = cv_rows["lomo_low_bytes"], cv_rows["lomo_high_bytes"]
            lomo_result = summarize(cv_rows)
            m = cv_rows["peak_nvml_bytes"]
            lomo_result["goal"] = meets_goal(lomo_result["summary"])
            lomo_result["baselines"] = {
                "seed formula, fitted in-sample": summary((cv_rows["seed_total_bytes"] - m) / m),
                "seed formula, leave-one-model-out": summary((cv_rows["seed_lomo_total_bytes"] - m) / m),
                "seed formula, published guesses": summary((SeedFormula.formula(data.loc[cv_rows.index],
                                                                                SeedFormula.GUESSES) - m) / m),
                "weights x 1.2": summary((cv_rows["times12_total_bytes"] - m) / m),
            }
            lomo_result["seed_coefficients"] = seeds[0] if len(seeds) == 1 else None
            result["lomo"] = lomo_result
    return result, rows


def cpu_validation(df, sources, coefficients_for, paths):
    """CPU tracker records scored against the estimate of what the tracker measures (``estimator.compare``):
    ``peak_allocated_bytes`` against the estimate's allocated peak less ``workspace_bytes``. No interval
    (it is a GPU's NVML figure) and no leave-one-model-out (nothing is fitted on CPU records)."""
    from calibration.data import usable
    from calibration.validate import predict_with, rows_frame, summarize
    from estimator.compare import MEASURED, cpu_allocated_bytes
    from estimator.errors import UserError

    data, left_out = usable(df, device="cpu")
    if data.empty:
        raise UserError(f"no usable CPU records in {', '.join(map(str, paths))} (left out: {left_out or 'none'})")
    _, _, _, parts = predict_with(coefficients_for, data)
    workspace = [coefficients_for(row).for_attn(row.get("attn_implementation")).get("workspace_bytes", 0.0)
                 for _, row in data.iterrows()]
    predicted = [cpu_allocated_bytes(a, {"workspace_bytes": w}) for a, w in zip(parts["allocated"], workspace)]
    rows = rows_frame(data, predicted, measured=MEASURED["cpu"], column="pred_cpu_allocated_bytes")
    rows["coefficients"] = parts["coefficients"]
    result = summarize(rows)
    result.update({"device": "cpu", "measured": MEASURED["cpu"], "left_out": left_out, "sources": sources,
                   "coefficients_used": sorted({_relative(c) for c in rows["coefficients"]})})
    return result, rows


def _relative(path: str) -> str:
    """A path relative to the working directory when it lies below it (reports stay portable)."""
    import os

    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


ROW_FIELDS = ("model", "workload", "attn_implementation", "dtype", "batch_size", "prompt_tokens", "new_tokens",
              "context", "peak_allocated_bytes", "peak_reserved_bytes", "peak_nvml_bytes", "pred_total_bytes",
              "pred_allocated_bytes", "pred_reserved_bytes", "low_bytes", "high_bytes", "covered", "error",
              "coefficients", "lomo_total_bytes", "lomo_error", "lomo_low_bytes", "lomo_high_bytes",
              "pred_cpu_allocated_bytes")


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def _validate(args: argparse.Namespace) -> int:
    from estimator.errors import UserError
    from estimator.paths import check_output_dir
    from calibration.vllm_fit import only_vllm_records, validate_cli

    if only_vllm_records(args.records):  # vLLM start-up records: the start-up model's check
        return validate_cli(args)

    if args.device == "cpu" and (args.cv or args.report):
        raise UserError("--cv and --report score GPU records (NVML peaks, the fitted interval); with --device "
                        "cpu, validate prints the summary (or --json)")
    if args.report:
        check_output_dir(args.report, "--report")  # before the work, which a bad path would throw away
    _require(report=bool(args.report))
    result, rows = validation(args.records, args.coefficients, cv=args.cv or bool(args.report),
                              progress=not args.json, device=args.device)
    if args.report:
        from calibration.report import write_report

        written = write_report(Path(args.report), result, rows)
        if not args.json:
            print(f"wrote {', '.join(str(p) for p in written)}")
    if args.json:
        result = dict(result)
        result["rows"] = [{k: _jsonable(r[k]) for k in ROW_FIELDS if k in r} for _, r in rows.iterrows()]
        json.dump(result, sys.stdout, indent=1, default=_jsonable)
        print()
        return 0
    _print_summary(result)
    return 0


def _print_summary(result: dict) -> None:
    def line(name, s):
        cov = s.get("interval_coverage")
        print(f"  {name:40s} n={s['n']:4d}  median |err| {100 * s['median_abs_error']:5.2f}%  p90 "
              f"{100 * s['p90_abs_error']:5.2f}%  worst under {100 * s['worst_underestimate']:+6.2f}%  coverage "
              + (f"{100 * cov:5.1f}%" if cov is not None else "  n/a"))

    if result.get("device") == "cpu":
        print("CPU records: peak_allocated_bytes (live tensor bytes) against the estimate's allocated peak "
              "without the cuBLAS workspace")
    print(f"coefficients: {', '.join(result['coefficients_used'])}")
    if result["left_out"]:
        print(f"left out: {result['left_out']}")
    if result.get("device") != "cpu" and _cpu_left_out(result["left_out"]):
        print("  the CPU records: score them with `vramcal validate --device cpu`")
    line("all records", result["summary"])
    for name, groups in result["subgroups"].items():
        for key, s in groups.items():
            line(f"{name}={key}", s)
    if "lomo" in result:
        print("leave-one-model-out (refit without each model):")
        line("all records", result["lomo"]["summary"])
        for name, s in result["lomo"]["baselines"].items():
            line(name, s)
        for name, groups in result["lomo"]["subgroups"].items():
            for key, s in groups.items():
                line(f"{name}={key}", s)
