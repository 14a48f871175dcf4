"""estimator/placement.py against transformers 5.17's own device_map, module by module.

Every catalogue model is built on the meta device (nothing allocated, so even Llama-3.1-405B takes a
fraction of a second) and handed to ``transformers.integrations.accelerate._get_device_map``, the
function ``from_pretrained(device_map=...)`` calls, with the max_memory of a GPU set. Without GPUs here,
the memory accelerate's ``get_max_memory`` would query (free memory per GPU, host RAM) is what its
``accelerate_max_memory`` returns in the "default" cases: the rest of transformers' code runs for real
(its 90% rules included). The GPU sets are uneven on purpose, and some are too small for the model, so
that accelerate offloads to "cpu" and "disk".
"""

import json
import warnings
from functools import lru_cache

import pytest

from estimator.catalogue import CONFIG_DIR
from estimator.families import spec_from_config
from estimator.placement import device_map_for, device_of, module_tree

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
GIB = 2**30


@lru_cache(maxsize=None)
def _load(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    spec = spec_from_config(config, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    return spec, model


def _gpu_sets(total: int) -> dict:
    """GPU sets scaled to the model's bf16 bytes, so each model meets every case: (max_memory, user_set)."""
    return {
        "two even, roomy": ({0: int(0.8 * total), 1: int(0.8 * total), "cpu": 64 * GIB}, True),
        "three uneven": ({0: int(0.5 * total), 1: int(0.3 * total), 2: int(0.4 * total), "cpu": 64 * GIB}, True),
        "two uneven, cpu offload": ({0: int(0.35 * total), 1: int(0.25 * total), "cpu": total}, True),
        "one small, cpu + disk": ({0: int(0.3 * total), "cpu": int(0.3 * total)}, True),
        "four, default (free memory)": ({0: int(0.3 * total), 1: int(0.3 * total), 2: int(0.2 * total),
                                         3: int(0.35 * total), "cpu": 2 * total}, False),
        "one, default (free memory)": ({0: int(1.2 * total), "cpu": 2 * total}, False),
        "one, default, 90% rule offloads": ({0: int(1.05 * total), "cpu": 2 * total}, False),
        "no cpu key: disk after the GPUs": ({0: int(0.4 * total), 1: int(0.3 * total)}, True),
    }


def _transformers_map(model, strategy: str, max_memory: dict, user_set: bool) -> dict:
    from transformers.integrations import accelerate as hf_accelerate

    if user_set:
        return hf_accelerate._get_device_map(model, strategy, dict(max_memory), None)
    # transformers' get_max_memory(None) asks accelerate for the free memory: answer it as GPUs would
    real = hf_accelerate.accelerate_max_memory
    hf_accelerate.accelerate_max_memory = lambda mm=None: dict(max_memory) if mm is None else real(mm)
    try:
        return hf_accelerate._get_device_map(model, strategy, None, None)
    finally:
        hf_accelerate.accelerate_max_memory = real


def test_module_sizes_match_compute_module_sizes():
    """The tree's bytes per top-level module and per decoder layer are transformers' exactly."""
    from transformers.integrations.accelerate import compute_module_sizes as hf_sizes

    from estimator.placement import compute_module_sizes

    for name in CONFIGS:
        spec, model = _load(name)
        theirs, their_leaves = hf_sizes(model)
        ours, _ = compute_module_sizes(module_tree(spec, "bfloat16")[0])
        # get_balanced_memory's buffer is 1.25 x max(largest decoder layer, mean leaf module): the tree counts
        # leaf modules only roughly, which is exact enough while the largest layer wins, as it does here
        largest = max(theirs[n] for n, m in model.named_modules() if type(m).__name__ in model._no_split_modules)
        assert largest >= sum(their_leaves.values()) / len(their_leaves), name
        modules = [n for n, _ in model.named_modules() if n.count(".") <= 1 or n.split(".")[-1].isdigit()]
        for m in modules:
            if m.count(".") <= 2:
                assert ours.get(m, 0) == theirs.get(m, 0), (name, m)


@pytest.mark.parametrize("name", CONFIGS)
def test_device_map_matches_transformers(name):
    spec, model = _load(name)
    total = spec.num_parameters * 2
    offloaded = False
    for case, (max_memory, user_set) in _gpu_sets(total).items():
        for strategy in ("auto", "sequential", "balanced_low_0"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = _transformers_map(model, strategy, max_memory, user_set)
            got = device_map_for(spec, "bfloat16", max_memory, strategy, user_set)
            assert got == dict(expected), (case, strategy)
            offloaded |= any(d in ("cpu", "disk") for d in got.values())
            for param, _ in model.named_parameters():  # every parameter has a device
                device_of(got, param)
    assert offloaded
