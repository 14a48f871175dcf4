"""Accuracy of predictions against measured peaks: metrics, subgroups, leave-one-model-out.

Errors are relative to the measured NVML peak: ``error = (predicted - measured) / measured`` (a
fraction; negative = under-estimate). The summary of a set of rows:

    n, median_abs_error, p90_abs_error, worst_underestimate (the most negative error, 0 if none),
    worst_overestimate, interval_coverage (fraction of rows with low <= measured <= high)

``lomo`` refits the model without each model in turn and predicts the held-out model: the honest figure
(the README quotes it), since every model a user asks about is one the fit has not seen.
"""

from __future__ import annotations

SUBGROUPS = (("model", "model"), ("workload", "workload"), ("attention", "attn_implementation"),
             ("dtype", "dtype"))
GOAL = {"median_abs_error": 0.02, "p90_abs_error": 0.05, "worst_underestimate": -0.05, "interval_coverage": 0.90}


def summary(error, low=None, high=None, measured=None) -> dict:
    """Metrics of relative errors (fractions); coverage when low/high/measured are given."""
    import numpy as np

    e = np.asarray(error, dtype=float)
    n = int(len(e))
    if n == 0:
        return {"n": 0, "median_abs_error": None, "p90_abs_error": None, "worst_underestimate": None,
                "worst_overestimate": None, "interval_coverage": None}
    out = {
        "n": n,
        "median_abs_error": float(np.median(np.abs(e))),
        "p90_abs_error": float(np.quantile(np.abs(e), 0.9)),
        "worst_underestimate": float(min(e.min(), 0.0)),
        "worst_overestimate": float(max(e.max(), 0.0)),
        "interval_coverage": None,
    }
    if low is not None and high is not None and measured is not None:
        m = np.asarray(measured, dtype=float)
        out["interval_coverage"] = float(np.mean((np.asarray(low) <= m) & (m <= np.asarray(high))))
    return out


def meets_goal(s: dict) -> dict[str, bool]:
    """Which of issue 4's goals a summary meets."""
    out = {}
    for key, limit in GOAL.items():
        value = s.get(key)
        if value is None:
            out[key] = False
        elif key == "worst_underestimate":
            out[key] = value >= limit
        elif key == "interval_coverage":
            out[key] = value >= limit
        else:
            out[key] = value <= limit
    return out


def rows_frame(df, predicted, low=None, high=None, prefix: str = "pred", measured: str = "peak_nvml_bytes",
               column: str | None = None):
    """The per-record table: case fields, measured and predicted bytes, error, interval.

    ``predicted`` goes into ``column`` (default ``{prefix}_total_bytes``); the error is relative to the
    ``measured`` column (``peak_nvml_bytes``; ``peak_allocated_bytes`` for CPU records)."""
    import pandas as pd

    cols = ["model", "workload", "attn_implementation", "dtype", "batch_size", "prompt_tokens", "new_tokens",
            "context", "peak_allocated_bytes", "peak_reserved_bytes", "peak_nvml_bytes"]
    column = column or f"{prefix}_total_bytes"
    out = df[[c for c in cols if c in df]].copy()
    out[column] = pd.Series(predicted, index=df.index)
    out["error"] = (out[column] - out[measured]) / out[measured]
    if low is not None:
        out["low_bytes"] = pd.Series(low, index=df.index)
        out["high_bytes"] = pd.Series(high, index=df.index)
        out["covered"] = (out["low_bytes"] <= out["peak_nvml_bytes"]) & (out["peak_nvml_bytes"] <= out["high_bytes"])
    return out


def summarize(rows) -> dict:
    """``{"summary": ..., "subgroups": {name: {value: summary}}}`` of a rows frame."""
    def one(frame):
        if "low_bytes" in frame:
            return summary(frame["error"], frame["low_bytes"], frame["high_bytes"], frame["peak_nvml_bytes"])
        return summary(frame["error"])

    groups = {}
    for name, column in SUBGROUPS:
        if column in rows:
            groups[name] = {str(k): one(g) for k, g in rows.groupby(column)}
    return {"summary": one(rows), "subgroups": groups}


def predict_with(coefficients_for, df):
    """Predictions of the shipped estimator: ``coefficients_for(row)`` picks the coefficients (by
    framework and GPU, or a given file); returns (total, low, high, parts) per row."""
    import pandas as pd

    from calibration.data import features_of
    from estimator.estimate import bounds, predict_parts

    total, low, high, alloc, reserved, overhead, sources = [], [], [], [], [], [], []
    for _, row in df.iterrows():
        coef = coefficients_for(row)
        c = coef.for_attn(row.get("attn_implementation"))
        parts = predict_parts(row["est_weights_bytes"], features_of(row), c)
        buffers = row["buffers_bytes"]
        t = round(parts["total"] + buffers)
        total.append(t)
        # the shipped interval: widened where the record's allocator settings are not the coefficients'
        lo, hi = bounds(t, coef, None, row.get("alloc_conf") or "", bool(row.get("compiled")))
        low.append(lo)
        high.append(hi)
        alloc.append(parts["allocated"] + buffers)
        reserved.append(parts["reserved"] + buffers)
        overhead.append(parts["overhead"] + buffers)
        sources.append(coef.source)
    idx = df.index
    return (pd.Series(total, index=idx), pd.Series(low, index=idx), pd.Series(high, index=idx),
            pd.DataFrame({"allocated": alloc, "reserved": reserved, "overhead": overhead, "coefficients": sources},
                         index=idx))


def lomo(df, make_model, progress: bool = True, desc: str = "leave-one-model-out"):
    """Leave-one-model-out: for each model, fit ``make_model()`` on the others and predict it.

    Returns a frame with ``lomo_total_bytes``, ``lomo_low_bytes``, ``lomo_high_bytes`` (the interval
    fitted on the other models) and ``lomo_error`` per row, in ``df``'s index.
    """
    import numpy as np
    import pandas as pd

    models = sorted(df["model"].unique())
    if len(models) < 2:
        from estimator.errors import UserError

        raise UserError("leave-one-model-out needs records of at least two models")
    iterator = models
    if progress:
        from tqdm import tqdm

        iterator = tqdm(models, desc=desc, unit="model", leave=False)
    out = pd.DataFrame(index=df.index, columns=["lomo_total_bytes", "lomo_low_bytes", "lomo_high_bytes"],
                       dtype=float)
    fits = {}
    for m in iterator:
        train, test = df[df["model"] != m], df[df["model"] == m]
        model = make_model().fit(train)
        pred = np.asarray(model.predict(test), dtype=float)
        interval = getattr(model, "interval_", None) or {"low": 0.0, "high": 0.0}
        out.loc[test.index, "lomo_total_bytes"] = pred
        out.loc[test.index, "lomo_low_bytes"] = pred * (1 + interval["low"])
        out.loc[test.index, "lomo_high_bytes"] = pred * (1 + interval["high"])
        fits[m] = model
    out["lomo_error"] = (out["lomo_total_bytes"] - df["peak_nvml_bytes"]) / df["peak_nvml_bytes"]
    return out, fits


def lomo_interval(df, lomo_frame, coverage: float = 0.90) -> dict:
    """An interval from the held-out residuals (more honest than the in-sample ones)."""
    from calibration.fit import interval_from_residuals

    return interval_from_residuals(lomo_frame["lomo_error"].to_numpy(dtype=float), coverage)
