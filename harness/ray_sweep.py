"""`vramcal sweep FILE.toml --ray [ADDRESS]`: the sweep's process groups as Ray tasks, one writer here.

The planning is the serial sweep's (`harness.sweep.run_sweep`: checks, resume, estimate filter, order);
only the measuring differs. Each process group (device, alloc_conf, model, memory limit: one worker, one
model build per dtype/attention/quantization) is one Ray task holding one GPU (`num_gpus=1`; a `device =
"cpu"` sweep asks for one CPU). The task runs `harness.runner.group_events` on its node: the same
`python -m harness.worker` subprocess as a serial sweep, so the model loads once per group, each worker
is its own process, and a worker that crashes or is OOM-killed becomes an error record for its case while
a fresh worker takes the group's other cases. The task is a Ray streaming generator (a generator
function under `ray.remote`, see Ray's "Ray Generators" guide): every message reaches the driver as it is
produced, and the driver, the only writer, appends and fsyncs each record as it arrives
(`estimator.records.append_record`). Nothing is kept in the cluster: a killed driver loses only the
cases in flight, and the rerun skips what is in the file.

A Ray task that dies itself (its node lost, Ray's memory monitor) is handled on the driver the same way:
an error record for the case it was measuring, a fresh task for the rest of its group.

GPU kinds: a cuda sweep with `gpu = "h100"` runs on nodes whose Ray resource `accelerator_type:H100` is
set (Ray detects it from NVML: `ray/_private/accelerators/nvidia_gpu.py`,
`NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type`), via the `accelerator_type` task option.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from estimator.errors import UserError, require_extra
from estimator.records import append_record, case_key
from harness.case import Case
from harness.runner import REPO_ROOT, crash_record, group_events, process_groups

# Small footprint for a local instance (a laptop, a CI runner): no dashboard, a 100 MiB object store
# (records are a few KiB each; Ray's minimum is 75 MiB).
LOCAL_OBJECT_STORE_BYTES = 100 * 2**20
# How many CPUs a local instance offers (default: all of this machine's); tests set 2.
LOCAL_CPUS_ENV = "VRAMCAL_RAY_LOCAL_CPUS"
# Ray's NVML name -> accelerator type rule (`NVIDIA_GPU_NAME_PATTERN` in ray/_private/accelerators/
# nvidia_gpu.py, Ray 2.60): "NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA RTX A6000" -> "RTX-A6000".
_RAY_GPU_NAME = re.compile(r"\w+\s+((?:[A-Z]+\s+)*[A-Z0-9]*\d[A-Z0-9]*)")
_ADDRESS = re.compile(r"^(local|auto|ray://[^\s/]+(:\d+)?|[A-Za-z0-9.\-\[\]:]+:\d+)$")


def check_ray(address: str) -> None:
    """Before anything else: Ray is installed (the `ray` extra) and the address has a form Ray takes."""
    require_extra("ray", "ray")
    if not _ADDRESS.match(address):
        raise UserError(f"--ray {address!r} is not a Ray address; give none (a local instance), auto (the "
                        "cluster this node belongs to), ray://HOST:10001 (Ray Client) or HOST:6379")


def accelerator_type(gpu_name: str | None) -> str | None:
    """Ray's accelerator type for an NVML GPU name, as Ray computes it for a node."""
    if not gpu_name:
        return None
    match = _RAY_GPU_NAME.match(gpu_name)
    result = match.group(1).replace(" ", "-") if match else None
    if result and len(result) > 1:
        return result
    cleaned = re.sub(r"^NVIDIA\s+", "", gpu_name).strip()  # Ray's fallback for mixed-case consumer names
    return cleaned.replace(" ", "-") or None


def pinned_type(sweep_gpu: str | None, device: str) -> str | None:
    """The accelerator type a cuda sweep's `gpu` pins its tasks to (None: any GPU, or a CPU sweep)."""
    if device != "cuda" or not sweep_gpu:
        return None
    from estimator.gpus import find_gpu

    gpu = find_gpu(sweep_gpu)  # UserError with close matches for an unknown name
    nvml = next((a for a in gpu.aliases if a.startswith(("NVIDIA ", "Tesla ", "AMD "))), f"NVIDIA {gpu.name}")
    return accelerator_type(nvml)


