"""Where ``from_pretrained(..., device_map="auto")`` puts each module, computed without torch.

transformers 5.17 (``transformers/integrations/accelerate.py``) computes the map itself, with its own
copies of accelerate's functions: ``_get_device_map`` calls ``get_balanced_memory`` (for "auto",
"balanced", "balanced_low_0"; ``get_max_memory`` for "sequential") and then ``infer_auto_device_map``
over ``compute_module_sizes`` of the meta-device model, with the model's ``_no_split_modules`` (its decoder
layer class) and its tied weights (``all_tied_weights_keys``). This module replays those functions over
a tree of the modules built from the ``ModelSpec`` (``module_tree``): the root, the base model, the
embedding, the decoder layers (never split, as ``_no_split_modules`` says), the final norm, the rotary
buffers and the head, each with its exact bytes at the load dtype. The names and the order of the
children are the transformers modules' (``LlamaModel.__init__``: embed_tokens, layers, norm, rotary_emb;
``GPT2Model``: wte, wpe, drop, h, ln_f). ``tests/harness/test_placement_accelerate.py`` checks the map
against transformers' own on the meta device, module by module, for every catalogue model.

Devices are ints (GPU indices), "cpu" and "disk", as accelerate names them. Memory is in bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from estimator.dtypes import dtype_bytes
from estimator.errors import UserError
from estimator.spec import ModelSpec

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class Node:
    """One ``nn.Module``: its direct parameters and buffers (full name, bytes) and its children."""

    name: str
    children: list["Node"] = field(default_factory=list)
    params: list[tuple[str, int]] = field(default_factory=list)
    buffers: list[tuple[str, int]] = field(default_factory=list)
    no_split: bool = False  # its class is in the model's _no_split_modules
    # Modules holding tensors inside a no-split node whose children are not listed (get_balanced_memory's
    # mean leaf size; it matters only where that mean exceeds the largest decoder layer).
    leaves: int = 0


@dataclass(frozen=True)
class Tensor:
    """A parameter or buffer treated on its own (after its module was split)."""

    name: str


@dataclass(frozen=True)
class _Layout:
    """Module names of one family's ``*ForCausalLM`` (transformers 5.17 modeling files)."""

    base: str = "model"
    embed: str = "embed_tokens"
    layers: str = "layers"
    norm: str = "norm"
    rotary: str | None = "rotary_emb"
    extra: tuple[str, ...] = ()  # modules between the embedding and the layers (GPT-2: wpe, drop)
    leaves_per_layer: int = 9  # Llama: q, k, v, o, gate, up, down, two norms


_LAYOUTS = {"gpt2": _Layout(base="transformer", embed="wte", layers="h", norm="ln_f", rotary=None,
                            extra=("wpe", "drop"), leaves_per_layer=6),
            # GPTNeoXForCausalLM: gpt_neox.{embed_in, emb_dropout, layers, final_layer_norm, rotary_emb}, lm_head
            "gpt_neox": _Layout(base="gpt_neox", embed="embed_in", norm="final_layer_norm", extra=("emb_dropout",),
                                leaves_per_layer=6)}

# Buffers inside a decoder layer, in elements at the model dtype: DeepseekV3TopkRouter registers
# ``e_score_correction_bias = torch.zeros(n_routed_experts)`` (modeling_deepseek_v3.py) in each MoE layer.
_LAYER_BUFFERS = {"deepseek_v3": lambda layer: layer.mlp.num_experts if layer.mlp.kind == "moe" else 0}


