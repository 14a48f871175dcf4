"""The fit recovers known coefficients; the baselines recover theirs; the fit predicts as estimate() does."""

import math

import pytest



@pytest.fixture(scope="module")
def frame(synthetic_records):
    from calibration.data import frame

    return frame(synthetic_records)


def test_structured_model_recovers_known_coefficients(frame, synth):
    TRUE = synth.TRUE
    from calibration.fit import StructuredModel

    model = StructuredModel(interval_from="fit").fit(frame)
    assert set(model.fitted_) == set(TRUE)
    for name, value in TRUE.items():
        assert model.coef_[name] == pytest.approx(value, rel=1e-3), name
    assert max(abs(r) for r in model.residuals_) < 1e-6


def test_coefficients_without_signal_keep_defaults_and_are_reported(frame):
    from calibration.fit import StructuredModel
    from estimator.coefficients import COEFFICIENTS

    model = StructuredModel(interval_from="fit").fit(frame)
    # transformers records go through the simulated program: the analytic-path factors have no signal
    assert {"kv_factor", "act_mlp", "act_scores_eager"} <= set(model.not_identified_)
    for name in model.not_identified_:
        assert model.coef_[name] == COEFFICIENTS[name][0]


def test_fit_is_robust_to_noise_and_bounded(synth):
    TRUE, make_records = synth.TRUE, synth.make_records
    from calibration.data import frame
    from calibration.fit import StructuredModel
    from estimator.coefficients import COEFFICIENTS

    noisy = frame(make_records(noise=0.005, seed=1))
    model = StructuredModel(interval_from="fit").fit(noisy)
    assert model.coef_["sim_allocated_factor"] == pytest.approx(TRUE["sim_allocated_factor"], rel=0.02)
    for name in model.fitted_:
        lo, hi = COEFFICIENTS[name][1:3]
        assert lo <= model.coef_[name] <= hi


def test_predict_before_fit_raises():
    from calibration.fit import NotFittedError, SeedFormula, StructuredModel

    with pytest.raises(NotFittedError, match="fit"):
        StructuredModel().predict(None)
    with pytest.raises(NotFittedError):
        SeedFormula().predict(None)


def test_interval_covers_the_asked_fraction():
    from calibration.fit import interval_from_residuals

    residuals = [((i % 21) - 10) / 500 for i in range(210)]  # -2% .. +2%
    iv = interval_from_residuals(residuals, 0.9)
    assert iv["low"] < 0 < iv["high"]
    assert iv["coverage"] >= 0.9


def test_seed_formula_recovers_its_factors(frame):
    from calibration.fit import SeedFormula

    truth = {"kv_factor": 0.5, "overhead_bytes": 1.1e9, "overhead_fraction": 0.07}
    df = frame.copy()
    df["peak_nvml_bytes"] = SeedFormula.formula(df, truth)
    seed = SeedFormula().fit(df)
    for name, value in truth.items():
        assert seed.coef_[name] == pytest.approx(value, rel=1e-3), name


def test_calibration_predicts_exactly_what_estimate_gives(synthetic_records):
    """Fit and shipped estimator share predict_parts: same bytes for the same coefficients."""
    from calibration.data import frame
    from calibration.fit import StructuredModel
    from estimator.estimate import estimate
    from estimator.families import spec_from_config
    from estimator.terms import Workload

    df = frame(synthetic_records)
    model = StructuredModel(interval_from="fit").fit(df)
    coef = model.coefficients(framework="transformers", gpu="H100 80GB")
    predicted = model.predict(df)
    for i in (0, 5, len(synthetic_records) - 1):
        rec = synthetic_records[i]
        est = estimate(spec_from_config(rec["config"], rec["model"]), Workload.from_record(rec), coef)
        assert est.total_bytes == round(predicted.iloc[i])


def test_reference_fit_is_within_the_goal_in_sample(synth):
    REFERENCE = synth.REFERENCE
    assert REFERENCE.is_file(), f"the reference records are missing: {REFERENCE}"
    from calibration.data import load_frame, usable
    from calibration.fit import StructuredModel

    df, left_out = usable(load_frame([REFERENCE]))
    model = StructuredModel(interval_from="fit").fit(df)
    errors = sorted(abs(r) for r in model.residuals_)
    assert errors[len(errors) // 2] < 0.02
    assert math.isclose(model.coef_["sim_allocated_factor"], 1.0, abs_tol=0.05)
