"""Fitting the estimator's non-exact coefficients to measured peaks (scipy), and the baselines.

``StructuredModel`` is the shipped estimator: predictions come from ``estimator.estimate.predict_parts``
(never a copy of its formula) over the exact terms of ``calibration.data``. ``fit`` solves one bounded
robust least-squares problem (``scipy.optimize.least_squares``, ``soft_l1`` loss) whose residuals are
relative to the measured NVML peak and stack the three measured levels:

    allocated:  (pred allocated - peak_allocated_bytes) / peak_nvml_bytes
    reserved:   (pred reserved  - peak_reserved_bytes)  / peak_nvml_bytes
    total:      (pred total     - peak_nvml_bytes)      / peak_nvml_bytes

so the allocator-level coefficients are pinned by ``torch.cuda.max_memory_*`` and ``overhead_bytes`` by
what NVML sees beyond the reserve (about the CUDA context, which the records' ``context_bytes`` shows).
Bounds come from ``estimator.coefficients.COEFFICIENTS``. A coefficient whose residuals do not move
when it does (no signal: e.g. the analytic-path factors on transformers data) keeps its default and is
reported in ``not_identified_``.

``SeedFormula`` is the classic three-factor guess and ``WeightsTimes`` the ``weights x 1.2`` rule, fitted
and scored on the same data for comparison.
"""

from __future__ import annotations

import math

from estimator.coefficients import COEFFICIENTS, DEFAULT_INTERVAL

LEVELS = (("allocated", "peak_allocated_bytes"), ("reserved", "peak_reserved_bytes"),
          ("total", "peak_nvml_bytes"))
GB = 10**9


class NotFittedError(RuntimeError):
    """``predict`` was called before ``fit``."""


def _check_fitted(model) -> None:
    if getattr(model, "coef_", None) is None:
        raise NotFittedError(f"{type(model).__name__} is not fitted yet: call fit(df) before predict(df)")


def _scale(name: str) -> float:
    """Coefficients in bytes are optimised in GiB so that every parameter is O(1)."""
    return float(2**30) if name.endswith("_bytes") else 1.0


