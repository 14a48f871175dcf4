"""Peak memory per GPU of a model loaded with ``from_pretrained(..., device_map="auto")`` on several GPUs.

``estimator/placement.py`` says which modules go where, as transformers computes it. Each GPU then holds
the weights of its modules (exact), the KV cache of its decoder layers (exact: a layer's cache lives on
the device the layer runs on), and the transient tensors of its own forward pieces. For those, the
allocator replay (``estimator/replay/``, through ``estimator.terms.features``) runs once per GPU on a
spec restricted to that GPU's layers: its frame allocates a hidden state of the batch's tokens where the
embedding output would be (on the first GPU it is that output; on the others it stands for the hidden
state accelerate's ``AlignDevicesHook`` copies in from the previous GPU), and the logits only on the GPU
that holds the head. This is an approximation, and says so: accelerate's hooks also copy the attention
mask and the rotary cos/sin to every later GPU, each GPU's weights fragment its allocator differently
from the single-GPU layout the replay starts from, and no multi-GPU run has been measured to calibrate it.
The interval of every GPU is therefore widened by ``MULTI_GPU_REL`` + ``MULTI_GPU_ABS_BYTES`` at each end.

Modules accelerate offloads to "cpu" or "disk" run on GPU 0 (the hooks' execution device): their
weights stream in one module at a time (the largest one is counted on GPU 0), and their KV cache and
activations live on GPU 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from estimator.errors import UserError
from estimator.estimate import Estimate, assemble, calibration_notes
from estimator.gpus import GPU, find_gpu
from estimator.placement import compute_module_sizes, device_of, module_tree, parse_max_memory, plan
from estimator.spec import ModelSpec
from estimator.terms import Workload, features

MIB = 2**20
# The CUDA context a process holds on each GPU before any tensor: 717 MiB measured on the H100 (the
# reference records); a few hundred MiB to about 1 GiB on other GPUs and drivers. accelerate's
# get_max_memory creates it on every visible GPU (``torch.tensor(0, device=i)``) and then reads
# ``mem_get_info`` free memory, so the default max_memory is the total less this context.
CUDA_CONTEXT_BYTES = 717 * MIB
# The widening of each GPU's interval for what the per-device replay does not model (module docstring).
MULTI_GPU_REL = 0.05
MULTI_GPU_ABS_BYTES = 256 * MIB
# Host RAM the default max_memory assumes when --max-memory gives no "cpu": ample, so modules beyond
# the GPUs go to the CPU rather than to disk (the GPUs' placement does not depend on it).
DEFAULT_CPU_BYTES = 2**40


def parse_gpus(text: str) -> tuple[GPU, ...]:
    """``"2xA100-80GB"``, ``"H100,H100,L40S"``, ``"2xH100,L40S"`` -> the GPUs in device order (strict names)."""
    gpus: list[GPU] = []
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            raise UserError(f"--gpus {text!r}: an empty name; expected e.g. 2xA100-80GB or H100,H100,L40S")
        m = re.fullmatch(r"(\d+)\s*[x*]\s*(.+)", item, flags=re.IGNORECASE)
        count, name = (int(m.group(1)), m.group(2)) if m else (1, item)
        if not 1 <= count <= 64:
            raise UserError(f"--gpus {item!r}: a count from 1 to 64 GPUs, got {count}")
        gpus += [find_gpu(name)] * count
    if len(gpus) > 64:
        raise UserError(f"--gpus {text!r}: {len(gpus)} GPUs; at most 64")
    return tuple(gpus)


def max_memory_for(gpus: tuple[GPU, ...], text: str | None) -> tuple[dict, bool]:
    """(max_memory, user_set): ``--max-memory`` as given (its GPU indices checked against ``gpus``), or
    what accelerate's get_max_memory would see: each GPU's total less its CUDA context, and host RAM."""
    if text is None:
        mm: dict = {i: g.memory_bytes - CUDA_CONTEXT_BYTES for i, g in enumerate(gpus)}
        mm["cpu"] = DEFAULT_CPU_BYTES
        return mm, False
    mm = parse_max_memory(text)
    for key in mm:
        if isinstance(key, int) and key >= len(gpus):
            raise UserError(f"--max-memory names GPU {key}, but --gpus lists {len(gpus)} (indices 0..{len(gpus) - 1})")
    return mm, True


@dataclass(frozen=True)
class DeviceEstimate:
    device: int
    gpu: GPU
    max_memory_bytes: int  # the cap placement filled this GPU up to (after get_balanced_memory)
    layers: tuple[int, ...]  # decoder layers placed here
    modules: tuple[str, ...]
    estimate: Estimate | None  # None: the GPU holds no module (only its CUDA context)
    streamed_bytes: int = 0  # GPU 0: the largest offloaded module, copied in while it runs
    offloaded_layers: tuple[int, ...] = ()  # GPU 0: layers offloaded to cpu/disk, which run here

    @property
    def weights_bytes(self) -> int:
        return self.estimate.weights_bytes if self.estimate else 0

    @property
    def total_bytes(self) -> int:
        return (self.estimate.total_bytes if self.estimate else CUDA_CONTEXT_BYTES) + self.streamed_bytes

    @property
    def high_bytes(self) -> int:
        high = self.estimate.high_bytes if self.estimate else CUDA_CONTEXT_BYTES
        return widen(high + self.streamed_bytes, +1)

    @property
    def low_bytes(self) -> int:
        low = self.estimate.low_bytes if self.estimate else CUDA_CONTEXT_BYTES
        return widen(low + self.streamed_bytes, -1)

    @property
    def verdict(self) -> str:
        if self.high_bytes <= self.gpu.memory_bytes:
            return "fits"
        return "tight" if self.total_bytes <= self.gpu.memory_bytes else "does not fit"

    def as_dict(self) -> dict:
        e = self.estimate
        return {"device": self.device, "gpu": self.gpu.name, "memory_bytes": self.gpu.memory_bytes,
                "max_memory_bytes": int(self.max_memory_bytes), "layers": list(self.layers),
                "modules": list(self.modules), "offloaded_layers_run_here": list(self.offloaded_layers),
                "weights_bytes": self.weights_bytes,
                "kv_cache_bytes": e.kv_cache_bytes if e else 0,
                "activation_bytes": (e.activation_bytes if e else 0) + self.streamed_bytes,
                "overhead_bytes": e.overhead_bytes if e else CUDA_CONTEXT_BYTES,
                "streamed_weights_bytes": self.streamed_bytes,
                "total_bytes": self.total_bytes, "low_bytes": self.low_bytes, "high_bytes": self.high_bytes,
                "free_bytes": self.gpu.memory_bytes - self.total_bytes, "verdict": self.verdict,
                "fits": self.verdict == "fits", "peak_phase": e.peak_phase if e else None}


def widen(n: int, sign: int) -> int:
    return max(round(n * (1 + sign * MULTI_GPU_REL) + sign * MULTI_GPU_ABS_BYTES), 0)


_ORDER = {"fits": 0, "tight": 1, "does not fit": 2}


@dataclass(frozen=True)
class MultiEstimate:
    model: str
    workload: Workload
    strategy: str
    devices: tuple[DeviceEstimate, ...]
    offloaded: dict = field(default_factory=dict)  # "cpu" / "disk" -> module names
    notes: tuple[str, ...] = ()
    coefficients: object = None

    @property
    def verdict(self) -> str:
        """The whole job's verdict: its worst GPU's."""
        return max((d.verdict for d in self.devices), key=_ORDER.get)

    def as_dict(self) -> dict:
        c = self.coefficients
        return {"model": self.model, "inputs": self.workload.as_dict(), "device_map": self.strategy,
                "devices": [d.as_dict() for d in self.devices], "offloaded": {k: list(v) for k, v in self.offloaded.items()},
                "verdict": self.verdict, "fits": self.verdict == "fits",
                "total_bytes": sum(d.total_bytes for d in self.devices), "notes": list(self.notes),
                "coefficients": {"source": c.source, "calibrated": c.calibrated, "gpu": c.gpu}}


def _leaf_modules(spec: ModelSpec, dtype: str) -> list[tuple[str, int, int | None]]:
    """(module, bytes, decoder layer index or None) for each module the map can place on its own."""
    root, _ = module_tree(spec, dtype)
    sizes, _ = compute_module_sizes(root)
    out = []
    for top in root.children:
        for child in top.children or [top]:
            if child.children:  # the layer list
                out += [(layer.name, sizes[layer.name], i) for i, layer in enumerate(child.children)]
            else:
                out.append((child.name, sizes.get(child.name, 0), None))
    return out


def _device_spec(spec: ModelSpec, layers: list[int], head: bool) -> ModelSpec:
    """``spec`` as one GPU's replay sees it: its decoder layers; the vocabulary only where the head is."""
    return replace(spec, layers=tuple(spec.layers[i] for i in layers), layer_params=(),
                   vocab_size=spec.vocab_size if head else 1)


