"""Configs as transformers writes them read the same as the catalogue's, and the shipped alias table is
what ``scripts/gen_config_aliases.py`` generates from the installed transformers.

transformers 5 rewrites a config when it loads and saves it: ``Qwen3MoeConfig(**config).to_dict()`` names
the expert count ``num_local_experts`` (its attribute_map target), moves ``rope_theta`` /
``rope_scaling`` / ``partial_rotary_factor`` into ``rope_parameters``, ``torch_dtype`` into ``dtype``,
spells out ``layer_types``, and nulls Qwen2's window when sliding is off. The estimate must not move.
"""

import importlib.util
import json
import warnings

import pytest

from estimator import Workload, estimate
from estimator.catalogue import CONFIG_DIR
from estimator.config import ALIAS_TABLE, alias_table
from estimator.families import spec_from_config
from estimator.terms import kv_cache_bytes

transformers = pytest.importorskip("transformers")

from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

GENERATOR = CONFIG_DIR.parent.parent / "scripts" / "gen_config_aliases.py"


def _one_file_per_model_type() -> list[str]:
    seen: dict[str, str] = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        seen.setdefault(json.loads(path.read_text())["model_type"], path.name)
    return sorted(seen.values())


def _saved_by_transformers(config: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CONFIG_MAPPING[config["model_type"]](**config).to_dict()


@pytest.mark.parametrize("filename", _one_file_per_model_type())
def test_transformers_to_dict_gives_the_same_estimate(filename):
    name = filename.removesuffix(".json")
    original = json.loads((CONFIG_DIR / filename).read_text())
    rewritten = _saved_by_transformers(original)
    a, b = spec_from_config(original, name), spec_from_config(rewritten, name)

    assert (b.num_parameters, b.num_layers, b.buffer_elems) == (a.num_parameters, a.num_layers, a.buffer_elems)
    assert b.layers == a.layers and b.default_quant == a.default_quant
    work = Workload(context=1024, batch=2, new_tokens=4)  # within GPT-2's 1,024 learned positions
    assert kv_cache_bytes(b, work) == kv_cache_bytes(a, work)
    assert estimate(b, work).total_bytes == estimate(a, work).total_bytes


def test_qwen3_moe_to_dict_names_experts_num_local_experts():
    # the case that used to fail with "lacks 'num_experts'"
    rewritten = _saved_by_transformers(json.loads((CONFIG_DIR / "qwen3-30b-a3b.json").read_text()))
    assert "num_local_experts" in rewritten and "num_experts" not in rewritten
    assert spec_from_config(rewritten, "q").layers[0].mlp.num_experts == 128


def test_shipped_alias_table_is_what_the_generator_writes():
    table = alias_table()
    if table["transformers_version"] != transformers.__version__:
        pytest.skip(f"table from transformers {table['transformers_version']}, installed {transformers.__version__}")
    spec = importlib.util.spec_from_file_location("gen_config_aliases", GENERATOR)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.render(generator.generate()) == ALIAS_TABLE.read_text(), \
        "run: python scripts/gen_config_aliases.py"
