"""Sweep files: TOML -> frozen dataclasses -> ordered cases -> records, resumably.

A sweep file holds top-level settings and one or more ``[[matrix]]`` tables; each matrix is the product
of its axes (models x dtypes x attn x cache x workloads x contexts x batches x new_tokens x alloc_conf x
quant). An axis left out of a matrix takes the top-level value of the same name, else its default::

    name = "h100-smoke"
    device = "cuda"                 # or "cpu" (tiny test sweeps)
    gpu = "h100"                    # GPU the estimate filter assumes when none is visible (dry runs);
                                    # with --ray, the GPU kind every task is pinned to (harness/ray_sweep.py)
    out = "results/h100/smoke.jsonl"  # default output, relative to the current directory
    skip_over_estimate = 1.5        # skip cases estimated above 1.5 x device memory (0: never)
    memory_limit_bytes = 0          # 0: none; else a cap (cuda: memory fraction; cpu: tracker limit)
    seed = 0
    gpus = 1                        # > 1: each case loaded with device_map over that many GPUs
    device_map = "auto"             # with gpus: auto, balanced, balanced_low_0 or sequential

    [[matrix]]
    models = ["llama-3.2-1b"]
    contexts = [1024, 4096]         # prompt + new tokens (forward: the sequence length)
    batches = [1, 4]

For ``workloads = ["forward"]`` the cache and new_tokens axes do not apply (null and 0). A generate
combination whose context does not exceed its new tokens is left out. Cases already in the output
file (same case key, any status) are skipped, so a rerun resumes (``vramcal measure`` follows the same
rule). Before anything is measured, the whole sweep is checked: the output path, the records already
in it, every case's context against its model's positions (a model with learned position embeddings
cannot run past them: the sweep is refused), and every model build on the meta device.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from estimator.compare import MEASURED, comparable_bytes
from estimator.errors import UserError, require_extra
from estimator.paths import check_output_file
from estimator.records import case_key, read_records
from harness.case import (ATTNS, CACHES, COMPILES, DEVICE_MAPS, DEVICES, MAX_GPUS, WORKLOADS, Case, check_positions,
                          normalize_dtype)

GIB = 2**30

# axis -> (element type, default)
AXES: dict[str, tuple[type, tuple]] = {
    "models": (str, ()),
    "dtypes": (str, ("bfloat16",)),
    "attn": (str, ("sdpa",)),
    "cache": (str, ("dynamic",)),
    "workloads": (str, ("generate",)),
    "contexts": (int, ()),
    "batches": (int, (1,)),
    "new_tokens": (int, (16,)),
    "alloc_conf": (str, ("",)),
    "quant": (str, ("none",)),
    "lora": (str, ("",)),  # peft LoRA adapters, harness/lora.py's text ("r16:q_proj+v_proj:x1:float32"); "": none
    "compile": (str, ("off",)),
    "assistant": (str, ("",)),  # assisted generation: a draft model, "NAME" or "NAME:K" (K candidates); "": none
    "prompt_lookup": (int, (0,)),  # prompt lookup decoding: candidate tokens per step; 0: none
}
SETTINGS = ("name", "description", "device", "gpu", "out", "skip_over_estimate", "memory_limit_bytes", "seed",
            "gpus", "device_map")
_CHOICES = {"attn": ATTNS, "cache": CACHES, "workloads": WORKLOADS, "compile": COMPILES}


@dataclass(frozen=True)
class Matrix:
    models: tuple[str, ...]
    dtypes: tuple[str, ...]
    attn: tuple[str, ...]
    cache: tuple[str, ...]
    workloads: tuple[str, ...]
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    new_tokens: tuple[int, ...]
    alloc_conf: tuple[str, ...]
    quant: tuple[str, ...]
    lora: tuple[str, ...] = ("",)
    compile: tuple[str, ...] = ("off",)
    assistant: tuple[str, ...] = ("",)
    prompt_lookup: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Sweep:
    path: str
    name: str
    description: str
    device: str
    gpu: str | None
    out: str | None
    skip_over_estimate: float
    memory_limit_bytes: int | None
    seed: int
    matrices: tuple[Matrix, ...] = field(repr=False)
    gpus: int = 1
    device_map: str | None = None  # set for a several-GPU sweep (harness/multigpu.py)


def _axis(where: str, name: str, value) -> tuple:
    kind, _ = AXES[name]
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise UserError(f"{where}: {name} is empty")
    out = []
    for item in value:
        if kind is int and (isinstance(item, bool) or not isinstance(item, int) or item < 0):
            raise UserError(f"{where}: {name} holds {item!r}; expected non-negative integers")
        if kind is str and not isinstance(item, str):
            raise UserError(f"{where}: {name} holds {item!r}; expected strings")
        if name in _CHOICES and item not in _CHOICES[name]:
            raise UserError(f"{where}: {name} {item!r} is not one of: {', '.join(_CHOICES[name])}")
        if name == "dtypes":
            try:
                item = normalize_dtype(item)
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None
        out.append(item)
    return tuple(dict.fromkeys(out))


def load_sweep(path) -> Sweep:
    """Parse and check a sweep file; UserError names the file, the table and the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"sweep file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read sweep file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from None
    unknown = set(data) - set(SETTINGS) - set(AXES) - {"matrix"}
    if unknown:
        raise UserError(f"{path}: unknown setting {sorted(unknown)[0]!r} (allowed: "
                        f"{', '.join(SETTINGS + tuple(AXES) + ('[[matrix]]',))})")
    device = data.get("device", "cuda")
    if device not in DEVICES:
        raise UserError(f"{path}: device {device!r} is not one of: {', '.join(DEVICES)}")
    ratio = data.get("skip_over_estimate", 1.5)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 0:
        raise UserError(f"{path}: skip_over_estimate must be a number >= 0 (0: never skip), not {ratio!r}")
    limit = data.get("memory_limit_bytes", 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise UserError(f"{path}: memory_limit_bytes must be an integer >= 0, not {limit!r}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{path}: seed must be an integer, not {seed!r}")
    gpus, device_map = _gpus_setting(path, data, device, limit)
    for name in ("name", "description", "gpu", "out"):
        if name in data and not isinstance(data[name], str):
            raise UserError(f"{path}: {name} must be a string, not {data[name]!r}")
    tables = data.get("matrix", [])
    if not isinstance(tables, list) or not tables:
        raise UserError(f"{path}: no [[matrix]] table; a sweep needs at least one")
    matrices = []
    for i, table in enumerate(tables, 1):
        where = f"{path} [[matrix]] {i}"
        unknown = set(table) - set(AXES)
        if unknown:
            raise UserError(f"{where}: unknown field {sorted(unknown)[0]!r} (allowed: {', '.join(AXES)})")
        axes = {}
        for name, (_, default) in AXES.items():
            value = table.get(name, data.get(name, list(default)))
            if value == [] and not default:
                raise UserError(f"{where}: {name} is required")
            axes[name] = _axis(where, name, value)
        matrices.append(Matrix(**axes))
    return Sweep(
        path=str(path), name=data.get("name", path.stem), description=data.get("description", ""),
        device=device, gpu=data.get("gpu"), out=data.get("out"), skip_over_estimate=float(ratio),
        memory_limit_bytes=limit or None, seed=seed, matrices=tuple(matrices), gpus=gpus, device_map=device_map,
    )


def _gpus_setting(path, data: dict, device: str, limit: int) -> tuple[int, str | None]:
    """(gpus, device_map): 1 and None unless the sweep places its models on several GPUs."""
    gpus = data.get("gpus", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= MAX_GPUS:
        raise UserError(f"{path}: gpus must be an integer from 1 to {MAX_GPUS}, not {gpus!r}")
    device_map = data.get("device_map", "auto" if gpus > 1 else None)
    if device_map is None:
        return gpus, None
    if device_map not in DEVICE_MAPS:
        raise UserError(f"{path}: device_map {device_map!r} is not one of: {', '.join(DEVICE_MAPS)}")
    if device != "cuda":
        raise UserError(f"{path}: device_map places models on GPUs; it needs device = \"cuda\"")
    if limit:
        raise UserError(f"{path}: memory_limit_bytes caps one GPU; it does not apply with device_map")
    return gpus, device_map


def expand(sweep: Sweep, device: str | None = None) -> tuple[list[Case], int]:
    """All distinct cases of the sweep, in file order, and how many combinations were left out
    (a generate context that does not exceed its new tokens)."""
    device = device or sweep.device
    cases: dict[tuple, Case] = {}
    left_out = 0
    for m in sweep.matrices:
        for (model, dtype, attn, cache, workload, context, batch, new, alloc, quant, lora, comp, draft,
             lookup) in itertools.product(m.models, m.dtypes, m.attn, m.cache, m.workloads, m.contexts, m.batches,
                                          m.new_tokens, m.alloc_conf, m.quant, m.lora, m.compile, m.assistant,
                                          m.prompt_lookup):
            if workload == "forward":
                cache, new = None, 0
            elif context <= new:
                left_out += 1
                continue
            case = Case.make(model, device=device, dtype=dtype, attn=attn, cache=cache, workload=workload,
                             context=context, batch=batch, new_tokens=new, alloc_conf=alloc, quant=quant,
                             memory_limit_bytes=sweep.memory_limit_bytes, device_map=sweep.device_map,
                             gpus=sweep.gpus, lora=lora or None, compile=comp,
                             **_assisted_axes(draft, lookup))
            cases.setdefault(case.key(), case)
    return list(cases.values()), left_out


def order(cases: list[Case]) -> list[Case]:
    """One worker per process group, one build per (dtype, attn, quant) within it, small cases first
    (an OOM near the end of a build group disturbs nothing after it)."""
    process_rank: dict[tuple, int] = {}
    build_rank: dict[tuple, int] = {}
    for case in cases:
        process_rank.setdefault(case.process_group(), len(process_rank))
        build_rank.setdefault((case.process_group(), case.build_group()), len(build_rank))
    return sorted(cases, key=lambda c: (process_rank[c.process_group()],
                                         build_rank[(c.process_group(), c.build_group())],
                                         c.batch * c.context, c.batch, c.workload, c.cache or ""))


class EstimateFilter:
    """`estimator.estimate` of each case, to skip cases far beyond the device's memory.

    The estimate is the one of what the device measures (`estimator.compare`): on cuda the estimate's
    `total_bytes` (the process's device memory, context included) against the GPU's memory; on the CPU
    its allocated peak without the cuBLAS workspace (the tracker's live tensor bytes) against
    `memory_limit_bytes`, if the sweep sets one. A case the estimator cannot handle is measured.
    """

    def __init__(self, device: str, memory_bytes: int | None, ratio: float):
        self.device = device
        self.memory_bytes = memory_bytes
        self.ratio = ratio
        self._warned: set[str] = set()
        self._specs: dict[str, object] = {}

    def estimate_bytes(self, case: Case) -> int | None:
        """The estimate comparable with this device's measurement, or None."""
        try:
            from estimator import Workload, estimate, load_model
        except ImportError as exc:
            self._warn("*", f"the estimator is unavailable ({exc}); no case is skipped")
            return None
        try:
            if case.source not in self._specs:
                self._specs[case.source] = load_model(case.source)
            workload = Workload(context=case.context, batch=case.batch, new_tokens=case.new_tokens,
                                workload=case.workload, dtype=case.dtype, quant=case.quant,
                                attn=case.attn, cache=case.cache or "dynamic", framework=case.framework,
                                alloc_conf=case.alloc_conf,
                                lora=_lora_of(case), compile=case.compile,
                                assistant=case.assistant, num_assistant_tokens=case.num_assistant_tokens,
                                prompt_lookup_num_tokens=case.prompt_lookup_num_tokens)
            return comparable_bytes(estimate(self._specs[case.source], workload), self.device)
        except Exception as exc:  # noqa: BLE001 - a case the estimator cannot handle is still measured
            self._warn(case.model, f"no estimate for {case.model} ({' '.join(str(exc).split())[:200]}); "
                                   "its cases are not filtered")
            return None

    def skip_reason(self, estimate: int | None) -> str | None:
        if not self.memory_bytes or self.ratio <= 0 or estimate is None:
            return None
        if estimate <= self.ratio * self.memory_bytes:
            return None
        return f"estimate {format_bytes(estimate)} > {self.ratio:g} x {format_bytes(self.memory_bytes)}"

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            print(f"vramcal: warning: {message}", file=sys.stderr)


def _assisted_axes(draft: str, lookup: int) -> dict:
    """Case fields from the sweep's ``assistant`` ("NAME" or "NAME:K") and ``prompt_lookup`` axes."""
    out = {}
    if draft:
        name, _, k = draft.rpartition(":") if draft.rpartition(":")[2].isdigit() else (draft, "", "")
        out["assistant"] = name
        if k:
            out["num_assistant_tokens"] = int(k)
    if lookup:
        out["prompt_lookup_num_tokens"] = lookup
    return out


def _lora_of(case: Case):
    from harness.lora import from_text

    return from_text(case.lora)


def existing_records(out: Path) -> list[dict]:
    """The records already in an output file (none when it does not exist yet or is empty).

    UserError, one line, when it holds anything else (a line that is not a record, an incomplete last
    line): records are appended to it, so it is checked before anything is measured."""
    out = Path(out)
    if not out.is_file() or out.stat().st_size == 0:
        return []
    try:
        with open(out, "rb") as handle:
            handle.seek(-1, 2)
            complete = handle.read(1) == b"\n"
        text = out.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{out} is not a records file (not UTF-8 text); give another --out") from None
    except OSError as exc:
        raise UserError(f"cannot read {out}: {exc.strerror or exc}") from None
    if not text.strip():
        return []
    if not complete:
        raise UserError(f"{out} ends with an incomplete line (an interrupted write?); remove that line, "
                        "then run again")
    try:
        return read_records(out)
    except UserError as exc:
        raise UserError(f"{out} is not a records file to append to: {exc}; give another --out") from None


def measured_keys(records: list[dict], retry_errors: bool) -> set[str]:
    """Keys already measured: every status, or with `retry_errors` only cases with a non-error record."""
    done: set[str] = set()
    for rec in records:
        if not retry_errors or rec["status"] != "error":
            done.add(case_key(rec))
    return done


def format_bytes(value: int | None) -> str:
    """GiB (2**30) for device-sized numbers, MiB (2**20) below 1 GiB (tiny CPU test models)."""
    if value is None:
        return "-"
    if abs(value) < GIB:
        return f"{value / 2**20:.2f} MiB"
    return f"{value / GIB:.2f} GiB"


def summary_line(case: Case, rec: dict, estimate: int | None = None) -> str:
    """One line per measured case."""
    status = rec["status"]
    parts = [f"{status:<5}", case.label()]
    if status == "ok":
        if rec["device"] == "cuda":
            parts.append(f"nvml {format_bytes(rec['peak_nvml_bytes'])}")
            parts.append(f"reserved {format_bytes(rec['peak_reserved_bytes'])}")
        parts.append(f"allocated {format_bytes(rec['peak_allocated_bytes'])}")
        if rec.get("kv_cache_bytes") is not None:
            parts.append(f"kv {format_bytes(rec['kv_cache_bytes'])}")
        if estimate is not None:
            # the estimate of the same quantity: NVML peak on cuda, live tensor bytes on the CPU
            measured = rec[MEASURED[rec["device"]]]
            if measured:
                parts.append(f"estimate {format_bytes(estimate)} ({(estimate - measured) / measured:+.1%})")
    else:
        parts.append(str(rec.get("error") or "")[:160])
    parts.append(f"{rec['duration_s']:.1f} s")
    if rec.get("other_processes"):
        parts.append(f"WARNING: {rec['other_processes']} other process(es) on this GPU; nvml includes them")
    return "  ".join(parts)


def gpu_of_this_machine(device: str, dry_run: bool, records: list[dict]) -> tuple[str | None, int | None]:
    """(gpu_name, memory_bytes) as NVML reports them for the GPU a worker would use.

    A dry run on a machine without a GPU assumes the GPU of the cuda records already in the output
    (if they name one), so it lists what a resumed run would still measure."""
    if device != "cuda":
        return None, None
    from harness.nvml import gpu_info

    try:
        info = gpu_info()
        return info.name, info.memory_bytes
    except UserError:
        if not dry_run:
            raise
    names = {r["gpu_name"] for r in records if r["device"] == "cuda" and r["gpu_name"]}
    if len(names) == 1:
        name = names.pop()
        memories = {r["gpu_memory_bytes"] for r in records if r["gpu_name"] == name}
        print(f"vramcal: no GPU visible; the dry run assumes the {name} of the existing records", file=sys.stderr)
        return name, max(m for m in memories if m) if any(memories) else None
    return None, None


def throughput_line(records: list[dict], wall_s: float) -> str:
    """Ok cases per minute of the measuring phase, and the share of it outside the measured workloads
    (worker starts, imports, model builds and weight initialisation: what `duration_s` does not cover)."""
    ok = sum(r["status"] == "ok" for r in records)
    inside_s = sum(r["duration_s"] for r in records)
    per_min = ok / (wall_s / 60) if wall_s > 0 else 0.0
    outside = 1 - inside_s / wall_s if wall_s > 0 else 0.0
    return (f"throughput: {ok} ok cases in {wall_s:.1f} s = {per_min:.1f} ok cases per device-minute; "
            f"{max(outside, 0.0):.0%} of the time outside the measured workloads "
            f"({inside_s:.1f} s inside)")


def check_sweep_positions(sweep: Sweep, cases: list[Case]) -> list[str]:
    """Every case's context against its model's positions, before anything runs (`check_positions`).

    UserError (one line) when cases exceed the learned position embeddings of their model; returns one
    note per model whose cases go beyond its trained (rotary) positions, for its longest such case."""
    refused: list[tuple[Case, str]] = []
    notes: dict[str, tuple[int, str]] = {}
    for case in cases:
        try:
            note = check_positions(case)
        except UserError as exc:
            refused.append((case, str(exc)))
            continue
        if note and case.context >= notes.get(case.model, (0, ""))[0]:
            notes[case.model] = (case.context, note)
    if refused:
        case, message = refused[0]
        more = f" ({len(refused)} cases, the first: {case.label()})" if len(refused) > 1 else f" ({case.label()})"
        raise UserError(f"{sweep.path}: {message}{more}; lower its contexts in the sweep file")
    return [note for _, note in notes.values()]


def run_sweep(path, *, out=None, device=None, dry_run=False, limit=None, retry_errors=False,
              verbose=False, ray: str | None = None, time_budget_s: float | None = None) -> int:
    """Check, plan and measure a sweep; `ray`: a Ray address ("local" for a new local instance) to run
    its process groups as Ray tasks (`harness.ray_sweep`) instead of one after another here.

    `time_budget_s`: seconds from this call's start after which no case starts (the one in flight is
    measured and recorded; `runner.run_cases`); the sweep then exits 0 with a summary, and a rerun
    resumes the cases left."""
    begun = time.monotonic()
    deadline = None if time_budget_s is None else begun + time_budget_s
    if ray is not None and deadline is not None:
        raise UserError("--time-budget applies to a sweep run here, not with --ray")
    require_extra("jsonschema", "harness")  # the records are validated as read and as written
    if ray is not None:
        from harness import ray_sweep

        ray_sweep.check_ray(ray)  # the ray extra and the address, before anything else
    sweep = load_sweep(path)
    device = device or sweep.device
    out_path = check_output_file(out or sweep.out or f"results/{sweep.name}.jsonl",
                                 "--out" if out else f"{sweep.path}: out")
    cases, left_out = expand(sweep, device)
    for note in check_sweep_positions(sweep, cases):
        print(f"vramcal: note: {note}", file=sys.stderr)
    records = existing_records(out_path)
    pin = None
    if ray is None:
        gpu_name, memory_bytes = gpu_of_this_machine(device, dry_run, records)
    else:  # each task's worker reports the GPU of its node; the driver needs none
        gpu_name, memory_bytes = None, None
        pin = ray_sweep.pinned_type(sweep.gpu, device)
    if memory_bytes is None and device == "cuda" and sweep.gpu:
        from estimator.gpus import find_gpu

        memory_bytes = find_gpu(sweep.gpu).memory_bytes
    if device == "cpu":
        memory_bytes = sweep.memory_limit_bytes
    elif sweep.device_map and memory_bytes:  # the one-GPU estimate against all the GPUs' memory: a rough filter
        memory_bytes *= sweep.gpus
    done = measured_keys(records, retry_errors)
    is_done = ray_sweep.done_rule(done, records, pin) if ray is not None else (lambda c: c.key(gpu_name) in done)
    pending = [case for case in order(cases) if not is_done(case)]
    already = len(cases) - len(pending)
    if pending and not dry_run:
        require_extra("tqdm", "harness")
        from harness.runner import check_cases

        check_cases(pending, echo_stderr=verbose)  # every model builds (meta device) before anything is measured
    flt = EstimateFilter(device, memory_bytes, sweep.skip_over_estimate)
    to_run: list[Case] = []
    estimates: dict[Case, int | None] = {}
    skipped = 0
    for case in pending:
        estimates[case] = flt.estimate_bytes(case)
        reason = flt.skip_reason(estimates[case])
        if reason:
            skipped += 1
            if dry_run:
                print(f"skip   {case.label()}  ({reason})")
            continue
        to_run.append(case)
    if limit is not None:
        to_run = to_run[:limit]
    where = f"on {gpu_name}" if gpu_name else f"on {device}"
    if ray is not None:
        where = f"on Ray ({'a local instance' if ray == 'local' else ray}, {pin or device})"
    print(f"sweep {sweep.name} {where}: {len(cases)} cases, {already} already in {out_path}, {skipped} skipped "
          f"by the estimate, {left_out} impossible combinations left out, {len(to_run)} to run")
    if dry_run:
        for case in to_run:
            print(f"run    {case.label()}  (estimate {format_bytes(estimates.get(case))})")
        return 0
    if not to_run:
        return 0
    from tqdm import tqdm

    from harness.runner import run_cases

    counts = {"ok": 0, "oom": 0, "error": 0}
    started = time.perf_counter()
    cluster = ray_sweep.Cluster(ray, device, pin, verbose) if ray is not None else contextlib.nullcontext()
    with cluster, tqdm(total=len(to_run), unit="case", file=sys.stderr, dynamic_ncols=True,
                       mininterval=0.5) as bar:
        def on_start(case):
            bar.set_postfix_str(f"{counts['ok']} ok {counts['oom']} oom {counts['error']} error | "
                                f"{case.label()[:50]}", refresh=True)

        def on_record(case, rec):
            counts[rec["status"]] += 1
            bar.write(summary_line(case, rec, estimates.get(case)), file=sys.stdout)
            bar.update(1)

        if ray is None:
            measured = run_cases(to_run, out_path, gpu_name=gpu_name, seed=sweep.seed, on_start=on_start,
                                 on_record=on_record, echo_stderr=verbose, deadline=deadline)
        else:
            nodes = cluster.run(to_run, out_path, seed=sweep.seed, on_start=on_start, on_record=on_record)
    print(f"sweep {sweep.name}: {sum(counts.values())} measured ({counts['ok']} ok, {counts['oom']} oom, "
          f"{counts['error']} error) -> {out_path}")
    if ray is None:
        not_started = len(to_run) - len(measured)
        if not_started:
            print(f"sweep {sweep.name}: stopped at the time budget ({time_budget_s:g} s): {not_started} cases "
                  "not started; a rerun resumes them")
        print(throughput_line(measured, time.perf_counter() - started))
    if ray is not None:
        ray_sweep.print_node_summary(nodes, time.perf_counter() - started)
    return 1 if counts["error"] else 0
