"""The tensors a transformers 5.17 inference run allocates, in order, replayed in the allocator model.

``simulate(spec, workload)`` walks one ``generate`` (prefill, then one forward per new token after the
first) or one full-logit ``forward`` the way the transformers 5.17 modeling code runs it on a CUDA GPU,
and feeds every tensor it creates and frees to ``estimator.allocator.CachingAllocator``. It returns the
peak bytes allocated and reserved above the weights: the activation and KV terms of the estimate, with
the allocator's fragmentation included, from shapes alone (no torch).

What is modelled, and where it comes from (transformers 5.17, torch 2.11 on sm90):

- RMSNorm upcasts to fp32: ``x.float()``, ``pow(2)``, ``x * rsqrt``, ``.to(dtype)``, ``weight *``
  (``LlamaRMSNorm``; Gemma's variant multiplies by ``1 + weight`` in fp32 and casts last). At fp32 the
  casts are no-ops and allocate nothing.
- Rotary embeddings: ``q * cos + rotate_half(q) * sin`` with ``rotate_half`` = ``cat(-x2, x1)``; Phi-3
  concatenates the pass-through part once more.
- The cache: ``DynamicLayer.update`` is ``torch.cat`` (the new cache tensor exists before the old one is
  freed); ``DynamicSlidingWindowLayer`` keeps a view of the concatenation, so after a long prompt the
  whole prompt stays allocated until the first decode step; ``StaticLayer`` allocates ``max_cache_len``
  once and writes in place; MLA caches the compressed latent and the shared rotary key, and expands
  them (``kv_b_proj``) for every forward.
- sdpa picks flash attention (bf16/fp16, head dim <= 256, no mask; ``enable_gqa`` for GQA): the output
  and a fp32 log-sum-exp, nothing of size seq^2. With a mask (sliding window past its length) or
  different K/V head dims, transformers repeats K/V and torch takes the memory-efficient kernel. At fp32
  flash is unavailable and the memory-efficient kernel refuses ``enable_gqa``, so GQA falls back to the
  math kernel: the scores, their ``_safe_softmax`` and a boolean mask are alive together (2.25 x the
  fp32 scores, which the reference fp32 runs confirm); fp32 multi-head attention stays memory-efficient.
- eager attention: the query copy ``matmul`` makes, scores, ``* scaling``, ``+ mask``, the fp32 softmax
  (its input is first cast to fp32), the cast back; the weights stay alive until the decoder layer
  returns (``hidden_states, _ = self.self_attn(...)``). Gemma 2 soft-caps the scores and the logits.
- MLPs: ``down(act(gate(x)) * up(x))``; Phi-3's fused ``gate_up_proj``; GPT-2's ``gelu_new`` written
  out in Python (five temporaries); mixture-of-experts through ``grouped_mm_experts_forward`` (the
  default on sm80+): sorted routed copies of the hidden states, the fused gate/up output and its
  ``masked_fill`` copy, the down projection and the re-ordering.
- Qwen3-Next: gated attention (``q_proj`` yields the query and a gate, the output is multiplied by
  ``sigmoid(gate)``), a partial rotary (a quarter of the head dim rotated, then ``cat``), the shared
  expert before the routed ones; its gated delta-net layers follow transformers' torch fallbacks: the
  projections and their reshaping copies, ``causal_conv1d_fn``, ``torch_chunk_gated_delta_rule`` (fp32
  copies padded to chunks of 64, the (64 x 64) pairwise decays per chunk, the triangular solves, then one
  loop iteration per chunk) and ``Qwen3NextRMSNormGated``; a decode step runs ``causal_conv1d_update``
  and ``torch_recurrent_gated_delta_rule`` on the cached fp32 state. Traced event by event, the replay
  allocates what the trace does except generic details below 1% (the rotary's scaling temporaries).
- generate computes the last position's logits only, copies them to fp32 and, when the model has an
  EOS token and ``min_new_tokens`` is set (the harness's method), the min-length processor makes two
  more fp32 copies; the fp32 logits of a step live until the next step replaces them.

Tensors of at most 1 MiB are left out: they come from the allocator's small pool (2 MiB segments) and
change the peaks by a few MiB, which the ``workspace_bytes`` coefficient absorbs together with the
cuBLAS workspace.

Family quirks live in ``layout(model_type)``: the replay's view of the model type's record in
``estimator/family.py``; everything else follows from the ``ModelSpec``.

How it runs fast, with the same result as replaying every tensor of every layer and step: the template
engine (``estimator/replay/engine.py``) records each piece once and replays it; the plain replay
(``estimator/replay/reference.py``) runs every piece, and the frozen oracle it writes
(``tests/estimator/test_program_speed_equivalence.py``) holds the two to the same bytes. A dynamic cache
that grows is replayed step by step: its blocks keep moving between segments, and the allocator's state
does not repeat.

The optional C allocator (``estimator/_replay.c``, built when a compiler is there) runs the same requests
4-8x faster, and whole runs of such growing decode steps in one call (``Replay.fast_steps``), 30-40x
faster; ``simulate`` uses it unless ``ACCELERATE`` is False (``VRAMCAL_PYTHON_REPLAY=1``), and falls back to
the Python allocator, the reference, when a size passes 2**62. Both give the same bytes
(``tests/estimator/test_replay_accelerator.py`` and the oracle, on both paths).
"""

