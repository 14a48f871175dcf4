"""Assisted generation in the harness: ``generate(assistant_model=DRAFT)`` and prompt lookup decoding.

What transformers 5.17 runs (``generation/utils.py`` ``_assisted_decoding``, ``candidate_generator.py``
``AssistedCandidateGenerator`` / ``PromptLookupCandidateGenerator``): both models' weights, both caches;
per step the draft generates up to ``num_assistant_tokens`` candidates (its own ``generate``, keeping one
fp32 score row per candidate), then the main model verifies them in one forward over the candidates + 1
with ``logits_to_keep = K + 1`` and crops its cache (and the draft's) back to the accepted tokens. Batch 1
only (transformers raises otherwise).

What a measured case pins, so that a measurement is a function of the case: the draft's
``generation_config`` gets ``num_assistant_tokens = K`` (default 20, transformers' default),
``num_assistant_tokens_schedule = "constant"`` and ``assistant_confidence_threshold = 0`` (no early stop of
the draft on its own confidence, which depends on the weights' values). The draft is built like the main
model (same dtype and attention, random weights from the same seed) and held on the main model object,
outside its modules (``object.__setattr__``), so the main model's parameters stay its own.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from estimator.errors import UserError

DEFAULT_NUM_ASSISTANT_TOKENS = 20  # transformers GenerationConfig default (configuration_utils.py)
ATTRIBUTE = "_vramcal_assistant"


def check_case(case) -> None:
    """Validate (and complete) a Case's assisted-generation fields; UserError, one line, before anything runs."""
    if case.assistant is not None and case.prompt_lookup_num_tokens is not None:
        raise UserError("--assistant and --prompt-lookup-num-tokens are two ways of assisted generation; give one")
    if case.num_assistant_tokens is not None and case.assistant is None:
        raise UserError("--num-assistant-tokens needs --assistant DRAFT")
    if case.workload != "generate":
        raise UserError("assisted generation is a generate workload; drop --workload forward")
    if case.cache != "dynamic":
        raise UserError("assisted generation crops its caches after each step: --cache dynamic only")
    if case.batch != 1:
        raise UserError(f"transformers' assisted generation runs batch 1 only (got batch {case.batch})")
    for name in ("num_assistant_tokens", "prompt_lookup_num_tokens"):
        value = getattr(case, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{name.replace('_', '-')} must be a positive integer, not {value!r}")
    if case.assistant is not None:
        path = Path(case.assistant)
        if not (path.is_absolute() and path.exists()):  # a name as the user gives it: resolve it once
            from harness.case import resolve_model

            src = resolve_model(case.assistant)
            if src.kind == "hub":
                raise UserError(f"--assistant {case.assistant}: give a catalogue name, a config.json or a "
                                "checkpoint folder (nothing is downloaded)")
            object.__setattr__(case, "assistant", src.source)
        if case.num_assistant_tokens is None:
            object.__setattr__(case, "num_assistant_tokens", DEFAULT_NUM_ASSISTANT_TOKENS)


def assistant_name(source: str) -> str:
    path = Path(source)
    return path.parent.name if path.name == "config.json" else path.stem if path.is_file() else path.name


def record_fields(case) -> dict:
    """The record's (and the case key's) assisted-generation fields; none for a plain case."""
    out = {}
    if case.assistant:
        out["assistant"] = assistant_name(case.assistant)
        out["num_assistant_tokens"] = case.num_assistant_tokens
    if case.prompt_lookup_num_tokens:
        out["prompt_lookup_num_tokens"] = case.prompt_lookup_num_tokens
    return out


def build_assistant(case, device: str, build):
    """The draft model, built by the backend's ``build`` as a case of its own (generation is pinned per
    case in ``generate_kwargs``)."""
    if not case.assistant:
        return None
    path = Path(case.assistant)
    kind = "checkpoint" if path.is_dir() else "config"
    draft_case = replace(case, model=assistant_name(case.assistant), source=case.assistant, source_kind=kind,
                         lora=None, assistant=None, num_assistant_tokens=None, quant=None)
    return build(draft_case, device)


def attach(model, draft) -> None:
    if draft is not None:
        object.__setattr__(model, ATTRIBUTE, draft)  # not a submodule: model.parameters() stays the main model's


def assistant_of(model):
    return getattr(model, ATTRIBUTE, None)


def generate_kwargs(model, case) -> dict:
    """The keyword arguments ``generate`` gets for the case's assisted generation (none for a plain case)."""
    draft = assistant_of(model)
    if draft is not None:  # pinned per case: a draft built once serves every K of its build group
        gc = draft.generation_config
        gc.num_assistant_tokens = case.num_assistant_tokens
        gc.num_assistant_tokens_schedule = "constant"
        gc.assistant_confidence_threshold = 0.0
        return {"assistant_model": draft}
    if getattr(case, "prompt_lookup_num_tokens", None):
        return {"prompt_lookup_num_tokens": case.prompt_lookup_num_tokens}
    return {}
