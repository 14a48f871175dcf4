"""The template engine that makes the replay fast: the same allocator requests as the plain program.

``Program`` (``estimator/replay/program.py``) describes a forward on a ``Tape`` that records ops on
numbered slots; ``Replay`` records each piece (a forward's frame, one decoder layer) once per shape and
replays the recording for every layer of that kind. A decode step's pieces are recorded with the past
tokens as a symbol (``Sym``: sizes ``a + b * past``, comparisons kept as conditions), so one recording
serves every step for which the conditions answer the same, and a whole step runs as one flat list of ops
(``FlatStep``). Two repetitions are skipped, only once the allocator's state has been seen to repeat
exactly: the iterations of a loop (the gated delta rule's chunks) and decode steps whose sizes no longer
grow (a static cache, a full sliding window). ``estimator/replay/reference.py`` runs the same program
with none of this; ``tests/estimator/test_program_speed_equivalence.py`` holds the two to the same bytes.
"""

from __future__ import annotations

from estimator.allocator import CachingAllocator
from estimator.replay.step import Step
from estimator.spec import LayerSpec


class NotAffine(Exception):
    """A size that is not ``a + b * x`` in the decode step's past tokens: record that step concretely."""


class Sym:
    """``a + b * x``, a quantity of a decode step that grows with its past tokens ``x`` (the cache's and
    the masks' lengths). Comparisons answer for the recorded ``x`` and are kept in ``conds``: a recorded
    step holds for every ``x`` that answers them the same way (``valid_range``)."""

    __slots__ = ("a", "b", "x", "conds")

    def __init__(self, a, b, x: int, conds: list):
        self.a, self.b, self.x, self.conds = a, b, x, conds

    def _new(self, a, b):
        return Sym(a, b, self.x, self.conds)

    def __add__(self, o):
        if isinstance(o, Sym):
            return self._new(self.a + o.a, self.b + o.b)
        return self._new(self.a + o, self.b)

    __radd__ = __add__

    def __sub__(self, o):
        if isinstance(o, Sym):
            return self._new(self.a - o.a, self.b - o.b)
        return self._new(self.a - o, self.b)

    def __rsub__(self, o):
        return self._new(o - self.a, -self.b)

    def __neg__(self):
        return self._new(-self.a, -self.b)

    def __mul__(self, o):
        if isinstance(o, Sym):
            raise NotAffine
        return self._new(self.a * o, self.b * o)

    __rmul__ = __mul__

    def __truediv__(self, o):
        if isinstance(o, Sym):
            raise NotAffine
        return self._new(self.a / o, self.b / o)

    def _floordiv(self, *_):
        raise NotAffine

    __floordiv__ = __rfloordiv__ = __rtruediv__ = __mod__ = __int__ = __index__ = __float__ = _floordiv

    def _cmp(self, o, op: str) -> bool:
        d = self - o
        v = d.a + d.b * self.x
        out = {"<": v < 0, "<=": v <= 0, ">": v > 0, ">=": v >= 0, "==": v == 0, "!=": v != 0}[op]
        if d.b:
            self.conds.append((d.a, d.b, op, out))
        return out

    def __lt__(self, o):
        return self._cmp(o, "<")

    def __le__(self, o):
        return self._cmp(o, "<=")

    def __gt__(self, o):
        return self._cmp(o, ">")

    def __ge__(self, o):
        return self._cmp(o, ">=")

    def __eq__(self, o):
        return self._cmp(o, "==")

    def __ne__(self, o):
        return self._cmp(o, "!=")

    __hash__ = None


