"""harness.nvml against a stand-in pynvml: device mapping, the poller, other processes, clear errors.

The real NVML needs a GPU (tests/harness/test_gpu.py); this checks the logic around it on any machine.
"""

from __future__ import annotations

import sys
import time
import types
from types import SimpleNamespace

import pytest

from estimator.errors import UserError


class FakeNVML(types.ModuleType):
    """Two boards; `used` of board 0 follows `self.used` (a list consumed one reading at a time)."""

    class NVMLError(Exception):
        pass

    def __init__(self, fail_init: bool = False):
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.used = [1000]
        self.level = None  # when set, every reading returns it
        self.procs = []
        self.uuids = ["GPU-aaaa-1111", "GPU-bbbb-2222"]

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        if i >= 2:
            raise self.NVMLError("Invalid Argument")
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid):
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetUUID(self, h):
        return self.uuids[h]

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3" if h == 0 else "NVIDIA A100-SXM4-80GB"

    def nvmlSystemGetDriverVersion(self):
        return "580.159.04"

    def nvmlDeviceGetMemoryInfo(self, h):
        if self.level is not None:
            used = self.level
        else:
            used = self.used.pop(0) if len(self.used) > 1 else self.used[0]
        return SimpleNamespace(total=85520809984, used=used, free=85520809984 - used)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p, usedGpuMemory=1) for p in self.procs]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        return []


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def test_device_info_and_mapping(nvml, monkeypatch):
    from harness.nvml import Device, gpu_info

    info = gpu_info()
    assert (info.name, info.memory_bytes, info.driver_version, info.nvml_index) == (
        "NVIDIA H100 80GB HBM3", 85520809984, "580.159.04", 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert Device(0).info().name == "NVIDIA A100-SXM4-80GB"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")  # CUDA accepts a unique UUID prefix
    assert Device(0).nvml_index == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(UserError, match="leaves no CUDA device 1"):
        Device(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with pytest.raises(UserError, match="NVML has no device '7'"):
        Device(0)


def test_missing_or_broken_nvml_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(fail_init=True))
    from harness.nvml import gpu_info

    with pytest.raises(UserError, match="NVML is unavailable .*Driver Not Loaded.*--device cpu"):
        gpu_info()
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with pytest.raises(UserError, match=r"pynvml is not installed; .*pip install 'vramcal\[harness\]'.*--device cpu"):
        gpu_info()


def test_other_processes(nvml):
    import os

    from harness.nvml import Device

    device = Device(0)
    assert device.other_processes(self_on_gpu=False) == 0
    nvml.procs = [os.getpid(), 4242]
    assert device.other_processes(self_on_gpu=True) == 1
    nvml.procs = [99999]  # a container: NVML lists host pids, ours among them
    assert device.other_processes(self_on_gpu=True) == 0
    assert device.other_processes(self_on_gpu=False) == 1


def test_poller_keeps_the_highest_reading(nvml):
    from harness.nvml import Device, Poller

    nvml.used = [100, 300, 900, 200] + [150]
    with Poller(Device(0), interval_s=0.001) as poller:
        deadline = time.time() + 5
        while poller.samples < 5 and time.time() < deadline:
            time.sleep(0.005)
        last = poller.sample()
    assert poller.peak_bytes == 900 and last == 150 and poller.samples >= 5


# ---- the worker's CUDA path, with torch.cuda and the backend stood in for -----------------------------
class FakeBackend:
    """Builds nothing; a run raises NVML's reading to 9000 for a moment, then leaves 7000 in use."""

    NAME = "fake"

    def __init__(self, nvml):
        self.nvml = nvml

    def version(self):
        return "0.0"

    def build(self, case, device):
        return object()

    def weights_bytes(self, model):
        return 1000

    def config_dict(self, model):
        return {"model_type": "fake"}

    def run(self, model, case, device, seed=0):
        import torch

        from harness.backends.transformers import Run

        if case.batch == 99:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if case.batch == 98:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.nvml.level = 9000
        time.sleep(0.05)
        self.nvml.level = 7000
        return Run(output=None, kv_cache_bytes=64, cache_class="DynamicCache")


def test_the_cuda_session_records_like_the_reference_method(nvml, monkeypatch):
    import torch

    import harness.backends
    from estimator.records import validate_record
    from harness.case import Case
    from harness.worker import Session

    backend = FakeBackend(nvml)
    monkeypatch.setattr(harness.backends, "get_backend", lambda name: backend)
    fractions = []
    stats = {"allocated": 5000, "reserved": 6000}
    cuda = torch.cuda
    for name, value in {
        "is_available": lambda: True, "synchronize": lambda: None,
        "empty_cache": lambda: None, "reset_peak_memory_stats": lambda: None,
        "get_device_properties": lambda i: SimpleNamespace(uuid="aaaa-1111"),
        "memory_stats": lambda: {"num_alloc_retries": 0},
        "max_memory_allocated": lambda: stats["allocated"], "max_memory_reserved": lambda: stats["reserved"],
        "set_per_process_memory_fraction": lambda f: fractions.append(f),
    }.items():
        monkeypatch.setattr(cuda, name, value)
    real_ones = torch.ones
    monkeypatch.setattr(torch, "ones", lambda *a, device=None, **k: real_ones(*a, **k))  # the warm-up matmul

    nvml.level = 1000  # the baseline; the CUDA context adds 700
    monkeypatch.setattr(cuda, "init", lambda: setattr(nvml, "level", 1700))
    session = Session("cuda", framework="fake")
    assert session.context_bytes == 700 and session.env["baseline_nvml_bytes"] == 1000
    assert session.env["gpu_name"] == "NVIDIA H100 80GB HBM3" and session.env["driver_version"] == "580.159.04"

    def case(batch, **kw):
        return Case.make("llama-3.2-1b", device="cuda", context=64, batch=batch, **kw)

    ok = session.run_case(case(1))
    validate_record(ok)
    assert ok["status"] == "ok" and ok["peak_nvml_bytes"] == 9000 - 1000  # the poller caught the spike
    assert (ok["peak_allocated_bytes"], ok["peak_reserved_bytes"], ok["kv_cache_bytes"]) == (5000, 6000, 64)
    assert ok["context_bytes"] == 700 and ok["nvml_samples"] >= 2 and ok["num_alloc_retries"] == 0
    assert fractions == []  # never touched without a limit, as in the reference runs

    oom = session.run_case(case(99, memory_limit_bytes=85520809984 // 4))
    validate_record(oom)
    assert oom["status"] == "oom" and oom["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert fractions == [0.25] and not session.broken
    after = session.run_case(case(2))
    assert after["status"] == "ok" and fractions == [0.25, 1.0]  # the limit is lifted again

    broken = session.run_case(case(98))
    validate_record(broken)
    assert broken["status"] == "error" and session.broken  # the worker stops; the parent starts another
