"""GPUs the verdict table lists: total device memory as NVML reports it (bytes).

Figures are the boards' memory totals as ``nvidia-smi``/NVML (``rocm-smi`` for MI300X) report them, in
MiB x 2**20; the H100 figure is the one the reference measurements recorded (85,520,809,984 bytes).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from estimator.errors import UserError

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    aliases: tuple[str, ...] = ()


GPUS: tuple[GPU, ...] = (
    GPU("H100 80GB", 81559 * MIB, ("h100", "h100-80gb", "h100-sxm", "nvidia h100 80gb hbm3", "h100-pcie")),
    GPU("H200", 143771 * MIB, ("h200", "h200-141gb", "nvidia h200")),
    GPU("A100 80GB", 81920 * MIB, ("a100-80gb", "a100", "nvidia a100-sxm4-80gb")),
    GPU("A100 40GB", 40960 * MIB, ("a100-40gb", "nvidia a100-sxm4-40gb")),
    GPU("L40S", 46068 * MIB, ("l40s", "nvidia l40s")),
    GPU("L4", 23034 * MIB, ("l4", "nvidia l4")),
    GPU("A10G", 23028 * MIB, ("a10g", "nvidia a10g")),
    GPU("T4", 15360 * MIB, ("t4", "tesla t4")),
    GPU("RTX 4090", 24564 * MIB, ("4090", "rtx4090", "geforce rtx 4090", "nvidia geforce rtx 4090")),
    GPU("RTX 3090", 24576 * MIB, ("3090", "rtx3090", "geforce rtx 3090", "nvidia geforce rtx 3090")),
    GPU("MI300X", 196592 * MIB, ("mi300x", "amd instinct mi300x")),
)


def _key(text: str) -> str:
    """Letters and digits only, board variants dropped: "NVIDIA A100-PCIE-40GB" -> "nvidiaa10040gb"."""
    text = re.sub(r"\b(pcie|sxm\d?|nvl|hbm\d?e?)\b", "", text.lower())
    return re.sub(r"[^a-z0-9]", "", text)


_INDEX = {_key(alias): gpu for gpu in GPUS for alias in (gpu.name, *gpu.aliases)}


def find_gpu(name: str) -> GPU:
    """A GPU by name or alias, case and punctuation ignored ("h100", "H100 80GB", "rtx-4090").

    A record's ``gpu_name`` ("NVIDIA H100 80GB HBM3") resolves too.
    """
    key = _key(name)
    if key in _INDEX:
        return _INDEX[key]
    # "nvidiah10080gbhbm3" contains "h10080gb"; the longest alias wins ("a10040gb" over "a100")
    for alias_key, gpu in sorted(_INDEX.items(), key=lambda kv: -len(kv[0])):
        if len(alias_key) >= 4 and alias_key in key:
            return gpu
    close = difflib.get_close_matches(name, [g.name for g in GPUS], n=3, cutoff=0.3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UserError(f"unknown GPU {name!r}{hint} (known: {', '.join(g.name for g in GPUS)})")


def canonical_gpu_name(name: str | None) -> str | None:
    """The table's name for a GPU name as NVML reports it, or the name itself if it is not listed."""
    if not name:
        return None
    try:
        return find_gpu(name).name
    except UserError:
        return name