def module_tree(spec: ModelSpec, dtype: str = "bfloat16") -> tuple[Node, list[list[str]]]:
    """(the root module, tied parameter groups) of ``spec`` built on the meta device at ``dtype``.

    Bytes are what ``compute_module_sizes`` counts: every parameter and buffer at its dtype, the tied
    ``lm_head.weight`` not at all (it is in ``all_tied_weights_keys``).
    """
    if not spec.layer_params or len(spec.layer_params) != spec.num_layers:
        raise UserError(f"{spec.name}: no per-layer parameter counts, so its device_map placement is unknown")
    if len(spec.parts) > 1:
        raise UserError(f"{spec.name}: device_map placement of a multimodal wrapper (its towers) is not modelled; "
                        "the estimate per GPU covers text-only models")
    from estimator.family import family

    lay = _LAYOUTS.get(spec.model_type, _Layout())
    b = dtype_bytes(dtype)
    hidden, vocab = spec.hidden_size, spec.vocab_size
    embed_scale = 1 if family(spec.model_type).embed_scale else 0
    layer_buffers = [_LAYER_BUFFERS.get(spec.model_type, lambda _: 0)(layer) for layer in spec.layers]
    head = 0 if spec.tie_word_embeddings else hidden * vocab
    extra = spec.other_params.get("other", 0) if lay.extra else 0  # GPT-2's learned positions (wpe)
    norm = spec.num_parameters - sum(spec.layer_params) - spec.embedding_params - head - extra
    base = lay.base
    embed = Node(f"{base}.{lay.embed}", params=[(f"{base}.{lay.embed}.weight", int(vocab * hidden * b))])
    if embed_scale:  # Gemma*ScaledWordEmbedding: a non-persistent scalar buffer at the model dtype
        embed.buffers.append((f"{base}.{lay.embed}.embed_scale", int(b)))
    children = [embed]
    for name in lay.extra:
        size = int(extra * b) if name == "wpe" else 0
        children.append(Node(f"{base}.{name}", params=[(f"{base}.{name}.weight", size)] if size else []))
    layers = Node(f"{base}.{lay.layers}")
    for i, (params, buffers) in enumerate(zip(spec.layer_params, layer_buffers)):
        layers.children.append(Node(f"{base}.{lay.layers}.{i}", params=[(f"{base}.{lay.layers}.{i}.params", int(params * b))],
                                    buffers=[(f"{base}.{lay.layers}.{i}.buffers", int(buffers * b))] if buffers else [],
                                    no_split=True, leaves=lay.leaves_per_layer))
    children += [layers, Node(f"{base}.{lay.norm}", params=[(f"{base}.{lay.norm}.weight", int(norm * b))])]
    if lay.rotary:  # inv_freq and original_inv_freq: float32 whatever the model dtype
        rotary = 4 * (spec.buffer_elems - embed_scale - sum(layer_buffers))
        children.append(Node(f"{base}.{lay.rotary}", buffers=[(f"{base}.{lay.rotary}.inv_freq", rotary)]))
    # a tied head holds no tensor of its own: compute_module_sizes skips the keys in all_tied_weights_keys
    lm_head = Node("lm_head", params=[("lm_head.weight", int(head * b))] if head else [])
    root = Node("", children=[Node(base, children=children), lm_head])
    tied = [sorted(["lm_head.weight", f"{base}.{lay.embed}.weight"])] if spec.tie_word_embeddings else [[]]
    return root, tied


