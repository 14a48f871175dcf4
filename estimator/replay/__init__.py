"""The allocator replay: a transformers 5.17 run's tensors fed to the caching-allocator model, no torch.

``simulate(spec, workload)`` (``simulate.py``) is the entry point. The package, one subject a module:

- ``program.py``: the transformers 5.17 program (``Program``), composed of ``blocks.py`` (norms, rotary,
  MLP, MoE), ``attention.py`` (the cache, attention kernels, MLA, masks) and ``linear_attention.py``
  (gated delta-net); family quirks: the record in ``estimator/family.py``, seen through ``layouts.py``.
- ``engine.py``: the template engine that replays each recorded piece for every layer and step.
- ``reference.py``: the plain replay (every layer of every forward, no templates), the oracle's source.
- ``weights.py``: the weights' load order, the allocator's starting state.
"""

from estimator.replay.layouts import Layout, attention_used, layout, rotary_fraction
from estimator.replay.program import TRANSFORMERS_VERSION
from estimator.replay.runner import MIN_TRACKED_BYTES, accelerated, simulate
from estimator.replay.weights import parameter_bytes

__all__ = ["Layout", "MIN_TRACKED_BYTES", "TRANSFORMERS_VERSION", "accelerated", "attention_used",
           "layout", "parameter_bytes", "rotary_fraction", "simulate"]
