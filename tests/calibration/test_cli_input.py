"""`vramcal calibrate` and `vramcal validate` on bad input, CPU records, contexts beyond a model's positions,
and the interval coverage the coefficients file states.

Commands run in a subprocess (``python -m vramcal``); a missing extra is simulated there with
``sys.modules[name] = None`` before the CLI runs, which makes ``import name`` raise ModuleNotFoundError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("pandas")
pytest.importorskip("scipy")


def run(*args, hide: tuple[str, ...] = (), cwd=None) -> subprocess.CompletedProcess:
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in hide)
            + "from vramcal.cli import main\nraise SystemExit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=dict(os.environ))


def one_line(result, *fragments) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def cpu_records(synth, coefficients_file):
    """CPU tracker records (the shape the CPU harness writes) whose peak is exactly the estimate of what the
    tracker measures: the allocated peak of ``coefficients_file`` less its ``workspace_bytes``."""
    from calibration.data import features_of, record_terms
    from estimator.coefficients import load_coefficients
    from estimator.compare import cpu_allocated_bytes
    from estimator.estimate import predict_parts

    coef = load_coefficients(coefficients_file)
    out = []
    for rec in synth.make_records(models=("qwen2.5-0.5b", "llama-3.2-1b")):
        rec = dict(rec, device="cpu", gpu_name=None, gpu_memory_bytes=None, alloc_conf="", context_bytes=None,
                   peak_reserved_bytes=None, peak_nvml_bytes=None, torch_version="2.13.0+cpu")
        terms = record_terms(rec)
        values = coef.for_attn(rec["attn_implementation"])
        parts = predict_parts(terms["est_weights_bytes"], features_of(terms), values)
        rec["peak_allocated_bytes"] = cpu_allocated_bytes(parts["allocated"] + terms["buffers_bytes"], values)
        out.append(rec)
    return out


COEFFICIENTS_FILE = "results/coefficients/transformers-h100.json"


# ---- output paths, checked before the work -------------------------------------------------------
def test_calibrate_out_a_folder_is_refused_before_fitting(tmp_path, synthetic_file):
    one_line(run("calibrate", synthetic_file, "--out", tmp_path, "--no-cv"), "--out", "is a folder")
    assert [p.name for p in tmp_path.iterdir()] == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line(run("calibrate", synthetic_file, "--out", blocker / "c.json", "--no-cv"), "is a file, not a folder")


def test_validate_report_an_existing_file_is_refused_before_the_work(tmp_path, synthetic_file):
    report = tmp_path / "report.md"
    report.write_text("keep me")
    one_line(run("validate", synthetic_file, "--report", report), "--report", "is a file; give a folder")
    assert report.read_text() == "keep me"


# ---- missing extras ------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["pandas", "scipy"])
@pytest.mark.parametrize("command", ["validate", "calibrate"])
def test_missing_calibration_extra_is_one_line_naming_it(tmp_path, synthetic_file, command, module):
    extra = ("--out", tmp_path / "c.json") if command == "calibrate" else ()
    one_line(run(command, synthetic_file, *extra, hide=(module,)),
             f"{module} is not installed; install the calibration extra: pip install 'vramcal[calibration]'")
    assert not (tmp_path / "c.json").exists()


def test_validate_report_without_matplotlib_fails_before_the_work(tmp_path, synthetic_file):
    one_line(run("validate", synthetic_file, "--report", tmp_path / "report", hide=("matplotlib",)),
             "matplotlib is not installed", "vramcal[calibration]")
    assert not (tmp_path / "report").exists()


# ---- CPU records ---------------------------------------------------------------------------------
def test_validate_device_cpu_scores_cpu_records_against_the_allocated_estimate(tmp_path, synth):
    path = synth.write_jsonl(tmp_path / "cpu.jsonl", cpu_records(synth, synth.ROOT / COEFFICIENTS_FILE))
    result = run("validate", path, "--device", "cpu", "--json", "--coefficients", synth.ROOT / COEFFICIENTS_FILE)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["device"] == "cpu" and data["measured"] == "peak_allocated_bytes"
    assert data["summary"]["n"] == 12 and data["left_out"] == {}
    assert data["summary"]["median_abs_error"] < 1e-6 and data["summary"]["p90_abs_error"] < 1e-6
    assert data["summary"]["interval_coverage"] is None  # the interval is a GPU's
    assert set(data["subgroups"]["model"]) == {"qwen2.5-0.5b", "llama-3.2-1b"}
    text = run("validate", path, "--device", "cpu", "--coefficients", synth.ROOT / COEFFICIENTS_FILE)
    assert text.returncode == 0 and "CPU records: peak_allocated_bytes" in text.stdout
    one_line(run("validate", path, "--device", "cpu", "--cv"), "--cv and --report score GPU records")


def test_gpu_validate_and_calibrate_refuse_cpu_records_and_say_why(tmp_path, synth):
    path = synth.write_jsonl(tmp_path / "cpu.jsonl", cpu_records(synth, synth.ROOT / COEFFICIENTS_FILE))
    one_line(run("validate", path), "12 CPU record(s)", "--device cpu")
    one_line(run("calibrate", path, "--out", tmp_path / "c.json"), "12 CPU record(s) left out",
             "no NVML peak", "vramcal validate --device cpu")
    assert not (tmp_path / "c.json").exists()


def test_calibrate_leaves_cpu_records_out_of_a_gpu_fit_and_points_to_validate(tmp_path, synth, synthetic_records):
    path = synth.write_jsonl(tmp_path / "mixed.jsonl",
                             synthetic_records + cpu_records(synth, synth.ROOT / COEFFICIENTS_FILE))
    out = tmp_path / "c.json"
    result = run("calibrate", path, "--out", out, "--no-cv")
    assert result.returncode == 0, result.stderr
    assert "vramcal validate --device cpu" in result.stdout
    written = json.loads(out.read_text())
    assert written["provenance"]["records"]["left_out"] == {"device cpu": 12}
    assert written["provenance"]["records"]["used"] == len(synthetic_records)


# ---- contexts beyond the positions: what was measured is scored ----------------------------------
def test_validate_scores_records_beyond_the_models_positions(tmp_path, synth):
    """The reference holds phi-3-mini at 16,368 + 16 tokens (4,096 positions, rotary); a GPT-2 record past
    its learned 1,024 positions is scored too: validate never refuses a measured record for its context."""
    from calibration.cli import validation

    reference = [json.loads(line) for line in synth.REFERENCE.read_text().splitlines() if line.strip()]
    long_phi = [r for r in reference if r["model"] == "phi-3-mini"
                and r["prompt_tokens"] + r["new_tokens"] > r["config"]["max_position_embeddings"]]
    assert long_phi, "the reference's phi-3-mini cases beyond 4,096 positions"
    gpt2 = synth.make_records(models=("gpt2",), cases=[dict(workload="generate", batch_size=1, prompt_tokens=2032,
                                                             new_tokens=16, attn_implementation="eager",
                                                             dtype="float32")])
    path = synth.write_jsonl(tmp_path / "beyond.jsonl", long_phi + gpt2)
    result, rows = validation([path], progress=False)
    assert result["left_out"] == {}
    assert result["summary"]["n"] == len(long_phi) + 1
    assert set(rows["model"]) == {"phi-3-mini", "gpt2"}
    assert rows["pred_total_bytes"].notna().all()


# ---- the interval's coverage in the coefficients file --------------------------------------------
def test_calibrate_states_the_held_out_coverage_the_readme_quotes(tmp_path, synth):
    """The coefficients file's `interval.coverage` is the leave-one-model-out coverage (README: 87.3% on the
    reference), not the fraction of the residuals the interval was cut from (94.4%, >= 90% by construction)."""
    out = tmp_path / "c.json"
    result = run("calibrate", synth.REFERENCE, "--out", out)
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    held_out = written["provenance"]["leave_one_model_out"]["summary"]["interval_coverage"]
    assert written["interval"]["coverage"] == held_out == pytest.approx(0.873, abs=0.02)
    assert written["interval"]["target"] == 0.9 and written["interval"]["from"] == "lomo"


def test_calibrate_without_cv_states_no_coverage(tmp_path, synthetic_file):
    out = tmp_path / "c.json"
    result = run("calibrate", synthetic_file, "--out", out, "--no-cv")
    assert result.returncode == 0, result.stderr
    interval = json.loads(out.read_text())["interval"]
    assert interval["coverage"] is None and interval["target"] == 0.9
    assert interval["low"] <= 0 <= interval["high"]


def test_shipped_coefficients_state_the_held_out_coverage(synth):
    shipped = json.loads((synth.ROOT / COEFFICIENTS_FILE).read_text())
    assert shipped["interval"]["coverage"] == shipped["provenance"]["leave_one_model_out"]["summary"][
        "interval_coverage"]
