"""NVML: device memory as the driver sees it (CUDA context, allocator segments, library workspaces).

The measured number is NVML `used` of the device minus a baseline taken before this process touched
the GPU, so it covers everything the process holds, and also anything another process allocates in
between: `other_processes` tells when that may have happened.

Device mapping: the worker runs with CUDA_DEVICE_ORDER=PCI_BUS_ID, so CUDA device i is the i-th entry
of CUDA_VISIBLE_DEVICES (an NVML index or a UUID) and the same board NVML enumerates; the worker
checks the UUID after CUDA init.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from estimator.errors import UserError

POLL_INTERVAL_S = 0.002


def _pynvml():
    from estimator.errors import require_extra

    try:
        pynvml = require_extra("pynvml", "harness")  # the nvidia-ml-py package
    except UserError as exc:
        raise UserError(f"{exc}; without a GPU, use --device cpu") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise UserError(f"NVML is unavailable ({exc}): no NVIDIA driver or GPU here? "
                        "use --device cpu without a GPU") from None
    return pynvml


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    uuid: str
    memory_bytes: int
    driver_version: str
    nvml_index: int | None


class Device:
    """The NVML view of CUDA device `cuda_index` as this process will see it."""

    def __init__(self, cuda_index: int = 0):
        self.nvml = _pynvml()
        self.handle, self.nvml_index = _visible_handle(self.nvml, cuda_index)
        self.pid = os.getpid()

    def info(self) -> DeviceInfo:
        nv, h = self.nvml, self.handle
        return DeviceInfo(
            name=_text(nv.nvmlDeviceGetName(h)),
            uuid=_text(nv.nvmlDeviceGetUUID(h)),
            memory_bytes=int(nv.nvmlDeviceGetMemoryInfo(h).total),
            driver_version=_text(nv.nvmlSystemGetDriverVersion()),
            nvml_index=self.nvml_index,
        )

    def used_bytes(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def other_processes(self, self_on_gpu: bool) -> int:
        """Processes other than this one holding memory on the device.

        In a container NVML may report host pids; then this process is recognised by count: once it
        has initialised CUDA (`self_on_gpu`), one of the listed processes is assumed to be it.
        """
        nv = self.nvml
        procs = []
        for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                procs += list(getattr(nv, query)(self.handle))
            except (nv.NVMLError, AttributeError):
                pass
        pids = {p.pid for p in procs}
        if self.pid in pids:
            return len(pids) - 1
        return max(len(pids) - (1 if self_on_gpu else 0), 0)


def _visible_handle(nv, cuda_index: int):
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        entry = str(cuda_index)
    else:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if cuda_index >= len(entries):
            raise UserError(f"CUDA_VISIBLE_DEVICES={visible!r} leaves no CUDA device {cuda_index}")
        entry = entries[cuda_index]
    try:
        if entry.isdigit():
            return nv.nvmlDeviceGetHandleByIndex(int(entry)), int(entry)
        # a UUID, possibly abbreviated as CUDA allows: match it against every board
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            if _text(nv.nvmlDeviceGetUUID(handle)).startswith(entry):
                return handle, i
        return nv.nvmlDeviceGetHandleByUUID(entry), None  # e.g. a MIG instance
    except nv.NVMLError as exc:
        raise UserError(f"NVML has no device {entry!r} (from CUDA_VISIBLE_DEVICES): {exc}") from None


def gpu_info(cuda_index: int = 0) -> DeviceInfo:
    """Name and memory of the GPU a worker would measure on, without initialising CUDA here."""
    return Device(cuda_index).info()


class Poller:
    """A thread reading NVML `used` every `interval_s` while a case runs; `.peak_bytes`, `.samples`."""

    def __init__(self, device: Device, interval_s: float = POLL_INTERVAL_S):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-poller", daemon=True)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return

    def sample(self) -> int:
        used = self.device.used_bytes()
        self.samples += 1
        if used > self.peak_bytes:
            self.peak_bytes = used
        return used

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
