"""LoRA adapters as peft holds and runs them: exact adapter weights, and the extra tensors of their forward.

What peft 0.21 does (``peft/tuners/lora/layer.py``, ``peft/tuners/tuners_utils.py``), modelled here:

- ``LoraLayer.update_layer`` gives every targeted ``nn.Linear`` (out x in) per adapter ``lora_A`` (r x in)
  and ``lora_B`` (out x r), no biases (``lora_bias=False``, the default); DoRA adds
  ``lora_magnitude_vector`` (out). ``modules_to_save`` (``ModulesToSaveWrapper``) keeps the original
  module and one deep copy per adapter, at the model's dtype.
- ``get_peft_model`` / ``PeftModel.from_pretrained`` default to ``autocast_adapter_dtype=True``:
  ``cast_adapter_dtype`` upcasts bf16/fp16 adapter weights to float32, so the adapter dtype is float32
  unless asked otherwise (``--lora-dtype``: ``autocast_adapter_dtype=False`` keeps the model's dtype).
- ``Linear.forward`` (unmerged): ``result = base_layer(x)``; for each *active* adapter
  ``x = _cast_input_dtype(x, lora_A.weight.dtype)`` (a copy when the dtypes differ),
  ``result = result + lora_B(lora_A(dropout(x))) * scaling`` (dropout is ``nn.Identity`` at
  ``lora_dropout=0``), then ``result.to(torch_result_dtype)`` (a copy when the sum was promoted).
  Loaded but inactive adapters cost weights only.
- merged (``merge_and_unload``): the LoRA layers are gone and the base weights changed in place: no
  extra memory in the run (the merge's own transient, B @ A per layer, happens at load, before the run).

The replay (``estimator/replay/attention.py``, ``blocks.py``) calls ``linear`` at each projection marked ``# LoRA hook``.
Modelled: the Llama-style layout (separate q/k/v/o and gate/up/down projections) of the families whose
transformers code uses it; other layouts, quantized bases and DoRA's unmerged forward are refused with
one line rather than estimated wrongly.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from estimator.dtypes import COMPUTE_DTYPES, dtype_bytes, normalize_dtype
from estimator.errors import UserError

# peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (peft/utils/constants.py) for the Llama-style
# families: q_proj and v_proj.
DEFAULT_TARGETS = ("q_proj", "v_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
# peft's "all-linear": every linear but the output layer (peft/tuners/tuners_utils.py, _maybe_include_all_linear_layers)
ALL_LINEAR = "all-linear"
SAVE_MODULES = ("lm_head", "embed_tokens")  # modules_to_save copies vramcal can size: (vocab x hidden) each
MAX_ADAPTERS = 4096
MAX_RANK = 65536


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters loaded on a model. ``ranks``: (target, rank) per targeted projection name.

    ``adapters`` are loaded; one is active (peft's ``set_adapter``), the others cost weights only.
    ``dtype``: the adapters' in-memory dtype (peft's autocast default: float32).
    ``stored_params``: exact element counts read from an adapter file (lora A/B + DoRA magnitudes, and the
    modules_to_save copies), else None (counted from the model's shapes).
    """

    ranks: tuple[tuple[str, int], ...]
    adapters: int = 1
    dtype: str = "float32"
    use_dora: bool = False
    merged: bool = False
    modules_to_save: tuple[str, ...] = ()
    stored_params: int | None = None
    stored_save_params: int | None = None
    source: str | None = None  # the adapter folder it was read from

    def __post_init__(self):
        if not self.ranks:
            raise UserError("--lora-targets names no projection")
        for name, r in self.ranks:
            if name not in TARGETS:
                raise UserError(f"LoRA target {name!r} is not one vramcal models; allowed: "
                                f"{', '.join(TARGETS)} or {ALL_LINEAR}")
            if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
                raise UserError(f"--lora-rank must be an integer in 1..{MAX_RANK}, got {r!r}")
        if not isinstance(self.adapters, int) or not 1 <= self.adapters <= MAX_ADAPTERS:
            raise UserError(f"--lora-adapters must be an integer in 1..{MAX_ADAPTERS}, got {self.adapters!r}")
        dtype = normalize_dtype(self.dtype)
        if dtype not in COMPUTE_DTYPES:
            raise UserError(f"--lora-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        for name in self.modules_to_save:
            if name not in SAVE_MODULES:
                raise UserError(f"modules_to_save {name!r}: vramcal sizes {', '.join(SAVE_MODULES)} only")

    @classmethod
    def make(cls, rank: int, targets=None, adapters: int = 1, dtype: str = "float32", use_dora: bool = False,
             merged: bool = False, modules_to_save=()) -> "LoraSpec":
        names = parse_targets(targets)
        return cls(tuple((n, rank) for n in names), adapters, dtype, use_dora, merged, tuple(modules_to_save))

    def rank(self, target: str) -> int | None:
        return dict(self.ranks).get(target)

    def as_dict(self) -> dict:
        return {"ranks": dict(self.ranks), "adapters": self.adapters, "dtype": self.dtype,
                "use_dora": self.use_dora, "merged": self.merged, "modules_to_save": list(self.modules_to_save),
                "source": self.source}


def parse_targets(targets) -> tuple[str, ...]:
    """``q_proj,v_proj`` / a sequence / ``all-linear`` / None (peft's default) -> projection names."""
    if targets is None:
        return DEFAULT_TARGETS
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = list(targets)
    if names == [ALL_LINEAR]:
        return TARGETS
    for n in names:
        if n not in TARGETS:
            import difflib

            close = difflib.get_close_matches(n, TARGETS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"--lora-targets: unknown projection {n!r}{hint}; allowed: {', '.join(TARGETS)} "
                            f"or {ALL_LINEAR}")
    return tuple(dict.fromkeys(names))


# ---- the model's projections --------------------------------------------------------------------------
def check_supported(spec, lora: LoraSpec, quant: str | None = None) -> None:
    """Raise a UserError where the replay does not model these adapters on this model."""
    from estimator.replay.layouts import layout

    lay = layout(spec.model_type)
    if quant:
        raise UserError(f"LoRA on {quant} weights (QLoRA) is not modelled; estimate it unquantized (--quant none) "
                        "or merged into a quantized checkpoint")
    if lay.fused_qkv or lay.fused_gate_up or lay.gated_attention or lay.learned_positions:
        raise UserError(f"LoRA on {spec.model_type}: its fused projections are not modelled; vramcal models "
                        "LoRA on the Llama-style layout (llama, qwen2/3, mistral, gemma...)")
    if lora.use_dora and not lora.merged:
        raise UserError("DoRA's unmerged forward (weight norms of W + BA per call) is not modelled; "
                        "estimate it merged (--lora-merge), which costs no extra memory")
    names = {n for n, _ in lora.ranks}
    for layer in spec.layers:
        if names & set(ATTENTION_TARGETS) and layer.attention.kind not in ("full", "sliding"):
            raise UserError(f"LoRA on {spec.model_type}'s {layer.attention.kind} attention layers is not modelled; "
                            "target the MLP only")
        if names & set(MLP_TARGETS) and not (layer.mlp.kind == "dense" and layer.mlp.gated):
            raise UserError(f"LoRA on {spec.model_type}'s {layer.mlp.kind} MLP is not modelled; target the "
                            "attention projections only")


def projections(spec) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every targetable projection, layer by layer, in module order."""
    H = spec.hidden_size
    out = []
    for layer in spec.layers:
        att, m = layer.attention, layer.mlp
        if att.kind in ("full", "sliding"):
            nh, nkv, d = att.num_heads, att.num_kv_heads or att.num_heads, att.head_dim
            dv = att.v_head_dim or d
            out += [("q_proj", H, nh * d), ("k_proj", H, nkv * d), ("v_proj", H, nkv * dv), ("o_proj", nh * dv, H)]
        if m.kind == "dense" and m.gated:
            out += [("gate_proj", H, m.intermediate_size), ("up_proj", H, m.intermediate_size),
                    ("down_proj", m.intermediate_size, H)]
    return out


def parameter_elems(spec, lora: LoraSpec) -> list[int]:
    """Elements of each adapter tensor in the order peft creates them (per adapter: per targeted layer
    lora_A, lora_B, DoRA magnitude; then the modules_to_save copy)."""
    out = []
    for _ in range(lora.adapters):
        for name, fin, fout in projections(spec):
            r = lora.rank(name)
            if r is None:
                continue
            out += [r * fin, fout * r] + ([fout] if lora.use_dora else [])
    return out


def save_elems(spec, lora: LoraSpec) -> int:
    """Elements of the modules_to_save copies (one per adapter; each an (vocab x hidden) matrix)."""
    if lora.stored_save_params is not None:
        return lora.stored_save_params * lora.adapters
    return len(lora.modules_to_save) * spec.vocab_size * spec.hidden_size * lora.adapters


def weight_bytes(spec, lora: LoraSpec | None, model_dtype: str) -> int:
    """Bytes the adapters add to the weights: 0 when merged; A/B (+ DoRA) at the adapter dtype, copies of
    modules_to_save at the model's dtype."""
    if lora is None or lora.merged:
        return 0
    adapter = lora.stored_params * lora.adapters if lora.stored_params is not None else sum(parameter_elems(spec, lora))
    return int(adapter * dtype_bytes(lora.dtype) + save_elems(spec, lora) * dtype_bytes(model_dtype))


def parameter_bytes(spec, lora: LoraSpec | None, model_dtype: str) -> list[int]:
    """Bytes of each adapter tensor in creation order (the allocator's state after loading)."""
    if lora is None or lora.merged:
        return []
    b = dtype_bytes(lora.dtype)
    out = [int(n * b) for n in parameter_elems(spec, lora)]
    if lora.modules_to_save:
        out += [int(spec.vocab_size * spec.hidden_size * dtype_bytes(model_dtype))] * (
            len(lora.modules_to_save) * lora.adapters)
    return out


# ---- a measured case's LoRA as one line of text (harness/case.py, records, sweep files) ----------------
def to_text(lora: LoraSpec | None) -> str | None:
    """``r8:q_proj+v_proj:x3:float32[:dora][:merged]`` (``--lora PATH``: ``path=<folder>:x3:float32``)."""
    if lora is None:
        return None
    if lora.source:
        head = f"path={lora.source}"
    else:
        ranks = {r for _, r in lora.ranks}
        if len(ranks) != 1:
            raise UserError("a measured LoRA case takes one rank for all targets")
        head = f"r{ranks.pop()}:{'+'.join(n for n, _ in lora.ranks)}"
    tail = [f"x{lora.adapters}", lora.dtype] + (["dora"] if lora.use_dora else []) + (["merged"] if lora.merged else [])
    if lora.modules_to_save:
        tail.append("save=" + "+".join(lora.modules_to_save))
    return ":".join([head] + tail)


def from_text(text: str | None) -> LoraSpec | None:
    if not text:
        return None
    parts = str(text).split(":")
    head, rest = parts[0], parts[1:]
    if head.startswith("path="):
        path = head.removeprefix("path=")
        while rest and not rest[0].startswith("x"):  # a path with ':' in it
            path += ":" + rest.pop(0)
        adapters = int(rest[0][1:]) if rest else 1
        return read_adapter(path, adapters, rest[1] if len(rest) > 1 else None, "merged" in rest)
    try:
        rank = int(head.removeprefix("r"))
        targets = parse_targets(rest[0].replace("+", ","))
        adapters = int(rest[1].removeprefix("x"))
        dtype = rest[2]
    except (ValueError, IndexError):
        raise UserError(f"lora {text!r}: expected r<rank>:<target>+<target>:x<adapters>:<dtype>, "
                        "e.g. r8:q_proj+v_proj:x1:float32") from None
    save = next((p.removeprefix("save=").split("+") for p in rest if p.startswith("save=")), ())
    return LoraSpec.make(rank, targets, adapters, dtype, "dora" in rest, "merged" in rest, tuple(save))



# ---- the replay's hook --------------------------------------------------------------------------------
def linear(run, name: str, rows: int, fin: int, fout: int, y):
    """peft ``Linear.forward`` of the active adapter on ``rows`` tokens, after the base output ``y``
    (rows x fout at the model's dtype) exists; the input (rows x fin) is alive. Returns the result block.

    ``run`` is the replay's ``_Run``: its tape ``t``, activation bytes ``a``, workload ``w``."""
    lora = run.w.lora
    r = lora.rank(name)
    if r is None or lora.merged:
        return y
    t, a, model = run.t, run.a, run.w.dtype
    L = dtype_bytes(lora.dtype)
    xc = t.new(rows * fin * L) if lora.dtype != model else None  # _cast_input_dtype
    xa = t.new(rows * r * L)  # lora_A(x)
    xb = t.new(rows * fout * L)  # lora_B(.)
    t.free(xa)
    s = t.new(rows * fout * L)  # * scaling
    t.free(xb)
    summed = model if lora.dtype == model else "float32"  # type promotion among float32/bfloat16/float16
    out = t.new(rows * fout * dtype_bytes(summed))  # result + ...
    t.free(s, y)
    if summed != model:
        cast = t.new(rows * fout * a)  # result.to(torch_result_dtype)
        t.free(out)
        out = cast
    t.free(xc)
    return out


# ---- an adapter folder ---------------------------------------------------------------------------------
def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file: an 8-byte little-endian length, then that many bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 2**20:
                raise UserError(f"{path}: not a safetensors file (header length {n:,})")
            raw = f.read(n)
        header = json.loads(raw)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def read_adapter(path: str, adapters: int = 1, dtype: str | None = None, merged: bool = False) -> LoraSpec:
    """A LoraSpec from a peft adapter folder: ``adapter_config.json`` and ``adapter_model.safetensors``.

    Ranks come from the lora_A shapes (rank_pattern included), element counts from the header. The
    in-memory dtype is ``dtype``, else float32 (peft's autocast on load)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"--lora {path}: not a folder (expected a peft adapter folder with adapter_config.json)")
    cfg_path = folder / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except OSError:
        raise UserError(f"--lora {path}: no readable adapter_config.json in it") from None
    except ValueError:
        raise UserError(f"--lora {path}: adapter_config.json is not valid JSON") from None
    if not isinstance(cfg, dict) or str(cfg.get("peft_type", "")).upper() != "LORA":
        raise UserError(f"--lora {path}: adapter_config.json is not a LoRA adapter (peft_type "
                        f"{cfg.get('peft_type') if isinstance(cfg, dict) else None!r})")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"--lora {path}: no adapter_model.safetensors (a .bin adapter: convert it to safetensors)")
    header = safetensors_header(weights)
    ranks: dict[str, int] = {}
    adapter_elems = save_elems_ = 0
    saves: set[str] = set()
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or "shape" not in info:
            raise UserError(f"{weights}: tensor {key!r} has no shape in the header")
        n = _numel(info["shape"])
        parts = key.split(".")
        if "lora_A" in parts or "lora_B" in parts or "lora_magnitude_vector" in parts:
            marker = next(i for i, p in enumerate(parts) if p.startswith("lora_"))
            target = parts[marker - 1]
            if target not in TARGETS:
                raise UserError(f"--lora {path}: adapter on {target!r}, which vramcal does not model "
                                f"(it models {', '.join(TARGETS)})")
            if parts[marker] == "lora_A":
                ranks[target] = max(ranks.get(target, 0), int(info["shape"][0]))
            adapter_elems += n
        else:  # a modules_to_save copy: base_model.model.lm_head.weight
            module = next((m for m in SAVE_MODULES if m in parts), None)
            if module is None:
                raise UserError(f"--lora {path}: tensor {key!r} is neither a LoRA matrix nor a module vramcal sizes")
            saves.add(module)
            save_elems_ += n
    if not ranks:
        raise UserError(f"--lora {path}: adapter_model.safetensors holds no lora_A/lora_B tensors")
    spec = LoraSpec(tuple(sorted(ranks.items(), key=lambda kv: TARGETS.index(kv[0]))), adapters,
                    dtype or "float32", bool(cfg.get("use_dora")), merged, tuple(sorted(saves)),
                    stored_params=adapter_elems, stored_save_params=save_elems_, source=str(folder))
    return spec


def from_args(args) -> LoraSpec | None:
    """The LoraSpec the CLI options describe (``--lora PATH`` or ``--lora-rank R``), or None."""
    path, rank = getattr(args, "lora", None), getattr(args, "lora_rank", None)
    extra = [f"--{n.replace('_', '-')}" for n in ("lora_targets", "lora_adapters", "lora_dtype", "lora_merge")
             if getattr(args, n, None) not in (None, False)]
    if path is None and rank is None:
        if extra:
            raise UserError(f"{extra[0]} needs --lora-rank R or --lora PATH")
        return None
    if path is not None and rank is not None:
        raise UserError("give --lora PATH or --lora-rank R, not both (the folder states its ranks)")
    adapters = getattr(args, "lora_adapters", None) or 1
    if path is not None:
        if getattr(args, "lora_targets", None):
            raise UserError("--lora-targets with --lora PATH: the adapter folder states its targets")
        return read_adapter(path, adapters, getattr(args, "lora_dtype", None), bool(getattr(args, "lora_merge", False)))
    return LoraSpec.make(rank, getattr(args, "lora_targets", None), adapters, getattr(args, "lora_dtype", None) or "float32",
                         merged=bool(getattr(args, "lora_merge", False)))


def add_args(p) -> None:
    """The LoRA options of ``estimate``, ``max-context``, ``max-batch`` (and the harness's ``measure``)."""
    from estimator.cli import positive_int

    g = p.add_argument_group("LoRA adapters (peft)")
    g.add_argument("--lora", default=None, metavar="PATH", help="a peft adapter folder (adapter_config.json + "
                   "adapter_model.safetensors)")
    g.add_argument("--lora-rank", type=positive_int, default=None, metavar="R", help="LoRA rank of every target")
    g.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help=f"projections adapted, comma-separated, or {ALL_LINEAR} (default: peft's q_proj,v_proj)")
    g.add_argument("--lora-adapters", type=positive_int, default=None, metavar="N",
                   help="adapters loaded (one active; the others cost weights only; default 1)")
    g.add_argument("--lora-dtype", default=None, metavar="D",
                   help="adapter dtype in memory (default float32: peft upcasts bf16/fp16 adapters on load)")
    g.add_argument("--lora-merge", action="store_true", help="merged into the base weights (merge_and_unload)")


# ---- what the estimate says about it -------------------------------------------------------------------
# No GPU measurement with adapters yet: the adapters' forward is replayed from peft's code and checked
# against traced and measured CPU runs (tests/harness/test_lora_estimate.py), not calibrated on a GPU, so
# each end of the interval moves out by this fraction of the adapter activations (the weights are exact).
LORA_WIDEN = 0.25


def note(lora: LoraSpec, f) -> tuple[str, int]:
    """(the estimate's note on the adapters, bytes to widen the interval by at each end)."""
    what = f"{lora.adapters} LoRA adapter{'s' if lora.adapters > 1 else ''}"
    ranks = ", ".join(f"{n} r{r}" for n, r in lora.ranks)
    if lora.merged:
        return f"{what} merged into the base weights ({ranks}): no extra memory in the run", 0
    widen = round(LORA_WIDEN * f.get("lora_activation_bytes", 0))
    active = " (1 active, the others weights only)" if lora.adapters > 1 else ""
    return (f"{what}{active}: {ranks}, {lora.dtype}; adapter weights exact, peft's unmerged forward not yet "
            f"measured on a GPU: interval widened by {LORA_WIDEN:.0%} of the adapter activations "
            f"({widen / 2**20:,.1f} MiB)"), widen


def table_rows(est) -> list[tuple[str, int]]:
    """The estimate table's rows: the adapters' weights and activations as rows of their own."""
    f = est.features
    if "lora_weights_bytes" not in f:
        return [("weights", est.weights_bytes), ("KV cache", est.kv_cache_bytes),
                ("activations", est.activation_bytes), ("overhead", est.overhead_bytes), ("total", est.total_bytes)]
    w, act = f["lora_weights_bytes"], f["lora_activation_bytes"]
    return [("weights", est.weights_bytes - w), ("adapter weights", w), ("KV cache", est.kv_cache_bytes),
            ("activations", est.activation_bytes - act), ("adapter activations", act),
            ("overhead", est.overhead_bytes), ("total", est.total_bytes)]
