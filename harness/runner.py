"""The parent side: spawn one worker per (device, alloc_conf, model) group, append its records.

The parent never imports torch (so it never holds a CUDA context of its own); it is the only writer of
the output file, and writes each record (validated, flushed, fsynced) as soon as it arrives. A worker
that dies records `status: error` for the case it was measuring; a new worker takes the rest.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from estimator.errors import UserError
from estimator.records import append_record, case_key
from harness.case import Case

REPO_ROOT = Path(__file__).resolve().parent.parent
STDERR_TAIL_LINES = 40


def worker_env(alloc_conf: str) -> dict:
    """The worker's environment: the case's allocator config (and nothing inherited), PCI bus order so
    CUDA and NVML number GPUs alike, and this checkout importable."""
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    env.pop("PYTORCH_ALLOC_CONF", None)
    if alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf  # the name every torch reads
        env["PYTORCH_ALLOC_CONF"] = alloc_conf  # the name torch >= 2.9 reads first
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "did not exit"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Worker:
    """One spawned `python -m harness.worker` and its message stream."""

    def __init__(self, cases: Sequence[Case], device: str, seed: int, echo_stderr: bool = False,
                 check: str | None = None):
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness.worker", "--parent-pid", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=worker_env(cases[0].alloc_conf), cwd=str(REPO_ROOT), text=True, bufsize=1,
        )
        self._stderr_thread = threading.Thread(target=self._read_stderr, args=(echo_stderr,), daemon=True)
        self._stderr_thread.start()
        job = {"device": device, "framework": cases[0].framework, "seed": seed, "check": check,
               "cases": [c.to_dict() for c in cases]}
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died at once; messages() ends and the exit status tells why

    def _read_stderr(self, echo: bool) -> None:
        for line in self.proc.stderr:
            self.stderr_tail.append(line.rstrip("\n"))
            if echo:
                sys.stderr.write(line)

    def messages(self):
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except ValueError:
                self.stderr_tail.append(line)

    def finish(self) -> int:
        """Close stdin (the worker exits if still running) and wait for it."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._stderr_thread.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def last_error_line(self) -> str:
        for line in reversed(self.stderr_tail):
            if line.strip() and not line.startswith(("  ", "Traceback")):
                return " ".join(line.split())[:300]
        return "no output on stderr"


def _invalid(message: dict) -> UserError:
    return UserError(f"{message.get('model')} cannot be built ({message.get('label')}): {message.get('error')}; "
                     "nothing was measured")


def check_cases(cases: Sequence[Case], echo_stderr: bool = False) -> None:
    """Build every distinct model build of `cases` on the meta device, in one worker that touches no GPU
    and allocates nothing; UserError (one line) for the first that cannot be built, or when torch or
    transformers is missing. A sweep runs this before it measures anything."""
    if not cases:
        return
    from harness.worker import distinct_builds

    builds = distinct_builds(cases)
    worker = Worker(builds, builds[0].device, seed=0, echo_stderr=echo_stderr, check="only")
    done = False
    try:
        for message in worker.messages():
            event = message.get("event")
            if event == "fatal":
                raise UserError(message.get("error") or "the checking worker could not start")
            if event == "invalid":
                raise _invalid(message)
            if event == "done":
                done = True
                break
    except BaseException:
        worker.kill()
        raise
    code = worker.finish()
    if not done:
        raise UserError(f"the worker checking the models {_describe_exit(code)}: {worker.last_error_line()}")


def process_groups(cases: Sequence[Case]) -> list[list[Case]]:
    """Consecutive cases of the same process group, one list per worker."""
    groups: list[list[Case]] = []
    for case in cases:
        if groups and groups[-1][0].process_group() == case.process_group():
            groups[-1].append(case)
        else:
            groups.append([case])
    return groups


