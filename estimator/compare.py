"""What a measured record is compared with, by the device it was measured on: one rule for the harness's
progress lines (and its estimate filter) and for ``vramcal validate``.

- ``cuda``: ``peak_nvml_bytes`` (the process's device memory, CUDA context included) against the
  estimate's ``total_bytes``.
- ``cpu``: ``peak_allocated_bytes``, the tracker's peak of live tensor storage (each storage rounded up to
  512 bytes like the CUDA caching allocator; ``harness/README.md``), against the estimate's allocated
  peak (``Estimate.peak_allocated_bytes``, the counterpart of ``torch.cuda.max_memory_allocated()``) less
  the ``workspace_bytes`` coefficient: the cuBLAS workspace that a CUDA device allocates through the
  caching allocator and the CPU does not (71 MiB in the H100 coefficients: a tiny test model's whole peak
  is under 1 MiB). There is no CPU calibration: the interval, the reserve and the context are a GPU's.
"""

from __future__ import annotations

from collections.abc import Mapping

MEASURED = {"cuda": "peak_nvml_bytes", "cpu": "peak_allocated_bytes"}


def cpu_allocated_bytes(allocated_bytes: float, values: Mapping[str, float]) -> int:
    """The estimate of a CPU tracker measurement from an allocated peak and its coefficient values."""
    return max(round(allocated_bytes - values.get("workspace_bytes", 0.0)), 0)


def comparable_bytes(est, device: str) -> int:
    """The number of an ``Estimate`` that a record measured on ``device`` is compared with."""
    if device == "cpu":
        values = est.coefficients.for_attn(est.workload.attn)
        return cpu_allocated_bytes(est.peak_allocated_bytes, values)
    return int(est.total_bytes)
