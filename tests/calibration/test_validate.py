"""Metrics, leave-one-model-out, the validate/calibrate commands, the report, bad inputs."""

import json
import subprocess
import sys

import pytest



def test_summary_metrics_are_fractions():
    from calibration.validate import summary

    s = summary([0.01, -0.03, 0.02, -0.01], low=[0, 0, 0, 0], high=[2, 2, 0, 2], measured=[1, 1, 1, 1])
    assert s["n"] == 4
    assert s["median_abs_error"] == pytest.approx(0.015)
    assert s["worst_underestimate"] == pytest.approx(-0.03)
    assert s["interval_coverage"] == pytest.approx(0.75)


def test_lomo_holds_each_model_out(synthetic_records):
    from calibration.data import frame
    from calibration.fit import StructuredModel
    from calibration.validate import lomo

    df = frame(synthetic_records)
    out, fits = lomo(df, lambda: StructuredModel(interval_from="fit"), progress=False)
    assert set(fits) == set(df["model"])
    assert out["lomo_error"].abs().max() < 1e-6  # exact synthetic data: held-out models predicted exactly


def test_oom_and_error_records_are_left_out_and_counted(tmp_path, synth):
    make_records, write_jsonl = synth.make_records, synth.write_jsonl
    from calibration.data import load_frame, usable

    recs = make_records(models=("qwen2.5-0.5b",))
    recs[0] = dict(recs[0], status="oom", error="CUDA out of memory")
    recs[1] = dict(recs[1], status="error", error="boom")
    df = load_frame([write_jsonl(tmp_path / "r.jsonl", recs)])
    keep, left_out = usable(df)
    assert len(keep) == len(recs) - 2
    assert left_out == {"status oom": 1, "status error": 1}


def test_a_case_measured_twice_counts_once_with_its_highest_peak(tmp_path, synth):
    from calibration.data import load_frame, usable

    recs = synth.make_records(models=("qwen2.5-0.5b",))
    again = dict(recs[2], peak_nvml_bytes=recs[2]["peak_nvml_bytes"] + 2**20)  # `measure --repeat`
    df = load_frame([synth.write_jsonl(tmp_path / "r.jsonl", recs + [again])])
    keep, left_out = usable(df)
    assert len(keep) == len(recs)
    assert left_out == {"repeat of a case (highest peak kept)": 1}
    assert again["peak_nvml_bytes"] in set(keep["peak_nvml_bytes"])
    assert recs[2]["peak_nvml_bytes"] not in set(keep["peak_nvml_bytes"])


def test_lora_and_assisted_records_are_left_out_of_fits(tmp_path, synth):
    from calibration.data import load_frame, usable

    recs = synth.make_records(models=("qwen2.5-0.5b",))
    recs[0] = dict(recs[0], lora="r16:q_proj+v_proj:x1:float32")
    recs[1] = dict(recs[1], assistant="qwen2.5-0.5b", num_assistant_tokens=5)
    keep, left_out = usable(load_frame([synth.write_jsonl(tmp_path / "r.jsonl", recs)]))
    assert len(keep) == len(recs) - 2
    assert left_out == {"LoRA adapters (not modelled in the fit)": 1,
                        "assisted generation (not modelled in the fit)": 1}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, synthetic_file):
    from vramcal.cli import main

    out = tmp_path_factory.mktemp("coef") / "transformers-h100.json"
    assert main(["calibrate", str(synthetic_file), "--out", str(out)]) == 0
    return out


def test_calibrate_writes_a_coefficients_file_with_provenance(calibrated, synthetic_file):
    from estimator.coefficients import load_coefficients

    data = json.loads(calibrated.read_text())
    assert data["schema"] == "vramcal.coefficients/1" and data["calibrated"] is True
    assert data["framework"] == "transformers" and data["gpu"] == "H100 SXM 80GB"
    prov = data["provenance"]
    assert prov["sources"][0]["path"] == str(synthetic_file) and len(prov["sources"][0]["sha256"]) == 64
    assert prov["records"]["used"] == 24 and prov["records"]["left_out"] == {}
    assert prov["versions"]["torch_version"] == ["2.11.0+cu130"] and "scipy" in prov["versions"]["fit"]
    assert "leave_one_model_out" in prov and prov["fit"]["not_identified"]
    assert {"low", "high", "coverage"} <= set(data["interval"])
    load_coefficients(calibrated)  # the estimator reads it


def test_validate_json_structure(calibrated, synthetic_file, capsys):
    from vramcal.cli import main

    assert main(["validate", str(synthetic_file), "--coefficients", str(calibrated), "--json", "--cv"]) == 0
    result = json.loads(capsys.readouterr().out)
    s = result["summary"]
    assert set(s) >= {"n", "median_abs_error", "p90_abs_error", "worst_underestimate", "interval_coverage"}
    assert s["n"] == 24 and s["median_abs_error"] < 1e-6
    assert set(result["subgroups"]) == {"model", "workload", "attention", "dtype"}
    assert set(result["subgroups"]["attention"]) == {"sdpa", "eager"}
    assert len(result["rows"]) == 24 and {"model", "peak_nvml_bytes", "pred_total_bytes", "error"} <= set(result["rows"][0])
    assert result["lomo"]["summary"]["n"] == 24


def test_report_files_are_written(calibrated, synthetic_file, tmp_path):
    from vramcal.cli import main

    out = tmp_path / "report"
    assert main(["validate", str(synthetic_file), "--coefficients", str(calibrated), "--report", str(out)]) == 0
    assert (out / "report.md").read_text().startswith("# vramcal validation report")
    assert "<img" in (out / "report.html").read_text()
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"pred_vs_measured.png", "error_by_model.png", "error_by_context.png",
                                       "breakdown.png"}
    assert all(0 < p.stat().st_size < 200_000 for p in pngs)


def _bad_inputs(tmp_path, synth):
    make_records, write_jsonl = synth.make_records, synth.write_jsonl
    good = make_records(models=("qwen2.5-0.5b",))[0]
    other = write_jsonl(tmp_path / "other.jsonl", [dict(good, schema="vramcal.record/2")])
    invalid = dict(good)
    del invalid["peak_nvml_bytes"]
    invalid_file = write_jsonl(tmp_path / "invalid.jsonl", [invalid])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    return {"other schema": (other, "schema"), "invalid record": (invalid_file, "peak_nvml_bytes"),
            "empty input": (empty, "no records")}


@pytest.mark.parametrize("case", ["other schema", "invalid record", "empty input"])
def test_bad_input_exits_2_with_one_line(case, tmp_path, synth):
    path, word = _bad_inputs(tmp_path, synth)[case]
    r = subprocess.run([sys.executable, "-m", "vramcal", "validate", str(path)], cwd=synth.ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and word in lines[0], r.stderr


def test_calibrate_without_usable_records_is_a_user_error(tmp_path, synth):
    make_records, write_jsonl = synth.make_records, synth.write_jsonl
    from vramcal.cli import main

    recs = [dict(r, status="oom", error="CUDA out of memory") for r in make_records(models=("qwen2.5-0.5b",))]
    path = write_jsonl(tmp_path / "oom.jsonl", recs)
    assert main(["calibrate", str(path), "--out", str(tmp_path / "c.json")]) == 2