class StructuredModel:
    """The estimator's formula with fitted coefficients (scikit-learn style).

    Parameters: ``loss`` (scipy's robust loss), ``f_scale`` (its residual scale, a fraction of the peak),
    ``interval_coverage`` (target of the prediction interval), ``interval_from`` ("lomo": the residuals
    of a leave-one-model-out refit on the training rows, what a new model will see; "fit": the
    in-sample residuals; "lomo" falls back to "fit" with fewer than three models), ``by_attn`` (fit per-attention-path
    overrides of the reserve where the data show they differ), ``min_group`` (records an attention path
    needs for an override), ``base`` (starting values; default: COEFFICIENTS' defaults).

    Fitted attributes: ``coef_`` (every coefficient), ``by_attn_`` (overrides), ``fitted_`` (names
    fitted), ``not_identified_``, ``interval_`` ({low, high, coverage}), ``residuals_`` (relative errors
    of the total on the training rows), ``n_``, ``cost_``, ``success_``.
    """

    def __init__(self, loss: str = "soft_l1", f_scale: float = 0.02, interval_coverage: float = 0.90,
                 interval_from: str = "lomo", by_attn: bool = True, min_group: int = 8, base: dict | None = None):
        self.loss = loss
        self.f_scale = f_scale
        self.interval_coverage = interval_coverage
        self.interval_from = interval_from
        self.by_attn = by_attn
        self.min_group = min_group
        self.base = base
        self.coef_ = None

    # ---- prediction -----------------------------------------------------------------------------
    _rows_cache: tuple = (None, None)

    def _rows(self, df) -> list[tuple]:
        """(weights, features, buffers, attention) per row, computed once per frame."""
        from calibration.data import features_of

        key = (id(df), tuple(df.index), tuple(df["peak_nvml_bytes"]))
        if self._rows_cache[0] != key:
            rows = [(float(r["est_weights_bytes"]), features_of(r), float(r["buffers_bytes"]),
                     r.get("attn_implementation")) for _, r in df.iterrows()]
            self._rows_cache = (key, rows)
        return self._rows_cache[1]

    def _parts(self, df, values: dict, by_attn: dict | None = None) -> dict[str, list[float]]:
        from estimator.estimate import predict_parts

        out = {"allocated": [], "reserved": [], "total": [], "overhead": [], "dynamic": [], "phase": []}
        for weights, f, buffers, attn in self._rows(df):
            c = values
            overrides = (by_attn or {}).get(attn)
            if overrides:
                c = {**values, **overrides}
            parts = predict_parts(weights, f, c)
            # buffers (rotary tables...) are added to every level by estimate(), as here
            out["allocated"].append(parts["allocated"] + buffers)
            out["reserved"].append(parts["reserved"] + buffers)
            out["total"].append(parts["total"] + buffers)
            out["overhead"].append(parts["overhead"] + buffers)
            out["dynamic"].append(parts["dynamic"])
            out["phase"].append(parts["phase"])
        return out

    def predict_parts(self, df):
        """Predicted allocated/reserved/total/overhead bytes per row (a DataFrame, same index)."""
        import pandas as pd

        _check_fitted(self)
        return pd.DataFrame(self._parts(df, self.coef_, self.by_attn_), index=df.index)

    def predict(self, df):
        """Predicted peak (NVML) bytes per row, as ``estimator.estimate`` computes ``total_bytes``."""
        return self.predict_parts(df)["total"]

    def interval(self, df):
        """(low, high) bytes per row from the fitted relative interval."""
        total = self.predict(df)
        return total * (1 + self.interval_["low"]), total * (1 + self.interval_["high"])

    # ---- fitting --------------------------------------------------------------------------------
    def _residuals(self, df, values, by_attn=None):
        import numpy as np

        parts = self._parts(df, values, by_attn)
        nvml = df["peak_nvml_bytes"].to_numpy(dtype=float)
        res = []
        for level, column in LEVELS:
            measured = df[column].to_numpy(dtype=float)
            res.append((np.asarray(parts[level]) - measured) / nvml)
        return np.concatenate(res)

    def _solve(self, df, base: dict, names: list[str], by_attn=None):
        import numpy as np
        from scipy.optimize import least_squares

        scales = np.array([_scale(n) for n in names])
        lo = np.array([COEFFICIENTS[n][1] for n in names]) / scales
        hi = np.array([COEFFICIENTS[n][2] for n in names]) / scales
        x0 = np.clip(np.array([base[n] for n in names]) / scales, lo, hi)

        def fun(x):
            values = dict(base)
            values.update({n: float(v * s) for n, v, s in zip(names, x, scales)})
            return self._residuals(df, values, by_attn)

        result = least_squares(fun, x0, bounds=(lo, hi), loss=self.loss, f_scale=self.f_scale,
                               x_scale="jac", method="trf")
        values = dict(base)
        values.update({n: float(v * s) for n, v, s in zip(names, result.x, scales)})
        return values, result

    def identified(self, df, base: dict, names=None, tol: float = 1e-9) -> tuple[list[str], list[str]]:
        """Coefficients whose residuals move when they do (finite differences at ``base``), and the rest."""
        import numpy as np

        names = list(names or COEFFICIENTS)
        r0 = self._residuals(df, base)
        signal, none = [], []
        for n in names:
            lo, hi = COEFFICIENTS[n][1], COEFFICIENTS[n][2]
            step = 0.05 * (hi - lo) if hi > lo else 0.0
            trial = dict(base)
            trial[n] = base[n] + step if base[n] + step <= hi else base[n] - step
            moved = float(np.max(np.abs(self._residuals(df, trial) - r0))) if step else 0.0
            (signal if moved > tol else none).append(n)
        return signal, none

    def fit(self, df):
        """Fit on the rows of ``df`` (a ``calibration.data`` frame of usable records); returns self."""
        import numpy as np

        if len(df) == 0:
            from estimator.errors import UserError

            raise UserError("no usable records to fit (all left out: status, device, framework or GPU)")
        base = {k: v[0] for k, v in COEFFICIENTS.items()}
        base.update(self.base or {})
        fitted, not_identified = self.identified(df, base)
        values, result = self._solve(df, base, fitted) if fitted else (base, None)
        by_attn = {}
        if self.by_attn and "attn_implementation" in df:
            by_attn = self._fit_overrides(df, values, fitted)
        self.coef_ = values
        self.by_attn_ = by_attn
        self.fitted_ = fitted
        self.not_identified_ = not_identified
        self.n_ = int(len(df))
        self.cost_ = float(result.cost) if result is not None else 0.0
        self.success_ = bool(result.success) if result is not None else True
        total = np.asarray(self._parts(df, values, by_attn)["total"])
        self.residuals_ = (total - df["peak_nvml_bytes"].to_numpy(dtype=float)) / df["peak_nvml_bytes"].to_numpy(dtype=float)
        self.interval_residuals_ = self.residuals_
        if self.interval_from == "lomo" and df["model"].nunique() >= 3:
            self.interval_residuals_ = self._lomo_residuals(df)
        self.interval_ = interval_from_residuals(self.interval_residuals_, self.interval_coverage)
        self.interval_["from"] = "lomo" if self.interval_residuals_ is not self.residuals_ else "fit"
        return self

    def _lomo_residuals(self, df):
        """Relative errors of each model's rows predicted by a fit without that model."""
        import numpy as np

        out = np.empty(len(df))
        models = df["model"].to_numpy()
        for m in np.unique(models):
            inner = StructuredModel(self.loss, self.f_scale, self.interval_coverage, "fit", self.by_attn,
                                    self.min_group, self.base)
            held = models == m
            inner.fit(df[~held])
            test = df[held]
            out[held] = inner._relative(test, inner.coef_, inner.by_attn_)
        return out

    def _fit_overrides(self, df, values: dict, fitted: list[str]) -> dict:
        """Per attention path, refit the allocator-level factors when it lowers that path's median
        |error| by more than a third (and the path has ``min_group`` records from 2+ models)."""
        import numpy as np

        names = [n for n in ("sim_allocated_factor", "sim_reserve_factor", "overhead_fraction") if n in fitted]
        out = {}
        for attn, group in df.groupby("attn_implementation"):
            if len(group) < self.min_group or group["model"].nunique() < 2 or len(group) == len(df) or not names:
                continue
            before = np.median(np.abs(self._relative(group, values)))
            local, _ = self._solve(group, values, names)
            after = np.median(np.abs(self._relative(group, local)))
            if after < before * (2 / 3):
                out[str(attn)] = {n: local[n] for n in names}
        return out

    def _relative(self, df, values, by_attn=None):
        import numpy as np

        total = np.asarray(self._parts(df, values, by_attn)["total"])
        nvml = df["peak_nvml_bytes"].to_numpy(dtype=float)
        return (total - nvml) / nvml

    def coefficients(self, **provenance):
        """An ``estimator.coefficients.Coefficients`` with the fitted values (for ``estimate``)."""
        from estimator.coefficients import Coefficients

        _check_fitted(self)
        return Coefficients(values=dict(self.coef_), interval=dict(self.interval_), by_attn=self.by_attn_,
                            calibrated=True, **provenance)


