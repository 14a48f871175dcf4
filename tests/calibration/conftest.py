"""Synthetic records with known coefficients, made through the estimator's own formula.

Measured peaks are ``estimator.estimate.predict_parts`` of the record's exact terms with chosen
coefficient values (plus a little seeded noise where a test says so), so a fit must recover them.
Configs are real catalogue configs (configs/models), small ones so that the terms are fast.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "models"
REFERENCE = ROOT / "results" / "reference" / "h100-transformers-5.17.jsonl"

TRUE = {"sim_allocated_factor": 1.01, "sim_reserve_factor": 0.9, "workspace_bytes": 48 * 2**20,
        "overhead_bytes": 700 * 2**20}
MODELS = ("qwen2.5-0.5b", "llama-3.2-1b", "qwen3-0.6b", "gemma-3-1b")
CASES = [dict(workload="generate", batch_size=b, prompt_tokens=p, new_tokens=16, attn_implementation="sdpa",
              dtype="bfloat16") for b, p in ((1, 1008), (4, 1008), (1, 4080), (4, 2032))]
CASES += [dict(workload="forward", batch_size=1, prompt_tokens=2048, new_tokens=0, attn_implementation="sdpa",
               dtype="bfloat16"),
          dict(workload="generate", batch_size=2, prompt_tokens=1008, new_tokens=16, attn_implementation="eager",
               dtype="bfloat16")]


def template() -> dict:
    return {
        "schema": "vramcal.record/1", "framework": "transformers", "framework_version": "5.17.0",
        "torch_version": "2.11.0+cu130", "device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3",
        "gpu_memory_bytes": 85520809984, "alloc_conf": "", "quantization": None, "cache_implementation": "dynamic",
        "status": "ok", "error": None, "context_bytes": 751632384, "duration_s": 1.0,
    }


def make_records(models=MODELS, cases=CASES, coef=None, noise: float = 0.0, seed: int = 0) -> list[dict]:
    """Valid vramcal.record/1 dicts whose peaks follow predict_parts with ``coef`` (default TRUE)."""
    from calibration.data import features_of, record_terms
    from estimator.coefficients import COEFFICIENTS
    from estimator.estimate import predict_parts

    values = {k: v[0] for k, v in COEFFICIENTS.items()}
    values.update(coef or TRUE)
    rng = random.Random(seed)
    out = []
    for name in models:
        config = json.loads((CONFIGS / f"{name}.json").read_text())
        for case in cases:
            rec = template() | case | {"model": name, "config": config}
            if rec["workload"] == "forward":
                rec["cache_implementation"] = None
            terms = record_terms(rec)
            f = features_of({k: v for k, v in terms.items()})
            parts = predict_parts(terms["est_weights_bytes"], f, values)
            buffers = terms["buffers_bytes"]
            jitter = 1 + rng.gauss(0, noise) if noise else 1.0
            rec["weights_bytes"] = terms["est_weights_bytes"] + buffers
            rec["peak_allocated_bytes"] = int((parts["allocated"] + buffers) * jitter)
            rec["peak_reserved_bytes"] = int((parts["reserved"] + buffers) * jitter)
            rec["peak_nvml_bytes"] = int((parts["total"] + buffers) * jitter)
            out.append(rec)
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def synthetic_records():
    return make_records()


@pytest.fixture(scope="session")
def synthetic_file(tmp_path_factory, synthetic_records):
    return write_jsonl(tmp_path_factory.mktemp("records") / "synthetic.jsonl", synthetic_records)


class _Synth:
    """The helpers above, for tests (``--import-mode=importlib`` keeps conftest off sys.path)."""

    ROOT, REFERENCE, TRUE = ROOT, REFERENCE, TRUE
    make_records = staticmethod(make_records)
    write_jsonl = staticmethod(write_jsonl)
    template = staticmethod(template)


@pytest.fixture(scope="session")
def synth():
    return _Synth
