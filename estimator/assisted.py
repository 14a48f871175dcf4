"""Assisted generation (``generate(assistant_model=DRAFT)``) replayed in the allocator model, two models at once.

transformers 5.17's loop (``generation/utils.py`` ``_assisted_decoding``, ``candidate_generator.py``
``AssistedCandidateGenerator``), greedy, batch 1, as the harness pins it (``harness/assisted.py``: K
candidates per step, constant schedule, no confidence stop). Per step, with ``L`` tokens so far:

1. ``get_candidates``: the draft's cache is cropped to ``L - 2`` tokens (``DynamicLayer.crop`` keeps a
   view: the storage stays until the next ``torch.cat``), then the draft's own ``generate`` runs
   ``m = min(K, max_length - L - 1)`` forwards (the first over the tokens it has not cached, then one per
   token), each with its fp32 logits copy and, with ``output_scores=True``, one fp32 score row kept per
   candidate (the main model's min-new-tokens processor runs in the draft too: a copy per row); the rows
   are stacked into ``candidate_logits`` (m x vocab fp32), alive until the next step's.
2. The main model verifies in one forward over ``m + 1`` tokens (the first step: the whole prompt plus
   the candidates) with ``logits_to_keep = m + 1``; ``new_logits`` is their fp32 copy and
   ``next_token_logits`` its clone, both alive until the next step's, as are the outputs (the logits at
   the model's dtype); the processors run per position on one row (a copy, and ``where``'s output).
3. The main cache is cropped back to the accepted tokens.

How many candidates are accepted depends on the weights' values. Modelled: none (each step adds one
token, as random weights do), which runs the most steps; a real draft accepts more, and its caches and
verification forwards differ by at most K + 1 tokens per step. The estimate says so and widens its
interval by that much (``widen_bytes``: K + 1 tokens of both caches, plus one verification's logits).
Prompt lookup decoding (``--prompt-lookup-num-tokens``) has no draft model: its candidates come from the
prompt itself; verification forwards as above.
"""

from __future__ import annotations

from estimator.dtypes import dtype_bytes
from estimator.errors import UserError

DEFAULT_NUM_ASSISTANT_TOKENS = 20  # transformers GenerationConfig default (configuration_utils.py)


def _crop(replay, tokens: int) -> None:
    """``DynamicCache.crop``: every layer holds at most ``tokens``; the storage is not freed."""
    for entry in replay.cache.values():
        if entry[2] > tokens:
            entry[2] = tokens


