"""Reading a config.json as transformers 5 reads it, and refusing values no model can have.

``parse_config(raw, name)`` is the one place a config dict is read. It

- finds the language model: the config itself, or the ``text_config`` of a multimodal wrapper, whose
  other sub-configs (``vision_config``...) it keeps for ``estimator/towers.py``;
- resolves each config class's ``attribute_map`` aliases both ways (``num_local_experts`` and
  ``num_experts`` of Qwen3-MoE, ``n_embd`` and ``hidden_size`` of GPT-2...), so a family can read the
  name it knows whichever one a file uses; when a file has both, the one transformers keeps wins;
- fills a nested sub-config's absent keys with its class's defaults, as transformers does when it builds
  the sub-config (``save_pretrained`` writes a nested config as a diff against those defaults; a
  top-level config keeps every model-specific key, so an absent size there is an error, not a default);
- reads ``dtype`` (or the older ``torch_dtype``) and ``partial_rotary_factor`` from ``rope_parameters``
  (or the legacy ``rope_scaling``/top-level keys), and maps legacy ``layer_types`` names;
- validates every field the families read (types, ranges, heads that divide), raising a ``UserError``
  that names the field and the allowed values.

The aliases and defaults are data, generated from transformers' config classes by
``python scripts/gen_config_aliases.py`` into ``estimator/data/config_aliases.json`` (it records the
transformers version); the estimator never imports transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping

from estimator.errors import UserError
from estimator.resources import data_path

ALIAS_TABLE = data_path("config_aliases.json")

# Sanity caps: no real model comes near them, and past them the counts stop meaning anything (a
# 10**12-layer config used to exhaust memory while its layers were listed).
MAX_LAYERS = 10_000
MAX_DIM = 2**31 - 1  # a width, head count, vocabulary or expert count
MAX_POSITIONS = 2**40  # estimator.positions.MAX_TOKENS
MAX_TENSOR_ELEMS = 2**63 - 1  # torch sizes are int64: one tensor cannot hold more elements


@lru_cache(maxsize=1)
def alias_table() -> dict:
    """The generated table: {"transformers_version", "legacy_layer_types", "model_types": {mt: {...}}}."""
    try:
        return json.loads(ALIAS_TABLE.read_text())
    except (OSError, ValueError) as exc:  # pragma: no cover - a broken install
        raise UserError(f"cannot read {ALIAS_TABLE} ({exc}); reinstall vramcal or run "
                        "python scripts/gen_config_aliases.py") from None


def type_info(model_type: str | None) -> dict:
    """attribute_map, defaults and sub_configs of one model_type ({} for a type the table lacks)."""
    return alias_table()["model_types"].get(model_type or "", {})


# ---------------------------------------------------------------------------------------------------
# The reader a family gets


class Config:
    """A normalized config dict that names the model and the key when something needed is absent."""

    def __init__(self, data: Mapping, name: str, defaults: Mapping | None = None, prefix: str = ""):
        self.data, self.defaults, self.prefix = data, defaults or {}, prefix
        self.name = name or data.get("model_type") or "model"

    def key(self, key: str) -> str:
        """The key as the user's file spells its path (``text_config.hidden_size``)."""
        return self.prefix + key

    def need(self, key: str, why: str):
        value = self.data.get(key)
        if value is None:
            got = "has 'null' for" if key in self.data else "lacks"
            raise UserError(f"config for {self.name} {got} '{self.key(key)}' (needed for {why})")
        return value

    def get(self, key: str, default=None):
        """The config's value; ``default`` when it is null; the class default when the key is absent.

        An explicit null switches a feature off (Mistral-7B-v0.3: ``"sliding_window": null``), while an
        absent key means the transformers config class's default (Mistral: a 4096-token window).
        """
        if key in self.data:
            return default if self.data[key] is None else self.data[key]
        value = self.defaults.get(key)
        return default if value is None else value

    def present(self, key: str, why: str):
        """A key that must be present but may be null (e.g. ``q_lora_rank``)."""
        if key not in self.data:
            raise UserError(f"config for {self.name} lacks '{self.key(key)}' (needed for {why}; null is allowed)")
        return self.data[key]

    def fail(self, message: str) -> UserError:
        return UserError(f"config for {self.name}: {message}")


