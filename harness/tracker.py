"""Live-storage tracker: the tensor-memory peak of a block of PyTorch code, on any device, fake or real.

`StorageTracker` is a `TorchDispatchMode`. After every aten op it looks at the op's outputs; an output
whose storage it has not seen, and which is not the storage of one of the op's inputs (a view), is a new
allocation. The storage is keyed on the storage itself: its `StorageImpl` address (`_cdata`), with a
`weakref.finalize` on the `UntypedStorage` object. PyTorch preserves that Python object for as long as
the C++ storage lives (PyObject preservation), so the finalizer fires exactly when the memory is
released, however many views or Python wrappers pointed at it. A storage counts once and leaves the
count when freed.

Sizes are rounded like the CUDA caching allocator's `round_size`: a zero-byte storage takes nothing
(`malloc(0)` is a no-op), anything else is rounded up to a multiple of 512 bytes (`kMinBlockSize`). The
rule is the same for the small pool (<= 1 MiB) and the large pool; the pools differ in segment sizes,
which matter for `max_memory_reserved`, not for `max_memory_allocated`. Not modelled: a large block
(> 1 MiB) is only split when the remainder exceeds 1 MiB, so a reused or freshly `cudaMalloc`ed block
can count up to 1 MiB more than requested per live large tensor.

Typical use::

    tracker = StorageTracker()
    tracker.track_existing(model, "weights")
    with tracker, tracker.phase("prefill"):
        out = model(input_ids)
    tracker.peak_bytes, tracker.peak_phase, tracker.peak_breakdown

With ``record_events=True`` the tracker also keeps the allocations and frees in order, as the input of
the caching-allocator model (``estimator/allocator.py``): ``events`` holds ``(slot, nbytes)`` for an
allocation of ``nbytes`` (exact storage bytes, not rounded) and ``(slot, 0)`` for the free of that
slot; ``slot_categories[slot]`` is the slot's category, and ``phase_marks`` lists ``(index, phase)``
where the phase of the events changes. A zero-byte storage makes no event (the allocator ignores it).

Single-threaded by design: the tracked code and the frees run on one thread, as in a PyTorch eager run.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA_BLOCK_BYTES = 512  # kMinBlockSize of c10/cuda/CUDACachingAllocator.cpp

WEIGHTS = "weights"
KV_CACHE = "kv_cache"
LOGITS = "logits"
ACTIVATIONS = "activations"  # the category of anything not tagged otherwise
CATEGORIES = (WEIGHTS, KV_CACHE, ACTIVATIONS, LOGITS)

# Ops that return a tensor made outside the mode (from Python data) as if it were new.
_FRESH_OPS = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


def allocator_bytes(nbytes: int, granularity: int = CUDA_BLOCK_BYTES) -> int:
    """Bytes the CUDA caching allocator counts as allocated for a request of `nbytes` (0 stays 0)."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // granularity) * granularity


