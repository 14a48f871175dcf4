"""Records -> one pandas DataFrame: the record's fields as columns, plus the estimator's exact terms.

Columns are the record's own field names (as ``pandas.read_json(path, lines=True)`` would give, without
``config``), so a residual is a plain column subtraction::

    df = load_frame(["results/reference/h100-transformers-5.17.jsonl"])
    df["pred_total_bytes"] - df["peak_nvml_bytes"]

Added columns: ``source`` (file), ``gpu`` (canonical name), ``context`` (prompt + new tokens),
``est_weights_bytes`` / ``buffers_bytes`` (the estimator's exact weights and buffers), ``kv_final_bytes``,
``spec_layers``/``spec_hidden`` (for the seed formula), and one ``f:<name>`` column per feature of
``estimator.terms.features``. Features come from each record's own ``config`` (the full resolved config
the harness stores), not from the catalogue, so a record stands on its own.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from estimator.errors import UserError

FEATURE_PREFIX = "f:"
# Record fields kept as columns (``config`` is turned into features instead).
DROP_FIELDS = ("config",)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sources(paths) -> tuple[list[dict], list[dict]]:
    """Records of every file (validated by ``estimator.records.read_records``) and one source entry per
    file: ``{"path", "sha256", "records"}``. Each record gets a ``_source`` key (its file)."""
    from estimator.records import read_records

    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise UserError("no record files given")
    records, sources = [], []
    for path in paths:
        recs = read_records([path])
        for r in recs:
            r["_source"] = str(path)
        records += recs
        sources.append({"path": str(path), "sha256": sha256(path), "records": len(recs)})
    return records, sources


def record_terms(record: dict) -> dict:
    """The estimator's exact terms for one record: weights, buffers and features (bytes)."""
    from estimator.families import spec_from_config
    from estimator.quant import buffer_bytes, weights_bytes
    from estimator.terms import Workload, features

    spec = spec_from_config(record["config"], record["model"])
    workload = Workload.from_record(record)
    out = {
        "est_weights_bytes": weights_bytes(spec, workload.dtype, workload.quant),
        "buffers_bytes": buffer_bytes(spec),
        "spec_layers": spec.num_layers,
        "spec_hidden": spec.hidden_size,
        "context": workload.context,
    }
    out.update({FEATURE_PREFIX + k: v for k, v in features(spec, workload).items()})
    return out


def frame(records: list[dict], progress: bool = False):
    """DataFrame of ``records`` with the estimator's terms. Records whose config the estimator cannot
    read get ``terms_error`` set (and no features)."""
    import pandas as pd

    from estimator.gpus import canonical_gpu_name
    from estimator.records import case_key

    rows = []
    iterator = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc="terms", unit="record", leave=False)
    for r in iterator:
        row = {k: v for k, v in r.items() if k not in DROP_FIELDS}
        row["source"] = row.pop("_source", None)
        row["gpu"] = canonical_gpu_name(r.get("gpu_name"))
        row["terms_error"] = None
        try:
            row["case_key"] = case_key(r)
        except UserError:
            row["case_key"] = None
        try:
            row.update(record_terms(r))
        except UserError as exc:
            row["terms_error"] = str(exc)
        rows.append(row)
    df = pd.DataFrame.from_records(rows)
    for col in feature_columns(df):
        df[col] = df[col].fillna(0)
    return df


def load_frame(paths, progress: bool = False):
    """``frame(read_sources(paths)[0])``."""
    records, _ = read_sources(paths)
    return frame(records, progress=progress)


def feature_columns(df) -> list[str]:
    return [c for c in df.columns if str(c).startswith(FEATURE_PREFIX)]


def features_of(row) -> dict[str, float]:
    """The feature dict of one DataFrame row, as ``predict_parts`` takes it (absent features left out)."""
    out = {}
    for key, value in row.items():
        if str(key).startswith(FEATURE_PREFIX) and value == value:  # skip NaN
            out[key[len(FEATURE_PREFIX):]] = float(value)
    return out


def usable(df, framework: str | None = None, gpu: str | None = None, device: str = "cuda"):
    """Split ``df`` into the rows a fit can use and a count of the rest by reason.

    Left out: status oom/error (their peak is not a completed case's), records of another device than
    ``device`` (by default CPU tracker records: no NVML peak, reserve or context to fit GPU coefficients
    on), device_map records over several GPUs (their peaks are sums), another framework or GPU than asked, records whose config the estimator cannot read, records
    without the measured peak (``estimator.compare.MEASURED``). A context beyond the model's positions is
    never a reason: what was measured is scored.
    """
    import pandas as pd

    from estimator.compare import MEASURED

    reasons = pd.Series("", index=df.index, dtype=object)
    if df.empty:
        return df.copy(), {}
    status = df.get("status", pd.Series("ok", index=df.index))
    reasons[status != "ok"] = "status " + status[status != "ok"].astype(str)
    devices = df.get("device", pd.Series("cuda", index=df.index))
    reasons[(reasons == "") & (devices != device)] = "device " + devices.astype(str)
    if framework:
        reasons[(reasons == "") & (df["framework"] != framework)] = "framework " + df["framework"].astype(str)
    if gpu:
        reasons[(reasons == "") & (df["gpu"] != gpu)] = "gpu " + df["gpu"].astype(str)
    if "device_map" in df:  # several GPUs (harness/multigpu.py): top-level peaks are sums, not one GPU's
        multi = (reasons == "") & df["device_map"].notna()
        reasons[multi] = "device_map (several GPUs)"
    # LoRA adapters and assisted generation (estimator/lora.py, assisted.py): the weights and features
    # here are the base model's alone (record_terms), so a fit or a score on them would be wrong.
    for column, reason in (("lora", "LoRA adapters (not modelled in the fit)"),
                           ("assistant", "assisted generation (not modelled in the fit)"),
                           ("prompt_lookup_num_tokens", "prompt lookup decoding (not modelled in the fit)")):
        if column in df:
            used = (reasons == "") & df[column].notna() & df[column].astype(bool)
            reasons[used] = reason
    if "terms_error" in df:
        bad = (reasons == "") & df["terms_error"].notna()
        reasons[bad] = "config unreadable"
    measured = df.get(MEASURED[device])
    if measured is not None:
        reasons[(reasons == "") & measured.isna()] = f"no {MEASURED[device]}"
    if measured is not None and "case_key" in df:
        # A case measured more than once (`measure --repeat`, the same case in two files) is one case:
        # counted twice it would weigh double in the fit and in the error statistics. The highest peak
        # is kept, the one a plan has to cover.
        ok = df[(reasons == "") & df["case_key"].notna()]
        top = ok.sort_values(MEASURED[device], ascending=False, kind="stable")
        repeats = top.index[top.duplicated("case_key", keep="first")]
        reasons[repeats] = "repeat of a case (highest peak kept)"
    keep = df[reasons == ""].copy()
    left_out = reasons[reasons != ""].value_counts().to_dict()
    return keep, {str(k): int(v) for k, v in left_out.items()}