def compute_module_sizes(root: Node) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes of every module and tensor by name, bytes of every module holding tensors): transformers'
    ``compute_module_sizes(model, only_modules=False)`` and its leaf table."""
    sizes: dict[str, int] = {}
    leaves: dict[str, int] = {}

    def walk(node: Node) -> int:
        total = 0
        for name, size in node.params + node.buffers:
            sizes[name] = sizes.get(name, 0) + size
            total += size
        for child in node.children:
            total += walk(child)
        sizes[node.name] = sizes.get(node.name, 0) + total
        if node.params or node.buffers:
            own = sum(s for _, s in node.params + node.buffers)
            if node.leaves:  # a no-split block stands for its leaf modules: their mean size
                for k in range(node.leaves):
                    leaves[f"{node.name}.#{k}"] = own // node.leaves
            else:
                leaves[node.name] = own
        return total

    walk(root)
    return sizes, leaves


def _named_modules(root: Node):
    yield root
    for child in root.children:
        yield from _named_modules(child)


def max_memory_of(max_memory: dict, module_total: int, no_split_sizes: list[int], leaves: dict[str, int],
                  strategy: str, user_set: bool) -> dict:
    """The ``max_memory`` that ``_get_device_map`` hands to ``infer_auto_device_map``.

    ``max_memory``: what ``get_max_memory`` returns (free memory per GPU, "cpu", "disk"), ``user_set``:
    whether the user passed it (then transformers keeps it as is; otherwise 90% of the CPU, and 90% of a
    single GPU for the balanced strategies).
    """
    mm = dict(max_memory)
    if not user_set and "cpu" in mm:
        mm["cpu"] *= 0.90  # transformers' get_max_memory
    if strategy == "sequential":
        return mm
    low_zero = strategy == "balanced_low_0"
    gpus = [d for d in mm if d not in ("cpu", "disk")]
    num_devices = len([d for d in gpus if mm[d] > 0])
    if num_devices == 0:
        return mm
    if num_devices == 1:
        low_zero = False
        if not user_set:
            for key in mm:
                if isinstance(key, int):
                    mm[key] *= 0.9  # get_balanced_memory: 10% left for the buffers
                    break
    per_gpu = module_total // (num_devices - 1 if low_zero else num_devices)
    buffer = max(no_split_sizes, default=0)
    mean_leaves = int(sum(leaves.values()) / max(len(leaves), 1))
    per_gpu += int(1.25 * max(buffer, mean_leaves))
    idx = sorted(d for d, m in mm.items() if isinstance(d, int) and m > 0)
    for i in idx[:-1]:  # the last GPU keeps its max in case the buffer is not enough
        mm[i] = min(mm[0] if low_zero and i == 0 else per_gpu, mm[i])
    if low_zero:
        mm[0] = min(max(0, module_total - sum(mm[i] for i in range(1, num_devices))), mm[0])
    return mm


def _max_layer_size(items, sizes: dict[str, int]) -> tuple[int, list[str]]:
    """accelerate ``get_max_layer_size``: the largest module that is never split (a leaf or a no-split one)."""
    best, names = 0, []
    todo = [(n, m) for n, m in items if isinstance(m, Node)]
    while todo:
        name, m = todo.pop(0)
        if not m.children or m.no_split:
            size = sizes.get(name, 0)
            if size > best:
                best, names = size, [name]
            elif size == best:
                names.append(name)
        else:
            todo = [(c.name, c) for c in m.children] + todo
    return best, names


def _treat_items(node: Node) -> list:
    """``named_parameters(recurse=False) + named_children()``: what a split module is replaced by."""
    return [(n, Tensor(n)) for n, _ in node.params] + [(c.name, c) for c in node.children]


def infer_auto_device_map(root: Node, max_memory: dict, tied: list[list[str]]) -> dict:
    """transformers 5.17 ``infer_auto_device_map`` (offload_buffers=False, no_placement_params None)."""
    sizes, _ = compute_module_sizes(root)
    devices = list(max_memory)
    if "disk" not in devices:
        devices.append("disk")
    gpus = [d for d in devices if d not in ("cpu", "disk")]
    main_devices = [gpus[0], "cpu"] if gpus else ["cpu"]
    todo = [(n, Tensor(n)) for n, _ in root.params] + [(c.name, c) for c in root.children] + \
           [(n, Tensor(n)) for n, _ in root.buffers]
    device_map: dict[str, object] = {}
    current = 0
    used = dict.fromkeys(devices, 0)
    max_layer, max_names = _max_layer_size(todo, sizes)
    while todo:
        name, module = todo.pop(0)
        max_names = [n for n in max_names if n != name and not n.startswith(name + ".")]
        if not max_names:
            max_layer, max_names = _max_layer_size(todo, sizes)
        size = sizes.get(name, 0)
        groups = [g for g in tied if any(name + "." in k + "." for k in g) and not all(name + "." in k + "." for k in g)]
        tied_params = [p for g in groups for p in g if name + "." not in p + "."]
        device = devices[current]
        limit = max_memory[device] if device != "disk" else None
        reserved = 0
        if device in main_devices:
            limit -= max_layer
            reserved = max_layer
        with_ties, tied_names, tied_modules = size, [], []
        for p in tied_params:  # get_module_size_with_ties
            j = [i for i, (n, _) in enumerate(todo) if p.startswith(n + ".")][0]
            if todo[j][0] not in tied_names:
                tied_names.append(todo[j][0])
                tied_modules.append(todo[j][1])
                with_ties += sizes.get(todo[j][0], 0)
        if limit is None or used[device] + with_ties <= limit:
            used[device] += with_ties
            device_map[name] = device
            for t in tied_names:
                todo = [(n, m) for n, m in todo if n != t]
                device_map[t] = device
            continue
        if tied_params and used[device] + size <= limit:
            split = False
            for t, tm in zip(tied_names, tied_modules):
                if not isinstance(tm, Node) or not tm.children or tm.no_split:
                    continue
                j = [i for i, (n, _) in enumerate(todo) if n == t][0]
                todo = [(name, module)] + todo[:j] + _treat_items(tm) + todo[j + 1:]
                max_layer, max_names = _max_layer_size(todo, sizes)
                split = True
                break
            if split:
                continue
        children = module.children if isinstance(module, Node) else []
        if children and not module.no_split:  # split: its parameters and children take its place
            todo = _treat_items(module) + todo
            max_layer, max_names = _max_layer_size(todo, sizes)
            continue
        used[device] += reserved  # cannot split: the next device
        current += 1
        todo = [(name, module)] + todo
    return clean_device_map(device_map)


def clean_device_map(device_map: dict, module_name: str = "") -> dict:
    """accelerate ``clean_device_map``: submodules all on one device become their parent's entry."""
    prefix = "" if module_name == "" else f"{module_name}."
    values = [v for k, v in device_map.items() if k.startswith(prefix)]
    if len(set(values)) == 1 and len(values) > 1:
        for k in [k for k in device_map if k.startswith(prefix)]:
            del device_map[k]
        device_map[module_name] = values[0]
    idx = len(module_name.split(".")) + 1 if module_name else 1
    children = {".".join(k.split(".")[:idx]) for k in device_map if k.startswith(prefix) and len(k) > len(module_name)}
    for child in sorted(children):
        clean_device_map(device_map, child)
    return device_map


