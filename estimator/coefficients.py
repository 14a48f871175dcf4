"""Coefficients: the non-exact factors of the estimate, one JSON file per framework and GPU.

A file (``results/coefficients/<framework>-<gpu>.json``, schema ``vramcal.coefficients/1``)::

    {"schema": "vramcal.coefficients/1", "framework": "transformers", "gpu": "H100 80GB",
     "calibrated": true, "alloc_conf": "",      # PYTORCH_CUDA_ALLOC_CONF of the fitted records
     "coefficients": {"kv_factor": 1.02, "act_mlp": 3.0, ..., "overhead_bytes": 7.3e8, ...},
     "by_attn": {"eager": {"overhead_fraction": 0.4}},      # optional overrides per attention path
     "interval": {"low": -0.03, "high": 0.04, "coverage": 0.9},   # relative to the point estimate
     "provenance": {"sources": [{"path": ..., "sha256": ..., "records": ...}], "versions": {...},
                    "date": ..., "residuals": {...}}}

Without a matching file the estimator uses ``DEFAULT``: first-principles values, marked uncalibrated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from estimator.errors import UserError
from estimator.resources import coefficients_dir

SCHEMA = "vramcal.coefficients/1"
COEFFICIENTS_DIR = coefficients_dir()

# name -> (first-principles value, lower bound, upper bound, meaning). The bounds are what a fit may use.
COEFFICIENTS: dict[str, tuple[float, float, float, str]] = {
    "kv_factor": (1.0, 1.0, 2.0, "KV cache bytes alive at the peak per byte the cache holds (transient copies)"),
    "act_hidden": (4.0, 0.0, 16.0, "copies of the hidden states (tokens x hidden) alive in a layer"),
    "act_qkv": (2.0, 0.0, 8.0, "copies of the q/k/v projections alive in a layer"),
    "act_mlp": (3.0, 0.0, 8.0, "copies of the dense MLP intermediate (tokens x intermediate)"),
    "act_moe": (3.0, 0.0, 8.0, "copies of the routed expert intermediate (tokens x top_k x expert width)"),
    "act_router": (2.0, 0.0, 8.0, "copies of the fp32 router logits (tokens x experts x 4 bytes)"),
    "act_scores_eager": (4.0, 0.0, 12.0, "copies of the eager attention scores (batch x heads x q x k)"),
    "act_scores_math": (3.0, 0.0, 12.0, "copies of the scores sdpa's math kernel materialises"),
    "act_logits": (1.0, 0.0, 8.0, "copies of the logits (positions x vocab) at the head"),
    "act_head_hidden": (2.0, 0.0, 16.0, "copies of the hidden states alive beside the logits"),
    "sim_allocated_factor": (1.0, 0.9, 1.3, "bytes allocated per byte of the simulated program's peak (estimator/replay/)"),
    "sim_reserve_factor": (1.0, 0.0, 2.0, "allocator reserve per byte of the simulated fragmentation (reserved - allocated)"),
    "workspace_bytes": (32 * 2**20, 0.0, 2**30, "bytes allocated besides the weights and the simulated tensors: cuBLAS workspaces, tensors under 1 MiB"),
    "overhead_bytes": (768 * 2**20, 0.0, 8 * 2**30, "CUDA context, cuBLAS/cuDNN workspaces: bytes outside torch's allocator"),
    "overhead_fraction": (0.10, 0.0, 2.0, "allocator reserve and fragmentation per byte of KV cache + activations"),
    "weights_fraction": (0.0, 0.0, 0.2, "allocator reserve per byte of weights"),
}
DEFAULT_INTERVAL = {"low": -0.10, "high": 0.15, "coverage": None}


@dataclass(frozen=True)
class Coefficients:
    values: Mapping[str, float]
    interval: Mapping[str, float | None] = field(default_factory=lambda: dict(DEFAULT_INTERVAL))
    framework: str | None = None
    gpu: str | None = None
    calibrated: bool = False
    source: str = "built-in first-principles defaults (uncalibrated)"
    by_attn: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # the PYTORCH_CUDA_ALLOC_CONF of the records they were fitted on ("": torch's defaults)
    alloc_conf: str = ""
    provenance: Mapping = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        unknown = set(self.values) - set(COEFFICIENTS)
        if unknown:
            raise UserError(f"unknown coefficient(s) {', '.join(sorted(unknown))} in {self.source}")
        merged = {k: v[0] for k, v in COEFFICIENTS.items()}
        merged.update({k: float(v) for k, v in self.values.items()})
        object.__setattr__(self, "values", MappingProxyType(merged))

    def for_attn(self, attn: str) -> Mapping[str, float]:
        """The coefficient values, with this attention path's overrides applied."""
        overrides = self.by_attn.get(attn)
        if not overrides:
            return self.values
        merged = dict(self.values)
        merged.update(overrides)
        return merged

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "framework": self.framework,
            "gpu": self.gpu,
            "calibrated": self.calibrated,
            "alloc_conf": self.alloc_conf,
            "coefficients": dict(self.values),
            "by_attn": {k: dict(v) for k, v in self.by_attn.items()},
            "interval": dict(self.interval),
            "provenance": dict(self.provenance),
        }


DEFAULT = Coefficients(values={})


def load_coefficients(path: str | Path) -> Coefficients:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"coefficients file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read coefficients file {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a {SCHEMA} file (schema: {data.get('schema') if isinstance(data, dict) else None!r})")
    try:
        return Coefficients(
            values=data["coefficients"],
            interval=data.get("interval") or dict(DEFAULT_INTERVAL),
            framework=data.get("framework"),
            gpu=data.get("gpu"),
            calibrated=bool(data.get("calibrated", False)),
            source=_display_path(path),
            by_attn=data.get("by_attn") or {},
            alloc_conf=_alloc_conf_of(data.get("alloc_conf"), path),
            provenance=data.get("provenance") or {},
        )
    except KeyError as exc:
        raise UserError(f"coefficients file {path} lacks {exc}") from None


def _alloc_conf_of(value, path: Path) -> str:
    """The file's ``alloc_conf`` (absent: the defaults), canonical; a bad one names the file."""
    from estimator.alloc_conf import parse_alloc_conf

    try:
        return parse_alloc_conf(value or "").text
    except UserError as exc:
        raise UserError(f"coefficients file {path}: {exc}") from None


def _display_path(path: Path) -> str:
    """The path relative to the working directory when it lies below it (shorter in every output)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@lru_cache(maxsize=None)
def _available(directory: Path) -> tuple[Coefficients, ...]:
    if not directory.is_dir():
        return ()
    return tuple(load_coefficients(p) for p in sorted(directory.glob("*.json")))


def select_coefficients(framework: str = "transformers", gpu: str | None = None,
                        directory: Path | None = None) -> Coefficients:
    """The file for this framework and GPU; else this framework's file for any GPU; else DEFAULT.

    ``gpu`` is a canonical name from ``estimator.gpus`` (or None: prefer H100 80GB, the reference GPU).
    """
    from estimator.gpus import canonical_gpu_name

    files = [c for c in _available(directory or COEFFICIENTS_DIR) if c.framework == framework]
    if gpu:
        exact = [c for c in files if canonical_gpu_name(c.gpu) == canonical_gpu_name(gpu)]
        if exact:
            return exact[0]
    preferred = [c for c in files if canonical_gpu_name(c.gpu) == canonical_gpu_name("H100 80GB")]
    return (preferred or files or [DEFAULT])[0]