def simulate_assisted(main, draft, workload, k: int, min_bytes: int = 1, accept: str = "none") -> dict[str, int]:
    """Peak bytes allocated and reserved above both models' weights for one assisted ``generate``.

    ``draft`` is the draft's ModelSpec (None with ``lookup``: prompt lookup decoding)."""
    from dataclasses import replace

    from estimator.allocator import CachingAllocator
    from estimator.replay.engine import Replay
    from estimator.replay.program import Program
    from estimator.replay.step import Step
    from estimator.replay.weights import parameter_bytes

    if workload.batch != 1:
        raise UserError(f"transformers' assisted generation runs batch 1 only (got --batch {workload.batch})")
    if workload.cache != "dynamic" or workload.workload != "generate":
        raise UserError("assisted generation is a generate workload with a dynamic cache")
    alloc = CachingAllocator()
    sizes = parameter_bytes(main, workload)
    if workload.lora is not None:
        from estimator import lora

        sizes += lora.parameter_bytes(main, workload.lora, workload.dtype)
    d_workload = replace(workload, lora=None)
    if draft is not None:
        sizes += parameter_bytes(draft, d_workload)
    for nbytes in sizes:
        if nbytes >= min_bytes:
            alloc.malloc(nbytes)
    alloc.reset_peak()
    base = alloc.allocated
    m_rep = Replay(Program(main, workload, min_bytes), min_bytes, alloc)
    d_rep = Replay(Program(draft, d_workload, min_bytes), min_bytes, alloc) if draft is not None else None

    def new(nbytes):
        return alloc.malloc(int(nbytes)) if nbytes >= min_bytes else None

    V = main.vocab_size
    row = V * 4  # one fp32 vocabulary row
    d_row = (draft.vocab_size if draft is not None else V) * 4
    eos = main.config.get("eos_token_id") if main.config else None
    scored = eos is not None and workload.new_tokens > 1  # MinNewTokensLengthLogitsProcessor (the harness's method)
    fp32 = workload.dtype == "float32"
    P, end = workload.prompt_tokens, workload.context
    L, first = P, True
    d_held = 0  # tokens the draft's cache holds
    outputs = new_logits = next_logits = candidates = None
    peak_step, step = 0, 0
    while L < end:
        before = alloc.peak_allocated
        m = min(k, end - L - 1)
        if m > 0 and d_rep is not None:  # the draft's generate
            if d_held:
                d_held = min(d_held, L - 2)
                _crop(d_rep, d_held)
            scores, prev32 = [], None
            for s in range(m):
                q = L - d_held if s == 0 else 1
                logits = d_rep.forward(Step(q, d_held, True, None, 1, decoding=d_held > 0))
                d_held += q
                l32 = new(d_row)  # logits[:, -1].to(float32, copy=True)
                if scored:  # clone, then where: the row kept in `scores`
                    clone = new(d_row)
                    kept = new(d_row)
                    alloc.free(clone)
                    alloc.free(prev32)
                else:
                    kept = l32
                scores.append(kept)
                prev32 = l32 if scored else None
                alloc.free(logits)  # del outputs
            stacked = new(m * d_row)  # torch.stack(assistant_output.scores, dim=1)
            for sc in scores:
                alloc.free(sc)
            alloc.free(prev32)
            alloc.free(candidates)
            candidates = stacked
        # the main model's verification forward over the candidates + 1
        if first:
            q, past = L + m, 0
        else:
            q, past = m + 1, L - 1
        logits = m_rep.forward(Step(q, past, True, None, m + 1, decoding=past > 0))
        alloc.free(outputs)
        outputs = logits
        nl = None if fp32 else new((m + 1) * row)  # .to(float32): a copy unless already fp32
        alloc.free(new_logits)
        new_logits = nl
        nt = new((m + 1) * row)  # new_logits.clone()
        alloc.free(next_logits)
        next_logits = nt
        if scored:
            for _ in range(m + 1):  # the processors on one row: clone, where, written back
                clone = new(row)
                kept = new(row)
                alloc.free(clone)
                alloc.free(kept)
        n = m if accept == "all" else 0  # candidates accepted
        _crop(m_rep, L + n)  # crop(-(m - n)): the cache keeps the accepted tokens
        L += n + 1
        first = False
        if alloc.peak_allocated > before:
            peak_step = step
        step += 1
    for b in (outputs, new_logits, next_logits, candidates):
        alloc.free(b)
    return {"sim_allocated_bytes": alloc.peak_allocated - base, "sim_reserved_bytes": alloc.peak_reserved - base,
            "sim_peak_step": peak_step}


# ---- the estimate ---------------------------------------------------------------------------------------
def check_workload(w) -> None:
    """One line for what assisted generation cannot run (Workload.__post_init__ calls this)."""
    if w.assistant is not None and w.prompt_lookup_num_tokens is not None:
        raise UserError("--assistant and --prompt-lookup-num-tokens are two ways of assisted generation; give one")
    if w.num_assistant_tokens is not None and w.assistant is None:
        raise UserError("--num-assistant-tokens needs --assistant DRAFT")
    for name in ("num_assistant_tokens", "prompt_lookup_num_tokens"):
        value = getattr(w, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096):
            raise UserError(f"--{name.replace('_', '-')} must be an integer in 1..4096, got {value!r}")
    if w.framework != "transformers":
        raise UserError("assisted generation is modelled for transformers' generate; vLLM's speculative decoding "
                        "is not: use --framework transformers")
    if w.workload != "generate" or w.cache != "dynamic":
        raise UserError("assisted generation is a generate workload with a dynamic cache (it crops the cache)")
    if w.batch != 1:
        raise UserError(f"transformers' assisted generation runs batch 1 only (got --batch {w.batch})")


