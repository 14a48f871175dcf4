"""Hugging Face transformers: build a model and run `generate` or one full-logit forward pass.

Random weights from a config are built directly on the device (`with torch.device(...)`): memory does
not depend on weight values. A checkpoint folder is loaded with `from_pretrained`, quantized at load
time when the case asks for it.

`case.compile`: "off" runs static caches eagerly (`disable_compile=True`, as the reference records);
"auto" leaves the choice to transformers (`GenerationMixin._valid_auto_compile_criteria`: on CUDA with a
compileable cache it compiles the decode step, mode "reduce-overhead", CUDA graphs), and `Run.compiled` says
whether it did: `get_compiled_call` keeps the compiled callable as `model._compiled_call`, dropped here
before each generate so that its presence after it means this case compiled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

NAME = "transformers"


def version() -> str:
    import transformers

    return transformers.__version__


def _torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_config(case):
    """The `PretrainedConfig` of a case's config.json file, checkpoint folder or Hub repo id."""
    from transformers import AutoConfig

    if case.source_kind == "config":
        with open(case.source, encoding="utf-8") as handle:
            data = json.load(handle)
        model_type = data.pop("model_type", None)
        if not model_type:
            raise ValueError(f"{case.source} has no model_type")
        return AutoConfig.for_model(model_type, **data)
    return AutoConfig.from_pretrained(case.source)


def _quantization_config(quant: str, dtype):
    import transformers

    if quant == "bnb-int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    if quant.startswith(("bnb-nf4", "bnb-fp4")):  # "-nodq": without double quantization
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant[4:7], bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=not quant.endswith("-nodq"),
        )
    if quant == "fp8-block":  # e4m3 weights, one fp32 scale per 128x128 block
        return transformers.FineGrainedFP8Config()
    raise ValueError(f"no load-time quantization {quant!r}")


def check(case) -> None:
    """Build the case's model on the meta device (shapes only: no memory, no GPU): raises what a real
    build raises for a config it cannot build (an unknown model_type, head sizes that do not divide, an
    attention implementation this install lacks). A checkpoint folder is checked by its config: its
    weights and load-time quantization are read by the real build."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if case.source_kind == "checkpoint":
        AutoConfig.from_pretrained(case.source)
        return
    config = load_config(case)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(case.dtype), attn_implementation=case.attn)


def build(case, device: str):
    """The model on `device`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = _torch_dtype(case.dtype)
    if getattr(case, "device_map", None):  # several GPUs: placed as from_pretrained(device_map=...) places it
        from harness import multigpu

        return multigpu.build(case, load_config, dtype)
    if case.source_kind == "checkpoint":
        kwargs = {"dtype": dtype, "attn_implementation": case.attn, "device_map": device}
        stored = json.loads(open(f"{case.source}/config.json", encoding="utf-8").read())
        if case.quant and not stored.get("quantization_config"):
            kwargs["quantization_config"] = _quantization_config(case.quant, dtype)
        model = AutoModelForCausalLM.from_pretrained(case.source, **kwargs)
    else:
        config = load_config(case)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=case.attn)
    if getattr(case, "lora", None):  # peft LoRA adapters on the built model (harness/lora.py)
        from harness.lora import apply_lora, from_text

        model = apply_lora(model, from_text(case.lora))
    if getattr(case, "assistant", None):  # assisted generation: the draft model, held beside it
        from harness.assisted import attach, build_assistant

        attach(model, build_assistant(case, device, build).eval())
    return model.eval()


def weights_bytes(model) -> int:
    """Parameters + buffers, numel x element size (tied weights count once)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return int(params + buffers)


def config_dict(model) -> dict:
    # to_dict() can hold dtypes and other non-JSON values; a record must be plain JSON
    return json.loads(json.dumps(model.config.to_dict(), default=str))


@dataclass
class Run:
    output: object  # kept alive until the caller has read device memory
    kv_cache_bytes: int | None
    cache_class: str | None
    compiled: bool = False  # transformers compiled the decode step (case.compile "auto" on CUDA, static cache)


def run(model, case, device: str, seed: int = 0) -> Run:
    """`generate`: prefill `prompt_tokens`, then exactly `new_tokens` greedy steps; `forward`: one pass
    with `use_cache=False` and logits for every position. Inputs are random token ids (batch, prompt)."""
    import torch

    torch.manual_seed(seed)
    vocab = int(getattr(model.config.get_text_config(), "vocab_size", 0) or 32000)
    with torch.no_grad():
        input_ids = torch.randint(0, vocab, (case.batch, case.prompt_tokens), device=device)
        if case.workload == "forward":
            output = model(input_ids, use_cache=False)
            return Run(output, None, None)
        attention_mask = torch.ones_like(input_ids)
        generation_config = model.generation_config
        pad = generation_config.pad_token_id
        if pad is None:
            eos = generation_config.eos_token_id
            pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        model.__dict__.pop("_compiled_call", None)
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=case.new_tokens,
            min_new_tokens=case.new_tokens,
            do_sample=False,
            num_beams=1,
            # assisted: the draft's generate gets the main's config, and a cache_implementation beside its
            # own past_key_values is refused; a DynamicCache is both generates' default anyway
            cache_implementation=None if _assisted_kwargs(model, case) else case.cache,
            disable_compile=getattr(case, "compile", "off") != "auto",
            return_dict_in_generate=True,
            pad_token_id=pad,
            **_assisted_kwargs(model, case),
        )
    produced = output.sequences.shape[-1] - case.prompt_tokens
    if produced != case.new_tokens:
        raise RuntimeError(f"generate produced {produced} new tokens, not {case.new_tokens}")
    compiled = "_compiled_call" in model.__dict__
    cache = getattr(output, "past_key_values", None)
    if cache is None:
        return Run(output, None, None, compiled)
    return Run(output, cache_bytes(cache), type(cache).__name__, compiled)


def _assisted_kwargs(model, case) -> dict:
    from harness.assisted import generate_kwargs

    return generate_kwargs(model, case)


def cache_bytes(cache) -> int:
    """Storage bytes of every tensor a cache object holds (its layers' keys, values, states, counters);
    a storage shared by several tensors counts once."""
    import torch

    seen_objects: set[int] = set()
    storages: dict[tuple, int] = {}

    def visit(obj, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[(obj.device.type, obj.device.index, storage.data_ptr(), storage.nbytes())] = storage.nbytes()
            return
        if depth > 4 or id(obj) in seen_objects or isinstance(obj, (str, bytes, int, float, bool, torch.nn.Module)):
            return
        seen_objects.add(id(obj))
        if isinstance(obj, dict):
            values = obj.values()
        elif isinstance(obj, (list, tuple)):
            values = obj
        elif hasattr(obj, "__dict__"):
            values = vars(obj).values()
        else:
            return
        for value in values:
            visit(value, depth + 1)

    visit(cache, 0)
    return int(sum(storages.values()))