@dataclass(frozen=True)
class ParsedConfig:
    """A config.json split into the language model and the towers around it, each normalized."""

    model_type: str  # the language model's model_type
    text: Config  # the language model's config
    wrapper_type: str | None = None  # a multimodal wrapper's model_type ("gemma3"), None for a plain LM
    wrapper: Config | None = None  # the wrapper's own keys (tie_word_embeddings, projector settings)
    towers: Mapping[str, Config] = field(default_factory=dict)  # sub-config key -> its Config
    dtype: str | None = None  # the config's dtype (or torch_dtype), as written


def parse_config(raw: Mapping, name: str = "") -> ParsedConfig:
    """Read a config.json dict (see the module docstring); raise UserError on a value no model can have."""
    label = name or (raw.get("model_type") if isinstance(raw, Mapping) else None) or "this model"
    if not isinstance(raw, Mapping):
        raise UserError(f"config for {label} is not a JSON object")
    model_type = raw.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise UserError(f"config for {label}: 'model_type' must be a string, got {_show(model_type)}")
    info = type_info(model_type)
    subs = info.get("sub_configs", {})
    text_raw = raw.get("text_config")
    if text_raw is None and "text_config" in subs:
        text_raw = {}  # a wrapper without text_config: transformers builds the default language model
    if text_raw is None:
        text = _normalize(dict(raw), model_type)
        _validate(text, label, "")
        return ParsedConfig(model_type or "", Config(text, label, _defaults(model_type)), dtype=_dtype(raw))

    if not isinstance(text_raw, Mapping):
        raise UserError(f"config for {label}: 'text_config' must be a JSON object, got {_show(text_raw)}")
    text_type = text_raw.get("model_type") or subs.get("text_config")
    if not isinstance(text_type, str):
        raise UserError(f"config for {label}: 'text_config' has no model_type (and {model_type!r} "
                        "names no default language model)")
    text = _normalize(_filled(text_raw, text_type), text_type)
    _validate(text, label, "text_config.")
    wrapper = _normalize(dict(raw), model_type)
    _validate(wrapper, label, "", only=_WRAPPER_KEYS)
    towers = {}
    for key in sorted(set(subs) | {k for k, v in raw.items() if k.endswith("_config") and isinstance(v, Mapping)}):
        if key in _NOT_TOWERS:
            continue
        sub_raw = raw.get(key)
        if sub_raw is None and key not in subs:
            continue
        if sub_raw is not None and not isinstance(sub_raw, Mapping):
            raise UserError(f"config for {label}: '{key}' must be a JSON object, got {_show(sub_raw)}")
        sub_type = (sub_raw or {}).get("model_type") or subs.get(key)
        sub = _normalize(_filled(sub_raw or {}, sub_type), sub_type)
        _validate(sub, label, f"{key}.")
        towers[key] = Config(sub, label, _defaults(sub_type), prefix=f"{key}.")
    return ParsedConfig(
        text_type, Config(text, label, _defaults(text_type), prefix="text_config."), model_type,
        Config(wrapper, label, _defaults(model_type)), towers, _dtype(text_raw) or _dtype(raw),
    )


def _defaults(model_type: str | None) -> dict:
    info = type_info(model_type)
    return _aliased(dict(info.get("defaults", {})), info.get("attribute_map", {}), set())


def _filled(sub: Mapping, model_type: str | None) -> dict:
    """A nested sub-config as transformers builds it: class defaults (by field name, aliases resolved
    after) under the keys it gives."""
    return {**type_info(model_type).get("defaults", {}), **sub, "model_type": model_type}


