"""The caching allocator under ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``.

From ``c10/cuda/CUDACachingAllocator.cpp`` (torch 2.4-2.11; Note [Expandable Segments], ``ExpandableSegment``,
``get_free_block``, ``find_expandable_block``, ``map_block``, ``try_allocate_expandable_block``,
``should_split``, ``free_block``, ``try_merge_blocks``, ``unmap_block``, ``release_blocks``):

- each pool (small: requests <= 1 MiB, large: the rest) has one segment per stream: a virtual address range
  of 1 1/8 the GPU's memory, of which only a prefix of pages is backed; a page is 2 MiB in the small pool
  and 20 MiB (``kLargeBuffer``) in the large pool. ``reserved`` counts the mapped pages.
- a request takes the best-fit free mapped block (smallest, then lowest address), except that a free block
  followed by unmapped address space counts, for the best fit, as its size plus that space
  (``expandable_size``): the block at the segment's mapped end is used only when no other free block fits;
- with none, ``find_expandable_block`` takes the lowest-addressed unmapped range (or the free block right
  before it) with room, and ``map_block`` maps the pages the request still lacks, rounded up to whole
  pages; the new pages merge with the free block before them;
- a block is split whenever at least 512 bytes are left over, in both pools (``should_split``), and the
  rest stays in the pool; a freed block merges with free mapped neighbours;
- ``max_split_size_mb`` still refuses oversize blocks in ``get_free_block``; segments are never unmapped
  during a run (only ``empty_cache`` or an out-of-memory retry unmaps whole free pages).

One segment per pool is modelled, with address space for any request (the real one holds 1 1/8 the GPU's
memory, more than any run that fits). Tested case by case in ``tests/estimator/test_alloc_conf.py``.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from estimator.alloc_conf import AllocConf
from estimator.allocator import _ADDRESS, _SHIFT, MIN_BLOCK, SMALL_BUFFER, SMALL_SIZE, LARGE_BUFFER, CachingAllocator, _PlainRun

_VA = 1 << 80  # address space of a segment: more than any request
_BASE = {False: 0, True: 1 << 84}  # segment starts, multiples of both page sizes
PAGE = {True: SMALL_BUFFER, False: LARGE_BUFFER}  # small pool 2 MiB, large pool 20 MiB


class _EBlock:
    __slots__ = ("ptr", "size", "prev", "next", "free", "small", "mapped")

    def __init__(self, ptr: int, size: int, small: bool, mapped: bool = True):
        self.ptr, self.size, self.small, self.mapped = ptr, size, small, mapped
        self.prev = self.next = None
        self.free = True


class ExpandableAllocator(_PlainRun, CachingAllocator):
    """``malloc``/``free``/``run``/``decode`` as ``CachingAllocator``, with expandable segments."""

    conf = AllocConf(expandable_segments=True)

    def __init__(self):
        super().__init__()
        self._unmapped: dict[bool, dict[int, _EBlock]] = {}
        for small in (True, False):
            self._unmapped[small] = {_BASE[small]: _EBlock(_BASE[small], _VA, small, mapped=False)}

    # ---- the pool of free mapped blocks ------------------------------------------------------------
    def _insert(self, b: _EBlock) -> None:
        insort(self._pools[b.small], b.size << _SHIFT | b.ptr)
        self._free[b.ptr] = b

    def _take(self, b: _EBlock) -> None:
        pool = self._pools[b.small]
        del pool[bisect_left(pool, b.size << _SHIFT | b.ptr)]
        del self._free[b.ptr]

    def _merge(self, dst: _EBlock, src: _EBlock | None) -> None:
        """``try_merge_blocks``: ``src``, a free neighbour of the same mapped state, joins ``dst``."""
        if src is None or not src.free or src.mapped != dst.mapped:
            return
        if src.mapped:
            self._take(src)
        else:
            del self._unmapped[src.small][src.ptr]
        if dst.prev is src:
            dst.ptr, dst.prev = src.ptr, src.prev
            if src.prev is not None:
                src.prev.next = dst
        else:
            dst.next = src.next
            if src.next is not None:
                src.next.prev = dst
        dst.size += src.size

    # ---- malloc ------------------------------------------------------------------------------------
    def _get_free_block(self, size: int, small: bool) -> _EBlock | None:
        pool, free = self._pools[small], self._free
        i = bisect_left(pool, size << _SHIFT)
        if i == len(pool):
            return None

        def expandable(j: int) -> int:
            b = free[pool[j] & _ADDRESS]
            n = b.next
            return b.size + (n.size if n is not None and not n.mapped else 0)

        while i + 1 < len(pool) and expandable(i + 1) < expandable(i):
            i += 1
        block = free[pool[i] & _ADDRESS]
        limit = self.conf.max_split_size_bytes
        if limit is not None and ((size < limit and block.size >= limit) or
                                  (size >= limit and block.size >= size + self.conf.max_non_split_rounding_bytes)):
            return None
        self._take(block)
        return block

    def _releasable(self) -> int:
        """The whole pages inside free mapped blocks: what ``release_cached_blocks`` unmaps."""
        out = 0
        for b in self._free.values():
            page, base = PAGE[b.small], _BASE[b.small]
            out += max((b.ptr + b.size - base) // page - -(-(b.ptr - base) // page), 0) * page
        return out

    def _map(self, b: _EBlock, nbytes: int) -> None:
        """``map_block``: back the pages of ``[b.ptr, b.ptr + nbytes)`` (``b`` unmapped, page-aligned)."""
        releasable = self._releasable()
        page = PAGE[b.small]
        mapped = min(-(-nbytes // page) * page, b.size)
        del self._unmapped[b.small][b.ptr]
        if mapped < b.size:
            rest = _EBlock(b.ptr + mapped, b.size - mapped, b.small, mapped=False)
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            self._unmapped[b.small][rest.ptr] = rest
            b.size = mapped
        b.mapped = True
        self._merge(b, b.prev)
        self._merge(b, b.next)
        self._insert(b)
        self.reserved += mapped
        self.segments += 1  # mappings, as ``num_device_alloc`` counts them
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        self._grown(releasable)

    def _expand(self, size: int, small: bool) -> _EBlock:
        """``try_allocate_expandable_block``: map pages at the lowest address with room for ``size``."""
        unmapped = self._unmapped[small]
        cand = None
        for ptr in sorted(unmapped):  # find_expandable_block
            c = unmapped[ptr]
            if c.prev is not None and c.prev.free:
                c = c.prev
            room, b = 0, c
            while room < size and b is not None and b.free:
                room += b.size
                b = b.next
            if room >= size:
                cand = c
                break
        if cand is None:  # beyond _VA: no GPU holds it
            raise OverflowError("a request beyond the modelled address space")
        if not cand.mapped:
            self._map(cand, min(cand.size, size))
        while cand.size < size:  # free -> unmapped: map what is missing, merged into one block
            nxt = cand.next
            self._map(nxt, min(size - cand.size, nxt.size))
            cand = nxt
        self._take(cand)
        return cand

    def malloc(self, nbytes: int) -> _EBlock | None:
        if nbytes <= 0:
            return None
        size = self.conf.round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._get_free_block(size, small)
        if block is None:
            block = self._expand(size, small)
        rest = block.size - size
        if rest >= MIN_BLOCK:  # should_split with expandable segments: both pools
            tail = _EBlock(block.ptr + size, rest, small)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            block.size = size
            self._insert(tail)
        block.free = False
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block

    def free(self, block: _EBlock | None) -> None:
        if block is None:
            return
        if block.free:
            raise ValueError("block freed twice")
        block.free = True
        self.allocated -= block.size
        prev, nxt = block.prev, block.next
        self._merge(block, prev)
        self._merge(block, nxt)
        self._insert(block)

    # ---- empty_cache, state, snapshots ---------------------------------------------------------------
    def empty_cache(self) -> None:
        """``release_blocks`` for expandable segments (``unmap_block``): the whole pages inside each free
        block are unmapped; the partial pages at its ends stay mapped, as free blocks."""
        for small in (True, False):
            page, base = PAGE[small], _BASE[small]
            for key in list(self._pools[small]):
                b = self._free[key & _ADDRESS]
                begin = base + -(-(b.ptr - base) // page) * page
                end = base + (b.ptr + b.size - base) // page * page
                if begin >= end:
                    continue
                self._take(b)
                if begin > b.ptr:
                    before = _EBlock(b.ptr, begin - b.ptr, small)
                    before.prev, before.next = b.prev, b
                    if b.prev is not None:
                        b.prev.next = before
                    b.prev = before
                    self._insert(before)
                if b.ptr + b.size > end:
                    after = _EBlock(end, b.ptr + b.size - end, small)
                    after.prev, after.next = b, b.next
                    if b.next is not None:
                        b.next.prev = after
                    b.next = after
                    self._insert(after)
                b.ptr, b.size, b.mapped = begin, end - begin, False
                self._merge(b, b.prev)
                self._merge(b, b.next)
                self._unmapped[small][b.ptr] = b
                self.reserved -= end - begin

    def state(self, blocks) -> tuple:
        unmapped = tuple((p, u.size) for small in (False, True) for p, u in sorted(self._unmapped[small].items()))
        return super().state(blocks) + (unmapped,)

    def snapshot(self) -> tuple:
        """Each pool's blocks in address order, runs of allocated blocks as one (they are never freed:
        ``snapshot`` is taken after loading the weights)."""
        pools = []
        for small in (True, False):
            b = self._head(small)
            runs = []
            while b is not None:
                if runs and not b.free and not runs[-1][2]:
                    runs[-1][1] += b.size
                else:
                    runs.append([b.ptr, b.size, b.free, b.mapped])
                b = b.next
            pools.append((small, tuple(tuple(r) for r in runs)))
        return (self.allocated, self.reserved, self.segments, tuple(pools))

    def _head(self, small: bool) -> _EBlock:
        """The pool's first block: back from an unmapped one (the address space's end always is one)."""
        b = next(iter(self._unmapped[small].values()))
        while b.prev is not None:
            b = b.prev
        return b

    @classmethod
    def restore(cls, snap: tuple) -> "ExpandableAllocator":
        a = cls()
        a.allocated, a.reserved, a.segments, pools = snap
        for small, runs in pools:
            a._unmapped[small] = {}
            prev = None
            for ptr, size, free, mapped in runs:
                b = _EBlock(ptr, size, small, mapped)
                b.free = free
                b.prev = prev
                if prev is not None:
                    prev.next = b
                if not mapped:
                    a._unmapped[small][ptr] = b
                elif free:
                    a._insert(b)
                prev = b
        a.reset_peak()
        return a
