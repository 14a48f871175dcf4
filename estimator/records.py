"""Measured records (`vramcal.record/1`): the schema, the case key, reading and appending JSONL.

Pure Python: jsonschema is imported inside the functions that validate, so the estimator stays light.
Calibration reads records only through `read_records`; the harness writes them only through
`append_record`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

from estimator.errors import UserError, require_extra
from estimator.resources import schema_dir

SCHEMA = "vramcal.record/1"
SCHEMA_PATH = schema_dir() / "record-1.json"

# What makes two measurements "the same case". Everything that changes device memory and that a sweep
# varies; not the versions (a case re-measured under a new torch is the same case, compared across
# versions by calibration) and not `config` (a catalogue name stands for one architecture).
# `gpu_name` is in the key: a case measured on an H100 is not done on an A100. A record's `device`
# tells CPU tracker measurements from CUDA ones; on the CPU `gpu_name` is null.
CASE_KEY_FIELDS = (
    "model",
    "framework",
    "device",
    "gpu_name",
    "dtype",
    "quantization",
    "attn_implementation",
    "cache_implementation",
    "workload",
    "batch_size",
    "prompt_tokens",
    "new_tokens",
    "alloc_conf",
    "compile",
)
# Fields a case description may leave out; they take these values (null = none / not applicable).
_KEY_DEFAULTS = {"gpu_name": None, "quantization": None, "cache_implementation": None, "alloc_conf": "",
                 "compile": "off"}  # records before issue 11 were all measured with disable_compile=True
_APPENDED = ("compile",)
# Fields added later, in the key only where they differ from their default ("|device_map=auto|gpus=2"),
# so the keys of every record measured before them stay what they were (a rerun still resumes).
OPTIONAL_KEY_FIELDS = {"device_map": None, "gpus": 1}


def case_key(case) -> str:
    """A stable one-line key for a record, or a case given as a dict with the record's field names.

    Fields of `CASE_KEY_FIELDS` joined by "|", `-` for null or empty, e.g.
    ``qwen2.5-0.5b|transformers|cuda|NVIDIA H100 80GB HBM3|bfloat16|-|sdpa|dynamic|generate|1|1008|16|-``.
    An object with a ``record_fields()`` method (``harness.case.Case``) is accepted too.
    """
    if not isinstance(case, Mapping) and hasattr(case, "record_fields"):
        case = case.record_fields()
    if not isinstance(case, Mapping):
        raise UserError(f"case_key needs a record or a dict of record fields, not {type(case).__name__}")
    parts = []
    for field in CASE_KEY_FIELDS:
        if field in case:
            value = case[field]
        elif field in _KEY_DEFAULTS:
            value = _KEY_DEFAULTS[field]
        else:
            raise UserError(f"cannot make a case key: the case has no {field!r} field")
        if field in _APPENDED and value == _KEY_DEFAULTS[field]:
            continue  # a field added later is left out at its default: older keys stay what they were
        parts.append("-" if value is None or value == "" else str(value))
    if case.get("lora"):  # LoRA cases (harness/lora.py) only: every other key stays as it was
        parts.append(f"lora={case['lora']}")
    for field, default in OPTIONAL_KEY_FIELDS.items():
        value = case.get(field, default)
        if value is not None and value != default:
            parts.append(f"{field}={value}")
    if case.get("assistant"):  # assisted generation (harness/assisted.py)
        parts.append(f"assistant={case['assistant']}:k{case.get('num_assistant_tokens')}")
    if case.get("prompt_lookup_num_tokens"):
        parts.append(f"prompt_lookup={case['prompt_lookup_num_tokens']}")
    return "|".join(parts)


@lru_cache(maxsize=1)
def _validator():
    jsonschema = require_extra("jsonschema", "calibration")
    try:
        schema = json.loads(SCHEMA_PATH.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the record schema {SCHEMA_PATH}: {exc}") from None
    return jsonschema.Draft202012Validator(schema)


def _first_error(rec) -> str | None:
    """One line naming the offending field, or None when `rec` is a valid record."""
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(rec))
    if error is None:
        return None
    field = ".".join(str(p) for p in error.absolute_path)
    message = " ".join(error.message.split())
    if len(message) > 160:
        message = message[:157] + "..."
    if error.validator == "required" or not field:
        return f"record: {message}"
    return f"record field {field!r}: {message}"


def validate_record(rec) -> None:
    """Raise UserError (one line, naming the field) unless `rec` is a valid `vramcal.record/1`."""
    if not isinstance(rec, Mapping):
        raise UserError(f"a record is a JSON object, not {type(rec).__name__}")
    if rec.get("schema") != SCHEMA:
        raise UserError(f"record schema is {rec.get('schema')!r}; this vramcal reads {SCHEMA!r} only")
    message = _first_error(dict(rec))
    if message:
        raise UserError(message)


def read_records(paths, validate: bool = True) -> list[dict]:
    """All records of one or more `.jsonl` files, in file order. Blank lines are skipped.

    UserError, one line with file:line, for a missing file, a line that is not JSON, another schema
    version, a record failing the schema, or no records at all.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no record files given")
    records: list[dict] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                for lineno, line in enumerate(handle, 1):
                    if line.strip():
                        records.append(_parse_line(line, f"{path}:{lineno}", validate))
        except FileNotFoundError:
            raise UserError(f"{path} does not exist") from None
        except IsADirectoryError:
            raise UserError(f"{path} is a folder, not a .jsonl file of records") from None
        except UnicodeDecodeError:
            raise UserError(f"{path} is not a UTF-8 text file of records") from None
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not records:
        raise UserError(f"no records in {', '.join(map(str, paths))}")
    return records


def _parse_line(line: str, where: str, validate: bool) -> dict:
    try:
        rec = json.loads(line)
    except ValueError as exc:
        raise UserError(f"{where}: not a JSON line ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(rec, dict):
        raise UserError(f"{where}: a record is a JSON object, not {type(rec).__name__}")
    if rec.get("schema") != SCHEMA:
        raise UserError(f"{where}: schema {rec.get('schema')!r} is not {SCHEMA!r}, the only one this vramcal reads")
    if validate:
        message = _first_error(rec)
        if message:
            raise UserError(f"{where}: {message}")
    return rec


def append_record(path, rec: Mapping) -> None:
    """Validate `rec` and append it as one line; flushed and fsynced before returning.

    One `write` of the whole line on an O_APPEND descriptor: a process killed around it leaves either
    the full line or nothing.
    """
    validate_record(rec)
    line = (json.dumps(dict(rec), allow_nan=False) + "\n").encode("utf-8")
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                raise UserError(f"{path} ends with an incomplete line (an interrupted write?); "
                                "remove that line, then run again")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(line)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_by_key(records: Iterable[Mapping]) -> dict[str, Mapping]:
    """The last record of each case key, in first-seen order: a case measured again (`vramcal sweep
    --retry-errors`) counts once, with its newest result."""
    latest: dict[str, Mapping] = {}
    for rec in records:
        latest[case_key(rec)] = rec
    return latest
