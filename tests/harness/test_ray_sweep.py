"""`vramcal sweep --ray` on a local Ray instance with 2 CPUs, against the serial sweep, on the CPU.

Real Ray, real worker subprocesses, tiny models (two copies of a 2-layer Qwen2 config, so a sweep has two
process groups that run side by side). Ray's footprint is kept small: no dashboard, a 100 MiB object
store, and every Ray process these tests start is ended by its pid (found by a marker in its environment).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from estimator.errors import UserError
from estimator.records import case_key, read_records
from harness.case import Case
from harness.ray_sweep import accelerator_type, done_rule, pinned_type

REPO = Path(__file__).resolve().parents[2]
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 4096}
MARKER = "VRAMCAL_TEST_RAY_MARKER"


# ---- pure parts: no Ray needed ---------------------------------------------------------------------
@pytest.mark.parametrize("nvml, expected", [  # NVML names as the reference records and nvidia-smi give them
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("Tesla V100-SXM2-16GB", "V100"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA RTX A6000", "RTX-A6000"),
    ("NVIDIA GeForce RTX 4090", "GeForce-RTX-4090"),
])
def test_accelerator_type_follows_rays_rule(nvml, expected):
    assert accelerator_type(nvml) == expected


def test_a_cuda_sweeps_gpu_pins_rays_accelerator_type():
    assert pinned_type("h100", "cuda") == "H100"
    assert pinned_type("a100-80gb", "cuda") == "A100"
    assert pinned_type("h100", "cpu") is None and pinned_type(None, "cuda") is None
    with pytest.raises(UserError, match="h1000"):
        pinned_type("h1000", "cuda")


def test_a_ray_sweep_resumes_cases_measured_on_any_gpu_of_the_pinned_kind():
    case = Case.make("llama-3.2-1b", device="cuda", context=1024)
    h100 = {"device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3"}
    a100 = {"device": "cuda", "gpu_name": "NVIDIA A100-SXM4-80GB"}
    done = {case.key(a100["gpu_name"])}
    assert done_rule(done, [h100, a100], None)(case)  # unpinned: measured once, on whichever GPU
    assert not done_rule(done, [h100, a100], "H100")(case)  # pinned to H100: the A100 record does not count
    assert done_rule({case.key(h100["gpu_name"])}, [h100], "H100")(case)
    cpu = Case.make("llama-3.2-1b", device="cpu", context=1024)
    assert done_rule({cpu.key()}, [], None)(cpu) and not done_rule(set(), [], None)(cpu)


def test_without_ray_installed_the_flag_names_the_extra(tmp_path):
    # the import of ray is blocked in the process itself: the real CLI, as on a machine without ray
    code = "import sys; sys.modules['ray'] = None; from vramcal.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", code, "sweep", "configs/sweeps/h100-smoke.toml", "--ray",
                             "--out", str(tmp_path / "x.jsonl")], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("vramcal: error: ray is not installed; install the ray extra: pip install "
                                     "'vramcal[ray]' (in a source checkout: pip install -e '.[ray]')")
    assert not (tmp_path / "x.jsonl").exists()


# ---- with Ray -------------------------------------------------------------------------------------
needs_ray = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("ray", "torch", "transformers")),
                               reason="needs the ray and harness extras")


@pytest.fixture
def sweep(tmp_path) -> Path:
    config = json.loads((REPO / "configs" / "models" / "qwen2.5-0.5b.json").read_text())
    config.update(TINY, max_window_layers=2, bos_token_id=1, eos_token_id=2)
    models = []
    for name in ("qwen-tiny", "qwen-tiny-b"):
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        models.append(str(tmp_path / f"{name}.json"))
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
name = "tiny"
device = "cpu"
skip_over_estimate = 0
new_tokens = [4]
[[matrix]]
models = {json.dumps(models)}
contexts = [24, 40]
batches = [1]
""")
    return path


