"""Several GPUs: a model placed by ``device_map`` and measured on every GPU it uses.

Loading: a checkpoint folder goes through ``from_pretrained(..., device_map=strategy)``, which computes
the map itself (``transformers/integrations/accelerate.py`` ``_get_device_map``) and dispatches the
weights. A config has no weights to load: the model is built with random weights on the CPU, the map is
computed by the same ``_get_device_map`` (so the estimator's ``estimator/placement.py`` mirrors one
function), and accelerate's ``dispatch_model`` moves each module to its device and adds the
``AlignDevicesHook``s that carry tensors between GPUs (offloaded modules stay on the CPU, or in a
temporary folder for "disk", and run on GPU 0), as ``from_pretrained`` does.

Measuring: per GPU, NVML ``used`` above a baseline read before CUDA init (a 2 ms poller each, and a last
reading after ``synchronize``) and ``torch.cuda.max_memory_allocated(i)`` / ``max_memory_reserved(i)``.
The record's ``devices`` list holds them; its top-level peaks are their sums (the process's device
memory over all its GPUs), and ``hf_device_map`` the placement.

The worker must see exactly ``gpus`` CUDA devices (``CUDA_VISIBLE_DEVICES``): accelerate's
``get_max_memory`` spreads the model over every visible GPU.
"""

from __future__ import annotations

import tempfile

from estimator.errors import UserError


class Devices:
    """NVML views and baselines of CUDA devices 0..n-1, taken before this process initialises CUDA."""

    def __init__(self, n: int):
        from harness.nvml import Device

        self.nv = [Device(i) for i in range(n)]
        self.info = [d.info() for d in self.nv]
        self.baseline_bytes = [d.used_bytes() for d in self.nv]
        self.context_bytes: list[int | None] = [None] * n

    def after_init(self, torch) -> None:
        """After ``torch.cuda.init()``: the visible count checked, cuBLAS loaded and the context read on each."""
        n = len(self.nv)
        if torch.cuda.device_count() != n:
            raise UserError(f"a device_map case over {n} GPU(s) needs exactly {n} visible, torch sees "
                            f"{torch.cuda.device_count()}: set CUDA_VISIBLE_DEVICES to {n} GPU(s)")
        for i in range(n):
            a = torch.ones(256, 256, dtype=torch.bfloat16, device=f"cuda:{i}")
            _ = a @ a
            torch.cuda.synchronize(i)
            del a, _
        torch.cuda.empty_cache()
        self.context_bytes = [d.used_bytes() - b for d, b in zip(self.nv, self.baseline_bytes)]

    def env(self) -> list[dict]:
        return [{"index": i, "gpu_name": info.name, "gpu_uuid": info.uuid, "gpu_memory_bytes": info.memory_bytes,
                 "baseline_nvml_bytes": b, "context_bytes": c}
                for i, (info, b, c) in enumerate(zip(self.info, self.baseline_bytes, self.context_bytes))]


def build(case, config_loader, dtype):
    """The case's model placed by ``device_map=case.device_map`` on the visible GPUs, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    if case.source_kind == "checkpoint":
        model = AutoModelForCausalLM.from_pretrained(case.source, dtype=dtype, attn_implementation=case.attn,
                                                     device_map=case.device_map,
                                                     offload_folder=tempfile.mkdtemp(prefix="vramcal-offload-"))
        return model.eval()
    from accelerate import dispatch_model
    from transformers.integrations.accelerate import _get_device_map

    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config_loader(case), dtype=dtype, attn_implementation=case.attn)
    device_map = _get_device_map(model, case.device_map, None, None)
    offload = tempfile.mkdtemp(prefix="vramcal-offload-") if "disk" in device_map.values() else None
    dispatch_model(model, device_map=device_map, offload_dir=offload,
                   skip_keys=getattr(model, "_skip_keys_device_placement", None))
    model.hf_device_map = device_map
    return model.eval()


def weights_by_device(model) -> dict[str, int]:
    """Bytes of parameters and buffers per device ("cuda:0", "cpu", "meta" for disk-offloaded ones)."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
    return out


def device_map_of(model) -> dict[str, str]:
    """The placement as JSON: module name -> device ("0", "cpu", "disk")."""
    return {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}


def measure(session, case, model) -> dict:
    """Run the case with a poller per GPU; the record's fields (top-level sums, ``devices`` per GPU)."""
    import gc

    from harness.nvml import Poller

    torch = session.torch
    devs: Devices = session.devices
    n = len(devs.nv)
    gc.collect()
    for i in range(n):
        torch.cuda.synchronize(i)
    torch.cuda.empty_cache()
    for i in range(n):
        torch.cuda.reset_peak_memory_stats(i)
    pollers = [Poller(d) for d in devs.nv]
    for p in pollers:
        p.__enter__()
    final = [0] * n
    try:
        run, status, error, seconds = session._run(case, model)
        if run is not None:
            for i in range(n):
                torch.cuda.synchronize(i)
            final = [p.sample() for p in pollers]
    finally:
        for p in pollers:
            p.__exit__(None, None, None)
    weights = weights_by_device(model)
    per = []
    for i in range(n):
        per.append({
            "index": i, "gpu_name": devs.info[i].name,
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(i)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(i)),
            "peak_nvml_bytes": max(0, int(max(pollers[i].peak_bytes, final[i]) - devs.baseline_bytes[i])),
            "baseline_nvml_bytes": devs.baseline_bytes[i], "context_bytes": devs.context_bytes[i],
            "weights_bytes": int(weights.get(f"cuda:{i}", 0)), "nvml_samples": pollers[i].samples,
        })
    out = {
        "status": status, "error": error,
        "kv_cache_bytes": run.kv_cache_bytes if run else None,
        "cache_class": run.cache_class if run else None,
        "peak_allocated_bytes": sum(d["peak_allocated_bytes"] for d in per),
        "peak_reserved_bytes": sum(d["peak_reserved_bytes"] for d in per),
        "peak_nvml_bytes": sum(d["peak_nvml_bytes"] for d in per),
        "duration_s": round(seconds, 3),
        "nvml_samples": sum(d["nvml_samples"] for d in per),
        "memory_limit_bytes": case.memory_limit_bytes,
        "devices": per,
        "hf_device_map": device_map_of(model),
        "offloaded_weights_bytes": int(sum(v for k, v in weights.items() if not k.startswith("cuda"))),
    }
    del run
    gc.collect()
    torch.cuda.empty_cache()
    return out