def done_rule(done: set[str], records: list[dict], pin: str | None) -> Callable[[Case], bool]:
    """Which cases a Ray sweep skips. The GPU a task gets is only known on its node, so a cuda case is
    done when the output holds its key for any GPU of the existing records (of the pinned kind, when the
    sweep pins one): each case is measured once per sweep, on whichever GPU took it."""
    names = {r["gpu_name"] for r in records if r["device"] == "cuda" and r["gpu_name"]}
    if pin:
        names = {n for n in names if accelerator_type(n) == pin}

    def is_done(case: Case) -> bool:
        if case.device != "cuda":
            return case.key() in done
        return any(case.key(n) in done for n in names)

    return is_done


# ---- on the node -------------------------------------------------------------------------------
def measure_group_task(cases: list[dict], seed: int, echo_stderr: bool):
    """Ray task body (a streaming generator): one process group measured on this node, every message
    yielded as it happens; a UserError (a device that cannot be set up, a model that cannot be built, a
    worker that keeps dying) ends the group with a "fatal" message."""
    import ray

    node = {"host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}
    group = [Case.from_dict(c) for c in cases]
    gpu = None
    try:
        for event, case, payload in group_events(group, gpu_name=None, seed=seed, echo_stderr=echo_stderr,
                                                 any_gpu=True):
            if event == "hello":
                gpu = payload.get("gpu_name")
                yield {"event": "hello", "env": payload, "node": node}
            elif event == "start":
                yield {"event": "start", "key": case.key(gpu)}
            else:
                yield {"event": "record", "record": payload}
    except UserError as exc:
        yield {"event": "fatal", "error": f"on {node['host']}: {exc}"}


# ---- on the driver -----------------------------------------------------------------------------
@dataclass
class _Group:
    remaining: list[Case]
    env: dict | None = None
    node: str = "?"
    in_flight: Case | None = None
    by_key: dict[str, Case] = field(default_factory=dict)
    fruitless: int = 0
    progressed: bool = False


def connect(address: str, verbose: bool) -> str:
    """ray.init: a new local instance for "local", else join the cluster. Returns a description."""
    import logging

    import ray

    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR,
             "configure_logging": True}
    if address == "local":
        cpus = os.environ.get(LOCAL_CPUS_ENV)
        if cpus is not None and not (cpus.isdigit() and int(cpus) > 0):
            raise UserError(f"{LOCAL_CPUS_ENV}={cpus!r}: expected a positive integer")
        # the workers import this checkout's packages, as the serial sweep's workers do (runner.worker_env)
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        ray.init(address="local", num_cpus=int(cpus) if cpus else None, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, runtime_env={"env_vars": {"PYTHONPATH": path}},
                 **quiet)
        return "a local Ray instance"
    try:
        ray.init(address=address, **quiet)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, timeouts, version mismatch: one line
        raise UserError(f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())[:300]}") from None
    return f"the Ray cluster at {address}"


def check_resources(device: str, pin: str | None) -> dict:
    """The task's resource request; UserError when no node of the cluster offers it now (a task Ray
    cannot place would wait forever)."""
    import ray

    have = ray.cluster_resources()
    if device == "cuda":
        request = {"num_cpus": 1, "num_gpus": 1}
        types = sorted(k.split(":", 1)[1] for k in have if k.startswith("accelerator_type:"))
        if not have.get("GPU"):
            raise UserError("the Ray cluster has no GPU; a device = \"cuda\" sweep needs nodes with GPUs "
                            "(or use --device cpu)")
        if pin:
            if f"accelerator_type:{pin}" not in have:
                raise UserError(f"no node of the Ray cluster has a GPU of kind {pin} (the sweep's gpu); it has: "
                                f"{', '.join(types) or 'no typed GPUs'}; change gpu in the sweep file")
            request["accelerator_type"] = pin
        return request
    if not have.get("CPU"):
        raise UserError("the Ray cluster offers no CPU for a device = \"cpu\" sweep")
    return {"num_cpus": 1, "num_gpus": 0}


class Cluster:
    """`with Cluster(address, device, pin):` joins (or starts) Ray and checks that it can place the tasks,
    before a progress bar is drawn, so a bad address or a missing GPU kind is one line; `run` measures."""

    def __init__(self, address: str, device: str, pin: str | None, verbose: bool = False):
        self.address, self.device, self.pin, self.verbose = address, device, pin, verbose
        self.request: dict | None = None

    def __enter__(self) -> Cluster:
        import ray

        connect(self.address, self.verbose)
        try:
            self.request = check_resources(self.device, self.pin)
        except BaseException:
            ray.shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()

    def run(self, cases: list[Case], out: Path, *, seed: int, on_start: Callable[[Case], None],
            on_record: Callable[[Case, dict], None]) -> dict[str, dict[str, int]]:
        """Measure `cases` (ordered) as Ray tasks, appending each record to `out` as it arrives; returns
        per-node counts {node: {"ok", "oom", "error"}}."""
        return _drive(cases, out, seed=seed, request=self.request, on_start=on_start, on_record=on_record,
                      verbose=self.verbose)


