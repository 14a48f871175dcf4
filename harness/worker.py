"""The measuring process: one per (device, alloc_conf, model) group, spawned by `harness.runner`.

Protocol: the parent writes one JSON line on stdin ({"device", "cases": [...], "seed", "check"}) and keeps
stdin open; its closing means the parent is gone and the worker exits. The worker answers JSON lines on
its original stdout (Python's stdout is redirected to stderr, so stray prints cannot corrupt them):
{"event": "hello", "env": {...}}, then per case {"event": "start", "key"} and {"event": "record",
"record"}, finally {"event": "done"}; {"event": "fatal", "error"} when torch or transformers is missing
or the device cannot be set up. With "check" ("first" or "only"), before the device is touched, every
distinct model build of the cases is built on the meta device: {"event": "invalid", "model", "label",
"error"} for the first that cannot be (bad input: nothing is measured), else {"event": "checked"};
"only" then ends with {"event": "done"}.

CUDA method (the reference records' method): NVML `used` before CUDA init is the baseline;
`torch.cuda.init()`, a 256x256 bf16 matmul and `empty_cache()` give `context_bytes`; the model is built
once per (dtype, attention, quantization) and reused; before each case `gc.collect()`,
`empty_cache()`, `reset_peak_memory_stats()`; an NVML poller runs during the case and a last reading
is taken after `synchronize()`, before the outputs are released. OOM is recorded as status "oom",
everything is freed and the next case runs.

CPU method: the same cases, measured by `harness.tracker.StorageTracker` (live tensor storage,
rounded like the CUDA caching allocator): weights are registered before the case, the peak is reset,
and the tracker's peak is `peak_allocated_bytes`. Reserved, NVML and context bytes are null.

Test hooks (environment): VRAMCAL_TEST_CRASH_KEY=substring makes the worker `os._exit(3)` when a case
whose key contains it starts; VRAMCAL_TEST_DELAY_S=seconds sleeps before each case's run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import threading
import time

from estimator.errors import UserError, require_extra
from estimator.records import SCHEMA, case_key
from harness.case import Case, default_alloc_conf

# Environment variables that change device memory; recorded as set for the measuring process.
MEMORY_ENV = (
    "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_NO_CUDA_MEMORY_CACHING",
    "CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE", "CUDA_MODULE_LOADING", "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER", "TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT",
)


# Errors after which a CUDA context cannot be trusted (sticky errors): the worker stops, a new one goes on.
CUDA_FATAL = ("CUDA error", "illegal memory access", "device-side assert", "CUBLAS_STATUS_EXECUTION_FAILED")


def is_oom(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or a library reporting the same from inside a kernel call."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _harness_version() -> str:
    try:
        from vramcal import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


class Session:
    """A measuring session on one device. Usable in-process (tests on the CPU) or in the worker."""

    def __init__(self, device: str = "cpu", framework: str = "transformers", seed: int = 0, gpus: int = 0):
        """``gpus``: device_map cases over that many GPUs (harness/multigpu.py); 0: everything on device 0."""
        from harness.backends import get_backend

        self.device = device
        self.seed = seed
        self.backend = get_backend(framework)
        self.nv = None
        self.baseline_bytes = None
        self.context_bytes = None
        self.others_at_baseline = None
        gpu = None
        if device == "cuda":
            from harness.nvml import Device

            self.nv = Device(0)
            gpu = self.nv.info()
            # before this process touches the GPU: everything above this is ours
            self.others_at_baseline = self.nv.other_processes(self_on_gpu=False)
            self.baseline_bytes = self.nv.used_bytes()
        self.devices = None
        if device == "cuda" and gpus:
            from harness.multigpu import Devices

            self.devices = Devices(gpus)  # NVML baselines of every GPU, before CUDA init
        torch = require_extra("torch", "harness")
        self.torch = torch
        if device == "cuda":
            if not torch.cuda.is_available():
                raise UserError("torch sees no CUDA device (a CPU build of torch, or no GPU); use --device cpu")
            torch.cuda.init()
            uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", "") or "")
            if uuid and uuid.removeprefix("GPU-") not in gpu.uuid:
                message = (f"CUDA device 0 is {uuid} but NVML measures {gpu.uuid}; "
                           "set CUDA_DEVICE_ORDER=PCI_BUS_ID or CUDA_VISIBLE_DEVICES to one GPU")
                if self.nv.nvml.nvmlDeviceGetCount() > 1:
                    raise UserError(message)
                print(f"vramcal: warning: {message}", file=sys.stderr)  # one board: a MIG or naming quirk
            a = torch.ones(256, 256, dtype=torch.bfloat16, device="cuda")
            _ = a @ a  # loads cuBLAS and its workspace, as every later case will have them
            torch.cuda.synchronize()
            del a, _
            torch.cuda.empty_cache()
            self.context_bytes = self.nv.used_bytes() - self.baseline_bytes
            if self.devices is not None:
                self.devices.after_init(torch)
        self.env = {
            "framework": self.backend.NAME,
            "framework_version": self.backend.version(),
            "torch_version": torch.__version__,
            "device": device,
            "gpu_name": gpu.name if gpu else None,
            "gpu_memory_bytes": gpu.memory_bytes if gpu else None,
            "alloc_conf": default_alloc_conf() if device == "cuda" else "",
            "context_bytes": self.context_bytes,
            "harness_version": _harness_version(),
            "python_version": platform.python_version(),
            "cuda_version": torch.version.cuda if device == "cuda" else None,
            "driver_version": gpu.driver_version if gpu else None,
            "gpu_uuid": gpu.uuid if gpu else None,
            "baseline_nvml_bytes": self.baseline_bytes,
            "env": {k: os.environ[k] for k in MEMORY_ENV if k in os.environ},
        }
        if self.devices is not None:
            self.env["devices"] = self.devices.env()
        self._built_group = None
        self._model = None
        self._weights_bytes = None
        self._config = None
        self._failed_builds: dict[tuple, tuple[str, str]] = {}
        self._limited = False
        self.broken = False

    # ---- the model ---------------------------------------------------------------------------
    def _free_model(self) -> None:
        self._model = None
        self._built_group = None
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def _model_for(self, case: Case):
        group = (case.source, case.build_group())
        if self._built_group == group:
            return self._model
        self._free_model()
        self.torch.manual_seed(self.seed)
        model = self.backend.build(case, self.device)
        self._model, self._built_group = model, group
        self._weights_bytes = self.backend.weights_bytes(model)
        self._config = self.backend.config_dict(model)
        return model

    def close(self) -> None:
        self._free_model()

    # ---- one case ----------------------------------------------------------------------------
    def base_record(self, case: Case) -> dict:
        return base_record(case, self.env, seed=self.seed, config=case.read_config())

    def run_case(self, case: Case) -> dict:
        rec = self.base_record(case)
        if case.alloc_conf != self.env["alloc_conf"] and self.device == "cuda":
            rec.update(status="error", error=f"this process runs with alloc_conf {self.env['alloc_conf']!r}, "
                                             f"not {case.alloc_conf!r}")
            return rec
        failed = self._failed_builds.get((case.source, case.build_group()))
        if failed:
            rec.update(status=failed[0], error=failed[1])
            return rec
        failure = None
        try:
            model = self._model_for(case)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built is data too
            failure = ("oom" if is_oom(exc) else "error", "building the model: " + one_line(exc))
        if failure:  # outside the except block: its traceback no longer holds half-built weights
            self._failed_builds[(case.source, case.build_group())] = failure
            self._free_model()
            rec.update(status=failure[0], error=failure[1])
            return rec
        rec["config"] = self._config
        rec["weights_bytes"] = self._weights_bytes
        if _assistant_of(model) is not None:
            rec["assistant_weights_bytes"] = self.backend.weights_bytes(_assistant_of(model))
        delay = float(os.environ.get("VRAMCAL_TEST_DELAY_S", "0") or 0)
        if delay:
            time.sleep(delay)
        if case.device_map:
            from harness import multigpu

            rec.update(multigpu.measure(self, case, model))
        elif self.device == "cuda":
            rec.update(self._measure_cuda(case, model))
        else:
            rec.update(self._measure_cpu(case, model))
        return rec

    def _run(self, case, model):
        """Runs the workload; returns (run, status, error, seconds). `run` holds the outputs alive.

        The exception (and the frames holding the case's tensors) is dropped before returning."""
        torch = self.torch
        start = time.perf_counter()
        try:
            run = self.backend.run(model, case, self.device, seed=self.seed)
            if self.device == "cuda":
                torch.cuda.synchronize()
            return run, "ok", None, time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - recorded, and the sweep goes on
            status = "oom" if is_oom(exc) else "error"
            if status == "error" and any(s in str(exc) for s in CUDA_FATAL):
                self.broken = True  # the CUDA context is unusable: this worker must not measure again
            return None, status, one_line(exc), time.perf_counter() - start

    def _measure_cuda(self, case: Case, model) -> dict:
        from harness.nvml import Poller

        torch = self.torch
        total = self.env["gpu_memory_bytes"]
        limit = case.memory_limit_bytes
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if limit or self._limited:  # only touched when asked: the reference never set a fraction
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total) if limit else 1.0)
            self._limited = bool(limit)
        torch.cuda.reset_peak_memory_stats()
        retries_before = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        final_used = 0
        with Poller(self.nv) as poller:
            run, status, error, seconds = self._run(case, model)
            if run is not None:
                final_used = poller.sample()  # after synchronize, before anything is released
        others = max(self.others_at_baseline or 0, self.nv.other_processes(self_on_gpu=True))
        out = {
            "status": status,
            "error": error,
            "kv_cache_bytes": run.kv_cache_bytes if run else None,
            "cache_class": run.cache_class if run else None,
            "compiled": getattr(run, "compiled", False) if run else None,
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
            "peak_nvml_bytes": max(0, int(max(poller.peak_bytes, final_used) - self.baseline_bytes)),
            "duration_s": round(seconds, 3),
            "num_alloc_retries": int(torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries_before),
            "nvml_samples": poller.samples,
            "other_processes": others,
            "memory_limit_bytes": limit,
        }
        if others:
            print(f"vramcal: warning: {others} other process(es) use this GPU; peak_nvml_bytes may include "
                  "their memory", file=sys.stderr)
        del run
        gc.collect()
        torch.cuda.empty_cache()
        return out

    def _measure_cpu(self, case: Case, model) -> dict:
        from harness.tracker import WEIGHTS

        tracker = _capped_tracker(case.memory_limit_bytes)
        tracker.track_existing(model, WEIGHTS)
        draft = _assistant_of(model)
        if draft is not None:  # assisted generation: the draft's weights are held through the run too
            tracker.track_existing(draft, WEIGHTS)
        gc.collect()
        tracker.reset_peak()
        with tracker:
            run, status, error, seconds = self._run(case, model)
        out = {
            "status": status,
            "error": error,
            "kv_cache_bytes": run.kv_cache_bytes if run else None,
            "cache_class": run.cache_class if run else None,
            "compiled": getattr(run, "compiled", False) if run else None,
            "peak_allocated_bytes": int(tracker.peak_bytes),
            "peak_reserved_bytes": None,
            "peak_nvml_bytes": None,
            "duration_s": round(seconds, 3),
            "num_alloc_retries": None,
            "nvml_samples": None,
            "other_processes": None,
            "memory_limit_bytes": case.memory_limit_bytes,
        }
        del run
        gc.collect()
        return out


