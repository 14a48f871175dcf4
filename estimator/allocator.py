"""A model of PyTorch's CUDA caching allocator, to turn a sequence of tensor allocations into
``max_memory_allocated`` and ``max_memory_reserved``.

Fragmentation is not noise: with the default settings the allocator never returns a segment to the
driver during a run, rounds every request, splits large blocks only when the rest exceeds 1 MiB, and
serves a request from the smallest free block that fits. The same sequence of requests therefore always
ends with the same reserved bytes. Replaying the sequence a transformers forward makes
(``estimator/replay/``) reproduces the reserve of the reference H100 runs within about 1% in most
cases, where a fraction of the activations misses by 20-100%.

Constants and rules from ``c10/cuda/CUDACachingAllocator.cpp`` (torch 2.4-2.11, default
``PYTORCH_CUDA_ALLOC_CONF``: no ``expandable_segments``, no ``max_split_size_mb``, no rounding divisions):

- sizes round up to 512 bytes (``kMinBlockSize``);
- requests <= 1 MiB (``kSmallSize``) come from the small pool, whose segments are 2 MiB;
- larger requests come from the large pool; a new segment is 20 MiB (``kLargeBuffer``) for requests
  under 10 MiB (``kMinLargeAlloc``), else the request rounded up to 2 MiB (``kRoundLarge``);
- best fit: the smallest free block of the pool that is large enough (ties: lowest address);
- a block is split when the rest is >= 512 bytes (small pool) or > 1 MiB (large pool); otherwise the
  whole block is handed out and counts as allocated;
- a freed block merges with free neighbours of the same segment.

Pure Python, no torch. Addresses are virtual: each segment starts 16 TiB or more past the previous one's
end, so no two blocks ever share one. A pool is a sorted list of integer keys ``size << 96 | address``
(one C-level bisect per request) next to a dict from address to block; a replay makes millions of
requests, so this is the estimator's hot loop. ``estimator/_replay.c`` is the same model in C (optional;
this one is the reference it is tested against, request by request).
"""

from __future__ import annotations

from bisect import bisect_left, insort

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
MIN_LARGE_ALLOC = 10 << 20
LARGE_BUFFER = 20 << 20
ROUND_LARGE = 2 << 20
_SEGMENT_GAP = 1 << 44  # segments start at multiples of this, past the previous one's end (``_segment``)
_SHIFT = 96  # pool key: size << _SHIFT | address (addresses stay far below 2**96)
_ADDRESS = (1 << _SHIFT) - 1