def _drive(cases, out, *, seed, request, on_start, on_record, verbose):
    import ray

    task = ray.remote(measure_group_task).options(max_retries=0, **request)
    live: dict = {}  # ObjectRefGenerator -> _Group

    def submit(group: _Group) -> None:
        live[task.remote([c.to_dict() for c in group.remaining], seed, verbose)] = group

    for cases_of_group in process_groups(cases):
        submit(_Group(remaining=list(cases_of_group)))
    nodes: dict[str, dict[str, int]] = {}
    try:
        while live:
            ready, _ = ray.wait(list(live), num_returns=1, timeout=1.0)
            for gen in ready:
                group = live[gen]
                try:
                    message = ray.get(next(gen))
                except StopIteration:
                    del live[gen]
                    _task_ended(group, None, submit, out, seed, nodes, on_record)
                    continue
                except ray.exceptions.RayError as exc:
                    del live[gen]
                    _task_ended(group, exc, submit, out, seed, nodes, on_record)
                    continue
                _handle(group, message, out, nodes, on_start, on_record)
    except BaseException:
        for gen in live:
            ray.cancel(gen, force=True)
        raise
    return nodes


def _handle(group: _Group, message: dict, out: Path, nodes: dict, on_start, on_record) -> None:
    event = message.get("event")
    if event == "fatal":
        raise UserError(message["error"])
    if event == "hello":
        group.env = message["env"]
        gpu = group.env.get("gpu_name")
        group.node = f"{message['node']['host']} ({gpu or 'cpu'})"
        group.by_key = {c.key(gpu): c for c in group.remaining}
    elif event == "start":
        group.in_flight = group.by_key.get(message["key"])
        if group.in_flight is not None:
            on_start(group.in_flight)
    elif event == "record":
        rec = message["record"]
        case = group.by_key.get(case_key(rec))
        if case is None or case not in group.remaining:
            raise UserError(f"a Ray task returned a record for a case it was not given: {case_key(rec)}")
        _write(group, case, rec, out, nodes, on_record)


def _write(group: _Group, case: Case, rec: dict, out: Path, nodes: dict, on_record) -> None:
    append_record(out, rec)  # the one writer: validated, appended, fsynced
    group.remaining.remove(case)
    group.in_flight, group.progressed = None, True
    counts = nodes.setdefault(group.node, {"ok": 0, "oom": 0, "error": 0})
    counts[rec["status"]] += 1
    on_record(case, rec)


def _task_ended(group: _Group, exc, submit, out, seed, nodes, on_record) -> None:
    """A task finished or died. Its group's cases left go to a fresh task; the case it was measuring when
    it died is an error record."""
    if exc is not None and group.in_flight is not None and group.env is not None:
        why = " ".join(str(exc).split())[:300]
        rec = crash_record(group.in_flight, group.env, seed,
                           f"the Ray task on {group.node} died during this case ({type(exc).__name__}: {why})")
        _write(group, group.in_flight, rec, out, nodes, on_record)
    if not group.remaining:
        return
    group.fruitless = 0 if group.progressed else group.fruitless + 1
    if group.fruitless >= 2:
        why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}" if exc else "it ended early"
        raise UserError(f"the Ray task for {group.remaining[0].model} keeps failing before measuring anything "
                        f"({why}); is vramcal[harness] installed on every node (or the job submitted with "
                        "--working-dir)?")
    submit(_Group(remaining=group.remaining, fruitless=group.fruitless))


def print_node_summary(nodes: dict[str, dict[str, int]], seconds: float) -> None:
    """One line per node: how many cases it measured and how they ended."""
    for node, c in sorted(nodes.items()):
        print(f"  node {node}: {sum(c.values())} cases ({c['ok']} ok, {c['oom']} oom, {c['error']} error)")
    total = sum(sum(c.values()) for c in nodes.values())
    if seconds > 0 and total:
        print(f"  {total} cases in {seconds:.0f} s on {len(nodes)} node(s): {60 * total / seconds:.1f} cases/min")