def marked_pids(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"{MARKER}={marker}".encode() in (proc / "environ").read_bytes().split(b"\0") and \
                    "State:\tZ" not in (proc / "status").read_text():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture
def marker():
    """A marker in the environment of everything a test starts; what is left of it is killed by pid."""
    value = uuid.uuid4().hex
    yield value
    for pid in marked_pids(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def vramcal(*args, marker: str, env=None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "VRAMCAL_RAY_LOCAL_CPUS": "2", MARKER: marker, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vramcal", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env=env, **kwargs)


def peaks(path: Path) -> dict[str, tuple]:
    return {case_key(r): (r["status"], r["peak_allocated_bytes"], r["kv_cache_bytes"]) for r in read_records(path)}


@needs_ray
def test_a_ray_sweep_measures_what_the_serial_sweep_measures(tmp_path, sweep, marker):
    serial, on_ray = tmp_path / "serial.jsonl", tmp_path / "ray.jsonl"
    result = vramcal("sweep", sweep, "--out", serial, marker=marker)
    assert result.returncode == 0, result.stderr
    result = vramcal("sweep", sweep, "--out", on_ray, "--ray", marker=marker)
    assert result.returncode == 0, result.stderr
    assert "on Ray (a local instance, cpu)" in result.stdout and "4 to run" in result.stdout
    assert "4 cases (4 ok, 0 oom, 0 error)" in result.stdout  # the per-node summary: one node here
    assert len(read_records(on_ray)) == 4 and peaks(on_ray) == peaks(serial)
    before = on_ray.read_bytes()
    result = vramcal("sweep", sweep, "--out", on_ray, "--ray", marker=marker)
    assert result.returncode == 0 and "4 already in" in result.stdout and "0 to run" in result.stdout
    assert on_ray.read_bytes() == before  # a second run adds nothing


@needs_ray
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the processes")
def test_a_killed_driver_loses_only_cases_in_flight_and_a_rerun_ends_with_every_case_once(tmp_path, sweep, marker):
    out = tmp_path / "ray.jsonl"
    env = {**os.environ, "VRAMCAL_RAY_LOCAL_CPUS": "2", MARKER: marker, "VRAMCAL_TEST_DELAY_S": "1.5"}
    proc = subprocess.Popen([sys.executable, "-m", "vramcal", "sweep", str(sweep), "--out", str(out), "--ray"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.is_file() and out.read_text().count("\n") >= 1):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # the other cases are sleeping in their workers
    proc.wait()
    written = [case_key(r) for r in read_records(out)]  # every line written is whole and valid
    assert 1 <= len(written) < 4
    deadline = time.time() + 20  # the measuring workers die with their Ray workers (PR_SET_PDEATHSIG)

    def workers():
        return [p for p in marked_pids(marker) if b"harness.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]

    while time.time() < deadline and workers():
        time.sleep(0.2)
    assert not workers()
    assert [case_key(r) for r in read_records(out)] == written  # no writer is left behind the dead driver
    result = vramcal("sweep", sweep, "--out", out, "--ray", marker=marker)
    assert result.returncode == 0, result.stderr
    assert f"{len(written)} already in" in result.stdout
    final = [case_key(r) for r in read_records(out)]
    assert final[: len(written)] == written and len(final) == len(set(final)) == 4


@needs_ray
@pytest.mark.parametrize("address, ok", [
    ("local", True), ("auto", True), ("ray://head:10001", True), ("10.0.0.7:6379", True), ("head-0.svc:6379", True),
    ("ray:/head", False), ("http://head:8265", False), ("head", False), ("", False),
])
def test_ray_addresses_are_checked_before_anything_runs(address, ok):
    from harness.ray_sweep import check_ray

    if ok:
        check_ray(address)
    else:
        with pytest.raises(UserError, match="is not a Ray address"):
            check_ray(address)


@needs_ray
def test_bad_ray_address_is_one_line_and_exit_2(tmp_path, sweep, marker):
    result = vramcal("sweep", sweep, "--out", tmp_path / "x.jsonl", "--ray", "not an address", marker=marker)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is not a Ray address" in result.stderr and not (tmp_path / "x.jsonl").exists()


@pytest.fixture
def local_ray(marker):
    """A local Ray instance in this process (2 CPUs); its workers carry the marker, sleep 1 s per case, and
    the measuring worker crashes on the case with a 52-token prompt."""
    import ray

    from harness.ray_sweep import LOCAL_OBJECT_STORE_BYTES

    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # one declared GPU of Ray's kind "H100" (nothing uses it: the resource logic is Ray's, placement is real)
    ray.init(address="local", num_cpus=2, num_gpus=1, resources={"accelerator_type:H100": 1},
             include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, MARKER: marker,
                                                            "VRAMCAL_TEST_DELAY_S": "1",
                                                            "VRAMCAL_TEST_CRASH_KEY": "|generate|1|52|4|"}})
    yield ray
    ray.shutdown()


@needs_ray
def test_tasks_ask_for_a_gpu_of_the_pinned_kind_and_a_kind_not_there_is_refused(local_ray):
    from harness.ray_sweep import check_resources

    assert check_resources("cpu", None) == {"num_cpus": 1, "num_gpus": 0}
    pinned = check_resources("cuda", "H100")
    assert pinned == {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "H100"}
    # Ray places a task with that request on the H100 node, with its GPU
    gpu_ids = local_ray.get(local_ray.remote(lambda: local_ray.get_gpu_ids()).options(**pinned).remote(), timeout=60)
    assert len(gpu_ids) == 1
    with pytest.raises(UserError, match="no node of the Ray cluster has a GPU of kind A100 .* it has: H100"):
        check_resources("cuda", "A100")


@needs_ray
def test_a_dead_ray_task_or_worker_is_an_error_record_and_the_group_goes_on(tmp_path, sweep, marker, local_ray):
    from harness.ray_sweep import _drive
    from harness.sweep import expand, load_sweep, order

    cases = [c for c in order(expand(load_sweep(sweep))[0]) if c.model == "qwen-tiny"]
    cases += [Case.make(cases[0].source, device="cpu", context=n, new_tokens=4) for n in (56, 72)]  # one group
    out, started, recorded = tmp_path / "ray.jsonl", [], []

    def on_start(case):
        started.append(case)
        if len(started) == 2:  # mid-case (the worker sleeps 1 s first): kill the Ray worker running the task
            (worker,) = [p for p in marked_pids(marker) if b"harness.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
            ray_worker = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
            os.kill(ray_worker, signal.SIGKILL)

    nodes = _drive(cases, out, seed=0, request={"num_cpus": 1, "num_gpus": 0}, on_start=on_start,
                   on_record=lambda case, rec: recorded.append(case), verbose=False)
    records = read_records(out)
    assert [case_key(r) for r in records] == [c.key() for c in cases]  # each once, in order
    assert [r["status"] for r in records] == ["ok", "error", "error", "ok"]
    assert "the Ray task on" in records[1]["error"] and "died during this case" in records[1]["error"]
    assert "the measuring process exited with status 3 during this case" in records[2]["error"]
    assert recorded == cases and [sum(c.values()) for c in nodes.values()] == [4]
