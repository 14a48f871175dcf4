"""Fit and check the vLLM start-up terms on `vllm_startup` records (from vLLM's own logs).

Fitted (estimator/vllm.py names): ``act_token_factor`` and ``act_logits_factor`` (non-negative least
squares of the logged activation peak on the exact feature sizes), ``non_torch_bytes`` /
``non_torch_tp_bytes`` (medians of the logged non-torch memory at TP 1 / TP > 1) and
``cuda_graph_bytes_per_layer_graph`` (median of logged graph pools per layer per capture size). A term with
no data keeps its first-principles default and is listed as uncalibrated.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import statistics
from pathlib import Path

from estimator.errors import UserError

GIB = 2**30
# Published model ids -> catalogue names with the same architecture (the reference rows name HF repos).
CATALOGUE = {"meta-llama/Meta-Llama-3-8B": "llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
             "deepseek-ai/DeepSeek-R1-0528-Qwen3-8B": "qwen3-8b", "openai/gpt-oss-20b": "gpt-oss-20b",
             "meta-llama/Meta-Llama-3.1-405B-Instruct-FP8": "llama-3.1-405b",
             "8B FP16 model (14.9888 GB => Llama-3.1-8B class)": "llama-3.1-8b"}


def vllm_records(records) -> list[dict]:
    return [r for r in records if r.get("kind") == "vllm_startup"]


def _spec(model: str):
    from estimator.catalogue import load_model

    return load_model(CATALOGUE.get(model, model))


def profile_settings(rec: dict, spec):
    """The settings vLLM ran the profile with: the log's, else the engine's defaults. V0 without chunked
    prefill profiles max(max_model_len, 2048) tokens (512 with chunked prefill above 32k); V1 profiles
    max_num_batched_tokens (2048, or 8192 on >= 70 GiB GPUs other than the A100)."""
    from estimator.vllm import VllmSettings, default_batch_limits

    v = rec["vllm"]
    total = rec.get("gpu_memory_bytes") or v.get("total_gpu_bytes") or 80 * GIB
    max_len = v.get("max_model_len") or spec.max_position_embeddings
    mnbt, seqs = v.get("max_num_batched_tokens"), v.get("max_num_seqs")
    if v["engine"] == "v0":
        seqs = seqs or 256
        mnbt = mnbt or (max(max_len, 2048) if max_len <= 32768 else 512)
    else:
        d_mnbt, d_seqs = default_batch_limits(total, rec.get("gpu_name"))
        mnbt, seqs = mnbt or d_mnbt, seqs or d_seqs
    return VllmSettings(gpu_memory_utilization=v.get("gpu_memory_utilization") or 0.9, max_model_len=max_len,
                        max_num_seqs=seqs, max_num_batched_tokens=max(mnbt, min(seqs, mnbt)),
                        tensor_parallel_size=v.get("tensor_parallel_size") or 1,
                        kv_cache_dtype=v.get("kv_cache_dtype") or "auto", enforce_eager=bool(v.get("enforce_eager")),
                        block_size=v.get("block_size"))


class VllmFit:
    """fit(records) -> self; ``coef_`` the fitted values, ``calibrated_terms_``, ``residuals_``."""

    def fit(self, records) -> "VllmFit":
        import numpy as np
        from scipy.optimize import nnls

        from estimator.vllm import COEFFICIENTS, activation_features, cudagraph_capture_sizes

        recs = vllm_records(records)
        if not recs:
            raise UserError("no vllm_startup records to fit (make them with `vramcal import-vllm-log`)")
        coef = {k: v[0] for k, v in COEFFICIENTS.items()}
        rows, ys, used = [], [], []
        nt1, ntp, graphs = [], [], []
        for r in recs:
            v = r["vllm"]
            try:
                spec = _spec(r["model"])
            except UserError:
                continue
            s = profile_settings(r, spec)
            if v.get("activation_peak_bytes") is not None:
                f = activation_features(spec, r["dtype"], r.get("quantization"), s.tensor_parallel_size,
                                        s.max_num_batched_tokens, s.max_num_seqs)
                rows.append([f["act_token_bytes"], f["act_logits_bytes"]])
                ys.append(v["activation_peak_bytes"])
                used.append(r.get("source", r["model"]))
            if v.get("non_torch_bytes") is not None:
                (ntp if s.tensor_parallel_size > 1 else nt1).append(v["non_torch_bytes"])
            if v.get("cuda_graph_bytes"):
                n = len(cudagraph_capture_sizes(s.max_num_seqs, s.max_num_batched_tokens))
                graphs.append(v["cuda_graph_bytes"] / (spec.num_layers * n))
        terms = []
        if len(ys) >= 2:
            A, y = np.array(rows, float), np.array(ys, float)
            scale = A.max(axis=0)
            scale[scale == 0] = 1
            x, _ = nnls(A / scale, y)
            coef["act_token_factor"], coef["act_logits_factor"] = float(x[0] / scale[0]), float(x[1] / scale[1])
            terms += ["act_token_factor", "act_logits_factor"]
            self.activation_residuals_ = [float(p - t) for p, t in zip(A @ (x / scale), y)]
        if nt1:
            coef["non_torch_bytes"] = float(statistics.median(nt1))
            terms.append("non_torch_bytes")
        if ntp:
            coef["non_torch_tp_bytes"] = float(statistics.median(ntp))
            terms.append("non_torch_tp_bytes")
        if graphs:
            coef["cuda_graph_bytes_per_layer_graph"] = float(statistics.median(graphs))
            terms.append("cuda_graph_bytes_per_layer_graph")
        self.coef_, self.calibrated_terms_ = coef, tuple(terms)
        self.counts_ = {"records": len(recs), "activation": len(ys), "non_torch_tp1": len(nt1),
                        "non_torch_tp": len(ntp), "cuda_graph": len(graphs)}
        return self


def check(records, coefficients=None) -> list[dict]:
    """Each record against the start-up model: logged vs predicted weights and KV pool (bytes, fraction)."""
    from estimator.vllm import VllmCoefficients, startup

    coefficients = coefficients or VllmCoefficients()
    out = []
    for r in vllm_records(records):
        v = r["vllm"]
        row = {"source": r.get("source"), "model": r["model"], "engine": v["engine"],
               "version": r["framework_version"], "gpu": r.get("gpu_name")}
        try:
            spec = _spec(r["model"])
        except UserError:
            row["note"] = "model not in the catalogue"
            out.append(row)
            continue
        total = r.get("gpu_memory_bytes") or v.get("total_gpu_bytes")
        if not total:
            row["note"] = "GPU total unknown"
            out.append(row)
            continue
        logged_len = v.get("max_model_len")
        if logged_len and spec.max_position_embeddings and logged_len > spec.max_position_embeddings:
            # the served checkpoint allowed it (e.g. a YaRN-extended fine-tune of a catalogue architecture)
            from dataclasses import replace

            spec = replace(spec, max_position_embeddings=logged_len)
        s = profile_settings(r, spec)
        try:
            quant = r.get("quantization") or spec.default_quant
            est = startup(spec, r["dtype"], quant, total, s, coefficients, r.get("gpu_name"))
        except UserError as exc:
            row["note"] = str(exc)[:90]
            out.append(row)
            continue
        row.update(weights_logged=v.get("weights_bytes"), weights_predicted=est.weights_bytes,
                   kv_logged=v.get("kv_cache_bytes"), kv_predicted=est.kv_cache_bytes)
        for k in ("weights", "kv"):
            logged = row[f"{k}_logged"]
            row[f"{k}_error"] = (row[f"{k}_predicted"] - logged) / abs(logged) if logged else None
        out.append(row)
    return out


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def calibrate_cli(args) -> int:
    """`vramcal calibrate --framework vllm RECORDS... --out results/coefficients/vllm-<gpu>.json`."""
    from estimator.records import read_records

    records = read_records(args.records)
    fit = VllmFit().fit(records)
    from estimator.vllm import VllmCoefficients

    coefficients = VllmCoefficients(values=fit.coef_, calibrated=True, calibrated_terms=fit.calibrated_terms_)
    rows = [r for r in check(records, coefficients) if r.get("kv_error") is not None]
    errs = [abs(r["kv_error"]) for r in rows]
    interval = {"low": -0.10, "high": 0.10} if len(errs) < 5 else {"low": -max(errs), "high": max(errs)}
    versions = sorted({r["framework_version"] for r in vllm_records(records)})
    gpus = sorted({str(r.get("gpu_name")) for r in vllm_records(records)})
    data = {
        "schema": "vramcal.coefficients/1", "framework": "vllm", "gpu": args.gpu or (gpus[0] if len(gpus) == 1 else "mixed"),
        "calibrated": False, "coefficients": {}, "by_attn": {}, "interval": {"low": -0.1, "high": 0.15},
        "note": "vLLM start-up terms live in 'vllm_startup' (estimator/vllm.py); the transformers keys stay empty",
        "vllm_startup": {"calibrated": True, "coefficients": fit.coef_, "calibrated_terms": list(fit.calibrated_terms_),
                         "uncalibrated_terms": [k for k in fit.coef_ if k not in fit.calibrated_terms_],
                         "interval": interval},
        "provenance": {"sources": [{"path": str(p), "sha256": _sha(p)} for p in args.records],
                       "counts": fit.counts_, "vllm_versions": versions, "gpus": gpus,
                       "date": dt.date.today().isoformat(),
                       "kv_pool_check": rows},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    print(f"fitted {', '.join(fit.calibrated_terms_) or 'nothing'} on {fit.counts_['records']} vllm_startup records "
          f"-> {args.out}")
    for k in fit.coef_:
        print(f"  {k} = {fit.coef_[k]:.6g}" + ("" if k in fit.calibrated_terms_ else "  (default, uncalibrated)"))
    return 0


def validate_cli(args) -> int:
    from estimator.records import read_records
    from estimator.vllm import load_vllm_coefficients, select_vllm_coefficients

    records = read_records(args.records)
    c = load_vllm_coefficients(args.coefficients) if getattr(args, "coefficients", None) else select_vllm_coefficients(None)
    rows = check(records, c)
    if getattr(args, "json", False):
        print(json.dumps({"coefficients": c.source, "rows": rows}, indent=2))
        return 0
    print(f"vLLM start-up check, coefficients: {c.source}")
    print(f"  {'source':<28}{'model':<34}{'engine':>6}  {'weights err':>11}  {'KV logged':>10}  {'KV pred':>10}  {'KV err':>8}")
    for r in rows:
        if "note" in r:
            print(f"  {str(r['source'])[:27]:<28}{r['model'][:33]:<34}{r['engine']:>6}  {r['note']}")
            continue
        we = f"{r['weights_error']:+.2%}" if r["weights_error"] is not None else "-"
        kl = f"{r['kv_logged'] / GIB:.2f}" if r["kv_logged"] is not None else "-"
        ke = f"{r['kv_error']:+.1%}" if r["kv_error"] is not None else "-"
        print(f"  {str(r['source'])[:27]:<28}{r['model'][:33]:<34}{r['engine']:>6}  {we:>11}  {kl:>10}  "
              f"{r['kv_predicted'] / GIB:>10.2f}  {ke:>8}")
    return 0


def only_vllm_records(paths) -> bool:
    """True when every non-blank line of the files is a vllm_startup record (a cheap look, no schema)."""
    seen = False
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        try:
                            if json.loads(line).get("kind") != "vllm_startup":
                                return False
                        except (ValueError, AttributeError):
                            return False
                        seen = True
        except OSError:
            return False
    return seen


_QUANT = {"fp8": "fp8", "mxfp4 (native)": None}


def reference_records(path) -> list[dict]:
    """The published start-up logs (results/reference/external/vllm-startup-logs.jsonl) as vllm_startup
    records: the parser reads each row's quoted log text; the row's stated settings fill what the excerpt
    lacks. Rows whose model is not in the catalogue keep their HF id (checked as 'not in the catalogue')."""
    import re

    from estimator.vllm_log import engine_of, record_from_log
    from estimator.errors import UserError as _UE
    from estimator.gpus import find_gpu

    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        gpu_text = str(row.get("gpu") or "")
        gpu = None
        m = re.match(r"(?:\d+x\s*)?([^()]+)", gpu_text)
        for candidate in ((m.group(1).strip() if m else ""), re.sub(r"[()]|implied|\d+x\s", " ", gpu_text)):
            try:
                gpu = find_gpu(candidate).name
                break
            except _UE:
                gpu = None
        stated_total = re.search(r"\(([0-9.]+)GiB\)", gpu_text)
        def num(key):
            v = row.get(key)
            return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        version = str(row.get("vllm_version") or "unknown")
        vm = re.search(r"(\d+\.\d+(?:\.\d+)?)", version)
        overrides = {"tensor_parallel_size": num("tp"), "gpu_memory_utilization": num("gpu_memory_utilization"),
                     "max_model_len": num("max_model_len"), "max_num_seqs": num("max_num_seqs"),
                     "max_num_batched_tokens": num("max_num_batched_tokens"),
                     "enforce_eager": row.get("enforce_eager")}
        if isinstance(row.get("max_model_len"), str) and re.search(r"\((\d+)\)", row["max_model_len"]):
            overrides["max_model_len"] = int(re.search(r"\((\d+)\)", row["max_model_len"]).group(1))
        if stated_total:
            overrides["total_gpu_bytes"] = int(round(float(stated_total.group(1)) * GIB))
        dtype = "float16" if str(row.get("dtype", "")).startswith("float16") else "bfloat16"
        quant = _QUANT.get(str(row.get("quantization")).lower()) if row.get("quantization") else None
        try:
            rec = record_from_log(row["quote"], CATALOGUE.get(row["model"], row["model"]), gpu,
                                  f"{row['id']} {row['source']}"[:200], vm.group(1) if vm else version, dtype, quant,
                                  overrides)
        except _UE:
            continue
        if rec["gpu_memory_bytes"] is None and overrides.get("total_gpu_bytes"):
            rec["gpu_memory_bytes"] = overrides["total_gpu_bytes"]
        if rec["vllm"]["engine"] == "v0" and vm and engine_of(vm.group(1)) == "v1" and "V0" not in version \
                and "VLLM_USE_V1=0" not in row["quote"] and "worker.py" not in row["quote"]:
            rec["vllm"]["engine"] = "v1"
        out.append(rec)
    return out