from __future__ import annotations

import os

from estimator.alloc_conf import parse_alloc_conf
from estimator.allocator import SMALL_SIZE, CachingAllocator, allocator_class, round_size
from estimator.replay.engine import Replay
from estimator.replay.program import Program
from estimator.replay.step import Step
from estimator.replay.weights import weights_state
from estimator.spec import ModelSpec


MIN_TRACKED_BYTES = SMALL_SIZE + 1

try:  # the optional C allocator (estimator/_replay.c); the Python one is the reference
    from estimator._replay import Allocator as _CAllocator
except ImportError:  # not built (no compiler at install): the Python replay answers, the same bytes
    _CAllocator = None
# False: always the Python replay (also ``VRAMCAL_PYTHON_REPLAY=1`` in the environment)
ACCELERATE = not os.environ.get("VRAMCAL_PYTHON_REPLAY")


def accelerated() -> bool:
    """Whether ``simulate`` runs on the C allocator by default (built and not switched off)."""
    return ACCELERATE and _CAllocator is not None


def simulate(spec: ModelSpec, workload, min_bytes: int = MIN_TRACKED_BYTES,
             accelerate: bool | None = None) -> dict[str, int]:
    """Peak bytes allocated and reserved above the weights for one run of ``workload`` on ``spec``.

    Returns ``{"sim_allocated_bytes", "sim_reserved_bytes", "sim_peak_step"}``: the peaks of
    ``torch.cuda.max_memory_allocated()`` / ``max_memory_reserved()`` minus the weights' bytes, as the
    harness measures them (reset after the weights are loaded and ``empty_cache()``), tensors under
    ``min_bytes`` left out.

    ``accelerate``: run on the C allocator (default: ``accelerated()``); the same answer as the Python
    one, which takes over, from the start, when a size passes 2**62 (the C one's OverflowError).
    """
    kind = allocator_class(parse_alloc_conf(workload.alloc_conf))
    if kind is not CachingAllocator:  # a non-default PYTORCH_CUDA_ALLOC_CONF: only the Python models follow it
        return _simulate(spec, workload, min_bytes, kind)
    if accelerate is None:
        accelerate = accelerated()
    if accelerate and _CAllocator is not None:
        try:
            return _simulate(spec, workload, min_bytes, _CAllocator)
        except OverflowError:
            pass
    return _simulate(spec, workload, min_bytes, CachingAllocator)


def generate_scores_logits(spec: ModelSpec, workload) -> bool:
    """Whether generate's min-length processor copies the logits (twice, fp32) at every step: the model has
    an EOS token and ``min_new_tokens`` is set (the harness's method, for more than one new token)."""
    eos = spec.config.get("eos_token_id") if spec.config else None
    return eos is not None and workload.new_tokens > 1


