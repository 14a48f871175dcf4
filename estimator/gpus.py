"""GPUs the verdicts list, from ``estimator/data/gpus.json``: memory as NVML and as torch report it.

A GPU has two totals. NVML (``nvidia-smi``) reports the board's memory; ``torch.cuda.mem_get_info()``
(cudaMemGetInfo) reports a few hundred MiB less, the part the driver keeps for itself. An estimate is a
process's NVML peak above the idle baseline, and the most a process can take is the CUDA total, so a
verdict compares with ``memory_bytes``: the torch total where it is known, else the NVML total (and the
card is marked approximate).

Names are matched strictly: case, punctuation, vendor words ("NVIDIA", "GeForce", "Tesla") and memory
technology ("HBM3") are ignored, but the memory size is part of the name: "A100-40G" is the A100 40GB,
and a bare "A100" is ambiguous (an error that lists both), never a silent pick.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache

from estimator.errors import UserError
from estimator.resources import data_path

MIB = 2**20
GIB = 2**30

# Words that do not tell two cards apart.
_NOISE = {"nvidia", "geforce", "tesla", "amd", "instinct", "radeon", "gpu", "hbm", "hbm2", "hbm2e", "hbm3",
          "hbm3e", "gddr6", "gddr6x", "gddr7", "memory", "ram", "vram", "graphics", "card"}
# Form factors: they tell two cards apart only where the table says so (H100 PCIe vs SXM vs NVL).
_FORM = {"sxm", "sxm2", "sxm4", "sxm5", "pcie", "nvl", "hgx", "dgx", "mezzanine"}


@dataclass(frozen=True)
class GPU:
    name: str
    memory_nvml_bytes: int
    memory_torch_bytes: int | None = None
    aliases: tuple[str, ...] = ()
    vendor: str = "nvidia"
    compute_capability: str | None = None
    approximate: bool = False

    @property
    def memory_bytes(self) -> int:
        """What one process can hold: the CUDA total where known, else the NVML total."""
        return self.memory_torch_bytes or self.memory_nvml_bytes

    def as_dict(self) -> dict:
        return {"name": self.name, "memory_bytes": self.memory_bytes, "memory_nvml_bytes": self.memory_nvml_bytes,
                "memory_torch_bytes": self.memory_torch_bytes, "vendor": self.vendor,
                "compute_capability": self.compute_capability, "approximate": self.approximate}


def _tokens(text: str) -> tuple[str, ...]:
    """"NVIDIA A100-SXM4-40GB" -> ("a100", "40", "sxm4"): words, sizes without their unit, noise dropped."""
    text = str(text).lower()
    text = re.sub(r"(\d+)\s*(gib|gb|g)\b", r" \1 ", text)  # "40gb", "40 GB", "40g" -> 40
    words = [w for w in re.split(r"[^a-z0-9]+", text) if w and w not in _NOISE]
    return tuple(sorted(set(words)))


def _strip_form(tokens: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(t for t in tokens if t not in _FORM)


@lru_cache(maxsize=1)
def _load() -> tuple[GPU, ...]:
    path = data_path("gpus.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the GPU table {path}: {exc}") from None
    gpus = []
    for row in data["gpus"]:
        approx = bool(row.get("approximate")) or row.get("memory_torch_bytes") is None
        gpus.append(GPU(name=row["name"], memory_nvml_bytes=int(row["memory_nvml_bytes"]),
                        memory_torch_bytes=int(row["memory_torch_bytes"]) if row.get("memory_torch_bytes") else None,
                        aliases=tuple(row.get("aliases", ())), vendor=row.get("vendor", "nvidia"),
                        compute_capability=row.get("compute_capability"), approximate=approx))
    return tuple(gpus)


def all_gpus() -> tuple[GPU, ...]:
    return _load()


# The cards the verdict table lists by default, by alias (every card is reachable with --gpu).
DEFAULT_TABLE = ("H100 SXM 80GB", "H200", "B200", "A100 80GB", "A100 40GB", "L40S", "L4", "A10G", "T4",
                 "RTX 4090", "RTX 3090", "RTX 5090", "MI300X")


@lru_cache(maxsize=1)
def table_gpus() -> tuple[GPU, ...]:
    picked = []
    for alias in DEFAULT_TABLE:
        try:
            gpu = find_gpu(alias)
        except UserError:
            continue
        if gpu not in picked:
            picked.append(gpu)
    return tuple(picked) or all_gpus()


@lru_cache(maxsize=1)
def _index() -> tuple[dict, dict]:
    exact: dict[tuple[str, ...], set[str]] = {}
    loose: dict[tuple[str, ...], set[str]] = {}
    for gpu in all_gpus():
        for alias in (gpu.name, *gpu.aliases):
            t = _tokens(alias)
            exact.setdefault(t, set()).add(gpu.name)
            loose.setdefault(_strip_form(t), set()).add(gpu.name)
    return exact, loose


def _pick(text: str, names: set[str]) -> GPU:
    """The one card ``names`` stand for; several with the same memory (A100 40GB SXM4 and PCIe) are one
    card to a memory verdict, the first listed; several with different memory are an error."""
    cards = [g for g in all_gpus() if g.name in names]
    if len({(g.memory_nvml_bytes, g.memory_torch_bytes) for g in cards}) == 1:
        return cards[0]
    raise _ambiguous(text, names)


def _ambiguous(text: str, names) -> UserError:
    return UserError(f"GPU {text!r} is ambiguous: {' or '.join(sorted(names))}? (give the memory size or "
                     "form factor, e.g. 'A100 40GB')")


def find_gpu(name: str) -> GPU:
    """A GPU by name or alias ("h100", "A100 40GB", "rtx-4090", NVML's "NVIDIA A100-SXM4-40GB").

    Exact on the words of a name (form factors dropped when only they differ); a name whose words
    belong to more than one card is an error listing the candidates; an unknown one suggests close names.
    """
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"no GPU name given; known: {', '.join(g.name for g in all_gpus())}")
    tokens = _tokens(name)
    exact, loose = _index()
    for table, key in ((exact, tokens), (loose, _strip_form(tokens))):
        hits = table.get(key)
        if hits:
            return _pick(name, hits)
    # every word given names a unique card ("4090" -> RTX 4090; "a100" -> both A100s: ambiguous)
    words = set(_strip_form(tokens))
    if words:
        cands = {n for key, names in loose.items() if words <= set(key) for n in names}
        if cands:
            return _pick(name, cands)
    names = [g.name for g in all_gpus()]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UserError(f"unknown GPU {name!r}{hint} (known: {', '.join(names)})")


def canonical_gpu_name(name: str | None) -> str | None:
    """The table's name for a GPU name as NVML reports it, or the name itself if it is not listed."""
    if not name:
        return None
    try:
        return find_gpu(name).name
    except UserError:
        return name


def __getattr__(attr):  # ``GPUS`` stays importable; the table is read on first use
    if attr == "GPUS":
        return table_gpus()
    raise AttributeError(attr)