def run_cases(
    cases: Sequence[Case],
    out: Path,
    *,
    gpu_name: str | None,
    seed: int = 0,
    on_start: Callable[[Case], None] | None = None,
    on_record: Callable[[Case, dict], None] | None = None,
    echo_stderr: bool = False,
    check_first: bool = False,
    deadline: float | None = None,
) -> list[dict]:
    """Measure `cases` (already ordered) and append one record per case to `out`; returns them.

    Consecutive cases of the same process group share a worker. Raises UserError when a worker cannot
    set up the device at all (nothing would be measured), and with `check_first` when the first worker
    finds, before it measures, a model that cannot be built (`check_cases`, in the same process).

    `deadline` (a `time.monotonic()` value): no case starts after it. The case in flight when it passes
    is measured to its end and recorded; then its worker is stopped (closing the event stream kills it)
    and the cases left have no record, so a rerun of the sweep resumes them.
    """
    records: list[dict] = []
    check = "first" if check_first else None
    for group in process_groups(cases):
        if deadline is not None and time.monotonic() >= deadline:
            break
        events = group_events(group, gpu_name=gpu_name, seed=seed, echo_stderr=echo_stderr, check=check)
        with contextlib.closing(events):
            for event, case, rec in events:
                if event == "start" and on_start:
                    on_start(case)
                elif event == "record":
                    append_record(out, rec)
                    records.append(rec)
                    if on_record:
                        on_record(case, rec)
                    if deadline is not None and time.monotonic() >= deadline:
                        break
        check = None
    return records


def group_events(group: Sequence[Case], *, gpu_name: str | None, seed: int = 0, echo_stderr: bool = False,
                 check: str | None = None, any_gpu: bool = False):
    """Measure one process group, a fresh worker after each one that dies; yields ("hello", None, env),
    ("start", case, None) and ("record", case, rec), the record not yet written (the caller writes it).

    `any_gpu`: accept the GPU the worker finds (a Ray task's), and key the cases by its name; else a
    cuda worker must measure on `gpu_name`."""
    remaining = list(group)
    fruitless = 0
    while remaining:
        progressed = yield from _worker_events(remaining, gpu_name=gpu_name, seed=seed, echo_stderr=echo_stderr,
                                               check=check, any_gpu=any_gpu)
        check = None
        fruitless = 0 if progressed else fruitless + 1
        if fruitless >= 2:
            raise UserError(f"the measuring worker for {group[0].model} keeps dying before measuring "
                            "anything; run with --verbose to see its output")


def _worker_events(remaining: list[Case], *, gpu_name, seed, echo_stderr, check=None, any_gpu=False):
    """One worker over `remaining` (consumed in place, after each record is yielded). Returns True if at
    least one record was yielded."""
    device = remaining[0].device
    by_key = {c.key(gpu_name): c for c in remaining}
    worker = Worker(remaining, device, seed, echo_stderr=echo_stderr, check=check)
    env = None
    in_flight: Case | None = None
    progressed = False
    try:
        for message in worker.messages():
            event = message.get("event")
            if event == "fatal":
                raise UserError(message.get("error") or "the measuring worker could not start")
            if event == "invalid":
                raise _invalid(message)
            if event == "hello":
                env = message["env"]
                if any_gpu:
                    by_key = {c.key(env.get("gpu_name")): c for c in remaining}
                elif device == "cuda" and env.get("gpu_name") != gpu_name:
                    raise UserError(f"the worker measures on {env.get('gpu_name')!r}, not {gpu_name!r}; "
                                    "set CUDA_VISIBLE_DEVICES to one GPU")
                yield "hello", None, env
            elif event == "start":
                in_flight = by_key.get(message.get("key"))
                if in_flight is not None:
                    yield "start", in_flight, None
            elif event == "record":
                rec = message["record"]
                case = by_key.get(case_key(rec))
                if case is None:
                    raise UserError(f"the worker returned a record for a case it was not given: {case_key(rec)}")
                yield "record", case, rec
                remaining.remove(case)
                in_flight, progressed = None, True
            elif event == "done":
                break
    except BaseException:
        worker.kill()
        raise
    code = worker.finish()
    if not remaining:
        return progressed
    if env is None:
        raise UserError(f"the measuring worker {_describe_exit(code)} before it was ready: "
                        f"{worker.last_error_line()}")
    if in_flight is None:  # died between cases: the next worker takes them all
        return progressed
    rec = crash_record(in_flight, env, seed, f"the measuring process {_describe_exit(code)} during this case "
                                              f"(last output: {worker.last_error_line()})")
    yield "record", in_flight, rec
    remaining.remove(in_flight)
    return True


def crash_record(case: Case, env: dict, seed: int, error: str) -> dict:
    """The error record of a case whose measuring process died (`env`: the worker's hello)."""
    from harness.worker import base_record

    rec = base_record(case, env, seed=seed, config=case.read_config())
    rec["error"] = error
    return rec