def estimate_devices(spec: ModelSpec, workload: Workload, gpus: tuple[GPU, ...], coefficients,
                     max_memory: dict, user_set: bool, strategy: str = "auto") -> MultiEstimate:
    """Each GPU's peak for ``workload`` on ``spec`` loaded with ``device_map=strategy`` over ``gpus``."""
    if workload.quant:
        raise UserError(f"--gpus with --quant {workload.quant}: the quantizers' module sizes and max_memory "
                        "adjustments are not modelled; estimate the unquantized model, or one GPU")
    if workload.lora is not None:
        raise UserError("--gpus with LoRA adapters: the adapters' placement over GPUs is not modelled; estimate "
                        "them on one GPU (--gpu), or the base model over --gpus")
    if workload.assistant or workload.prompt_lookup_num_tokens:
        raise UserError("--gpus with assisted generation: the draft's placement and the verification forward "
                        "over GPUs are not modelled; estimate it on one GPU (--gpu)")
    if workload.cache == "static" and workload.compile == "auto":
        raise UserError("--gpus with a static cache and --compile auto: the compiled decode step over GPUs is not "
                        "modelled; add --compile off (generate(disable_compile=True)) or use one GPU")
    if workload.framework != "transformers":
        raise UserError("--gpus places modules as transformers' device_map does; vLLM splits a model by tensor "
                        "parallelism instead (--framework vllm --tensor-parallel-size)")
    # max_memory_bytes per GPU: the cap infer_auto_device_map filled up to (balanced, 90% rules applied)
    device_map, mm_used = plan(spec, workload.dtype, max_memory, strategy, user_set)
    leaves = _leaf_modules(spec, workload.dtype)
    where = {name: device_of(device_map, name) for name, _, _ in leaves}
    offloaded = {d: [n for n, _, _ in leaves if where[n] == d] for d in ("cpu", "disk")}
    offloaded = {d: names for d, names in offloaded.items() if names}
    head_name = "lm_head"
    head_device = where[head_name]
    if head_device in ("cpu", "disk"):
        head_device = 0
    notes: list[str] = [
        f"per-GPU activations: the allocator replay of each GPU's own layers, the hidden state handed between "
        f"GPUs and the logits on the last; accelerate's copies of masks and rotary tables and the per-GPU "
        f"fragmentation are not modelled, no multi-GPU run is calibrated: each GPU's interval widened by "
        f"{MULTI_GPU_REL:.0%} + {MULTI_GPU_ABS_BYTES // MIB} MiB at each end"]
    if not user_set:
        notes.append(f"max_memory as accelerate would see it: each GPU's total less a {CUDA_CONTEXT_BYTES // MIB} MiB "
                     "CUDA context (measured on the H100; other drivers differ by a few hundred MiB), host RAM "
                     "assumed ample (give --max-memory cpu=... to say otherwise)")
    if offloaded:
        listed = "; ".join(f"{d}: {_names(n)}" for d, n in offloaded.items())
        notes.append(f"offloaded by accelerate ({listed}): they run on GPU 0, their weights copied in at every "
                     "forward, so generate becomes slow (every step waits for that copy over PCIe); their KV cache is on GPU 0")
    streamed = max((size for name, size, _ in leaves if where[name] in ("cpu", "disk")), default=0)
    for gpu in dict.fromkeys(gpus):  # each kind of GPU once: its interval widened where not calibrated
        notes += [n for n in calibration_notes(coefficients, gpu, workload.framework) if n not in notes]
    devices = []
    for i, gpu in enumerate(gpus):
        mine = [(n, s, layer) for n, s, layer in leaves if where[n] == i]
        runs_here = [layer for n, _, layer in leaves if layer is not None
                     and (where[n] == i or (i == 0 and where[n] in ("cpu", "disk")))]
        head = head_device == i
        if not mine and not runs_here:
            devices.append(DeviceEstimate(i, gpu, mm_used.get(i, 0), (), (), None))
            continue
        weights = sum(s for _, s, _ in mine)
        est = _estimate_on(spec, workload, runs_here, head, weights, coefficients, gpu)
        placed = tuple(layer for _, _, layer in mine if layer is not None)
        devices.append(DeviceEstimate(i, gpu, mm_used.get(i, 0), placed, tuple(n for n, _, _ in mine), est,
                                      streamed if i == 0 else 0, tuple(l for l in runs_here if l not in placed)))
    return MultiEstimate(spec.name, workload, strategy, tuple(devices), offloaded, tuple(notes), coefficients)


