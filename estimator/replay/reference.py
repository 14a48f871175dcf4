"""The plain replay: every tensor of every layer of every forward, straight into the Python allocator.

No templates, no symbolic past, no skipped loop iterations or decode steps, no reduced decode layers, no
C allocator: ``Program`` (``estimator/replay/program.py``) writes onto a ``LiveTape`` that calls
``CachingAllocator.malloc`` / ``free`` as each request is made, and the generate loop below runs every
step. It is slow (a 300-token generation of a 126-layer model is some seconds) and it is the definition
the fast path (``estimator/replay/runner.py``, ``engine.py``, ``estimator/_replay.c``) must reproduce:
``scripts/regenerate_replay_oracle.py`` writes the frozen oracle from it, and
``tests/estimator/test_program_speed_equivalence.py`` checks the fast path against that oracle and, on a
few cases, against this module directly.
"""

from __future__ import annotations

from estimator.allocator import CachingAllocator
from estimator.replay.program import Program
from estimator.replay.runner import MIN_TRACKED_BYTES, generate_scores_logits
from estimator.replay.step import Step
from estimator.replay.weights import weights_state
from estimator.spec import ModelSpec


class LiveTape:
    """``Tape``'s interface (``estimator/replay/engine.py``), executed as it is called: ``new`` allocates a
    block (None under ``min_bytes``), ``free`` frees blocks, ``layers`` runs every decoder layer at
    ``self.step``, ``repeat`` runs every iteration of a loop."""

    def __init__(self, alloc: CachingAllocator, min_bytes: int, program: Program):
        self.alloc, self.min_bytes, self.program = alloc, min_bytes, program
        self.step: Step | None = None  # the forward being run (set by ``forward``)

    def new(self, nbytes):
        nbytes = int(nbytes)
        return self.alloc.malloc(nbytes) if nbytes >= self.min_bytes else None

    def free(self, *blocks) -> None:
        for block in blocks:
            self.alloc.free(block)

    def layers(self, h, kept: bool):
        """Every decoder layer on ``h``; ``kept``: the caller still references ``h`` (the first layer
        does not free it). The masks are the frame's: a layer reads them and frees nothing of them."""
        program, step = self.program, self.step
        for i, layer in enumerate(program.spec.layers):
            h = program.layer(i, layer, step, {}, h, [h] if kept and i == 0 else [])
        return h

    def repeat(self, count: int, body, carried: tuple) -> tuple:
        for _ in range(count):
            carried = body(carried)
        return carried


def simulate_reference(spec: ModelSpec, workload, min_bytes: int = MIN_TRACKED_BYTES) -> dict[str, int]:
    """``estimator.replay.simulate``'s answer, computed the plain way (the same keys)."""
    alloc = CachingAllocator.restore(weights_state(spec, workload, min_bytes))
    base = alloc.allocated
    program = Program(spec, workload, min_bytes)
    tape = program.t = LiveTape(alloc, min_bytes, program)
    b, V = workload.batch, spec.vocab_size
    peak_step = 0

    def forward(step: Step):
        tape.step = step
        return program.frame(step)

    if workload.workload == "forward":
        alloc.free(forward(Step(workload.context, 0, use_cache=False, logits_positions=workload.context)))
    else:
        static = workload.cache_tokens if workload.cache == "static" else None
        scored = generate_scores_logits(spec, workload)
        past = 0
        prev_logits32 = prev_scores = None
        for n in range(max(workload.new_tokens, 1)):
            q_len = workload.prompt_tokens if n == 0 else 1
            before = alloc.peak_allocated
            logits = forward(Step(q_len, past, True, static, 1, decoding=n > 0))
            past += q_len
            logits32 = tape.new(b * V * 4)  # logits[:, -1].to(float32, copy=True)
            alloc.free(prev_logits32)
            prev_logits32 = logits32
            if scored:  # min-length processor: clone, then where
                clone = tape.new(b * V * 4)
                scores = tape.new(b * V * 4)
                alloc.free(clone)
                alloc.free(prev_scores)
                prev_scores = scores
            alloc.free(logits)  # del outputs
            if alloc.peak_allocated > before:
                peak_step = n
    return {
        "sim_allocated_bytes": alloc.peak_allocated - base,
        "sim_reserved_bytes": alloc.peak_reserved - base,
        "sim_peak_step": peak_step,
    }