def valid_range(conds: list, x: int) -> tuple[float, float]:
    """The integers ``[lo, hi]`` around ``x`` for which every recorded comparison answers as it did at ``x``.

    ``a + b * y`` has one sign below ``t = -a / b`` and the other above, so a comparison's answer is the
    same on ``(-inf, floor(t) - 1]``, may differ at ``floor(t)``, and is the same on ``[floor(t) + 1, inf)``.
    """
    from fractions import Fraction
    from math import floor

    lo, hi = float("-inf"), float("inf")
    for a, b, op, out in conds:
        k = floor(Fraction(-a) / Fraction(b))

        def same(y: int) -> bool:
            return cmp_at(a, b, op, y) == out

        if x <= k - 1:
            hi = min(hi, (k if not same(k + 1) else float("inf")) if same(k) else k - 1)
        elif x >= k + 1:
            lo = max(lo, (k if not same(k - 1) else float("-inf")) if same(k) else k + 1)
        else:
            if not same(k - 1):
                lo = max(lo, k)
            if not same(k + 1):
                hi = min(hi, k)
    return lo, hi


def cmp_at(a, b, op: str, y: int) -> bool:
    from fractions import Fraction

    v = Fraction(a) + Fraction(b) * y
    return {"<": v < 0, "<=": v <= 0, ">": v > 0, ">=": v >= 0, "==": v == 0, "!=": v != 0}[op]


class Tape:
    """Records what a piece of the program allocates and frees, as ops on numbered slots.

    ``new(nbytes)`` returns a slot, or None for a tensor under ``min_bytes`` (never tracked). An op is
    ``(slot, nbytes)`` (allocate; a ``Sym`` size in a decode step) or ``(slot, 0)`` (free);
    ``(-1, Repeat)`` runs a recorded body several times. Slots ``0 .. n_ext - 1`` are bound by the
    caller (a layer's input, its cache)."""

    __slots__ = ("ops", "n", "min_bytes")

    def __init__(self, min_bytes: int, n_ext: int = 0):
        self.ops: list = []
        self.n = n_ext
        self.min_bytes = min_bytes

    def new(self, nbytes):
        if not isinstance(nbytes, Sym):
            nbytes = int(nbytes)
        if nbytes < self.min_bytes:
            return None
        slot = self.n
        self.n += 1
        self.ops.append((slot, nbytes))
        return slot

    def free(self, *slots) -> None:
        for slot in slots:
            if slot is not None:
                self.ops.append((slot, 0))

    def layers(self, h, kept: bool):
        """Every decoder layer, run by the replay on the hidden states ``h`` (``kept``: also referenced by
        the caller, so the first layer does not free it); returns the last layer's output's slot."""
        slot = self.n
        self.n += 1
        self.ops.append((-2, (h, kept, slot)))
        return slot

    def repeat(self, count: int, step, carried: tuple) -> tuple:
        """``count`` iterations of ``step(carried) -> carried`` (a loop whose iterations allocate the same
        sizes): recorded once, replayed until the allocator's state repeats (``_execute``)."""
        outer, self.ops = self.ops, []
        out = step(carried)
        body, self.ops = self.ops, outer
        if any((i is None) != (o is None) for i, o in zip(carried, out)):
            raise AssertionError("a loop-carried tensor is tracked in one iteration only")
        if body:
            self.ops.append((-1, Repeat(count, body, [(i, o) for i, o in zip(carried, out) if i is not None])))
        return out


class Repeat:
    __slots__ = ("count", "body", "carry")

    def __init__(self, count: int, body: list, carry: list):
        self.count, self.body, self.carry = count, body, carry


class Template:
    """A recorded piece of the program: ``ops`` on ``n`` slots, valid for past tokens in ``[lo, hi]``;
    ``sym``: some sizes are ``(a, b)``, i.e. ``a + b * past``. ``out``: what the piece hands back."""

    __slots__ = ("ops", "n", "lo", "hi", "sym", "out", "loop")

    def __init__(self, ops: list, n: int, lo, hi, sym: bool, out):
        self.ops, self.n, self.lo, self.hi, self.sym, self.out = ops, n, lo, hi, sym, out
        self.loop = None  # whether ``ops`` hold a loop (``Repeat``), once ``_flatten`` asked