def _draft(workload):
    from estimator.catalogue import load_model

    return load_model(workload.assistant) if workload.assistant else None


def check_draft(spec, workload):
    """The draft's ModelSpec (None: prompt lookup), refused where its vocabulary is not the model's."""
    draft = _draft(workload)
    if draft is not None and draft.vocab_size != spec.vocab_size:
        raise UserError(f"draft {draft.name} has a vocabulary of {draft.vocab_size:,}, {spec.name} of "
                        f"{spec.vocab_size:,}: assisted generation with different tokenizers is not modelled")
    return draft


def apply(spec, workload, f: dict) -> tuple[int, str, int]:
    """Replace the replay's features in ``f`` with the assisted run's; add its rows. Returns (the draft's
    weight bytes, the estimate's note, bytes to widen the interval by at each end)."""
    from dataclasses import replace

    from estimator.replay import MIN_TRACKED_BYTES
    from estimator.quant import weights_bytes
    from estimator.terms import kv_cache_bytes

    draft = check_draft(spec, workload)
    k = workload.num_assistant_tokens or workload.prompt_lookup_num_tokens or DEFAULT_NUM_ASSISTANT_TOKENS
    plain = f["sim_allocated_bytes"]
    runs = {a: simulate_assisted(spec, draft, workload, k, MIN_TRACKED_BYTES, accept=a) for a in ("none", "all")}
    worst = max(runs.values(), key=lambda r: r["sim_allocated_bytes"])
    f.update(worst)
    draft_w = weights_bytes(draft, workload.dtype, None) if draft is not None else 0
    draft_kv = kv_cache_bytes(draft, replace(workload, lora=None)) if draft is not None else 0
    f["draft_weights_bytes"] = draft_w
    f["draft_kv_bytes"] = draft_kv
    f["verification_activation_bytes"] = max(worst["sim_allocated_bytes"] - plain - draft_kv, 0)
    widen = abs(runs["none"]["sim_allocated_bytes"] - runs["all"]["sim_allocated_bytes"])
    what = (f"assisted generation with draft {draft.name}, {k} candidates per step" if draft is not None else
            f"prompt lookup decoding, up to {k} candidates per step (assumed found at every step)")
    note = (f"{what}: the larger peak of no and of all candidates accepted (the acceptance depends on the "
            f"weights); interval widened by their difference ({widen / 2**20:,.1f} MiB); not yet measured on a GPU")
    return draft_w, note, widen


def table_rows(est, rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The estimate table's rows with the draft's weights and KV and the verification as rows of their own."""
    f = est.features
    if "draft_weights_bytes" not in f:
        return rows
    dw, dkv, ver = f["draft_weights_bytes"], f["draft_kv_bytes"], f["verification_activation_bytes"]
    out = []
    for label, value in rows:
        if label == "weights":
            out += [(label, value - dw), ("draft weights", dw)]
        elif label == "KV cache":
            out += [(label, value), ("draft KV cache", dkv)]
        elif label == "activations":
            out += [(label, value - dkv - ver), ("verification activations", ver)]
        else:
            out.append((label, value))
    return out


def add_args(p) -> None:
    """``--assistant``, ``--num-assistant-tokens``, ``--prompt-lookup-num-tokens`` (estimate, max-context)."""
    from estimator.cli import positive_int

    g = p.add_argument_group("assisted generation (transformers' generate(assistant_model=...))")
    g.add_argument("--assistant", default=None, metavar="DRAFT", help="the draft model (a catalogue name or config.json)")
    g.add_argument("--num-assistant-tokens", type=positive_int, default=None, metavar="K",
                   help=f"candidates the draft proposes per step (default {DEFAULT_NUM_ASSISTANT_TOKENS}, transformers')")
    g.add_argument("--prompt-lookup-num-tokens", type=positive_int, default=None, metavar="N",
                   help="prompt lookup decoding: candidates per step from the prompt (no draft model)")
