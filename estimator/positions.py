"""Whether a model can run a context at all, and whether it was trained on it.

Two kinds of position encoding behave differently past ``max_position_embeddings``:

- learned absolute position embeddings (GPT-2's ``wpe``, OPT's ``embed_positions``, ...) are a table
  with one row per position: a longer context indexes past its end and the model fails (the
  ``IndexError`` a GPT-2 run at 5,000 tokens dies with). Such a context is refused.
- rotary (and ALiBi, and no-position) models compute positions: transformers runs any length, and memory
  is what it is, but the model was not trained past that length. The estimate answers and says so.

Measured records are never refused for this (``validate``/``calibrate`` score what was measured).
"""

from __future__ import annotations

from estimator.errors import UserError

# model_type values whose positions are a learned table of max_position_embeddings rows (transformers
# modeling files: nn.Embedding(config.max_position_embeddings | n_positions, ...)). OPT's table has
# max_position_embeddings + 2 rows (its offset of 2); it still ends at max_position_embeddings tokens.
LEARNED_POSITIONS = frozenset({
    "gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt", "xglm", "imagegpt", "ctrl", "openai-gpt",
    "bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "bert-generation",
    "megatron-bert", "data2vec-text", "rembert", "roc_bert", "xmod", "markuplm", "blip_2_qformer",
    "git", "trocr", "marian", "mbart", "bart", "plbart", "pegasus", "blenderbot", "blenderbot-small",
    "mvp", "prophetnet", "whisper", "musicgen", "musicgen_melody", "kosmos-2", "mega", "xlm",
})

# Sizes beyond which no tensor can be indexed with 64-bit sizes (elements), let alone allocated.
MAX_TOKENS = 2**40


def learned_positions(model_type: str | None) -> bool:
    return (model_type or "") in LEARNED_POSITIONS


def check_context(model_type: str | None, max_positions: int | None, context: int, name: str = "the model") -> str | None:
    """Raise a UserError when ``name`` cannot run ``context`` tokens; return a one-line note when it can
    but was not trained on that many positions; None when the context is within its positions."""
    if context > MAX_TOKENS:
        raise UserError(f"context {context:,} is beyond any model or GPU (at most {MAX_TOKENS:,} tokens)")
    if not max_positions or context <= max_positions:
        return None
    if learned_positions(model_type):
        raise UserError(
            f"{name} ({model_type}) has learned absolute position embeddings for {max_positions:,} positions; "
            f"it cannot run {context:,} tokens (use --context {max_positions:,} or less)"
        )
    return (f"context {context:,} is beyond {name}'s {max_positions:,} trained positions: transformers runs it "
            "and the memory estimate holds, but the model's output quality there is not what it was trained for")
