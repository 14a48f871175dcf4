"""Where the shipped data lives: in a source checkout, its folders; in an installed wheel, package data.

The repository keeps data where a reader looks for it (``configs/models``, ``results/coefficients``,
``results/schema``); the wheel carries the same files as package data of ``vramcal`` (``vramcal/configs``,
``vramcal/coefficients``, ``vramcal/schema``; see ``[tool.setuptools.package-dir]`` in pyproject.toml).
Environment variables override both (``VRAMCAL_CONFIG_DIR``, ``VRAMCAL_COEFFICIENTS_DIR``).
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_SOURCE = _PACKAGE.parent  # the repository root, when running from a checkout or an editable install
_IN_SOURCE = (_SOURCE / "pyproject.toml").is_file() and (_SOURCE / "configs").is_dir()


def _installed(*parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("vramcal")
    base = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else _SOURCE / "vramcal"
    return base.joinpath(*parts)


def data_path(name: str) -> Path:
    """A file of the estimator's own data (``estimator/data``): GPU table, config aliases."""
    return _PACKAGE / "data" / name


def config_dir() -> Path:
    """The catalogue's configs (``configs/models``)."""
    if os.environ.get("VRAMCAL_CONFIG_DIR"):
        return Path(os.environ["VRAMCAL_CONFIG_DIR"])
    return _SOURCE / "configs" / "models" if _IN_SOURCE else _installed("configs", "models")


def sweeps_dir() -> Path:
    return _SOURCE / "configs" / "sweeps" if _IN_SOURCE else _installed("configs", "sweeps")


def coefficients_dir() -> Path:
    if os.environ.get("VRAMCAL_COEFFICIENTS_DIR"):
        return Path(os.environ["VRAMCAL_COEFFICIENTS_DIR"])
    return _SOURCE / "results" / "coefficients" if _IN_SOURCE else _installed("coefficients")


def schema_dir() -> Path:
    return _SOURCE / "results" / "schema" if _IN_SOURCE else _installed("schema")
