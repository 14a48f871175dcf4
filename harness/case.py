"""One measured case: a frozen dataclass built from the command line or a sweep file.

Light at import time (no torch): the parent process of a sweep builds, filters and orders cases
without ever touching the GPU; only the worker subprocess imports torch.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from estimator.errors import UserError
from estimator.records import case_key

DEVICES = ("cuda", "cpu")
WORKLOADS = ("generate", "forward")
CACHES = ("dynamic", "static")
# generate's compilation: "auto" is what transformers 5.17 does (GenerationMixin._valid_auto_compile_criteria:
# on CUDA a compileable cache, i.e. a static one, compiles the decode step with CompileConfig's default mode
# "reduce-overhead", CUDA graphs); "off" passes disable_compile=True (how the reference records were measured)
COMPILES = ("auto", "off")
ATTNS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
DTYPES = {  # accepted spelling -> canonical torch dtype name
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}
# Quantization applied at load time to a checkpoint folder (needs the weights and the library).
# A checkpoint whose config.json carries a `quantization_config` is measured as stored, under its
# `quant_method` name (gptq, awq, fp8, compressed-tensors, ...).
# Names are estimator.quant's canonical ones, so a record's `quantization` maps onto its formats.
LOAD_TIME_QUANTS = ("bnb-int8", "bnb-nf4", "bnb-nf4-nodq", "bnb-fp4", "bnb-fp4-nodq", "fp8-block")
FRAMEWORKS = ("transformers",)
# from_pretrained's device_map strategies (transformers/integrations/accelerate.py check_and_set_device_map)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
MAX_GPUS = 64
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _choice(field: str, value, allowed) -> str:
    if value not in allowed:
        raise UserError(f"{field} {value!r} is not one of: {', '.join(map(str, allowed))}")
    return value


def normalize_dtype(value: str) -> str:
    canonical = DTYPES.get(str(value).lower())
    if canonical is None:
        raise UserError(f"dtype {value!r} is not one of: bfloat16, float16, float32")
    return canonical


@dataclass(frozen=True)
class ModelSource:
    """A model as the user named it: `name` goes into records, `source` is what the worker loads."""

    name: str
    source: str  # absolute config.json path, checkpoint folder, or Hub repo id
    kind: str  # "config" | "checkpoint" | "hub"
    quant_method: str | None = None  # of a pre-quantized checkpoint

    def read_config(self) -> dict:
        """The config.json as stored ({} for a Hub repo id not cached locally)."""
        path = Path(self.source)
        if self.kind == "checkpoint":
            path = path / "config.json"
        if self.kind == "hub" or not path.is_file():
            return {}
        return json.loads(path.read_text())


def _config_dir() -> Path:
    try:
        from estimator.catalogue import CONFIG_DIR

        return Path(CONFIG_DIR)
    except ImportError:  # catalogue not in this checkout yet
        return Path(__file__).resolve().parent.parent / "configs" / "models"


def resolve_model(model: str) -> ModelSource:
    """A catalogue name, a config.json path, a checkpoint folder, or a Hub repo id; UserError otherwise.

    Names follow `estimator.catalogue.load_model`: a path gives its file stem (or its folder's name for
    ``.../config.json`` and for a checkpoint folder), so records of the same config keep one name.
    """
    if not model or not str(model).strip():
        raise UserError("no model given; `vramcal models` lists the catalogue")
    config_dir = _config_dir()
    catalogue_file = config_dir / f"{model.lower()}.json"
    if catalogue_file.is_file():
        return ModelSource(model.lower(), str(catalogue_file.resolve()), "config")
    path = Path(model).expanduser()
    if path.is_file():
        name = path.parent.name if path.name == "config.json" else path.stem
        _read_json(path)
        return ModelSource(name, str(path.resolve()), "config")
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise UserError(f"folder {path} holds no config.json")
        data = _read_json(config)
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        quant = _normalize_quant((data.get("quantization_config") or {}).get("quant_method"), strict=False)
        if not has_weights:
            return ModelSource(path.resolve().name, str(config.resolve()), "config")
        return ModelSource(path.resolve().name, str(path.resolve()), "checkpoint", quant)
    if _REPO_ID.match(model) and not path.exists():
        return ModelSource(model, model, "hub")
    names = sorted(p.stem for p in config_dir.glob("*.json"))
    close = difflib.get_close_matches(model.lower(), names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown model {model!r}{hint} (give a name from configs/models, a config.json, "
                    "a checkpoint folder or a Hugging Face repo id)")


def _normalize_quant(name: str | None, strict: bool = True) -> str | None:
    """estimator.quant's canonical name ("nf4" -> "bnb-nf4"); a stored format it does not know stays."""
    if name is None or str(name).strip().lower() in ("", "none", "null"):
        return None
    try:
        from estimator.quant import normalize_quant
    except ImportError:  # pragma: no cover - estimator.quant not in this checkout
        return str(name)
    try:
        return normalize_quant(name)
    except UserError:
        if strict:
            raise
        return str(name)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read {path} as a JSON config: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a config.json (expected a JSON object)")
    return data


