"""Generate estimator/data/config_aliases.json from transformers' config classes.

    python scripts/gen_config_aliases.py           # (re)write the table from the installed transformers
    python scripts/gen_config_aliases.py --check   # exit 1 if the shipped table is not what it would write

For every model_type the estimator reads (``estimator.families.FAMILIES``, the multimodal wrappers and
vision towers of ``estimator.towers``, and the sub-config types those wrappers nest), the table holds:

- ``attribute_map``: the config class's aliases (``{"num_experts": "num_local_experts"}``);
- ``defaults``: the class's dataclass field defaults (JSON values only), with ``rope_parameters`` as an
  instance standardizes it (``partial_rotary_factor`` included);
- ``sub_configs``: for a wrapper, sub-config key -> the model_type of its default sub-config.

It also records the transformers version and the legacy ``layer_types`` names transformers remaps. The
estimator reads the table at run time (``estimator/config.py``) and never imports transformers; a new
transformers release or a new family is a rerun of this script plus the tests
(``tests/harness/test_config_aliases.py`` checks that the shipped table is what this script generates).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "estimator" / "data" / "config_aliases.json"


def _json_value(value):
    """The value as JSON holds it (tuples become lists), or raise TypeError/ValueError."""
    return json.loads(json.dumps(value, allow_nan=False))


def _defaults(cls) -> dict:
    from transformers import PreTrainedConfig

    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in base or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        try:
            out[f.name] = _json_value(value)
        except (TypeError, ValueError):
            continue
    rope = getattr(cls(), "rope_parameters", None) if "rope_parameters" in out else None
    if rope is not None:
        out["rope_parameters"] = _json_value(dict(rope))
    return out


def _sub_configs(cls) -> dict:
    subs = getattr(cls, "sub_configs", {}) or {}
    if not subs:
        return {}
    instance = cls().to_dict()
    out = {}
    for key, sub_cls in subs.items():
        model_type = getattr(sub_cls, "model_type", "") or (instance.get(key) or {}).get("model_type")
        if model_type:
            out[key] = model_type
    return out


def generate() -> dict:
    """The table, from the installed transformers (imports only the config modules it needs)."""
    sys.path.insert(0, str(ROOT))
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    import transformers
    from transformers.configuration_utils import _LEGACY_LAYER_TYPE_REMAP
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from estimator.families import FAMILIES
    from estimator.towers import TOWERS, WRAPPERS

    pending = sorted(set(FAMILIES) | set(TOWERS) | set(WRAPPERS))
    types: dict[str, dict] = {}
    while pending:
        model_type = pending.pop()
        if model_type in types or model_type not in CONFIG_MAPPING:
            continue
        cls = CONFIG_MAPPING[model_type]
        entry = {"attribute_map": dict(sorted(cls.attribute_map.items())), "defaults": _defaults(cls)}
        subs = _sub_configs(cls)
        if subs:
            entry["sub_configs"] = subs
            pending.extend(m for m in subs.values() if m not in types)
        types[model_type] = entry
    return {
        "generated_by": "python scripts/gen_config_aliases.py",
        "transformers_version": transformers.__version__,
        "legacy_layer_types": dict(sorted(_LEGACY_LAYER_TYPE_REMAP.items())),
        "model_types": dict(sorted(types.items())),
    }


def render(table: dict) -> str:
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped table instead of writing")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    text = render(generate())
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'differs from what the installed transformers gives'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(json.loads(text)['model_types'])} model types)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
