"""Records, case keys, cases and sweep files: pure Python, no torch, fast."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from estimator.errors import UserError
from estimator.records import (
    CASE_KEY_FIELDS, SCHEMA, SCHEMA_PATH, append_record, case_key, latest_by_key, read_records, validate_record,
)
from harness.case import Case
from harness.sweep import expand, load_sweep, order

REPO = Path(__file__).resolve().parents[2]
# 71 real H100 records measured independently of this harness (results/reference/README.md): format and
# cross-check. Shipped with the repository: a missing file is a failure, not a skip.
REFERENCE = REPO / "results" / "reference" / "h100-transformers-5.17.jsonl"
SWEEPS = REPO / "configs" / "sweeps"


def reference_records() -> list[dict]:
    assert REFERENCE.is_file(), f"the reference records are missing: {REFERENCE}"
    return read_records(REFERENCE)


def cpu_record(**changes) -> dict:
    """A valid CPU record (the shape the CPU harness writes)."""
    rec = {
        "schema": SCHEMA, "model": "llama-tiny", "config": {"model_type": "llama"}, "framework": "transformers",
        "framework_version": "5.17.0", "torch_version": "2.13.0+cpu", "device": "cpu", "gpu_name": None,
        "gpu_memory_bytes": None, "alloc_conf": "", "dtype": "bfloat16", "quantization": None,
        "attn_implementation": "sdpa", "cache_implementation": "dynamic", "workload": "generate",
        "batch_size": 2, "prompt_tokens": 60, "new_tokens": 4, "status": "ok", "error": None,
        "context_bytes": None, "weights_bytes": 1000, "kv_cache_bytes": 100, "peak_allocated_bytes": 2048,
        "peak_reserved_bytes": None, "peak_nvml_bytes": None, "duration_s": 0.5,
    }
    rec.update(changes)
    return rec


# ---- the schema ---------------------------------------------------------------------------------
def test_schema_file_is_draft_2020_12():
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_the_71_reference_records_validate():
    records = reference_records()
    assert len(records) == 71
    for rec in records:
        validate_record(rec)
    assert len({case_key(r) for r in records}) == 71  # the key tells every reference case apart


def test_cpu_record_validates_and_cuda_fields_must_be_null_on_cpu():
    validate_record(cpu_record())
    with pytest.raises(UserError, match="peak_nvml_bytes"):
        validate_record(cpu_record(peak_nvml_bytes=5))


@pytest.mark.parametrize("changes, field", [
    ({"peak_allocated_bytes": None}, "peak_allocated_bytes"),  # ok needs a peak
    ({"status": "oom"}, "error"),  # a failure says why
    ({"weights_bytes": -1}, "weights_bytes"),
    ({"weights_bytes": 1.5}, "weights_bytes"),
    ({"workload": "forward", "new_tokens": 0}, "cache_implementation"),  # forward has no cache
    ({"dtype": "int3"}, "dtype"),
    ({"nonsense": 1}, "nonsense"),
])
def test_a_bad_record_is_one_line_naming_the_field(changes, field):
    with pytest.raises(UserError) as info:
        validate_record(cpu_record(**changes))
    message = str(info.value)
    assert field in message and "\n" not in message


def test_a_cuda_ok_record_needs_the_device_numbers():
    rec = reference_records()[0]
    for field in ("peak_nvml_bytes", "peak_reserved_bytes", "context_bytes", "gpu_name"):
        bad = copy.deepcopy(rec)
        bad[field] = None
        with pytest.raises(UserError, match=field):
            validate_record(bad)
    oom = copy.deepcopy(rec)
    oom.update(status="oom", error="OutOfMemoryError: CUDA out of memory", peak_nvml_bytes=None, kv_cache_bytes=None)
    validate_record(oom)


# ---- case keys ----------------------------------------------------------------------------------
def test_case_key_format_and_fields():
    rec = reference_records()[0]
    assert case_key(rec) == (
        "qwen2.5-0.5b|transformers|cuda|NVIDIA H100 80GB HBM3|bfloat16|-|sdpa|dynamic|generate|1|1008|16|-"
    )
    changed = dict(rec, alloc_conf="expandable_segments:True")
    assert case_key(changed) != case_key(rec)
    assert case_key(dict(rec, duration_s=99, torch_version="x", config={})) == case_key(rec)  # not in the key
    assert case_key(dict(rec, alloc_conf=None)) == case_key(rec)  # unset either way
    assert case_key(dict(rec, compile="off")) == case_key(rec)  # the default, left out: older keys hold
    assert case_key(dict(rec, compile="auto")) == case_key(rec) + "|auto"
    assert len(CASE_KEY_FIELDS) == 14


def test_case_key_of_a_case_matches_its_record():
    rec = reference_records()[0]
    case = Case.make("qwen2.5-0.5b", device="cuda", context=1024, new_tokens=16, batch=1)
    assert case.prompt_tokens == 1008
    assert case.key(rec["gpu_name"]) == case_key(rec)
    assert case_key(case.record_fields(rec["gpu_name"])) == case_key(rec)


def test_case_key_without_a_needed_field():
    with pytest.raises(UserError, match="'batch_size'"):
        case_key({k: 1 for k in CASE_KEY_FIELDS if k != "batch_size"})


def test_latest_by_key_keeps_the_newest_record_of_a_case():
    first = cpu_record(status="error", error="x", peak_allocated_bytes=None)
    other, again = cpu_record(batch_size=4), cpu_record()
    latest = latest_by_key([first, other, again])
    assert list(latest.values()) == [again, other]


# ---- reading and appending ----------------------------------------------------------------------
def test_read_records_errors_are_one_line(tmp_path):
    good = json.dumps(cpu_record())
    cases = {
        "missing.jsonl": None,
        "badjson.jsonl": good + "\n{not json\n",
        "otherschema.jsonl": json.dumps(cpu_record(schema="vramcal.record/2")) + "\n",
        "invalid.jsonl": good + "\n" + json.dumps(cpu_record(batch_size=0)) + "\n",
        "empty.jsonl": "\n\n",
    }
    expect = {"missing.jsonl": "does not exist", "badjson.jsonl": "badjson.jsonl:2: not a JSON line",
              "otherschema.jsonl": "otherschema.jsonl:1: schema 'vramcal.record/2'",
              "invalid.jsonl": "invalid.jsonl:2: record field 'batch_size'", "empty.jsonl": "no records"}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(UserError) as info:
            read_records(path)
        assert expect[name] in str(info.value) and "\n" not in str(info.value), name
    with pytest.raises(UserError, match="no record files"):
        read_records([])
    assert len(read_records(tmp_path / "invalid.jsonl", validate=False)) == 2


def test_append_record_validates_appends_and_refuses_a_torn_file(tmp_path):
    out = tmp_path / "sub" / "records.jsonl"
    append_record(out, cpu_record())
    append_record(out, cpu_record(batch_size=4))
    assert [r["batch_size"] for r in read_records(out)] == [2, 4]
    with pytest.raises(UserError, match="peak_allocated_bytes"):
        append_record(out, cpu_record(peak_allocated_bytes=None))
    assert len(out.read_text().splitlines()) == 2  # the bad record was not written
    with open(out, "a") as handle:
        handle.write('{"schema": "vramcal.rec')  # a write cut short
    with pytest.raises(UserError, match="incomplete line"):
        append_record(out, cpu_record())


# ---- cases --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"model": "nosuchmodel"}, "unknown model 'nosuchmodel'"),
    ({"dtype": "int3"}, "dtype 'int3'"),
    ({"context": 16, "new_tokens": 16}, "must exceed new_tokens"),
    ({"batch": 0}, "batch must be >= 1"),
    ({"cache": "paged"}, "cache 'paged'"),
    ({"attn": "magic"}, "attn 'magic'"),
    ({"workload": "forward", "new_tokens": 4}, "new_tokens must be 0"),
    ({"quant": "bnb-nf4"}, "needs a checkpoint folder"),
    ({"quant": "int3"}, "unknown quantization"),
])
def test_case_errors_are_one_line(kwargs, match):
    args = {"model": "llama-3.2-1b", "device": "cpu", "context": 64, **kwargs}
    with pytest.raises(UserError, match=match) as info:
        Case.make(args.pop("model"), **args)
    assert "\n" not in str(info.value)


def test_case_round_trips_and_forward_has_no_cache():
    case = Case.make("llama-3.2-1b", device="cpu", workload="forward", context=512, batch=2)
    assert (case.prompt_tokens, case.new_tokens, case.cache) == (512, 0, None)
    assert Case.from_dict(case.to_dict()) == case
    assert Case.make("llama-3.2-1b", device="cpu", context=64, alloc_conf="expandable_segments:True").alloc_conf == ""


# ---- sweep files --------------------------------------------------------------------------------
def write(tmp_path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, match", [
    ('device = "tpu"\n[[matrix]]\nmodels=["gpt2"]\ncontexts=[64]', "device 'tpu'"),
    ('colour = 1\n[[matrix]]\nmodels=["gpt2"]\ncontexts=[64]', "unknown setting 'colour'"),
    ('[[matrix]]\nmodels=["gpt2"]\ncontexts=[64]\nbatch=[1]', "unknown field 'batch'"),
    ('[[matrix]]\nmodels=["gpt2"]', "contexts is required"),
    ('[[matrix]]\nmodels=["gpt2"]\ncontexts=[64]\ndtypes=["int3"]', "dtype 'int3'"),
    ('[[matrix]]\nmodels=["gpt2"]\ncontexts=["long"]', "contexts holds 'long'"),
    ('[[matrix]]\nmodels=["gpt2"]\ncontexts=[64]\nworkloads=["train"]', "workloads 'train'"),
    ('name = "x"', "no \\[\\[matrix\\]\\]"),
    ('[[matrix]\n', "not valid TOML"),
])
def test_sweep_file_errors_name_the_field(tmp_path, text, match):
    with pytest.raises(UserError, match=match) as info:
        load_sweep(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_expand_and_order(tmp_path):
    path = write(tmp_path, """