def _tensors(obj) -> Iterator[torch.Tensor]:
    """Tensors in a tensor, a module (parameters and buffers), or any nesting of lists/tuples/dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for v in obj:
            yield from _tensors(v)


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse or nested tensors have no single storage
        return None


def _on_free(tracker_ref, key: int) -> None:
    tracker = tracker_ref()
    if tracker is not None:
        tracker._free(key)


class StorageTracker(TorchDispatchMode):
    """Follows every storage created (and every registered one) until it is freed.

    Attributes: `live_bytes`, `peak_bytes`, `peak_phase`, `peak_breakdown` (bytes by category at the
    peak). Bytes are rounded by `granularity` (512 = the CUDA caching allocator; 1 = exact nbytes).
    """

    def __init__(self, granularity: int = CUDA_BLOCK_BYTES, record_events: bool = False):
        super().__init__()
        self.granularity = granularity
        self._live: dict[int, list] = {}  # storage key -> [rounded bytes, raw nbytes, category, event slot]
        # the allocation/free sequence (see the module docstring); None unless record_events
        self.events: list[tuple[int, int]] | None = [] if record_events else None
        self.slot_categories: list[str] = []
        self.phase_marks: list[tuple[int, str]] = []
        self._by_category: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self._phase = "default"
        self._category_stack: list[str] = []
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_phase = self._phase
        self.peak_breakdown: dict[str, int] = dict(self._by_category)
        self._self_ref = weakref.ref(self)

    # ---- phases and categories -------------------------------------------------------------
    def set_phase(self, name: str) -> None:
        self._phase = name

    @property
    def current_phase(self) -> str:
        return self._phase

    @contextlib.contextmanager
    def phase(self, name: str):
        """Label the block: a peak reached inside it reports `peak_phase == name`."""
        previous, self._phase = self._phase, name
        try:
            yield self
        finally:
            self._phase = previous

    @contextlib.contextmanager
    def category(self, name: str):
        """Storages allocated inside the block belong to `name` (e.g. a KV-cache update, lm_head)."""
        self._category_stack.append(name)
        try:
            yield self
        finally:
            self._category_stack.pop()

    def tag(self, obj, category: str) -> None:
        """Move the tracked storages of `obj` (tensors, a module, nested containers) to `category`."""
        for t in _tensors(obj):
            s = _storage(t)
            rec = None if s is None else self._live.get(s._cdata)
            if rec is not None and rec[2] != category:
                self._by_category[rec[2]] -= rec[0]
                self._by_category[category] = self._by_category.get(category, 0) + rec[0]
                rec[2] = category
                if rec[3] is not None:
                    self.slot_categories[rec[3]] = category

    def track_existing(self, obj, category: str | None = None) -> int:
        """Count storages made before the tracker started (e.g. parameters); returns bytes added."""
        added = 0
        for t in _tensors(obj):
            s = _storage(t)
            if s is not None and s._cdata not in self._live:
                added += self._add(s, category)
        if category is not None:
            self.tag(obj, category)
        return added

    # ---- reading --------------------------------------------------------------------------
    def reset_peak(self) -> None:
        """Start a new peak from what is live now (like `torch.cuda.reset_peak_memory_stats`)."""
        self.peak_bytes = self.live_bytes
        self.peak_phase = self._phase
        self.peak_breakdown = dict(self._by_category)

    def breakdown(self) -> dict[str, int]:
        """Live bytes by category now."""
        return dict(self._by_category)

    def is_tracked(self, t: torch.Tensor) -> bool:
        s = _storage(t)
        return s is not None and s._cdata in self._live

    @property
    def live_storages(self) -> int:
        return len(self._live)

    # ---- bookkeeping ----------------------------------------------------------------------
    def _event_alloc(self, nbytes: int, category: str) -> int | None:
        """Record an allocation; returns its slot (None when not recording, or for zero bytes)."""
        events = self.events
        if events is None or nbytes <= 0:
            return None
        if not self.phase_marks or self.phase_marks[-1][1] != self._phase:
            self.phase_marks.append((len(events), self._phase))
        slot = len(self.slot_categories)
        self.slot_categories.append(category)
        events.append((slot, nbytes))
        return slot

    def _add(self, storage, category: str | None) -> int:
        nbytes = storage.nbytes()
        size = allocator_bytes(nbytes, self.granularity)
        cat = category or (self._category_stack[-1] if self._category_stack else ACTIVATIONS)
        key = storage._cdata
        self._live[key] = [size, nbytes, cat, self._event_alloc(nbytes, cat)]
        f = weakref.finalize(storage, _on_free, self._self_ref, key)
        f.atexit = False
        self._by_category[cat] = self._by_category.get(cat, 0) + size
        self.live_bytes += size
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_phase = self._phase
            self.peak_breakdown = dict(self._by_category)
        return size

    def _free(self, key: int) -> None:
        rec = self._live.pop(key, None)
        if rec is not None:
            self.live_bytes -= rec[0]
            self._by_category[rec[2]] -= rec[0]
            if rec[3] is not None:
                self.events.append((rec[3], 0))

    def _resized(self, storage, rec: list) -> None:
        """An in-place resize (`resize_`, an `out=` op) changed a tracked storage's size."""
        nbytes = storage.nbytes()
        if nbytes == rec[1]:
            return
        size = allocator_bytes(nbytes, self.granularity)
        delta = size - rec[0]
        if self.events is not None:  # a resize allocates the new size, copies, then frees the old block
            old_slot, rec[3] = rec[3], self._event_alloc(nbytes, rec[2])
            if old_slot is not None:
                self.events.append((old_slot, 0))
        rec[0], rec[1] = size, nbytes
        self._by_category[rec[2]] += delta
        self.live_bytes += delta
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_phase = self._phase
            self.peak_breakdown = dict(self._by_category)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            outputs = (out,)
        elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) or o is None for o in out):
            outputs = out
        else:
            outputs = tree_leaves(out)
        input_keys = None
        for o in outputs:
            if not isinstance(o, torch.Tensor):
                continue
            s = _storage(o)
            if s is None:
                continue
            key = s._cdata
            rec = self._live.get(key)
            if rec is not None:
                self._resized(s, rec)
                continue
            if func not in _FRESH_OPS:
                if input_keys is None:  # only computed when an output is not tracked yet
                    input_keys = {
                        st._cdata
                        for t in tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor) and (st := _storage(t)) is not None
                    }
                if key in input_keys:  # a view or an out= of an untracked input: not new memory
                    continue
            self._add(s, None)
        return out