def interval_from_residuals(residuals, coverage: float = 0.90) -> dict:
    """Relative interval [low, high] around the point estimate from residuals r = pred/measured - 1.

    measured lies in [pred (1 + low), pred (1 + high)] iff measured/pred - 1 lies in [low, high]; the
    bounds are the (1 - coverage)/2 and (1 + coverage)/2 quantiles of measured/pred - 1, taken at the
    conformal rank ceil((n + 1) q) so that a new case is covered with the asked probability.
    """
    import numpy as np

    r = np.asarray(residuals, dtype=float)
    r = r[np.isfinite(r)]
    if len(r) == 0:
        return dict(DEFAULT_INTERVAL)
    ratio = np.sort(1.0 / (1.0 + r) - 1.0)  # measured / pred - 1
    n = len(ratio)
    tail = (1 - coverage) / 2
    k_lo = max(int(math.floor((n + 1) * tail)) - 1, 0)
    k_hi = min(int(math.ceil((n + 1) * (1 - tail))) - 1, n - 1)
    low, high = float(min(ratio[k_lo], 0.0)), float(max(ratio[k_hi], 0.0))
    inside = float(np.mean((ratio >= low) & (ratio <= high)))
    return {"low": low, "high": high, "coverage": round(inside, 4), "target": coverage}