def _normalize(data: dict, model_type: str | None) -> dict:
    info = type_info(model_type)
    data = _aliased(data, info.get("attribute_map", {}), set(info.get("defaults", {})))
    if data.get("dtype") is None and data.get("torch_dtype") is not None:
        data["dtype"] = data["torch_dtype"]  # PreTrainedConfig.__post_init__: dtype wins when both are set
    if data.get("sliding_window") == 0 and data.get("use_sliding_window") is False:
        data["sliding_window"] = None  # Qwen2MoeConfig.__post_init__ saves 0 for "no window"
    factor = _partial_rotary_factor(data, info.get("defaults", {}))
    if factor is not None:
        data["partial_rotary_factor"] = factor
    types = data.get("layer_types")
    if isinstance(types, list):
        remap = alias_table().get("legacy_layer_types", {})
        data["layer_types"] = [remap.get(t, t) if isinstance(t, str) else t for t in types]
    return data


def _aliased(data: dict, attribute_map: Mapping[str, str], fields: set) -> dict:
    """Both spellings of every aliased key. When a file has both, transformers keeps the one that is not a
    dataclass field of the config class (it is set after the fields, through the alias)."""
    for alias, target in attribute_map.items():
        if alias in data and target in data and data[alias] != data[target]:
            winner = alias if alias not in fields else target
            data[alias] = data[target] = data[winner]
        elif alias in data:
            data[target] = data[alias]
        elif target in data:
            data[alias] = data[target]
    return data


# Keys a config class's __post_init__ pops into rope_parameters["partial_rotary_factor"] when the rope dict
# has none (GPTNeoXConfig: ``rotary_pct``, default 0.25).
_LEGACY_ROTARY_KEYS = {"gpt_neox": "rotary_pct"}


def _partial_rotary_factor(data: Mapping, defaults: Mapping):
    """transformers' RotaryEmbeddingConfigMixin.convert_rope_params_to_dict priority: the rope dict
    (``rope_scaling`` wins over ``rope_parameters``), then the top-level key, then the class default."""
    rope = data.get("rope_scaling") or data.get("rope_parameters")
    if isinstance(rope, Mapping):
        if "full_attention" in rope and isinstance(rope["full_attention"], Mapping):  # per layer type (Gemma 3)
            rope = rope["full_attention"]
        if rope.get("partial_rotary_factor") is not None:
            return rope["partial_rotary_factor"]
    if data.get("partial_rotary_factor") is not None:
        return data["partial_rotary_factor"]
    legacy = _LEGACY_ROTARY_KEYS.get(data.get("model_type"))
    if legacy and data.get(legacy) is not None:
        return data[legacy]
    default_rope = defaults.get("rope_parameters")
    if isinstance(default_rope, Mapping) and default_rope.get("partial_rotary_factor") is not None:
        return default_rope["partial_rotary_factor"]
    return defaults.get("partial_rotary_factor")


def _dtype(data: Mapping) -> str | None:
    value = data.get("dtype") if data.get("dtype") is not None else data.get("torch_dtype")
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------------------------------
# Validation: every key a family or tower reads, with what it may hold


@dataclass(frozen=True)
class Rule:
    kind: str  # "int", "bool", "fraction", "int_list", "str_list", "int_or_pair"
    low: int = 1
    high: int = MAX_DIM
    nullable: bool = True

    def allowed(self) -> str:
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "fraction":
            text = "a number in (0, 1]"
        elif self.kind == "str_list":
            text = "a list of strings"
        elif self.kind == "int_list":
            text = f"a list of integers from {self.low:,} to {self.high:,}"
        else:
            size = "a positive integer" if self.low == 1 else f"an integer >= {self.low}"
            text = f"{size} (at most {self.high:,})"
            if self.kind == "int_or_pair":
                text += " or a list of two"
        return text + (" or null" if self.nullable else "")


def _size(low=1, high=MAX_DIM, nullable=True) -> Rule:
    return Rule("int", low, high, nullable)


