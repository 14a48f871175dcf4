"""``Step``: the shape of one forward, the argument every piece of the replayed program takes."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, eq=False)  # eq=False: ``past`` may be a Sym, whose comparisons are recorded
class Step:
    """One forward: ``q_len`` new tokens per sequence after ``past`` cached ones.

    ``past`` is an int, or an ``estimator.replay.engine.Sym`` while a decode step is recorded for every
    past at once. ``static_len``: a ``StaticCache``'s ``max_cache_len`` (None: a ``DynamicCache``).
    ``logits_positions``: the positions the head computes logits for (generate: 1; forward: all).
    ``decoding``: one of generate's decode steps (transformers switches MoE to ``batched_mm`` for them).
    """

    q_len: int
    past: object = 0
    use_cache: bool = True
    static_len: int | None = None
    logits_positions: int = 1
    decoding: bool = False

    @property
    def static_decode(self) -> bool:
        """A static cache's decode step: sdpa gets the mask of the pre-allocated positions."""
        return self.static_len is not None and self.q_len == 1

    def at(self, past) -> "Step":
        return replace(self, past=past)

    def key(self) -> tuple:
        """What a recording of a piece depends on besides the past (and the layer's cache)."""
        return (self.q_len, self.logits_positions, self.use_cache, self.static_len, self.decoding)