# -------------------------------------------------------------------------------------------------
# Baselines


class SeedFormula:
    """weights + kv_factor x 2 x layers x hidden x tokens x 2 bytes + overhead_bytes + overhead_fraction
    x weights, with tokens = context x batch. Published guesses: 0.30, 0.8 GB, 10%."""

    NAMES = ("kv_factor", "overhead_bytes", "overhead_fraction")
    GUESSES = {"kv_factor": 0.30, "overhead_bytes": 0.8 * GB, "overhead_fraction": 0.10}
    BOUNDS = {"kv_factor": (0.0, 10.0), "overhead_bytes": (0.0, 16 * GB), "overhead_fraction": (0.0, 5.0)}

    def __init__(self, loss: str = "soft_l1", f_scale: float = 0.02):
        self.loss = loss
        self.f_scale = f_scale
        self.coef_ = None

    @staticmethod
    def kv_bytes(df):
        tokens = df["context"] * df["batch_size"]
        return 2 * df["spec_layers"] * df["spec_hidden"] * tokens * 2

    @classmethod
    def formula(cls, df, c: dict):
        w = df["est_weights_bytes"]
        return w + c["kv_factor"] * cls.kv_bytes(df) + c["overhead_bytes"] + c["overhead_fraction"] * w

    def fit(self, df):
        import numpy as np
        from scipy.optimize import least_squares

        nvml = df["peak_nvml_bytes"].to_numpy(dtype=float)
        scales = np.array([GB if n == "overhead_bytes" else 1.0 for n in self.NAMES])

        def values(x):
            return {n: float(v * s) for n, v, s in zip(self.NAMES, x, scales)}

        def fun(x):
            return (self.formula(df, values(x)).to_numpy(dtype=float) - nvml) / nvml

        lo = np.array([self.BOUNDS[n][0] for n in self.NAMES]) / scales
        hi = np.array([self.BOUNDS[n][1] for n in self.NAMES]) / scales
        x0 = np.array([self.GUESSES[n] for n in self.NAMES]) / scales
        result = least_squares(fun, x0, bounds=(lo, hi), loss=self.loss, f_scale=self.f_scale)
        self.coef_ = values(result.x)
        self.residuals_ = fun(result.x)
        self.interval_ = interval_from_residuals(self.residuals_)
        return self

    def predict(self, df):
        _check_fitted(self)
        return self.formula(df, self.coef_)

    def predict_guesses(self, df):
        """The published guesses, unfitted."""
        return self.formula(df, self.GUESSES)


class WeightsTimes:
    """The ``weights x 1.2`` rule of thumb (nothing to fit)."""

    def __init__(self, factor: float = 1.2):
        self.factor = factor
        self.coef_ = {"factor": factor}

    def fit(self, df):
        return self

    def predict(self, df):
        return df["est_weights_bytes"] * self.factor