_LAYERS = _size(high=MAX_LAYERS, nullable=False)
_COUNT = _size(low=0, high=MAX_LAYERS)
_BOOL = Rule("bool")
FIELDS: Mapping[str, Rule] = {
    # widths and counts that size the model
    **dict.fromkeys(("hidden_size", "n_embd", "vocab_size", "num_attention_heads", "n_head"), _size(nullable=False)),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "depth"), _LAYERS),
    **dict.fromkeys((
        "num_key_value_heads", "head_dim", "intermediate_size", "intermediate_size_mlp", "moe_intermediate_size",
        "n_inner", "num_experts_per_tok", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim",
        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
        "linear_conv_kernel_dim", "n_positions", "sliding_window", "attention_chunk_size", "num_heads",
        "num_channels", "in_channels", "temporal_patch_size", "spatial_merge_size", "out_hidden_size",
        "num_position_embeddings", "vision_output_dim", "projector_input_dim", "projector_output_dim",
        "mm_tokens_per_image"), _size()),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "n_shared_experts",
                     "shared_expert_intermediate_size", "qk_nope_head_dim"), _size(low=0)),
    **dict.fromkeys(("patch_size", "image_size"), Rule("int_or_pair")),
    "max_position_embeddings": _size(high=MAX_POSITIONS),
    **dict.fromkeys(("sliding_window_pattern", "full_attention_interval", "decoder_sparse_step",
                     "interleave_moe_layer_step", "no_rope_layer_interval"), _size(high=MAX_LAYERS)),
    **dict.fromkeys(("max_window_layers", "first_k_dense_replace"), _COUNT),
    # switches
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "use_qk_norm",
                     "vision_use_head", "multimodal_projector_bias"), _BOOL),
    **dict.fromkeys(("partial_rotary_factor", "pixel_shuffle_ratio"), Rule("fraction")),
    # per-layer lists
    "layer_types": Rule("str_list"),
    **dict.fromkeys(("mlp_only_layers", "moe_layers"), Rule("int_list", 0, MAX_LAYERS - 1)),
    "no_rope_layers": Rule("int_list", 0, 1),
}
# Object-valued keys of a wrapper that hold no tower's weights
_NOT_TOWERS = frozenset({"text_config", "quantization_config", "generation_config"})
# The keys of a wrapper's own level that the towers read (the rest belongs to its sub-configs).
_WRAPPER_KEYS = frozenset({"tie_word_embeddings", "multimodal_projector_bias", "spatial_merge_size",
                           "mm_tokens_per_image"})


def _show(value) -> str:
    """A value as the JSON file wrote it, with its JSON type: '"4096" (a string)'."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", str: "a string", list: "a list", dict: "an object", float: "a number"}
    word = next((w for t, w in kinds.items() if isinstance(value, t)), None)
    text = json.dumps(value, default=repr)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} ({word})" if word else text


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _ok(rule: Rule, value) -> bool:
    if value is None:
        return rule.nullable
    if rule.kind == "bool":
        return isinstance(value, bool)
    if rule.kind == "fraction":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    if rule.kind == "str_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if rule.kind == "int_list":
        return isinstance(value, list) and all(_is_int(v) and rule.low <= v <= rule.high for v in value)
    if rule.kind == "int_or_pair" and isinstance(value, list):
        return len(value) == 2 and all(_is_int(v) and rule.low <= v <= rule.high for v in value)
    return _is_int(value) and rule.low <= value <= rule.high


def _validate(data: Mapping, label: str, prefix: str, only: frozenset | None = None) -> None:
    for key, value in data.items():
        rule = FIELDS.get(key)
        if rule is None or (only is not None and key not in only) or _ok(rule, value):
            continue
        raise UserError(f"config for {label}: '{prefix}{key}' must be {rule.allowed()}, got {_show(value)}")
    heads = next((data[k] for k in ("num_attention_heads", "n_head", "num_heads") if _is_int(data.get(k))), None)
    kv = data.get("num_key_value_heads")
    if heads and _is_int(kv) and heads % kv:
        raise UserError(f"config for {label}: '{prefix}num_key_value_heads' ({kv}) must divide "
                        f"'{prefix}num_attention_heads' ({heads}): each key/value head serves a whole group of "
                        "query heads")
