"""Framework backends: one module per framework, `harness/backends/<name>.py`, found by name.

A backend module provides::

    NAME: str
    version() -> str
    check(case) -> None                             # raises when the case's model cannot be built (meta device)
    build(case, device: str) -> model              # on `device`, in eval mode
    weights_bytes(model) -> int                     # parameters + buffers
    config_dict(model) -> dict                      # the full resolved config
    run(model, case, device: str, seed: int) -> Run # the workload; outputs kept alive in Run
"""

from __future__ import annotations

import importlib

from estimator.errors import UserError


def get_backend(name: str):
    try:
        return importlib.import_module(f"harness.backends.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"harness.backends.{name}":
            raise UserError(f"no harness backend {name!r} (harness/backends/{name}.py)") from None
        raise
