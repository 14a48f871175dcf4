"""``PYTORCH_CUDA_ALLOC_CONF``: the caching allocator's settings, parsed strictly into a frozen dataclass.

The grammar and the checks are PyTorch's (``c10/core/AllocatorConfig.cpp``, ``AllocatorConfig::parseArgs``
and its ``parse*`` helpers, torch 2.9-2.11; ``c10/cuda/CUDAAllocatorConfig.cpp`` before): comma-separated
``key:value`` pairs, spaces ignored. Where torch would refuse a value, so does this, with one line that names
the key and the allowed values; where torch accepts a setting that the allocator model cannot follow
(``backend:cudaMallocAsync``, the driver's own pool), the estimate refuses too rather than answer for the
native allocator.

What each setting does to device memory (``estimator/allocator.py`` and ``estimator/expandable.py`` model it):

- ``expandable_segments:True``: one growing segment per pool, mapped in 2 MiB (small pool) / 20 MiB (large
  pool) pages, blocks split down to 512 bytes (``should_split``);
- ``max_split_size_mb:N`` (N >= 20): blocks of N MiB or more are never split, and serve only requests of at
  least N MiB that they exceed by less than ``max_non_split_rounding_mb`` (default 20 MiB; ``get_free_block``);
- ``roundup_power2_divisions``: sizes round up to the next of D divisions of their power-of-two interval
  (``round_size``, ``roundup_power2_next_division``); one value for all sizes, or ``[MB:D,...,>:D]``;
- ``garbage_collection_threshold:F`` (0 < F < 1): acts only when the process set a memory fraction
  (``torch.cuda.set_per_process_memory_fraction``; ``malloc`` checks ``set_fraction``), which neither
  transformers nor ``generate`` does: no effect on the modelled run (the estimate says so);
- ``release_lock_on_cudamalloc``, ``pinned_*``: no effect on device memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from estimator.errors import UserError

MIB = 2**20
LARGE_BUFFER_MIB = 20  # kLargeBuffer / kMB: the smallest max_split_size_mb and max_non_split_rounding_mb
ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: 1 MiB .. 64 GiB, one per power of two

_BOOL_KEYS = ("expandable_segments", "release_lock_on_cudamalloc", "pinned_use_cuda_host_register",
              "pinned_use_background_threads")
_INT_KEYS = ("max_split_size_mb", "max_non_split_rounding_mb", "pinned_num_register_threads")
KEYS = _BOOL_KEYS + _INT_KEYS + ("roundup_power2_divisions", "garbage_collection_threshold", "backend")


@dataclass(frozen=True)
class AllocConf:
    """The settings that change device memory; the defaults are torch's (``AllocatorConfig::AllocatorConfig``)."""

    expandable_segments: bool = False
    max_split_size_bytes: int | None = None  # None: no limit (SIZE_MAX)
    max_non_split_rounding_bytes: int = LARGE_BUFFER_MIB * MIB
    roundup_power2_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS  # per interval, 0/1: no rounding
    garbage_collection_threshold: float = 0.0
    text: str = ""  # the canonical string (``canonical``), "" for the defaults

    @property
    def is_default(self) -> bool:
        """Whether the allocator behaves as with no setting (the reference measurements' allocator)."""
        return self.memory_settings() == AllocConf().memory_settings()

    def memory_settings(self) -> tuple:
        return (self.expandable_segments, self.max_split_size_bytes, self.max_non_split_rounding_bytes,
                self.roundup_power2_divisions)

    def divisions(self, size: int) -> int:
        """``AllocatorConfig::roundup_power2_divisions(size)``: the interval of ``floor(log2 size)``."""
        index = min(max(size.bit_length() - 1 - 20, 0), ROUNDUP_INTERVALS - 1)
        return self.roundup_power2_divisions[index]

    def round_size(self, nbytes: int) -> int:
        """``DeviceCachingAllocator::round_size``: 512-byte blocks, or the next power-of-two division."""
        if nbytes < 512:
            return 512
        d = self.divisions(nbytes)
        if d > 1 and nbytes > 512 * d:
            if nbytes & (nbytes - 1) == 0:  # a power of two stays
                return nbytes
            floor2 = 1 << (nbytes.bit_length() - 1)
            step = floor2 >> (d.bit_length() - 1)  # 63 - clz(divisions): divisions rounded down to 2**k
            if step == 0:
                return floor2 << 1
            low = nbytes & ~(step - 1)
            return nbytes if low == nbytes else low + step
        return -(-nbytes // 512) * 512

    def notes(self) -> list[str]:
        """What the estimate should say about settings it does not model (one line each)."""
        out = []
        if self.garbage_collection_threshold:
            out.append(f"garbage_collection_threshold:{self.garbage_collection_threshold:g} acts only under "
                       "torch.cuda.set_per_process_memory_fraction, which transformers does not call: no effect counted")
        return out


def _fail(key: str, allowed: str, got: str) -> UserError:
    return UserError(f"PYTORCH_CUDA_ALLOC_CONF {key}: expected {allowed}, got {got!r}")


def _int(key: str, value: str, allowed: str) -> int:
    if not value.isdigit():
        raise _fail(key, allowed, value)
    return int(value)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _divisions(value: str) -> tuple[int, ...]:
    """``parseRoundUpPower2Divisions``: ``D`` (a power of two, every interval) or ``[MB:D,...,>:D]``
    (MB a power of two naming the interval [MB, 2 MB) MiB; the first entry also fills the intervals below it,
    ``>`` fills from the last named interval, that one included, to the end; D a power of two or 0)."""
    key, allowed = "roundup_power2_divisions", "a power of two, or [MB:D,...,>:D] with MB and D powers of two"
    if not value.startswith("["):
        d = _int(key, value, allowed)
        if not _pow2(d):
            raise _fail(key, allowed, value)
        return (d,) * ROUNDUP_INTERVALS
    if not value.endswith("]") or len(value) < 3:
        raise _fail(key, allowed, value)
    out = [0] * ROUNDUP_INTERVALS
    first, last = True, 0
    for item in value[1:-1].split(","):
        interval, sep, d_text = item.partition(":")
        d = _int(key, d_text, allowed) if sep else None
        if d is None or not (d == 0 or _pow2(d)):
            raise _fail(key, allowed, value)
        if interval == ">":
            out[last:] = [d] * (ROUNDUP_INTERVALS - last)
            continue
        mb = _int(key, interval, allowed)
        if not _pow2(mb):
            raise _fail(key, allowed, value)
        index = min(mb.bit_length() - 1, ROUNDUP_INTERVALS - 1)
        if first:
            out[:index] = [d] * index
            first = False
        out[index] = d
        last = index
    return tuple(out)


@lru_cache(maxsize=256)
def parse_alloc_conf(text: str | None) -> AllocConf:
    """The settings of a ``PYTORCH_CUDA_ALLOC_CONF`` string; UserError (one line) for anything torch refuses,
    and for ``backend:cudaMallocAsync``, which this model does not follow."""
    if text is None:
        return AllocConf()
    if not isinstance(text, str):
        raise UserError(f"PYTORCH_CUDA_ALLOC_CONF must be a string, not {text!r}")
    # split at commas outside [...] (the divisions list has commas of its own); spaces are ignored (lexArgs)
    items, depth, cur = [], 0, ""
    for ch in text.replace(" ", ""):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if cur or items:
        items.append(cur)
    settings: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition(":")
        if key not in KEYS:
            raise UserError(f"PYTORCH_CUDA_ALLOC_CONF: unknown option {key!r}; allowed: {', '.join(KEYS)}")
        if not sep or not value:
            raise UserError(f"PYTORCH_CUDA_ALLOC_CONF {key}: expected {key}:VALUE, got {item!r}")
        if key in _BOOL_KEYS:
            if value not in ("True", "False"):
                raise _fail(key, "True or False", value)
            settings[key] = value == "True"
        elif key in ("max_split_size_mb", "max_non_split_rounding_mb"):
            mb = _int(key, value, f"an integer >= {LARGE_BUFFER_MIB} (MiB)")
            if mb < LARGE_BUFFER_MIB:
                raise _fail(key, f"an integer >= {LARGE_BUFFER_MIB} (MiB)", value)
            settings[key] = mb
        elif key == "pinned_num_register_threads":
            n = _int(key, value, "a power of two")
            if not _pow2(n):
                raise _fail(key, "a power of two", value)
            settings[key] = n
        elif key == "garbage_collection_threshold":
            try:
                f = float(value)
            except ValueError:
                raise _fail(key, "a number between 0 and 1 (exclusive)", value) from None
            if not 0.0 < f < 1.0:
                raise _fail(key, "a number between 0 and 1 (exclusive)", value)
            settings[key] = f
        elif key == "roundup_power2_divisions":
            settings[key] = _divisions(value)
        else:  # backend
            if value == "cudaMallocAsync":
                raise UserError("PYTORCH_CUDA_ALLOC_CONF backend:cudaMallocAsync hands memory to the CUDA driver's "
                                "pool, which vramcal does not model; allowed: backend:native")
            if value != "native":
                raise _fail(key, "native or cudaMallocAsync", value)
        settings.setdefault("_order", [])
        settings["_order"].append((key, value))  # type: ignore[union-attr]
    conf = AllocConf(
        expandable_segments=bool(settings.get("expandable_segments", False)),
        max_split_size_bytes=settings["max_split_size_mb"] * MIB if "max_split_size_mb" in settings else None,
        max_non_split_rounding_bytes=int(settings.get("max_non_split_rounding_mb", LARGE_BUFFER_MIB)) * MIB,
        roundup_power2_divisions=settings.get("roundup_power2_divisions", (0,) * ROUNDUP_INTERVALS),
        garbage_collection_threshold=float(settings.get("garbage_collection_threshold", 0.0)),
    )
    # the canonical text: the user's settings, each key once (the last wins, as in torch), in KEYS order
    last = dict(settings.get("_order", []))
    canonical = ",".join(f"{k}:{last[k]}" for k in KEYS if k in last)
    object.__setattr__(conf, "text", canonical)
    return conf


def env_alloc_conf(environ=None) -> str:
    """The setting this process's torch would read: ``PYTORCH_ALLOC_CONF`` first (torch >= 2.9), then
    ``PYTORCH_CUDA_ALLOC_CONF``."""
    env = os.environ if environ is None else environ
    return env.get("PYTORCH_ALLOC_CONF") or env.get("PYTORCH_CUDA_ALLOC_CONF") or ""


def describe(conf: AllocConf) -> str:
    """One phrase for the output: "default" or the canonical settings."""
    return conf.text if conf.text else "default"
