"""Output paths, checked before any work: no measurement and no fit is lost to a path it cannot write.

Each command that writes (``measure``/``sweep`` records, ``calibrate`` coefficients, ``validate --report``)
checks its output here first, before anything is measured or fitted. The checks create nothing: a
missing folder is created when the first result is written (as ``estimator.records.append_record`` does),
so here it only has to be creatable: the nearest existing folder above it is a folder and writable.
"""

from __future__ import annotations

import os
from pathlib import Path

from estimator.errors import UserError


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a component that is a file: "Not a directory"
        return False


def _check_creatable(folder: Path, option: str, given) -> None:
    """``folder`` exists as a writable folder, or can be made below the nearest one that does."""
    existing = folder
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {given}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write in" if existing == folder else f"create {folder} in"
        raise UserError(f"{option} {given}: cannot {what} {existing} (permission denied)")


def check_output_file(path, option: str = "--out") -> Path:
    """A file that results are written or appended to: not a folder, writable if it exists, and its
    folder creatable. Returns the path; UserError (one line, naming ``option``) otherwise."""
    if path is None or not str(path).strip():
        raise UserError(f"{option} needs a file name")
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file in it, e.g. {p / 'results.jsonl'}")
    if _exists(p):
        if not p.is_file():
            raise UserError(f"{option} {path} is not a regular file")
        if not os.access(p, os.W_OK):
            raise UserError(f"{option} {path} is not writable (permission denied)")
        return p
    _check_creatable(p.parent, option, path)
    return p


def check_output_dir(path, option: str = "--report") -> Path:
    """A folder that files are written into: a folder if it exists (writable), else creatable."""
    if path is None or not str(path).strip():
        raise UserError(f"{option} needs a folder name")
    p = Path(path).expanduser()
    if _exists(p) and not p.is_dir():
        raise UserError(f"{option} {path} is a file; give a folder (it is created if missing)")
    _check_creatable(p, option, path)
    return p
