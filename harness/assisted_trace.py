"""The assisted-generation loop driven on real or fake tensors, for the trace (``harness/trace.py``).

transformers' ``_assisted_decoding`` compares token values (``n_matches``), which fake tensors do not
have, so the trace cannot run ``generate(assistant_model=...)`` itself. This driver runs the same modules
(both models' forwards, ``DynamicCache.update`` and ``crop``) and keeps the same tensors alive as the loop
does (``generation/utils.py`` ``_assisted_decoding``, ``candidate_generator.py``
``AssistedCandidateGenerator``), with the acceptance given: ``"all"`` candidates accepted, or ``"none"``,
the two patterns ``estimator/assisted.py`` replays. The real loop is checked against the replay in
``tests/harness/test_assisted_estimate.py`` (measured with ``generate``); this driver gives the same
program on the modeling code, under the trace's fake tensors.
"""

from __future__ import annotations

import torch


def assisted_generate(model, draft, tracker, prompt: int, new_tokens: int, k: int, accept: str, known: dict):
    """Greedy assisted generation of ``new_tokens`` after ``prompt`` tokens, batch 1; returns the main cache.

    ``draft`` None: prompt lookup decoding, candidates assumed found (k per step)."""
    from transformers import DynamicCache

    from harness.trace import _kv_cache_category, _min_new_tokens_processor

    cfg = model.config.get_text_config(decoder=True)
    vocab = cfg.vocab_size
    eos = getattr(model.generation_config, "eos_token_id", None)
    scored = eos is not None and new_tokens > 1
    cache = DynamicCache(config=cfg)
    d_cache = DynamicCache(config=draft.config.get_text_config(decoder=True)) if draft is not None else None
    d_vocab = draft.config.get_text_config(decoder=True).vocab_size if draft is not None else vocab
    L, end, first, step = prompt, prompt + new_tokens, True, 0
    d_held = 0
    outputs = new_logits = next_logits = candidates = None
    with _kv_cache_category(cache, tracker), _kv_cache_category(d_cache, tracker):
        while L < end:
            with tracker.phase("prefill" if step == 0 else f"decode {step}"):
                m = min(k, end - L - 1)
                if m > 0 and draft is not None:  # the draft's generate: m forwards, one score row kept each
                    if d_held > L - 2:  # crop(-tokens): what _update_past_and_masks removes
                        d_cache.crop(-(d_held - (L - 2)))
                        d_held = L - 2
                    scores = []
                    for s in range(m):
                        q = L - d_held if s == 0 else 1
                        known["past"] = d_held
                        out = draft(input_ids=torch.zeros((1, q), dtype=torch.long),
                                    position_ids=torch.arange(d_held, d_held + q)[None], past_key_values=d_cache,
                                    use_cache=True, logits_to_keep=1)
                        d_held += q
                        logits32 = out.logits[:, -1].to(copy=True, dtype=torch.float32)
                        del out
                        scores.append(_min_new_tokens_processor(logits32, d_vocab, eos) if scored else logits32)
                    stacked = torch.stack(scores, dim=1)  # candidate_logits
                    del scores, logits32
                    candidates = stacked
                    del stacked
                q, past = (L + m, 0) if first else (m + 1, L - 1)
                known["past"] = past
                outputs = model(input_ids=torch.zeros((1, q), dtype=torch.long),
                                position_ids=torch.arange(past, past + q)[None], past_key_values=cache,
                                use_cache=True, logits_to_keep=m + 1)
                new_logits = outputs.logits[:, -m - 1:].to(dtype=torch.float32)
                next_logits = new_logits.clone()
                if scored:
                    for i in range(m + 1):
                        new_logits[:, i, :] = _min_new_tokens_processor(new_logits[:, i, :], vocab, eos)
                n = m if accept == "all" else 0
                if m > n:  # outputs.past_key_values.crop(-(candidate_length - n_matches))
                    cache.crop(-(m - n))
                L += n + 1
                first = False
                step += 1
    del outputs, new_logits, next_logits, candidates, d_cache
    return cache
