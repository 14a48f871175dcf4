"""Sweeps end to end through the command line, with real worker subprocesses on the CPU.

Resume without duplicates, a sweep killed with SIGKILL, an out-of-memory case, a crashing worker, and
one-line errors for bad input. Test hooks of harness/worker.py: VRAMCAL_TEST_CRASH_KEY makes the worker
os._exit(3) when a matching case starts; VRAMCAL_TEST_DELAY_S slows every case down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from estimator.records import case_key, read_records  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 4096}


@pytest.fixture
def tiny(tmp_path) -> Path:
    config = json.loads((REPO / "configs" / "models" / "qwen2.5-0.5b.json").read_text())
    config.update(TINY, max_window_layers=2, bos_token_id=1, eos_token_id=2)
    path = tmp_path / "qwen-tiny.json"
    path.write_text(json.dumps(config))
    return path


def sweep_file(tmp_path, tiny, extra: str = "", contexts=(24, 40), batches=(1, 2), more: str = "") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
name = "tiny"
device = "cpu"
skip_over_estimate = 0
new_tokens = [4]
{extra}
[[matrix]]
models = ["{tiny}"]
contexts = {list(contexts)}
batches = {list(batches)}
{more}
""")
    return path


def vramcal(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vramcal", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env={**os.environ, **(env or {})}, **kwargs)


def keys(path: Path) -> list[str]:
    return [case_key(r) for r in read_records(path)]


def test_sweep_then_resume_writes_no_duplicates(tmp_path, tiny):
    out = tmp_path / "out.jsonl"
    first = vramcal("sweep", sweep_file(tmp_path, tiny), "--out", out)
    assert first.returncode == 0, first.stderr
    records = read_records(out)  # validates every record
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    assert "4 to run" in first.stdout and first.stdout.count("\nok ") + first.stdout.startswith("ok ") == 4
    # grow the sweep: only the new cases run
    second = vramcal("sweep", sweep_file(tmp_path, tiny, contexts=(24, 40, 56)), "--out", out)
    assert second.returncode == 0, second.stderr
    assert "4 already in" in second.stdout and "2 to run" in second.stdout
    third = vramcal("sweep", sweep_file(tmp_path, tiny, contexts=(24, 40, 56)), "--out", out)
    assert "0 to run" in third.stdout
    assert len(keys(out)) == len(set(keys(out))) == 6


def worker_pids(parent_pid: int) -> list[int]:
    """Live `python -m harness.worker --parent-pid <parent_pid>` processes."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"harness.worker" in argv and str(parent_pid).encode() in argv:
            status = (proc / "status").read_text()
            if "State:\tZ" not in status:
                pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker")
def test_a_killed_sweep_loses_at_most_the_case_in_flight_and_resumes(tmp_path, tiny):
    out = tmp_path / "out.jsonl"
    path = sweep_file(tmp_path, tiny)
    proc = subprocess.Popen([sys.executable, "-m", "vramcal", "sweep", str(path), "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "VRAMCAL_TEST_DELAY_S": "1.5"})
    deadline = time.time() + 120
    while time.time() < deadline and not (out.is_file() and out.read_text().count("\n") >= 1):
        time.sleep(0.1)
    assert worker_pids(proc.pid), "no worker running mid-sweep"
    proc.send_signal(signal.SIGKILL)  # mid-case: the second case is sleeping in its worker
    proc.wait()
    written = keys(out)  # every line written is whole and valid
    assert 1 <= len(written) < 4
    deadline = time.time() + 15  # the orphaned worker notices and exits (stdin EOF / PDEATHSIG)
    while time.time() < deadline and worker_pids(proc.pid):
        time.sleep(0.2)
    assert not worker_pids(proc.pid)
    assert keys(out) == written  # nothing was added behind the dead sweep's back
    resumed = vramcal("sweep", path, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(written)} already in" in resumed.stdout
    final = keys(out)
    assert final[: len(written)] == written and len(final) == len(set(final)) == 4


def test_an_oom_is_recorded_and_the_sweep_goes_on(tmp_path, tiny):
    out = tmp_path / "out.jsonl"
    # weights 0.67 MB; peaks ~0.82 MB at batch 1 and ~1.5 MB at batch 8: the limit stops batch 8. The eager
    # matrix is a second build in the same worker, measured after the OOM.
    more = f'[[matrix]]\nmodels = ["{tiny}"]\nattn = ["eager"]\ncontexts = [24]\nbatches = [1]'
    path = sweep_file(tmp_path, tiny, extra="memory_limit_bytes = 1_150_000", contexts=(24,), batches=(1, 8),
                      more=more)
    result = vramcal("sweep", path, "--out", out)
    assert result.returncode == 0, result.stderr  # an OOM is data, not a failure
    records = read_records(out)
    assert [(r["attn_implementation"], r["batch_size"], r["status"]) for r in records] == [
        ("sdpa", 1, "ok"), ("sdpa", 8, "oom"), ("eager", 1, "ok")]
    oom = records[1]
    assert "OutOfMemoryError" in oom["error"] and oom["memory_limit_bytes"] == 1_150_000
    assert records[2]["peak_allocated_bytes"] < 1_150_000  # the OOM case left nothing behind
    assert "1 oom" in result.stdout


def test_a_crashed_worker_records_error_and_a_new_worker_goes_on(tmp_path, tiny):
    out = tmp_path / "out.jsonl"
    crash = "|generate|1|36|4|"  # batch 1, prompt 36: the second case in order
    result = vramcal("sweep", sweep_file(tmp_path, tiny), "--out", out, env={"VRAMCAL_TEST_CRASH_KEY": crash})
    assert result.returncode == 1  # errors are recorded, and the exit status says there were some
    records = read_records(out)
    assert len(records) == 4
    status = {case_key(r): r for r in records}
    crashed = [r for k, r in status.items() if crash in k]
    assert len(crashed) == 1 and crashed[0]["status"] == "error"
    assert "exited with status 3 during this case" in crashed[0]["error"]
    assert sum(r["status"] == "ok" for r in records) == 3  # cases before and after the crash
    # --retry-errors measures it again (without the hook it now works)
    retry = vramcal("sweep", sweep_file(tmp_path, tiny), "--out", out, "--retry-errors")
    assert retry.returncode == 0 and "1 to run" in retry.stdout
    assert read_records(out)[-1]["status"] == "ok" and crash in case_key(read_records(out)[-1])


def test_measure_appends_one_record(tmp_path, tiny):
    out = tmp_path / "m.jsonl"
    result = vramcal("measure", tiny, "--device", "cpu", "--workload", "forward", "--context", "32",
                     "--batch", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    (rec,) = read_records(out)
    assert (rec["model"], rec["workload"], rec["batch_size"], rec["prompt_tokens"]) == ("qwen-tiny", "forward", 2, 32)
    assert result.stdout.startswith("ok ")


@pytest.mark.parametrize("args, message", [
    (("measure", "nosuchmodel", "--device", "cpu", "--out", "x.jsonl"), "unknown model 'nosuchmodel'"),
    (("measure", "llama-3.2-1b", "--device", "cpu", "--context", "8", "--new-tokens", "16", "--out", "x.jsonl"),
     "must exceed new_tokens"),
    (("measure", "llama-3.2-1b", "--device", "cpu", "--dtype", "int3", "--out", "x.jsonl"), "dtype 'int3'"),
    (("measure", "llama-3.2-1b", "--batch", "many", "--out", "x.jsonl"), "invalid int value"),
    (("measure", "llama-3.2-1b", "--device", "cpu"), "--out"),
    (("sweep", "configs/sweeps/no-such-sweep.toml"), "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = vramcal(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (REPO / "x.jsonl").exists()