def _assistant_of(model):
    from harness.assisted import assistant_of

    return assistant_of(model)


def _capped_tracker(limit: int | None):
    """A StorageTracker that raises torch.OutOfMemoryError once live bytes pass `limit` (a CPU stand-in
    for a GPU's capacity)."""
    import torch

    from harness.tracker import StorageTracker

    class CappedTracker(StorageTracker):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if limit is not None and self.live_bytes > limit:
                raise torch.OutOfMemoryError(
                    f"CPU tracker: {self.live_bytes} live bytes exceed the imposed limit of {limit} bytes")
            return out

    return CappedTracker()


def base_record(case: Case, env: dict, seed: int | None = 0, config: dict | None = None) -> dict:
    """A record for `case` with the environment filled in and every measurement still null."""
    rec = {
        "schema": SCHEMA,
        "model": case.model,
        "config": config if config is not None else {},
        "framework": env["framework"],
        "framework_version": env["framework_version"],
        "torch_version": env["torch_version"],
        "device": case.device,
        "gpu_name": env["gpu_name"],
        "gpu_memory_bytes": env["gpu_memory_bytes"],
        "alloc_conf": case.alloc_conf,
        "compile": case.compile,
        "dtype": case.dtype,
        "quantization": case.quant,
        "attn_implementation": case.attn,
        "cache_implementation": case.cache,
        "workload": case.workload,
        "batch_size": case.batch,
        "prompt_tokens": case.prompt_tokens,
        "new_tokens": case.new_tokens,
        "status": "error",
        "error": None,
        "context_bytes": env["context_bytes"],
        "weights_bytes": None,
        "kv_cache_bytes": None,
        "peak_allocated_bytes": None,
        "peak_reserved_bytes": None,
        "peak_nvml_bytes": None,
        "duration_s": 0.0,
        "case_key": None,
        "harness_version": env["harness_version"],
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python_version": env["python_version"],
        "cuda_version": env["cuda_version"],
        "driver_version": env["driver_version"],
        "gpu_uuid": env["gpu_uuid"],
        "baseline_nvml_bytes": env["baseline_nvml_bytes"],
        "model_source": case.source,
        "seed": seed,
        "env": env["env"],
    }
    if case.lora:  # peft LoRA adapters (harness/lora.py); part of the case key
        rec["lora"] = case.lora
    if case.device_map:  # several GPUs (harness/multigpu.py): in the case key only when set
        rec.update(device_map=case.device_map, gpus=case.gpus, devices=env.get("devices"), hf_device_map=None)
    from harness.assisted import record_fields as assisted_fields

    rec.update(assisted_fields(case))  # assisted generation (harness/assisted.py); part of the case key
    rec["case_key"] = case_key(rec)
    return rec


