"""A model of PyTorch's CUDA caching allocator, to turn a sequence of tensor allocations into
``max_memory_allocated`` and ``max_memory_reserved``.

Fragmentation is not noise: with the default settings the allocator never returns a segment to the
driver during a run, rounds every request, splits large blocks only when the rest exceeds 1 MiB, and
serves a request from the smallest free block that fits. The same sequence of requests therefore always
ends with the same reserved bytes. Replaying the sequence a transformers forward makes
(``estimator/program.py``) reproduces the reserve of the reference H100 runs within about 1% in most
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

Pure Python, no torch. Addresses are virtual: each segment starts far from the previous one.
"""

from __future__ import annotations

from bisect import bisect_left, insort

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
MIN_LARGE_ALLOC = 10 << 20
LARGE_BUFFER = 20 << 20
ROUND_LARGE = 2 << 20
_SEGMENT_GAP = 1 << 44  # virtual distance between segments: blocks of two segments never touch


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
        self._pools: dict[bool, list] = {True: [], False: []}  # sorted (size, ptr, id, block) of free blocks
        self._next_ptr = _SEGMENT_GAP
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.segments = 0

    def malloc(self, nbytes: int) -> _Block | None:
        if nbytes <= 0:
            return None
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._pools[small]
        i = bisect_left(pool, (size,))
        if i < len(pool):
            block = pool.pop(i)[3]
        else:
            seg = segment_size(size)
            block = _Block(self._next_ptr, seg, small)
            self._next_ptr += _SEGMENT_GAP
            self.reserved += seg
            self.segments += 1
            if self.reserved > self.peak_reserved:
                self.peak_reserved = self.reserved
        rest = block.size - size
        if (rest >= MIN_BLOCK) if small else (rest > SMALL_SIZE):
            tail = _Block(block.ptr + size, rest, small)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            block.size = size
            insort(pool, (tail.size, tail.ptr, id(tail), tail))
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
        prev, nxt = block.prev, block.next
        if prev is not None and prev.free:
            self._remove(pool, prev)
            block.ptr, block.size, block.prev = prev.ptr, prev.size + block.size, prev.prev
            if prev.prev is not None:
                prev.prev.next = block
        if nxt is not None and nxt.free:
            self._remove(pool, nxt)
            block.size += nxt.size
            block.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = block
        insort(pool, (block.size, block.ptr, id(block), block))

    @staticmethod
    def _remove(pool: list, block: _Block) -> None:
        i = bisect_left(pool, (block.size, block.ptr, id(block)))
        pool.pop(i)

    def reset_peak(self) -> None:
        """``torch.cuda.reset_peak_memory_stats()``: peaks restart from the current values."""
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()``: segments that are wholly free go back to the driver."""
        for small, pool in self._pools.items():
            keep = []
            for entry in pool:
                block = entry[3]
                if block.prev is None and block.next is None:
                    self.reserved -= block.size
                    self.segments -= 1
                else:
                    keep.append(entry)
            self._pools[small] = keep