def round_size(nbytes: int) -> int:
    """Bytes the allocator hands out for a request (``round_size``)."""
    if nbytes < MIN_BLOCK:
        return MIN_BLOCK
    return -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """Bytes of a new segment for a rounded request (``get_allocation_size``)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class _Block:
    __slots__ = ("ptr", "size", "prev", "next", "free", "small")

    def __init__(self, ptr: int, size: int, small: bool):
        self.ptr, self.size, self.small = ptr, size, small
        self.prev = self.next = None
        self.free = True


class CachingAllocator:
    """``malloc(nbytes) -> block``, ``free(block)``; ``allocated``/``reserved`` and their peaks, in bytes."""

    def __init__(self):
        self._pools: dict[bool, list[int]] = {True: [], False: []}  # sorted keys of the free blocks
        self._free: dict[int, _Block] = {}  # address -> free block, both pools
        self._next_ptr = _SEGMENT_GAP
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.segments = 0

    def _segment(self, size: int, small: bool) -> _Block:
        """A new segment (``cudaMalloc``) for a rounded request, as one free block; ``malloc`` splits it.

        Its address is a multiple of ``_SEGMENT_GAP`` past the end of every earlier segment, however large
        they were: a segment of 16 TiB or more (a batch of 2**18 sequences) must not overlap the next ones,
        or two blocks share an address, the key of ``_free``, and the pool and ``_free`` disagree."""
        seg = segment_size(size)
        block = _Block(self._next_ptr, seg, small)
        self._next_ptr += (seg // _SEGMENT_GAP + 1) * _SEGMENT_GAP
        self.reserved += seg
        self.segments += 1
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        return block

    def malloc(self, nbytes: int) -> _Block | None:
        if nbytes <= 0:
            return None
        size = -(-nbytes // MIN_BLOCK) * MIN_BLOCK
        small = size <= SMALL_SIZE
        pool = self._pools[small]
        i = bisect_left(pool, size << _SHIFT)
        if i < len(pool):
            block = self._free.pop(pool.pop(i) & _ADDRESS)
        else:
            block = self._segment(size, small)
        rest = block.size - size
        return self._take(block, size, pool, (rest >= MIN_BLOCK) if small else (rest > SMALL_SIZE))

    def _take(self, block: _Block, size: int, pool: list, split: bool) -> _Block:
        """Hand out ``block`` for ``size`` bytes; with ``split`` its remainder becomes a free block of its own
        (``DeviceCachingAllocator::alloc_found_block``)."""
        if split:
            rest = block.size - size
            tail = _Block(block.ptr + size, rest, block.small)
            nxt = block.next
            tail.prev, tail.next = block, nxt
            if nxt is not None:
                nxt.prev = tail
            block.next = tail
            block.size = size
            insort(pool, rest << _SHIFT | tail.ptr)
            self._free[tail.ptr] = tail
        block.free = False
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block

    def free(self, block: _Block | None) -> None:
        if block is None:
            return
        if block.free:
            raise ValueError("block freed twice")
        block.free = True
        self.allocated -= block.size
        pool = self._pools[block.small]
        free = self._free
        prev, nxt = block.prev, block.next
        if prev is not None and prev.free:
            del pool[bisect_left(pool, prev.size << _SHIFT | prev.ptr)]
            del free[prev.ptr]
            block.ptr, block.size, block.prev = prev.ptr, prev.size + block.size, prev.prev
            if prev.prev is not None:
                prev.prev.next = block
        if nxt is not None and nxt.free:
            del pool[bisect_left(pool, nxt.size << _SHIFT | nxt.ptr)]
            del free[nxt.ptr]
            block.size += nxt.size
            block.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = block
        insort(pool, block.size << _SHIFT | block.ptr)
        free[block.ptr] = block

    def run(self, ops: list, loc: list, start: int = 0, x: int = 0) -> int:
        """Replay ``ops[start:]``: ``(slot, size)`` is ``loc[slot] = malloc(size)`` for a size already rounded
        (``round_size``), ``(slot, (a, b))`` the same for ``round_size(a + b * x)`` (a decode step's size at
        ``x`` past tokens), ``(slot, 0)`` is ``free(loc[slot])``; stops at the first op whose slot is negative
        (the caller's) and returns its index, or ``len(ops)``. ``malloc`` and ``free`` inlined (but a new segment,
        which is rare): this loop is the replay's hot path."""
        pools, free_at = self._pools, self._free
        large, small_pool = pools[False], pools[True]
        allocated, peak = self.allocated, self.peak_allocated
        n = len(ops)
        i = start
        while i < n:
            slot, nbytes = ops[i]
            if slot < 0:
                break
            i += 1
            if nbytes.__class__ is tuple:
                nbytes = -(-(nbytes[0] + nbytes[1] * x) // MIN_BLOCK) * MIN_BLOCK
            if nbytes:  # malloc
                size = nbytes
                small = size <= SMALL_SIZE
                pool = small_pool if small else large
                j = bisect_left(pool, size << _SHIFT)
                if j < len(pool):
                    block = free_at.pop(pool.pop(j) & _ADDRESS)
                else:
                    block = self._segment(size, small)
                rest = block.size - size
                if (rest >= MIN_BLOCK) if small else (rest > SMALL_SIZE):
                    tail = _Block(block.ptr + size, rest, small)
                    nxt = block.next
                    tail.prev = block
                    tail.next = nxt
                    if nxt is not None:
                        nxt.prev = tail
                    block.next = tail
                    block.size = size
                    insort(pool, rest << _SHIFT | tail.ptr)
                    free_at[tail.ptr] = tail
                block.free = False
                allocated += block.size
                if allocated > peak:
                    peak = allocated
                loc[slot] = block
            else:  # free
                block = loc[slot]
                if block is None:
                    continue
                block.free = True
                size = block.size
                allocated -= size
                pool = small_pool if block.small else large
                prev, nxt = block.prev, block.next
                if prev is not None and prev.free:
                    del pool[bisect_left(pool, prev.size << _SHIFT | prev.ptr)]
                    del free_at[prev.ptr]
                    size += prev.size
                    block.ptr = prev.ptr
                    pp = block.prev = prev.prev
                    if pp is not None:
                        pp.next = block
                if nxt is not None and nxt.free:
                    del pool[bisect_left(pool, nxt.size << _SHIFT | nxt.ptr)]
                    del free_at[nxt.ptr]
                    size += nxt.size
                    nn = block.next = nxt.next
                    if nn is not None:
                        nn.prev = block
                block.size = size
                insort(pool, size << _SHIFT | block.ptr)
                free_at[block.ptr] = block
        self.allocated, self.peak_allocated = allocated, peak
        return i

    def decode(self, ops: list, loc: list, keep: list, x: int, k: int) -> int:
        """``k`` decode steps at pasts ``x, x + 1, ...``: each sets the slots not in ``keep`` to None, runs
        ``ops`` (``run``'s ops, then moves ``(-3, (dst, src))``: ``loc[dst] = loc[src]``, None for ``src``
        -1) and notes whether the peak allocated rose. Returns the last step (from 0) that raised it, or -1.
        ``estimator.replay.engine.Replay.fast_steps`` builds the ops; ``estimator/_replay.c`` loops the same in C."""
        kept = set(keep)
        clear = [i for i in range(len(loc)) if i not in kept]
        first = len(ops)
        while first and ops[first - 1][0] == -3:
            first -= 1
        moves = [(dst, src) for _, (dst, src) in ops[first:]]
        body = ops[:first]
        run = self.run
        last = -1
        for j in range(k):
            before = self.peak_allocated
            for i in clear:
                loc[i] = None
            if run(body, loc, 0, x + j) != first:
                raise ValueError("decode: a move before the step's end")
            for dst, src in moves:
                loc[dst] = loc[src] if src >= 0 else None
            if self.peak_allocated > before:
                last = j
        return last

    def state(self, blocks) -> tuple:
        """What the allocator's next requests depend on: the counters, the free blocks of both pools and
        ``(address, size)`` of each of ``blocks`` (None stays None); equal states replay equally."""
        return (self.allocated, self.reserved, tuple(self._pools[False]), tuple(self._pools[True]),
                tuple((b.ptr, b.size) if b is not None else None for b in blocks))

    def reset_peak(self) -> None:
        """``torch.cuda.reset_peak_memory_stats()``: peaks restart from the current values."""
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()``: segments that are wholly free go back to the driver."""
        for small, pool in self._pools.items():
            keep = []
            for key in pool:
                block = self._free[key & _ADDRESS]
                if block.prev is None and block.next is None:
                    self.reserved -= block.size
                    self.segments -= 1
                    del self._free[block.ptr]
                else:
                    keep.append(key)
            self._pools[small] = keep

    # ---- snapshots: the state after loading the weights, shared by every run of a model -------------
    def snapshot(self) -> tuple:
        """The state, for ``restore``, when no block was ever freed (after loading the weights): then every
        free block is the tail of a segment whose other blocks stay allocated for good."""
        tails = []
        for small, pool in self._pools.items():
            for key in pool:
                block = self._free[key & _ADDRESS]
                assert block.next is None and (block.prev is None or not block.prev.free)
                tails.append((small, block.ptr, block.size, block.prev is not None))
        return (self.allocated, self.reserved, self.segments, self._next_ptr, tuple(tails))

    @classmethod
    def restore(cls, snap: tuple) -> "CachingAllocator":
        """A new allocator in the state ``snapshot`` saw (peaks reset to it)."""
        a = cls()
        a.allocated, a.reserved, a.segments, a._next_ptr, tails = snap
        for small, ptr, size, held in tails:
            block = _Block(ptr, size, small)
            if held:  # an allocated neighbour that is never freed: it only stops merges
                wall = _Block(ptr - MIN_BLOCK, MIN_BLOCK, small)
                wall.free = False
                block.prev = wall
            a._pools[small].append(size << _SHIFT | ptr)
            a._free[ptr] = block
        for pool in a._pools.values():
            pool.sort()
        a.reset_peak()
        return a


# ---- non-default PYTORCH_CUDA_ALLOC_CONF (estimator/alloc_conf.py) ------------------------------------
# Only the Python models follow these settings: ``estimator/_replay.c`` is the default allocator, and
# ``program.simulate`` runs these classes instead of it whenever a setting changes device memory.


class _PlainRun:
    """``run`` as plain ``malloc``/``free`` calls (the default allocator inlines them; these classes do not),
    and ``peak_needed``: the most bytes held by segments with a live block, seen whenever the reserve grows.

    The model has no memory limit, but torch has one: when ``cudaMalloc`` fails, ``malloc`` frees cached
    blocks (``release_available_cached_blocks``: oversize ones first, then ``release_cached_blocks``: every
    wholly free segment, or the free pages of expandable segments) and retries. Under ``max_split_size_mb``
    the cached oversize blocks can grow without bound (a request just below the limit never reuses a
    segment at or above it), so ``peak_reserved`` with unlimited memory says nothing about what a GPU needs;
    ``peak_needed`` is the reserve without what such a retry frees (an approximation: after a real release
    the blocks fall differently). ``_releasable`` is what ``release_cached_blocks`` would free.

    ``reports_needed``: only under ``max_split_size_mb`` does the estimate count ``peak_needed`` instead of
    ``peak_reserved``; otherwise the cache kept is bounded fragmentation, which a GPU with ample memory
    shows (as with the default allocator, whose calibrated reserve is ``peak_reserved``)."""

    peak_needed = 0

    @property
    def reports_needed(self) -> bool:
        return self.conf.max_split_size_bytes is not None

    def _releasable(self) -> int:
        return sum(b.size for b in self._free.values() if b.prev is None and b.next is None)

    def _grown(self, releasable: int) -> None:
        """After the reserve grew: note the reserve less what was free to release before it grew."""
        needed = self.reserved - releasable
        if needed > self.peak_needed:
            self.peak_needed = needed

    def reset_peak(self) -> None:
        super().reset_peak()
        self.peak_needed = self.reserved - self._releasable()

    def run(self, ops: list, loc: list, start: int = 0, x: int = 0) -> int:
        n = len(ops)
        i = start
        while i < n:
            slot, nbytes = ops[i]
            if slot < 0:
                break
            i += 1
            if nbytes.__class__ is tuple:
                nbytes = -(-(nbytes[0] + nbytes[1] * x) // MIN_BLOCK) * MIN_BLOCK
            if nbytes:
                loc[slot] = self.malloc(nbytes)
            elif loc[slot] is not None:
                self.free(loc[slot])
        return i


class ConfiguredAllocator(_PlainRun, CachingAllocator):
    """The default allocator under ``max_split_size_mb`` / ``max_non_split_rounding_mb`` /
    ``roundup_power2_divisions`` (``conf``, set per class by ``allocator_class``). From
    ``CUDACachingAllocator.cpp``:

    - ``round_size``: ``AllocConf.round_size`` (the power-of-two divisions); applied to sizes the program already
      rounded to 512 bytes, which gives the same bytes (a division step is a power of two >= 512);
    - ``get_free_block``: the best-fit block is refused (a new segment instead) when the request is under
      ``max_split_size`` and the block is not, or the request is at least ``max_split_size`` and the block
      exceeds it by ``max_non_split_rounding_size`` or more; the next larger block is not tried;
    - ``should_split`` (large pool): only a request under ``max_split_size``, with more than 1 MiB left over.

    Segments are never released: ``release_available_cached_blocks`` runs only when ``cudaMalloc`` fails, and
    the model has no memory limit (it answers how much memory a run takes)."""

    conf = None  # an ``AllocConf``; ``allocator_class`` makes one subclass per setting

    def _segment(self, size: int, small: bool) -> _Block:
        releasable = self._releasable()
        block = super()._segment(size, small)
        self._grown(releasable)
        return block

    def malloc(self, nbytes: int) -> _Block | None:
        if nbytes <= 0:
            return None
        conf = self.conf
        size = conf.round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._pools[small]
        limit = conf.max_split_size_bytes
        block = None
        i = bisect_left(pool, size << _SHIFT)
        if i < len(pool):
            found = pool[i] >> _SHIFT
            oversize = limit is not None and (
                (size < limit and found >= limit) or (size >= limit and found >= size + conf.max_non_split_rounding_bytes))
            if not oversize:
                block = self._free.pop(pool.pop(i) & _ADDRESS)
        if block is None:
            block = self._segment(size, small)
        rest = block.size - size
        if small:
            split = rest >= MIN_BLOCK
        else:
            split = (limit is None or size < limit) and rest > SMALL_SIZE
        return self._take(block, size, pool, split)


_CLASSES: dict = {}


def allocator_class(conf) -> type:
    """The allocator model for an ``AllocConf`` (None or the defaults: ``CachingAllocator``, which
    ``estimator/_replay.c`` mirrors); one class per setting, made once."""
    if conf is None or conf.is_default:
        return CachingAllocator
    key = conf.memory_settings()
    cls = _CLASSES.get(key)
    if cls is None:
        if conf.expandable_segments:
            from estimator.expandable import ExpandableAllocator as base
        else:
            base = ConfiguredAllocator
        cls = _CLASSES[key] = type(base.__name__, (base,), {"conf": conf})
    return cls