@dataclass(frozen=True)
class Case:
    """One measurement. `prompt_tokens + new_tokens` is the context at the end of the case."""

    model: str  # name written to records
    source: str  # what the worker loads (see ModelSource)
    source_kind: str
    device: str = "cuda"
    dtype: str = "bfloat16"
    attn: str = "sdpa"
    cache: str | None = "dynamic"  # None for forward
    workload: str = "generate"
    batch: int = 1
    prompt_tokens: int = 1008
    new_tokens: int = 16
    quant: str | None = None
    alloc_conf: str = ""
    framework: str = "transformers"
    memory_limit_bytes: int | None = None
    lora: str | None = None  # peft LoRA adapters, canonical text (harness/lora.py: to_text / from_text)
    # Several GPUs: the model placed by from_pretrained(device_map=...) over the first `gpus` CUDA devices
    # (None: the whole model on device 0, as the reference records were measured).
    device_map: str | None = None
    gpus: int = 1
    compile: str = "off"
    # assisted generation (generate(assistant_model=...)): the draft model's source (as `source`) and the
    # candidate tokens per step; or prompt lookup decoding (no second model). harness/assisted.py.
    assistant: str | None = None
    num_assistant_tokens: int | None = None
    prompt_lookup_num_tokens: int | None = None

    def __post_init__(self):
        _choice("device", self.device, DEVICES)
        _choice("workload", self.workload, WORKLOADS)
        _choice("framework", self.framework, FRAMEWORKS)
        _choice("attn", self.attn, ATTNS)
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        for name in ("batch", "prompt_tokens", "new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be an integer, not {value!r}")
        if self.batch < 1:
            raise UserError(f"batch must be >= 1, not {self.batch}")
        if self.prompt_tokens < 1:
            raise UserError(f"the prompt must hold at least one token (context {self.context}, "
                            f"new tokens {self.new_tokens})")
        if self.workload == "forward":
            if self.new_tokens != 0:
                raise UserError("new_tokens must be 0 for workload forward (one pass over the context)")
            if self.cache is not None:
                object.__setattr__(self, "cache", None)
        else:
            if self.new_tokens < 1:
                raise UserError("new_tokens must be >= 1 for workload generate")
            _choice("cache", self.cache, CACHES)
        if self.quant is not None:
            if self.source_kind != "checkpoint":
                raise UserError(f"quantization {self.quant!r} needs a checkpoint folder with weights "
                                f"(model {self.model!r} is a config only)")
        if self.memory_limit_bytes is not None and self.memory_limit_bytes <= 0:
            raise UserError(f"memory_limit_bytes must be > 0, not {self.memory_limit_bytes}")
        if not isinstance(self.alloc_conf, str):
            raise UserError(f"alloc_conf must be a string, not {self.alloc_conf!r}")
        from estimator.alloc_conf import parse_alloc_conf

        # strict, as torch parses it, and canonical: the record's alloc_conf is what the estimator reads
        object.__setattr__(self, "alloc_conf", parse_alloc_conf(self.alloc_conf).text)
        if self.assistant is not None or self.prompt_lookup_num_tokens is not None or self.num_assistant_tokens:
            from harness.assisted import check_case

            check_case(self)
        if self.lora is not None:  # canonical, and checked before anything runs
            from harness.lora import from_text, to_text

            object.__setattr__(self, "lora", to_text(from_text(self.lora)))
        if self.device == "cpu":  # the CUDA allocator's config means nothing on the CPU
            object.__setattr__(self, "alloc_conf", "")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or not 1 <= self.gpus <= MAX_GPUS:
            raise UserError(f"gpus must be an integer from 1 to {MAX_GPUS}, not {self.gpus!r}")
        if self.device_map is not None:
            _choice("device_map", self.device_map, DEVICE_MAPS)
            if self.device != "cuda":
                raise UserError("device_map places a model on GPUs; it needs device cuda")
            if self.memory_limit_bytes is not None:
                raise UserError("memory_limit_bytes caps one GPU; it does not apply to a device_map case")
        elif self.gpus > 1:
            raise UserError(f"gpus {self.gpus} needs a device_map (auto, balanced, balanced_low_0 or sequential)")
        _choice("compile", self.compile, COMPILES)
        if self.workload == "forward":  # one model call, no generate: nothing to compile
            object.__setattr__(self, "compile", "off")

    @classmethod
    def make(cls, model: str, *, context: int, new_tokens: int | None = None, workload: str = "generate",
             quant: str | None = None, **kw) -> Case:
        """From a model as the user names it and a context (prompt + new tokens)."""
        src = resolve_model(model)
        _choice("workload", workload, WORKLOADS)
        if new_tokens is None:
            new_tokens = 16 if workload == "generate" else 0
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise UserError(f"context must be a positive integer, not {context!r}")
        if workload == "generate" and context <= new_tokens:
            raise UserError(f"context {context} must exceed new_tokens {new_tokens} "
                            "(context = prompt + new tokens)")
        quant = _normalize_quant(quant)
        if quant is not None:
            _choice("quant", quant, LOAD_TIME_QUANTS)
            if src.quant_method:
                raise UserError(f"{src.source} is already quantized ({src.quant_method}); drop --quant")
        quant = quant or src.quant_method
        if workload == "forward":
            kw["cache"] = None
        return cls(model=src.name, source=src.source, source_kind=src.kind, workload=workload,
                   prompt_tokens=context - new_tokens, new_tokens=new_tokens, quant=quant, **kw)

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.new_tokens

    def record_fields(self, gpu_name: str | None = None) -> dict:
        """The record fields that describe this case (the case key's fields)."""
        return {
            "model": self.model,
            "framework": self.framework,
            "device": self.device,
            "gpu_name": gpu_name if self.device == "cuda" else None,
            "dtype": self.dtype,
            "quantization": self.quant,
            "attn_implementation": self.attn,
            "cache_implementation": self.cache,
            "workload": self.workload,
            "batch_size": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "alloc_conf": self.alloc_conf,
            **({"lora": self.lora} if self.lora else {}),
            **({"device_map": self.device_map, "gpus": self.gpus} if self.device_map else {}),
            "compile": self.compile,
            **_assisted_fields(self),
        }

    def key(self, gpu_name: str | None = None) -> str:
        return case_key(self.record_fields(gpu_name))

    # A worker process serves one (device, alloc_conf, model): the allocator config is fixed at CUDA
    # init, and one process per model is how the reference records were measured.
    # A case that may compile on CUDA gets a process of its own: compiled graphs and their memory pools
    # outlive the case (NVML grew from 15.8 to 33.7 GiB over four later cases in one process, issue 11).
    def process_group(self) -> tuple:
        alone = (self.key(),) if self.compile == "auto" and self.device == "cuda" else ()
        return (self.device, self.alloc_conf, self.framework, self.model, self.source, self.memory_limit_bytes,
                self.gpus if self.device_map else 0) + alone

    # Within a process the model is built once per (dtype, attention, quantization).
    def build_group(self) -> tuple:
        return (self.quant or "", self.dtype, self.attn, self.lora or "", self.device_map or "", self.assistant or "")

    def label(self) -> str:
        """Short human description for progress lines."""
        tokens = f"{self.prompt_tokens}+{self.new_tokens}" if self.workload == "generate" else f"{self.prompt_tokens}"
        parts = [self.model, self.dtype, self.attn, self.workload]
        if self.cache and self.cache != "dynamic":
            parts.append(self.cache)
        if self.quant:
            parts.append(self.quant)
        parts += [f"b{self.batch}", tokens]
        if self.alloc_conf:
            parts.append(f"[{self.alloc_conf}]")
        if self.lora:
            parts.append(f"lora {self.lora}")
        if self.device_map:
            parts.append(f"device_map={self.device_map}x{self.gpus}")
        if self.compile == "auto":
            parts.append("compile:auto")
        if self.assistant:
            parts.append(f"assistant {Path(self.assistant).stem} k{self.num_assistant_tokens}")
        if self.prompt_lookup_num_tokens:
            parts.append(f"prompt-lookup {self.prompt_lookup_num_tokens}")
        return " ".join(parts)

    def read_config(self) -> dict:
        """The config.json as stored, for records of cases whose model was never built."""
        try:
            return ModelSource(self.model, self.source, self.source_kind).read_config()
        except (OSError, ValueError):
            return {}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Case:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _assisted_fields(case: Case) -> dict:
    from harness.assisted import record_fields

    return record_fields(case)