def _simulate(spec: ModelSpec, workload, min_bytes: int, allocator) -> dict[str, int]:
    alloc = allocator.restore(weights_state(spec, workload, min_bytes))
    base = alloc.allocated
    replay = Replay(Program(spec, workload, min_bytes), min_bytes, alloc)
    b, V = workload.batch, spec.vocab_size
    peak_step = 0

    def new(nbytes):
        return alloc.malloc(nbytes) if nbytes >= min_bytes else None

    if workload.workload == "forward":
        alloc.free(replay.forward(Step(workload.context, 0, use_cache=False, logits_positions=workload.context)))
    else:
        static = workload.cache_tokens if workload.cache == "static" else None
        prompt = workload.prompt_tokens
        scored = generate_scores_logits(spec, workload)
        copy = round_size(b * V * 4) if b * V * 4 >= min_bytes else 0  # a tracked fp32 copy of the logits
        past = 0
        prev_logits32 = prev_scores = None
        steps = max(workload.new_tokens, 1)
        step = 0
        seen: dict = {}  # allocator state at a decode step's start -> step, since sizes stopped growing
        valid_to = float("inf")  # the past up to which the pieces those steps ran hold
        grew = True  # the last step's sizes grew with the past (or it was the prompt): ``seen`` was reset
        while step < steps:
            q_len = prompt if step == 0 else 1
            if step > 1 and not grew:
                # Decode steps whose pieces allocate the same sizes at any past (a static cache, a full
                # sliding window) and that bring the allocator back to a state it had p steps earlier
                # repeat those p steps exactly, up to where the pieces' recordings stop holding: skip whole
                # periods (their peaks were seen, so they set no new one). After a step that grew, the state
                # would be forgotten at the end of this one if it grows too, as it mostly does: not built
                # (a skip found one step later is the same skip).
                state = replay.state(prev_logits32, prev_scores)
                if state in seen:
                    period = step - seen[state]
                    skip = min(steps - step, replay.same_steps(past, valid_to)) // period * period
                    if skip > 0:
                        step += skip
                        past += skip
                        seen, valid_to = {}, float("inf")
                        continue
                seen[state] = step
            if step > 0 and grew and past > 0:  # growing decode steps, many in one call
                held = [prev_logits32, prev_scores]
                done = replay.fast_steps(past, steps - step, static, (copy, copy if scored else 0), held)
                if done is not None:
                    k, last = done
                    if last >= 0:
                        peak_step = step + last
                    prev_logits32, prev_scores = held
                    step += k
                    past += k
                    seen, valid_to = {}, float("inf")
                    continue
            replay.used = []
            before = alloc.peak_allocated
            logits = replay.forward(Step(q_len, past, True, static, 1, decoding=step > 0))
            past += q_len
            logits32 = new(b * V * 4)  # logits[:, -1].to(float32, copy=True)
            alloc.free(prev_logits32)
            prev_logits32 = logits32
            if scored:  # min-length processor: clone, then where
                clone = new(b * V * 4)
                scores = new(b * V * 4)
                alloc.free(clone)
                alloc.free(prev_scores)
                prev_scores = scores
            alloc.free(logits)  # del outputs
            if alloc.peak_allocated > before:
                peak_step = step
            grew = step == 0 or any(t.sym for t in replay.used)
            if grew:
                seen, valid_to = {}, float("inf")
            else:
                valid_to = min([valid_to] + [t.hi for t in replay.used])
            step += 1
    out = {
        "sim_allocated_bytes": alloc.peak_allocated - base,
        "sim_reserved_bytes": alloc.peak_reserved - base,
        "sim_peak_step": peak_step,
    }
    if getattr(alloc, "reports_needed", False):  # max_split_size_mb (estimator/allocator.py, _PlainRun)
        out["sim_needed_bytes"] = alloc.peak_needed - base
    return out