def _estimate_on(spec, workload, layers, head, weights, coefficients, gpu) -> Estimate:
    if layers:
        sub = _device_spec(spec, layers, head)
        f = features(sub, workload)
    else:  # only the norm and the head: their tensors are the logits and the hidden state
        a = 2 if workload.dtype in ("bfloat16", "float16") else 4
        rows = workload.batch * (workload.prompt_tokens if workload.workload == "forward" else 1)
        f = {"hidden": workload.batch * workload.prompt_tokens * spec.hidden_size * a,
             "logits": rows * spec.vocab_size * a if head else 0}
    return assemble(spec.name, workload, weights, f, 0, 0, coefficients, gpu, workload.attn, (), False)


def _names(names: list[str]) -> str:
    """"model.layers.40".."model.layers.79" -> "model.layers.40-79"; others as they are."""
    layers = [int(n.rsplit(".", 1)[1]) for n in names if re.fullmatch(r".*\.(layers|h)\.\d+", n)]
    rest = [n for n in names if not re.fullmatch(r".*\.(layers|h)\.\d+", n)]
    parts = [f"decoder layers {layer_ranges(layers)}"] if layers else []
    return ", ".join(parts + rest)


def layer_ranges(layers) -> str:
    """[0, 1, 2, 5, 6] -> "0-2, 5-6"."""
    out, start, prev = [], None, None
    for n in sorted(layers):
        if start is None:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            out.append(f"{start}-{prev}" if prev > start else str(start))
            start = prev = n
    if start is not None:
        out.append(f"{start}-{prev}" if prev > start else str(start))
    return ", ".join(out) or "-"

