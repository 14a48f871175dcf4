"""LoRA adapters on a real (or fake-tensor) transformers model, with peft: what the trace and the harness run.

``apply_lora(model, lora)`` wraps the model as peft does for inference: ``get_peft_model`` with the
adapter's ``LoraConfig`` (dropout 0, no bias; ``autocast_adapter_dtype`` as ``lora.dtype`` asks), one
more ``add_adapter`` per extra adapter (loaded, inactive: peft keeps ``default`` active), then
``merge_and_unload`` when merged. It returns the transformers model itself, with the LoRA layers
injected in place (``PeftModel.get_base_model()``), so ``generate`` and the trace driver run it as they
run any model. An adapter folder (``--lora PATH``) is loaded with ``PeftModel.from_pretrained`` for a real
model; under fake tensors its config's shapes are built instead (same tensors, no values).

A case's LoRA travels as one canonical string (``to_text`` / ``from_text``), so a Case stays a flat,
hashable record of scalars and the record key tells LoRA cases apart.
"""

from __future__ import annotations

import contextlib

from estimator.errors import require_extra
from estimator.lora import LoraSpec, from_text, to_text  # noqa: F401 - the case text lives in estimator.lora


def lora_config(lora: LoraSpec):
    peft = require_extra("peft", "harness")
    targets = [n for n, _ in lora.ranks]
    rank = max(r for _, r in lora.ranks)
    pattern = {n: r for n, r in lora.ranks if r != rank}
    return peft.LoraConfig(r=rank, target_modules=targets, rank_pattern=pattern, lora_dropout=0.0, bias="none",
                           use_dora=lora.use_dora, modules_to_save=list(lora.modules_to_save) or None)


def apply_lora(model, lora: LoraSpec | None, fake_mode=None):
    """The model with ``lora`` applied as peft applies it (see the module docstring)."""
    if lora is None:
        return model
    import torch

    peft = require_extra("peft", "harness")
    model_dtype = next(model.parameters()).dtype
    want = getattr(torch, lora.dtype)
    # autocast_adapter_dtype=True upcasts bf16/fp16 adapters to float32 (peft.tuners.tuners_utils.cast_adapter_dtype)
    autocast = want == torch.float32 and model_dtype != torch.float32
    with _fake_safe_moves(fake_mode):
        pm = _wrap(peft, model, lora, autocast, fake_mode is not None)
    if not autocast and want != model_dtype:  # an adapter dtype other than the model's and float32's rule
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(want)
    pm.eval()
    if lora.merged:
        return pm.merge_and_unload()
    return pm.get_base_model()


def _wrap(peft, model, lora: LoraSpec, autocast: bool, fake: bool):
    if lora.source and not fake:
        pm = peft.PeftModel.from_pretrained(model, lora.source, autocast_adapter_dtype=autocast)
        config = pm.peft_config["default"]
    else:
        config = lora_config(lora)
        pm = peft.get_peft_model(model, config, autocast_adapter_dtype=autocast)
    for i in range(1, lora.adapters):
        pm.add_adapter(f"adapter{i}", config, autocast_adapter_dtype=autocast)
    return pm


@contextlib.contextmanager
def _fake_safe_moves(fake_mode):
    """Under FakeTensorMode, ``nn.Module.to`` must ``swap_tensors`` a fake parameter (``Module._apply``),
    and ``swap_tensors`` refuses a tensor with a weak reference ("Couldn't swap Linear.weight"). The
    fake mode's ``MetaConverter.tensor_memo`` (a WeakValueDictionary of the fakes it converted from real
    tensors: peft's init constants) holds such references when peft moves a new adapter to the base
    layer's device and dtype. The memo is a cache: emptied before each swap, the move goes through."""
    if fake_mode is None:
        yield
        return
    import torch

    original = torch.utils.swap_tensors
    memo = fake_mode.fake_tensor_converter.meta_converter.tensor_memo

    def swap(t1, t2):
        memo.clear()
        return original(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


def adapter_bytes(model) -> int:
    """Bytes of the peft adapter tensors a model holds (lora A/B, DoRA magnitudes, modules_to_save copies)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if "lora_" in n or ".modules_to_save." in n)