def check_build(backend, case: Case) -> str | None:
    """None if the case's model builds on the meta device, else the error on one line."""
    try:
        backend.check(case)
    except Exception as exc:  # noqa: BLE001 - whatever the library raises is the config's problem
        return one_line(exc, limit=200)
    finally:
        gc.collect()
    return None


def distinct_builds(cases) -> list[Case]:
    """One case per (framework, model source, dtype, attention, quantization)."""
    builds: dict[tuple, Case] = {}
    for case in cases:
        builds.setdefault((case.framework, case.source, case.build_group()), case)
    return list(builds.values())


# ---- the subprocess ----------------------------------------------------------------------------
def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent dies: PR_SET_PDEATHSIG where Linux offers it, and stdin reaching EOF."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent_pid and os.getppid() != parent_pid:
        os._exit(0)

    def wait_for_eof() -> None:
        for _ in sys.stdin:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_eof, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.worker")
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)
    # The original stdout carries the protocol; everything printed goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    job = json.loads(sys.stdin.readline() or "{}")
    _watch_parent(args.parent_pid)
    cases = [Case.from_dict(c) for c in job.get("cases", [])]
    crash_key = os.environ.get("VRAMCAL_TEST_CRASH_KEY")
    framework = job.get("framework", "transformers")
    try:  # before anything else: a missing extra is bad input, said on one line with the fix
        require_extra("torch", "harness")
        require_extra("transformers", "harness")
        if job.get("check"):
            from harness.backends import get_backend

            backend = get_backend(framework)
    except UserError as exc:
        send({"event": "fatal", "error": str(exc)})
        return 2
    if job.get("check"):
        for case in distinct_builds(cases):
            error = check_build(backend, case)
            if error:
                send({"event": "invalid", "model": case.model, "label": case.label(), "error": error})
                return 2
        send({"event": "checked"})
        if job["check"] == "only":
            send({"event": "done"})
            return 0
    try:
        gpus = cases[0].gpus if cases and cases[0].device_map else 0
        session = Session(job.get("device", "cpu"), framework, job.get("seed", 0), gpus)
    except UserError as exc:
        send({"event": "fatal", "error": str(exc)})
        return 2
    except Exception as exc:  # noqa: BLE001 - reported to the parent on one line
        send({"event": "fatal", "error": "setting up the device: " + one_line(exc)})
        return 2
    send({"event": "hello", "env": session.env, "pid": os.getpid()})
    for case in cases:
        key = case.key(session.env["gpu_name"])
        send({"event": "start", "key": key})
        if crash_key and crash_key in key:
            os._exit(3)
        send({"event": "record", "record": session.run_case(case)})
        if session.broken:  # the parent starts a fresh worker for the cases left
            return 4
    session.close()
    send({"event": "done"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