class FlatStep:
    """A decode step flattened (``Replay._flatten``): its ops, the slots that take each layer's cache
    tensors in (``cache_in``: layer, slot, slot) and hand them out (``cache_out``: layer, slot, slot, tokens
    held), the logits' slot."""

    __slots__ = ("ops", "n", "lo", "hi", "sym", "cache_in", "cache_out", "logits", "fast")

    def __init__(self, tmpl: Template, cache_in: list, cache_out: list, logits):
        self.ops, self.n, self.lo, self.hi, self.sym = tmpl.ops, tmpl.n, tmpl.lo, tmpl.hi, tmpl.sym
        self.cache_in, self.cache_out, self.logits = cache_in, cache_out, logits
        self.fast = None  # (glue, program for the allocator's ``decode``...): ``Replay.fast_steps``


class Replay:
    """Runs the program of ``Program`` on the allocator model. Each piece (a forward's frame, one layer) is
    recorded once per shape and replayed for every layer and step it serves; a decode step's pieces are
    recorded with a symbolic past (``Sym``), so one recording serves every step whose comparisons answer
    the same. The allocator sees exactly the requests the plain program makes, in the same order."""

    def __init__(self, run, min_bytes: int, alloc: CachingAllocator):
        self.spec, self.min_bytes, self.alloc = run.spec, min_bytes, alloc
        self.run = run  # the Program whose pieces are recorded
        self.cache: dict[int, list] = {}  # layer index -> [block, block, tokens held]
        self.templates: dict[tuple, list] = {}
        self.used: list = []  # the templates the current step ran
        kinds: dict = {}
        self._kind = [kinds.setdefault(layer, len(kinds)) for layer in run.spec.layers]  # a small key per layer

    def same_steps(self, past: int, valid_to: float) -> float:
        """How many decode steps from ``past`` on run the same pieces as the last ones, whose sizes do not
        depend on the past and whose recordings hold up to ``valid_to``: up to there, or to the past at
        which a cache's held tokens equal it (a layer's piece changes there)."""
        end = valid_to + 1
        for e in self.cache.values():
            if e[2] >= past:
                end = min(end, e[2])
        return end - past

    def state(self, *blocks) -> tuple:
        """What the next step's allocations depend on besides the past: the free blocks, the live ones."""
        live = [b for e in self.cache.values() for b in e[:2]] + list(blocks)
        return self.alloc.state(live), tuple(e[2] for e in self.cache.values())

    # ---- recording --------------------------------------------------------------------------------
    def _template(self, key: tuple, x: int, symbolic: bool, record) -> Template:
        """The template for ``key`` valid at past ``x``, recorded if none is: ``record(past) -> out`` runs
        the piece on ``self.run.t`` (a fresh tape), with a symbolic past when ``symbolic``."""
        found = self.templates.get(key)
        if found:
            for tmpl in found:
                if tmpl.lo <= x <= tmpl.hi:
                    self.used.append(tmpl)
                    return tmpl
        tmpl = None
        if symbolic:
            conds: list = []
            try:
                tmpl = self._record(record, Sym(0, 1, x, conds), x)
                tmpl.lo, tmpl.hi = valid_range(conds, x)
            except NotAffine:
                tmpl = None
        if tmpl is None:
            tmpl = self._record(record, x, x)
        self.templates.setdefault(key, []).append(tmpl)
        self.used.append(tmpl)
        return tmpl

    def _record(self, record, past, x: int) -> Template:
        self.run.t = tape = Tape(self.min_bytes)
        out = record(past)
        ops, sym = [], False
        for s, z in tape.ops:
            if s >= 0 and isinstance(z, Sym):
                a, b = z.a, z.b
                if a != int(a) or b != int(b):
                    raise NotAffine  # int() of a fractional size is not affine
                z = (int(a), int(b)) if b else int(a)
                sym = sym or bool(b)
            if s >= 0 and z.__class__ is int and z:
                z = -(-z // 512) * 512  # the allocator's round_size, done once
            ops.append((s, z))
        if isinstance(out, tuple) and any(isinstance(v, Sym) for v in out):
            out = tuple((int(v.a), int(v.b)) if isinstance(v, Sym) else v for v in out)
        return Template(ops, tape.n, x, x, sym, out)

    # ---- running ----------------------------------------------------------------------------------
    def forward(self, step: Step):
        """One forward (the prompt, a decode step or a whole forward pass) at ``step.past`` (an int);
        returns the logits' block."""
        symbolic = step.q_len == 1 and step.past > 0
        if symbolic:
            return self._step(step)
        frame = self._frame(step, symbolic)
        loc = [None] * frame.n
        self._execute(frame.ops, loc, step.past, (step, symbolic))
        return loc[frame.out[0]] if frame.out[0] is not None else None

    def _frame(self, step: Step, symbolic: bool):
        run = self.run

        def record(past):
            return (run.frame(step.at(past)), step.static_decode)

        return self._template(("frame", *step.key()), step.past, symbolic, record)

    def _desc(self, i: int, x: int):
        """What layer ``i``'s recording assumes of its cache: none, or which tensors are tracked and the
        tokens it holds (the past itself, or a fixed number)."""
        entry = self.cache.get(i)
        if entry is None:
            return None
        held = entry[2]
        return (entry[0] is not None, entry[1] is not None, "past" if held == x else held)

    def _layer_template(self, i: int, layer: LayerSpec, step: Step, symbolic: bool, small: bool, first: bool,
                        desc) -> Template:
        """Layer ``i``'s recording at ``step`` (``step.past`` an int), its cache as ``desc`` says."""
        run = self.run
        key = ("layer", self._kind[i], small, step.q_len, step.static_len, step.use_cache, step.decoding,
               first, desc)

        def record(past):
            t = run.t
            t.n = 3  # slots 0, 1, 2: the input hidden states, the cache's two tensors
            if desc is None:
                run.cache.pop(i, None)
            else:
                run.cache[i] = [1 if desc[0] else None, 2 if desc[1] else None,
                                past if desc[2] == "past" else desc[2]]
            if small:
                run.cache_only_layer(i, layer.attention, step.at(past))
                h_out = None
            else:
                # the masks are the frame's: a layer reads them and frees nothing of them
                h_out = run.layer(i, layer, step.at(past), {}, 0, [0] if first else [])
            after = run.cache.get(i)
            if after is None:
                return (h_out, None, None, None)
            return (h_out, after[0], after[1], after[2])

        return self._template(key, step.past, symbolic, record)

    def _step_template(self, step: Step):
        """The flattened decode flat (``FlatStep``) valid at past ``x`` and its layers' descriptors, recorded if
        none is; None for a flat with a loop in a piece."""
        x = step.past
        descs = tuple(self._desc(i, x) for i in range(len(self.spec.layers)))
        key = ("step", *step.key(), descs)
        for cand in self.templates.get(key, ()):
            if cand.lo <= x <= cand.hi:
                return cand, descs
        flat = self._flatten(step, descs)
        if flat is not None:
            self.templates.setdefault(key, []).append(flat)
        return flat, descs

    def _step(self, step: Step):
        """A decode flat as one flat list of ops over every layer (``FlatStep``), built once and run for
        every flat its pieces hold for: no per-layer bookkeeping between the allocator's requests."""
        x = step.past
        flat, _ = self._step_template(step)
        if flat is None:  # a piece with a loop in it: run it piece by piece
            frame = self._frame(step, True)
            loc = [None] * frame.n
            self._execute(frame.ops, loc, x, (step, True))
            return loc[frame.out[0]] if frame.out[0] is not None else None
        self.used.append(flat)
        loc = [None] * flat.n
        cache = self.cache
        for i, s0, s1 in flat.cache_in:
            entry = cache[i]
            loc[s0], loc[s1] = entry[0], entry[1]
        self.alloc.run(flat.ops, loc, 0, x)
        for i, s0, s1, held in flat.cache_out:
            if held.__class__ is tuple:
                held = held[0] + held[1] * x
            cache[i] = [loc[s0] if s0 is not None else None, loc[s1] if s1 is not None else None, held]
        return loc[flat.logits] if flat.logits is not None else None

    def fast_steps(self, x: int, count: int, static_len, glue: tuple, held: list) -> tuple[int, int] | None:
        """Up to ``count`` whole decode steps from past ``x`` in one call of the allocator's ``decode`` (a
        loop in C on the C allocator), while one flattened flat serves them all: its sizes grow with the past
        (a dynamic cache; the state does not repeat, so no flat could be skipped), its recording holds and
        every layer's cache descriptor (``_desc``) stays the same. Each flat is the flat's ops, then
        ``glue`` (``simulate``'s logits copies) and the cache's hand-over, the same requests in the same
        order as ``_step`` and ``simulate``'s loop. ``held``: ``[logits32, scores]``, updated. Returns the
        steps run and the last of them (counted from 0) that raised the peak allocated, or -1; None
        (nothing run) when the steps do not qualify."""
        flat, descs = self._step_template(Step(1, x, True, static_len, 1, decoding=True))
        if flat is None or not flat.sym:
            return None
        k = min(count, flat.hi - x + 1)
        for i, s0, s1, h in flat.cache_out:
            d = descs[i]
            if d is None or (s0 is not None) != d[0] or (s1 is not None) != d[1]:
                return None
            if h.__class__ is tuple:  # the held tokens grow: "past" at every flat only as x + 1
                if d[2] != "past" or h != (1, 1):
                    return None
            elif d[2] == "past" or h != d[2]:
                return None
            elif h is not None and h > x:  # a fixed count stays not "past" until the past reaches it
                k = min(k, h - x)
        if k < 2:
            return None
        if flat.fast is None or flat.fast[0] != glue:
            flat.fast = (glue, *self._fast_program(flat, glue))
        _, ops, n, keep, l32, sc = flat.fast
        loc = [None] * n
        cache = self.cache
        for i, c0, c1 in flat.cache_in:
            loc[c0], loc[c1] = cache[i][0], cache[i][1]
        loc[l32], loc[sc] = held
        last = self.alloc.decode(ops, loc, keep, x, k)
        x_end = x + k - 1
        for i, c0, c1 in flat.cache_in:
            entry = cache[i]
            h = entry[2]
            cache[i] = [loc[c0], loc[c1], x_end + 1 if h == x else h]
        held[:] = [loc[l32], loc[sc]]
        self.used = [flat]
        return k, last

    @staticmethod
    def _fast_program(step: "FlatStep", glue: tuple) -> tuple:
        """``step``'s ops and ``glue`` as one program for ``decode``: extra slots for the fp32 logits and
        scores that live from one step to the next; at its end, moves (``(-3, (dst, src))``) of them and of
        the cache into the slots the next step reads."""
        logits32, scores = glue  # rounded bytes of each copy, or 0 when it is not tracked (or not made)
        n = step.n
        l32, sc, t1, clone, t2 = n, n + 1, n + 2, n + 3, n + 4
        ops, moves = list(step.ops), []
        if logits32:  # logits32 = logits[:, -1].float(); free(prev_logits32)
            ops += [(t1, logits32), (l32, 0)]
            moves.append((-3, (l32, t1)))
        if scores:  # min-length processor: clone, then where
            ops += [(clone, scores), (t2, scores), (clone, 0), (sc, 0)]
            moves.append((-3, (sc, t2)))
        if step.logits is not None:
            ops.append((step.logits, 0))
        out = {i: (s0, s1) for i, s0, s1, _ in step.cache_out}
        keep = [l32, sc]
        for i, c0, c1 in step.cache_in:
            s0, s1 = out[i]
            moves += [(-3, (c0, -1 if s0 is None else s0)), (-3, (c1, -1 if s1 is None else s1))]
            keep += [c0, c1]
        return ops + moves, n + 5, keep, l32, sc

    def _flatten(self, step: Step, descs):
        """The frame's ops with every layer's ops spliced in at its layers op, slots renumbered; None when
        a piece has a loop (``Repeat``). Valid for the pasts every piece holds for."""
        frame = self._frame(step, True)
        small = self.run.small_step(step)
        n = frame.n
        rename = {s: s for s in range(frame.n)}
        ops, lo, hi, sym = [], frame.lo, frame.hi, frame.sym
        cache_in, cache_out = [], []
        for s, z in frame.ops:
            if s == -1:
                return None
            if s >= 0:
                ops.append((rename[s], z))
                continue
            h, kept, out = z
            h = rename[h] if h is not None else None
            for i, layer in enumerate(self.spec.layers):
                desc = descs[i]
                tmpl = self._layer_template(i, layer, step, True, small, kept and i == 0, desc)
                if tmpl.loop is None:
                    tmpl.loop = any(ts == -1 for ts, _ in tmpl.ops)
                if tmpl.loop:
                    return None
                lo, hi, sym = max(lo, tmpl.lo), min(hi, tmpl.hi), sym or tmpl.sym
                # the layer's slots: 0 the input (h), 1 and 2 its cache (n, n + 1), 3.. its own (base + slot)
                c = n
                if desc is not None:
                    cache_in.append((i, n, n + 1))
                    n += 2
                base = n - 3
                n += tmpl.n - 3

                def local(ts, h=h, c=c, base=base, cached=desc is not None):
                    if ts >= 3:
                        return base + ts
                    if ts == 0:
                        return h
                    return c + ts - 1 if cached else None

                t_ops = tmpl.ops
                if h is None:  # an untracked input: its frees go
                    t_ops = [op for op in t_ops if op[0] != 0]
                ops += [(ts + base if ts >= 3 else local(ts), tz) for ts, tz in t_ops]
                h_out, s0, s1, held = tmpl.out
                h = local(h_out) if h_out is not None else None
                if s0 is not None or s1 is not None or held is not None:
                    cache_out.append((i, local(s0) if s0 is not None else None,
                                      local(s1) if s1 is not None else None, held))
                else:
                    cache_out.append((i, None, None, None))
            rename[out] = h if h is not None else out
        logits = frame.out[0]
        return FlatStep(Template(ops, n, lo, hi, sym, None), cache_in, cache_out,
                        rename[logits] if logits is not None else None)

    def _layers(self, h, kept: bool, step: Step, symbolic: bool):
        small = self.run.small_step(step)
        x = step.past
        for i, layer in enumerate(self.spec.layers):
            entry = self.cache.get(i)
            tmpl = self._layer_template(i, layer, step, symbolic, small, kept and i == 0, self._desc(i, x))
            lloc = [h, entry[0] if entry else None, entry[1] if entry else None] + [None] * (tmpl.n - 3)
            self._execute(tmpl.ops, lloc, x, None)
            h_out, s0, s1, held = tmpl.out
            h = lloc[h_out] if h_out is not None else None
            if s0 is None and s1 is None and held is None:
                self.cache.pop(i, None)
            else:
                if held.__class__ is tuple:
                    held = held[0] + held[1] * x
                self.cache[i] = [lloc[s0] if s0 is not None else None, lloc[s1] if s1 is not None else None, held]
        return h

    def _execute(self, ops: list, loc: list, x: int, frame) -> None:
        run, n, i = self.alloc.run, len(ops), 0
        while True:
            i = run(ops, loc, i, x)
            if i == n:
                return
            slot, arg = ops[i]
            if slot == -2:  # the layers
                h, kept, out = arg
                loc[out] = self._layers(loc[h] if h is not None else None, kept, *frame)  # (step, symbolic)
            else:
                self._repeat(arg, loc, x)
            i += 1

    def _repeat(self, rep: "Repeat", loc: list, x: int) -> None:
        """``rep.count`` iterations of its body. The body allocates the same sizes each time and touches
        no block but its own and the loop-carried ones, so the allocator's state at an iteration's start
        (its free blocks, the carried blocks) decides everything after it. Once that state equals the
        state ``p`` iterations earlier, the iterations cycle with period ``p`` (a carried tensor is made
        before its predecessor is freed, so two places alternate: p = 2) and the peaks are already seen:
        skip whole periods, run the rest."""
        alloc = self.alloc
        seen: dict = {}
        left = rep.count
        while left:
            state = alloc.state([loc[i] for i, _ in rep.carry if loc[i] is not None])
            if state in seen:
                left %= seen[state] - left  # the period
                seen = {}
                if not left:
                    break
            else:
                seen[state] = left
            self._execute(rep.body, loc, x, None)
            for i, o in rep.carry:
                loc[i] = loc[o]
            left -= 1
