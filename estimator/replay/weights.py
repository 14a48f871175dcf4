"""The allocator's state after the weights load: every parameter tensor, in registration order."""

from __future__ import annotations

from estimator import lora as _lora  # LoRA hook
from estimator.alloc_conf import parse_alloc_conf
from estimator.allocator import allocator_class
from estimator.dtypes import dtype_bytes
from estimator.spec import ModelSpec


_WEIGHTS: dict[int, tuple] = {}  # id(spec) -> (spec, {(dtype, min_bytes): allocator snapshot})


def weights_state(spec: ModelSpec, workload, min_bytes: int) -> tuple:
    """The allocator after loading the weights (``parameter_bytes``), computed once per model and dtype."""
    entry = _WEIGHTS.get(id(spec))
    if entry is None or entry[0] is not spec:
        if len(_WEIGHTS) > 256:
            _WEIGHTS.clear()
        entry = _WEIGHTS[id(spec)] = (spec, {})
    kind = allocator_class(parse_alloc_conf(workload.alloc_conf))  # the C allocator restores the default's
    lora = getattr(workload, "lora", None)
    key = (workload.dtype, min_bytes, kind, lora)  # LoRA hook: the adapters' tensors are allocated after the model's
    snap = entry[1].get(key)
    if snap is None:
        alloc = kind()
        for nbytes in parameter_bytes(spec, workload) + _lora.parameter_bytes(spec, lora, workload.dtype):
            if nbytes >= min_bytes:
                alloc.malloc(nbytes)
        snap = entry[1][key] = alloc.snapshot()
    return snap


def parameter_bytes(spec: ModelSpec, workload) -> list[int]:
    """Bytes of each parameter in the order transformers creates them (the allocator's starting state):
    ``ModelSpec.parameter_tensors``, which ``estimator/families.py`` records with the parameter count, so
    the replay loads exactly ``weights_bytes`` (``tests/estimator/test_families_replay_agree.py``)."""
    if not spec.parameter_tensors:
        raise ValueError(f"{spec.name}: the spec has no parameter_tensors (build it with spec_from_config)")
    w = dtype_bytes(workload.dtype)
    return [int(n * w) for n in spec.parameter_tensors]