device = "cpu"
batches = [1]
[[matrix]]
models = ["gpt2", "llama-3.2-1b"]
workloads = ["generate", "forward"]
cache = ["dynamic", "static"]
contexts = [16, 64]
new_tokens = [16]
[[matrix]]
models = ["llama-3.2-1b"]
workloads = ["forward"]
contexts = [64]
dtypes = ["float32", "bf16"]
""")
    cases, left_out = expand(load_sweep(path))
    # generate: 2 models x 2 caches x context 64 (16 <= 16 new tokens is left out); forward: no cache axis
    assert left_out == 4
    generate = [c for c in cases if c.workload == "generate"]
    forward = [c for c in cases if c.workload == "forward"]
    assert len(generate) == 4 and all(c.prompt_tokens == 48 and c.new_tokens == 16 for c in generate)
    assert len(forward) == 2 * 2 + 1  # the second matrix adds only float32 (its bf16 case is a duplicate)
    assert all(c.cache is None and c.new_tokens == 0 for c in forward)
    ordered = order(cases)
    # one worker per model, one build per dtype: groups are contiguous
    models = [c.model for c in ordered]
    assert models == sorted(models, key=models.index)
    builds = [(c.model, c.dtype) for c in ordered]
    assert len({b for b in builds}) == len([b for i, b in enumerate(builds) if i == 0 or builds[i - 1] != b])


def test_shipped_sweeps_parse_and_cover_the_campaign():
    smoke = load_sweep(SWEEPS / "h100-smoke.toml")
    calibration = load_sweep(SWEEPS / "h100-calibration.toml")
    assert smoke.device == calibration.device == "cuda"
    try:
        cal_cases, _ = expand(calibration)
        smoke_cases, _ = expand(smoke)
    except UserError as exc:  # a model config not in the catalogue yet
        pytest.skip(str(exc))
    models = {c.model for c in cal_cases}
    assert len(models) >= 8 and {"llama-3.1-8b", "phi-3-mini", "olmoe-1b-7b", "deepseek-v2-lite",
                                 "gemma-2-2b", "mistral-7b", "qwen3-30b-a3b"} <= models
    assert len(cal_cases) >= 300
    assert {c.dtype for c in cal_cases} == {"bfloat16", "float16", "float32"}
    assert {c.attn for c in cal_cases} == {"sdpa", "eager"}
    assert {c.cache for c in cal_cases} == {"dynamic", "static", None}
    assert {c.alloc_conf for c in cal_cases} == {"", "expandable_segments:True", "max_split_size_mb:512",
                                                 "roundup_power2_divisions:4",
                                                 "expandable_segments:True,max_split_size_mb:512"}
    assert {c.compile for c in cal_cases if c.cache == "static"} == {"auto", "off"}  # issue 11
    assert max(c.new_tokens for c in cal_cases) >= 512 and max(c.context for c in cal_cases) >= 32768
    # the smoke sweep repeats reference cases exactly, for the 2% cross-check
    reference = {case_key(r) for r in reference_records()}
    overlap = {c.key("NVIDIA H100 80GB HBM3") for c in smoke_cases} & reference
    assert len(overlap) >= 12
