"""`vramcal sweep --time-budget`: no case starts after the budget, the one in flight is recorded, the
sweep exits 0 with a summary and a rerun resumes the rest (issue 16: a GPU campaign cut at its time
limit keeps what it measured). Real worker subprocesses on the CPU, the tiny model of
test_sweep_process.py; VRAMCAL_TEST_DELAY_S (harness/worker.py) makes each case last long enough."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from estimator.records import case_key, read_records  # noqa: E402
from harness.runner import run_cases  # noqa: E402
from harness.sweep import expand, load_sweep, order  # noqa: E402
from tests.harness.test_sweep_process import sweep_file, tiny, vramcal  # noqa: E402,F401


def test_the_case_in_flight_at_the_deadline_is_recorded_and_no_other_starts(tmp_path, tiny, monkeypatch):  # noqa: F811
    cases = order(expand(load_sweep(sweep_file(tmp_path, tiny)))[0])
    assert len(cases) == 4
    monkeypatch.setenv("VRAMCAL_TEST_DELAY_S", "2")  # the worker sleeps 2 s before each case
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    # the deadline passes while the first case sleeps: it is measured to its end, then the worker is stopped
    records = run_cases(cases, out, gpu_name=None, deadline=started + 0.5)
    assert [r["status"] for r in records] == ["ok"]
    assert [case_key(r) for r in read_records(out)] == [cases[0].key()]
    assert time.monotonic() - started < 60  # the three cases left did not run (2 s each plus a worker)


def test_sweep_with_a_spent_budget_exits_0_and_a_rerun_resumes(tmp_path, tiny):  # noqa: F811
    path, out = sweep_file(tmp_path, tiny), tmp_path / "out.jsonl"
    cut = vramcal("sweep", path, "--out", out, "--time-budget", "0.001")
    assert cut.returncode == 0, cut.stderr
    assert "stopped at the time budget (0.001 s): 4 cases not started; a rerun resumes them" in cut.stdout
    assert "throughput: 0 ok cases" in cut.stdout
    assert not out.exists() or not out.read_text().strip()
    full = vramcal("sweep", path, "--out", out, "--time-budget", "600")
    assert full.returncode == 0, full.stderr
    assert "stopped at the time budget" not in full.stdout
    assert "throughput: 4 ok cases" in full.stdout and "of the time outside the measured workloads" in full.stdout
    assert len(read_records(out)) == 4


@pytest.mark.parametrize("value", ["0", "-5", "nan", "soon"])
def test_a_bad_time_budget_is_one_line_and_exit_2(tmp_path, tiny, value):  # noqa: F811
    result = vramcal("sweep", sweep_file(tmp_path, tiny), "--out", tmp_path / "o.jsonl", "--time-budget", value)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--time-budget" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_a_time_budget_with_ray_is_refused_in_one_line(tmp_path, tiny):  # noqa: F811
    result = vramcal("sweep", sweep_file(tmp_path, tiny), "--out", tmp_path / "o.jsonl", "--time-budget", "60",
                     "--ray")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "vramcal: error: --time-budget applies to a sweep run here, not with --ray"