def device_map_for(spec: ModelSpec, dtype: str, max_memory: dict, strategy: str = "auto",
                   user_set: bool = True) -> dict:
    """``from_pretrained(device_map=strategy, max_memory=...)``'s device map for ``spec`` at ``dtype``.

    ``max_memory``: bytes per device as ``get_max_memory`` sees them; ``user_set`` False when they stand
    for the free memory transformers would query itself (its 90% rules apply then).
    """
    return plan(spec, dtype, max_memory, strategy, user_set)[0]


def plan(spec: ModelSpec, dtype: str, max_memory: dict, strategy: str = "auto",
         user_set: bool = True) -> tuple[dict, dict]:
    """(the device map, the max_memory infer_auto_device_map filled: balanced, 90% rules applied)."""
    if strategy not in DEVICE_MAPS:
        raise UserError(f"--device-map {strategy!r}: expected one of {', '.join(DEVICE_MAPS)}")
    # get_max_memory's order: GPU indices ascending, then "cpu", then "disk"
    max_memory = {k: max_memory[k] for k in sorted(k for k in max_memory if isinstance(k, int))} | \
        {k: max_memory[k] for k in ("cpu", "disk") if k in max_memory}
    root, tied = module_tree(spec, dtype)
    sizes, leaves = compute_module_sizes(root)
    no_split = [sizes[m.name] for m in _named_modules(root) if m.no_split]
    mm = max_memory_of(max_memory, sizes[""], no_split, leaves, strategy, user_set)
    return infer_auto_device_map(root, mm, tied), mm


def device_of(device_map: dict, name: str):
    """The device of module ``name`` under ``device_map`` (the longest matching prefix, as
    transformers' ``expand_device_map`` resolves it)."""
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            raise KeyError(name)
        name = name.rsplit(".", 1)[0] if "." in name else ""


# ---------------------------------------------------------------------------------------------------
# Input: --max-memory 0=70GiB,1=75GiB,cpu=200GiB

_UNITS = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1, "": 1}


def parse_size(text: str) -> int:
    """Bytes of "70GiB", "75GB", "512MiB" or a plain integer (accelerate's convert_file_size_to_int)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"memory size {text!r}: expected a number with a unit, e.g. 70GiB, 80GB, 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_max_memory(text: str) -> dict:
    """``"0=70GiB,1=75GiB,cpu=200GiB"`` -> {0: bytes, 1: bytes, "cpu": bytes}."""
    out: dict = {}
    for item in (t for t in text.split(",") if t.strip()):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not (key.isdigit() or key in ("cpu", "disk")):
            raise UserError(f"--max-memory item {item.strip()!r}: expected DEVICE=SIZE with DEVICE a GPU index, "
                            "cpu or disk (e.g. 0=70GiB,1=75GiB)")
        device = int(key) if key.isdigit() else key
        if device in out:
            raise UserError(f"--max-memory names device {key} twice")
        out[device] = parse_size(value)
    if not out:
        raise UserError("--max-memory is empty; expected e.g. 0=70GiB,1=75GiB")
    return out