def _positions_of(case: Case) -> tuple[str | None, int | None]:
    """(model_type, max positions) of the case's model: the estimator's ModelSpec where it reads the
    config, else the config as stored (a family the estimator does not model is still measured)."""
    try:
        from estimator.catalogue import load_model

        spec = load_model(case.source)
        return spec.model_type, spec.max_position_embeddings
    except Exception:  # noqa: BLE001 - the stored config answers the two fields, whatever the estimator says
        config = case.read_config()
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for cfg in (config, text):
        for key in ("max_position_embeddings", "n_positions"):
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return cfg.get("model_type") or config.get("model_type"), value
    return config.get("model_type"), None


def check_positions(case: Case) -> str | None:
    """``estimator.positions.check_context`` for a case, before it runs: UserError (one line) for a context
    a model with learned absolute position embeddings cannot run (GPT-2 at 5,000 tokens dies with an
    IndexError); a one-line note for a context beyond a rotary model's trained positions (it runs, and
    its memory is what a record measures); None within the positions."""
    from estimator.positions import check_context

    model_type, positions = _positions_of(case)
    return check_context(model_type, positions, case.context, case.model)


def default_alloc_conf() -> str:
    """The allocator config this process would hand to CUDA (new name first, as torch reads it)."""
    return os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or ""
