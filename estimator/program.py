"""The tensors a transformers 5.x inference run allocates, in order, replayed in the allocator model.

``simulate(spec, workload)`` walks one ``generate`` (prefill, then one forward per new token after the
first) or one full-logit ``forward`` the way the transformers 5.17 modeling code runs it on a CUDA GPU,
and feeds every tensor it creates and frees to ``estimator.allocator.CachingAllocator``. It returns the
peak bytes allocated and reserved above the weights: the activation and KV terms of the estimate, with
the allocator's fragmentation included, from shapes alone (no torch).

What is modelled, and where it comes from (transformers 5.17, torch 2.11 on sm90):

- RMSNorm upcasts to fp32: ``x.float()``, ``pow(2)``, ``x * rsqrt``, ``.to(dtype)``, ``weight *``
  (``LlamaRMSNorm``; Gemma's variant multiplies by ``1 + weight`` in fp32 and casts last). At fp32 the
  casts are no-ops and allocate nothing.
- Rotary embeddings: ``q * cos + rotate_half(q) * sin`` with ``rotate_half`` = ``cat(-x2, x1)``; Phi-3
  concatenates the pass-through part once more.
- The cache: ``DynamicLayer.update`` is ``torch.cat`` (the new cache tensor exists before the old one is
  freed); ``DynamicSlidingWindowLayer`` keeps a view of the concatenation, so after a long prompt the
  whole prompt stays allocated until the first decode step; ``StaticLayer`` allocates ``max_cache_len``
  once and writes in place; MLA caches the compressed latent and the shared rotary key, and expands
  them (``kv_b_proj``) for every forward.
- sdpa picks flash attention (bf16/fp16, head dim <= 256, no mask; ``enable_gqa`` for GQA): the output
  and a fp32 log-sum-exp, nothing of size seq^2. With a mask (sliding window past its length) or
  different K/V head dims, transformers repeats K/V and torch takes the memory-efficient kernel. At fp32
  flash is unavailable and the memory-efficient kernel refuses ``enable_gqa``, so GQA falls back to the
  math kernel: the scores, their ``_safe_softmax`` and a boolean mask are alive together (2.25 x the
  fp32 scores, which the reference fp32 runs confirm); fp32 multi-head attention stays memory-efficient.
- eager attention: the query copy ``matmul`` makes, scores, ``* scaling``, ``+ mask``, the fp32 softmax
  (its input is first cast to fp32), the cast back; the weights stay alive until the decoder layer
  returns (``hidden_states, _ = self.self_attn(...)``). Gemma 2 soft-caps the scores and the logits.
- MLPs: ``down(act(gate(x)) * up(x))``; Phi-3's fused ``gate_up_proj``; GPT-2's ``gelu_new`` written
  out in Python (five temporaries); mixture-of-experts through ``grouped_mm_experts_forward`` (the
  default on sm80+): sorted routed copies of the hidden states, the fused gate/up output and its
  ``masked_fill`` copy, the down projection and the re-ordering.
- Qwen3-Next: gated attention (``q_proj`` yields the query and a gate, the output is multiplied by
  ``sigmoid(gate)``), a partial rotary (a quarter of the head dim rotated, then ``cat``), the shared
  expert before the routed ones; its gated delta-net layers follow transformers' torch fallbacks: the
  projections and their reshaping copies, ``causal_conv1d_fn``, ``torch_chunk_gated_delta_rule`` (fp32
  copies padded to chunks of 64, the (64 x 64) pairwise decays per chunk, the triangular solves, then one
  loop iteration per chunk) and ``Qwen3NextRMSNormGated``; a decode step runs ``causal_conv1d_update``
  and ``torch_recurrent_gated_delta_rule`` on the cached fp32 state. Traced event by event, the replay
  allocates what the trace does except generic details below 1% (the rotary's scaling temporaries).
- generate computes the last position's logits only, copies them to fp32 and, when the model has an
  EOS token and ``min_new_tokens`` is set (the harness's method), the min-length processor makes two
  more fp32 copies; the fp32 logits of a step live until the next step replaces them.

Tensors of at most 1 MiB are left out: they come from the allocator's small pool (2 MiB segments) and
change the peaks by a few MiB, which the ``workspace_bytes`` coefficient absorbs together with the
cuBLAS workspace.

Family quirks live in ``LAYOUTS`` (by ``model_type``); everything else follows from the ``ModelSpec``.

How it runs fast, with the same result as replaying every tensor of every layer and step (checked
against a frozen oracle, ``tests/estimator/test_program_speed_equivalence.py``): ``_Run`` describes the
program on a ``_Tape`` that records ops on numbered slots; ``_Replay`` records each piece (a forward's
frame, one decoder layer) once per shape and replays the recording for every layer of that kind. A
decode step's pieces are recorded with the past tokens as a symbol (``_Sym``: sizes ``a + b * past``,
comparisons kept as conditions), so one recording serves every step for which the conditions answer
the same, and a whole step runs as one flat list of ops (``_Step``). Two repetitions are skipped, only
once the allocator's state has been seen to repeat exactly: the iterations of a loop (the gated delta
rule's chunks) and decode steps whose sizes no longer grow (a static cache, a full sliding window).
A dynamic cache that grows is replayed step by step: its blocks keep moving between segments, and the
allocator's state does not repeat.

The optional C allocator (``estimator/_replay.c``, built when a compiler is there) runs the same requests
4-8x faster, and whole runs of such growing decode steps in one call (``_Replay.fast_steps``), 30-40x
faster; ``simulate`` uses it unless ``ACCELERATE`` is False (``VRAMCAL_PYTHON_REPLAY=1``), and falls back to
the Python allocator, the reference, when a size passes 2**62. Both give the same bytes
(``tests/estimator/test_replay_accelerator.py`` and the oracle, on both paths).
"""

from __future__ import annotations

from dataclasses import dataclass

import os

from estimator import lora as _lora  # LoRA hook
from estimator.allocator import SMALL_SIZE, CachingAllocator, round_size
from estimator.dtypes import dtype_bytes
from estimator.spec import AttentionSpec, LayerSpec, ModelSpec


@dataclass(frozen=True)
class Layout:
    """How a family's transformers code computes a layer, where it differs from Llama's."""

    norm: str = "rms"  # "rms" (Llama), "rms_gemma" (fp32 product, cast last), "layer" (LayerNorm kernel)
    fused_qkv: bool = False  # one qkv projection (Phi-3, GPT-2); q, k, v are views of it
    fused_gate_up: bool = False  # Phi-3: gate_up_proj, chunked
    rope: str = "half"  # "half": rotate_half; "half_cat": Phi-3's extra cat; "split": gpt-oss's halves and
    # cat; "complex": DeepSeek-V2's complex product; "none": learned positions; "partial": rotate_half on
    # the first ``partial_rotary_factor`` of the head dim, then cat with the rest (Qwen3-Next)
    act: str = "kernel"  # "kernel": one tensor (silu, gelu); "gelu_new": GPT-2's Python formula
    sandwich_norms: bool = False  # Gemma 2/3: norms on the attention and MLP outputs too
    attn_softcap: bool = False  # Gemma 2 eager: scores / cap, tanh, * cap
    final_softcap: bool = False  # Gemma 2: logits / cap, tanh, * cap
    embed_scale: bool = False  # Gemma: embeddings * sqrt(hidden)
    learned_positions: bool = False  # GPT-2: wpe(position_ids) added to the embeddings
    sdpa: bool = True  # False: transformers has no sdpa path (gpt-oss, with sinks): eager
    eager_fp32_softmax: bool = True  # False: GPT-2's eager softmax stays in the model's dtype
    router_fp32: bool = False  # DeepSeek: the router runs on an fp32 copy of the hidden states
    expert_glu: str = "act"  # "act": act(gate) * up; "gpt_oss": clamped gate/up, gate * sigmoid(1.702 gate) * (up + 1)
    expert_bias: bool = False  # gpt-oss: per-expert biases gathered for the routed rows
    sinks: bool = False  # gpt-oss: one sink logit per head concatenated to the scores
    gated_attention: bool = False  # Qwen3-Next: q_proj also yields a gate; output * sigmoid(gate)
    shared_expert_gate: bool = False  # Qwen3-Next: shared expert first, scaled by sigmoid(gate(x))


LAYOUTS: dict[str, Layout] = {
    "phi3": Layout(fused_qkv=True, fused_gate_up=True, rope="half_cat"),
    "gpt2": Layout(norm="layer", fused_qkv=True, rope="none", act="gelu_new", learned_positions=True,
                   eager_fp32_softmax=False),
    "gemma2": Layout(norm="rms_gemma", sandwich_norms=True, attn_softcap=True, final_softcap=True,
                     embed_scale=True),
    "gemma3_text": Layout(norm="rms_gemma", sandwich_norms=True, embed_scale=True),
    "gpt_oss": Layout(norm="rms_gemma", rope="split", sdpa=False, sinks=True, expert_glu="gpt_oss",
                      expert_bias=True),
    "deepseek_v2": Layout(rope="complex", router_fp32=True),
    "deepseek_v3": Layout(router_fp32=True),
    "qwen3_next": Layout(norm="rms_gemma", rope="partial", gated_attention=True, shared_expert_gate=True),
}
DEFAULT_LAYOUT = Layout()  # every other family follows Llama's code (qwen2/3, mistral, mixtral, olmoe...)
MIN_TRACKED_BYTES = SMALL_SIZE + 1


class _NotAffine(Exception):
    """A size that is not ``a + b * x`` in the decode step's past tokens: record that step concretely."""


class _Sym:
    """``a + b * x``, a quantity of a decode step that grows with its past tokens ``x`` (the cache's and
    the masks' lengths). Comparisons answer for the recorded ``x`` and are kept in ``conds``: a recorded
    step holds for every ``x`` that answers them the same way (``_valid_range``)."""

    __slots__ = ("a", "b", "x", "conds")

    def __init__(self, a, b, x: int, conds: list):
        self.a, self.b, self.x, self.conds = a, b, x, conds

    def _new(self, a, b):
        return _Sym(a, b, self.x, self.conds)

    def __add__(self, o):
        if isinstance(o, _Sym):
            return self._new(self.a + o.a, self.b + o.b)
        return self._new(self.a + o, self.b)

    __radd__ = __add__

    def __sub__(self, o):
        if isinstance(o, _Sym):
            return self._new(self.a - o.a, self.b - o.b)
        return self._new(self.a - o, self.b)

    def __rsub__(self, o):
        return self._new(o - self.a, -self.b)

    def __neg__(self):
        return self._new(-self.a, -self.b)

    def __mul__(self, o):
        if isinstance(o, _Sym):
            raise _NotAffine
        return self._new(self.a * o, self.b * o)

    __rmul__ = __mul__

    def __truediv__(self, o):
        if isinstance(o, _Sym):
            raise _NotAffine
        return self._new(self.a / o, self.b / o)

    def _floordiv(self, *_):
        raise _NotAffine

    __floordiv__ = __rfloordiv__ = __rtruediv__ = __mod__ = __int__ = __index__ = __float__ = _floordiv

    def _cmp(self, o, op: str) -> bool:
        d = self - o
        v = d.a + d.b * self.x
        out = {"<": v < 0, "<=": v <= 0, ">": v > 0, ">=": v >= 0, "==": v == 0, "!=": v != 0}[op]
        if d.b:
            self.conds.append((d.a, d.b, op, out))
        return out

    def __lt__(self, o):
        return self._cmp(o, "<")

    def __le__(self, o):
        return self._cmp(o, "<=")

    def __gt__(self, o):
        return self._cmp(o, ">")

    def __ge__(self, o):
        return self._cmp(o, ">=")

    def __eq__(self, o):
        return self._cmp(o, "==")

    def __ne__(self, o):
        return self._cmp(o, "!=")

    __hash__ = None


def _valid_range(conds: list, x: int) -> tuple[float, float]:
    """The integers ``[lo, hi]`` around ``x`` for which every recorded comparison answers as it did at ``x``.

    ``a + b * y`` has one sign below ``t = -a / b`` and the other above, so a comparison's answer is the
    same on ``(-inf, floor(t) - 1]``, may differ at ``floor(t)``, and is the same on ``[floor(t) + 1, inf)``.
    """
    from fractions import Fraction
    from math import floor

    lo, hi = float("-inf"), float("inf")
    for a, b, op, out in conds:
        k = floor(Fraction(-a) / Fraction(b))

        def same(y: int) -> bool:
            return _cmp_at(a, b, op, y) == out

        if x <= k - 1:
            hi = min(hi, (k if not same(k + 1) else float("inf")) if same(k) else k - 1)
        elif x >= k + 1:
            lo = max(lo, (k if not same(k - 1) else float("-inf")) if same(k) else k + 1)
        else:
            if not same(k - 1):
                lo = max(lo, k)
            if not same(k + 1):
                hi = min(hi, k)
    return lo, hi


def _cmp_at(a, b, op: str, y: int) -> bool:
    from fractions import Fraction

    v = Fraction(a) + Fraction(b) * y
    return {"<": v < 0, "<=": v <= 0, ">": v > 0, ">=": v >= 0, "==": v == 0, "!=": v != 0}[op]


class _Tape:
    """Records what a piece of the program allocates and frees, as ops on numbered slots.

    ``new(nbytes)`` returns a slot, or None for a tensor under ``min_bytes`` (never tracked). An op is
    ``(slot, nbytes)`` (allocate; a ``_Sym`` size in a decode step) or ``(slot, 0)`` (free);
    ``(-1, _Repeat)`` runs a recorded body several times. Slots ``0 .. n_ext - 1`` are bound by the
    caller (a layer's input, its cache)."""

    __slots__ = ("ops", "n", "min_bytes")

    def __init__(self, min_bytes: int, n_ext: int = 0):
        self.ops: list = []
        self.n = n_ext
        self.min_bytes = min_bytes

    def new(self, nbytes):
        if not isinstance(nbytes, _Sym):
            nbytes = int(nbytes)
        if nbytes < self.min_bytes:
            return None
        slot = self.n
        self.n += 1
        self.ops.append((slot, nbytes))
        return slot

    def free(self, *slots) -> None:
        for slot in slots:
            if slot is not None:
                self.ops.append((slot, 0))

    def layers(self, h, kept: bool):
        """Every decoder layer, run by the replay on the hidden states ``h`` (``kept``: also referenced by
        the caller, so the first layer does not free it); returns the last layer's output's slot."""
        slot = self.n
        self.n += 1
        self.ops.append((-2, (h, kept, slot)))
        return slot

    def repeat(self, count: int, step, carried: tuple) -> tuple:
        """``count`` iterations of ``step(carried) -> carried`` (a loop whose iterations allocate the same
        sizes): recorded once, replayed until the allocator's state repeats (``_execute``)."""
        outer, self.ops = self.ops, []
        out = step(carried)
        body, self.ops = self.ops, outer
        if any((i is None) != (o is None) for i, o in zip(carried, out)):
            raise AssertionError("a loop-carried tensor is tracked in one iteration only")
        if body:
            self.ops.append((-1, _Repeat(count, body, [(i, o) for i, o in zip(carried, out) if i is not None])))
        return out


class _Repeat:
    __slots__ = ("count", "body", "carry")

    def __init__(self, count: int, body: list, carry: list):
        self.count, self.body, self.carry = count, body, carry


class _Run:
    """One model's forwards over the tape. Sizes in bytes; ``a`` is the activation dtype's bytes."""

    def __init__(self, spec: ModelSpec, workload, min_bytes: int):
        self.spec, self.w, self.t = spec, workload, _Tape(min_bytes)
        self.lay = LAYOUTS.get(spec.model_type, DEFAULT_LAYOUT)
        a = dtype_bytes(workload.dtype)
        if workload.quant and a < 2:
            a = 2.0
        self.a = a
        self.kv_b = dtype_bytes(workload.kv_dtype or workload.dtype)
        self.b = workload.batch
        self.attn = workload.attn
        if not self.lay.sdpa and self.attn == "sdpa":
            self.attn = "eager"
        self.decoding = False  # generate's decode steps (MoE switches to batched_mm)
        self.static_decode = False
        self.cache: dict[int, list] = {}  # layer index -> cache tensors [k, v] (or latent, rope)
        self.cfg = spec.config or {}
        # the resolved factor (rope_parameters / partial_rotary_factor / the class default: estimator/config.py)
        self.rotary_fraction = spec.partial_rotary_factor if self.lay.rope == "partial" else 1.0

    # ---- building blocks ----------------------------------------------------------------------
    def norm(self, n: int):
        """A norm over ``n`` elements at the activation dtype; returns the output block."""
        t, a = self.t, self.a
        if self.lay.norm == "layer":
            return t.new(n * a)
        if a == 4:  # the fp32 casts are no-ops
            p = t.new(n * 4)
            t.free(p)
            y = t.new(n * 4)
            out = t.new(n * 4)
            t.free(y)
            return out
        x32 = t.new(n * 4)
        p = t.new(n * 4)
        t.free(p)
        y32 = t.new(n * 4)
        t.free(x32)
        if self.lay.norm == "rms_gemma":
            o32 = t.new(n * 4)  # * (1 + weight) in fp32
            t.free(y32)
            out = t.new(n * a)  # type_as
            t.free(o32)
            return out
        ya = t.new(n * a)
        out = t.new(n * a)  # weight * x
        t.free(ya, y32)
        return out

    def rope(self, n: int, whole: bool = True):
        """``x * cos + rotate_half(x) * sin`` over ``n`` elements; the caller frees ``x``. ``whole=False``:
        a partial rotary's rotated part only (the caller makes the ``cat`` with the pass-through part)."""
        t, a = self.t, self.a
        if self.lay.rope == "split":  # gpt-oss: cat((x1 cos - x2 sin, x2 cos + x1 sin), -1)
            halves = []
            for _ in range(2):
                p1 = t.new(n * a / 2)
                p2 = t.new(n * a / 2)
                h = t.new(n * a / 2)
                t.free(p1, p2)
                halves.append(h)
            out = t.new(n * a)
            t.free(*halves)
            return out
        if self.lay.rope == "complex":  # DeepSeek-V2: view_as_complex(x.float()) * freqs, type_as(x)
            x32 = t.new(n * 4)
            prod = t.new(n * 4)
            out = t.new(n * a)
            t.free(prod, x32)
            return out
        whole_n = n
        if self.lay.rope == "partial":  # x[..., :rotary_dim] rotated, x[..., rotary_dim:] passed through
            n = n * self.rotary_fraction
        xc = t.new(n * a)
        neg = t.new(n * a / 2)
        cat = t.new(n * a)
        t.free(neg)
        xs = t.new(n * a)
        t.free(cat)
        out = t.new(n * a)
        t.free(xc, xs)
        if whole and self.lay.rope in ("half_cat", "partial"):  # cat((rotated, pass), -1)
            joined = t.new(whole_n * a)
            t.free(out)
            out = joined
        return out

    def act(self, n: int, x):
        """The activation of ``n`` elements; returns its output (the caller frees ``x``)."""
        t, a = self.t, self.a
        if self.lay.act == "gelu_new":  # 0.5 * x * (1 + tanh(c * (x + 0.044715 * x**3)))
            half = t.new(n * a)
            cube = t.new(n * a)
            scaled = t.new(n * a)
            t.free(cube)
            inner = t.new(n * a)
            t.free(scaled)
            inner2 = t.new(n * a)
            t.free(inner)
            th = t.new(n * a)
            t.free(inner2)
            one = t.new(n * a)
            t.free(th)
            out = t.new(n * a)
            t.free(half, one)
            return out
        return t.new(n * a)

    # ---- attention ----------------------------------------------------------------------------
    def cache_update(self, i: int, att: AttentionSpec, k_bytes: float, v_bytes: float, q_len: int,
                     past: int, static_len: int | None):
        """Write this step's K/V (bytes for q_len tokens) into layer i's cache; returns the cache's tokens."""
        t = self.t
        entry = self.cache.get(i)
        per_tok_k, per_tok_v = k_bytes / q_len, v_bytes / q_len
        if static_len is not None:  # StaticLayer: zeros(max_cache_len) at the first update, then in place
            if entry is None:
                tokens = static_len
                if att.kind == "sliding" and att.window:
                    tokens = min(static_len, att.window)
                self.cache[i] = [t.new(per_tok_k * tokens), t.new(per_tok_v * tokens), tokens]
            return self.cache[i][2]
        held = entry[2] if entry else 0
        total = held + q_len
        k_new = t.new(per_tok_k * total)
        if entry:
            t.free(entry[0])
        v_new = t.new(per_tok_v * total)
        if entry:
            t.free(entry[1])
        keep = total
        if att.kind == "sliding" and att.window:
            keep = min(total, att.window - 1)  # a view of the concatenation: the storage stays whole
        self.cache[i] = [k_new, v_new, keep]
        return total

    def attention(self, i: int, layer: LayerSpec, q_len: int, past: int, x, static_len: int | None,
                  use_cache: bool, masks: dict):
        """Self-attention of layer i on the normed input ``x`` (freed here); returns its output block."""
        t, a, b = self.t, self.a, self.b
        att = layer.attention
        T = b * q_len
        H = self.spec.hidden_size
        if att.kind in ("linear", "ssm"):
            return self.linear_mixer(i, att, q_len, x, use_cache)
        if att.kind == "mla":
            return self.mla(i, att, q_len, past, x, static_len, use_cache, masks)
        nh, nkv, d = att.num_heads, att.num_kv_heads or att.num_heads, att.head_dim
        dv = att.v_head_dim or d
        q_n, k_n, v_n = T * nh * d, T * nkv * d, T * nkv * dv
        lay = self.lay
        if lay.fused_qkv:
            qkv = t.new((q_n + k_n + v_n) * a)
            q = k = v = None
        elif self.spec.model_type in _QK_NORM:  # q_norm(q_proj(x)), k_norm(k_proj(x)), v_proj(x)
            qkv = None
            q0 = t.new(q_n * a * (2 if lay.gated_attention else 1))
            if self.w.lora:  # LoRA hook
                q0 = _lora.linear(self, "q_proj", T, H, nh * d, q0)
            if lay.gated_attention:  # chunk(q_proj(x), 2) then gate.reshape: a copy
                gate = t.new(q_n * a)
            q = self.norm(q_n)
            t.free(q0)
            k0 = t.new(k_n * a)
            if self.w.lora:  # LoRA hook
                k0 = _lora.linear(self, "k_proj", T, H, nkv * d, k0)
            k = self.norm(k_n)
            t.free(k0)
            v = t.new(v_n * a)
            if self.w.lora:  # LoRA hook
                v = _lora.linear(self, "v_proj", T, H, nkv * dv, v)
        else:
            qkv = None
            q = t.new(q_n * a)
            if self.w.lora:  # LoRA hook
                q = _lora.linear(self, "q_proj", T, H, nh * d, q)
            k = t.new(k_n * a)
            if self.w.lora:  # LoRA hook
                k = _lora.linear(self, "k_proj", T, H, nkv * d, k)
            v = t.new(v_n * a)
            if self.w.lora:  # LoRA hook
                v = _lora.linear(self, "v_proj", T, H, nkv * dv, v)
        if lay.rope == "partial":  # both rotations, then cat((rotated, pass), -1) for each
            qr = self.rope(q_n, whole=False)
            kr = self.rope(k_n, whole=False)
            qe = t.new(q_n * a)
            t.free(qr)
            ke = t.new(k_n * a)
            t.free(kr, q, k)
        elif lay.rope != "none":
            qe = self.rope(q_n)
            ke = self.rope(k_n)
            t.free(q, k)
        else:
            qe, ke = q, k
        if use_cache:
            kv_len = self.cache_update(i, att, k_n * self.kv_b, v_n * self.kv_b, q_len, past, static_len)
            if qe is not ke:
                t.free(ke)
            ke = None
            t.free(v)
            v = None
        else:
            kv_len = q_len
        out, weights = self.core_attention(att, q_len, kv_len, qe, masks)
        if lay.gated_attention:  # attn_output * sigmoid(gate)
            sg = t.new(q_n * a)
            gated = t.new(T * nh * dv * a)
            t.free(sg, out)
            y = t.new(T * H * a)
            t.free(gated, qe, gate, ke, v, qkv, x)
            return y, weights
        y = t.new(T * H * a)  # o_proj; the attention's locals go when it returns
        if self.w.lora:  # LoRA hook
            y = _lora.linear(self, "o_proj", T, nh * dv, H, y)
        t.free(out, qe, ke, v, qkv, x)
        return y, weights

    def core_attention(self, att: AttentionSpec, q_len: int, kv_len: int, q, masks: dict):
        """The attention kernel on (b, heads, q_len, kv_len); returns (output, weights kept alive)."""
        t, a, b = self.t, self.a, self.b
        nh, nkv, d = att.num_heads, att.num_kv_heads or att.num_heads, att.head_dim
        dv = att.v_head_dim or d
        T = b * q_len
        out_bytes = T * nh * dv * a
        kv_eff = kv_len
        windowed = att.kind == "sliding" and att.window and kv_len >= att.window
        if self.attn == "eager":
            return self.eager(att, q_len, kv_eff, masks)
        if self.attn == "flash_attention_2":
            out = t.new(out_bytes)
            lse = t.new(b * nh * q_len * 4)
            t.free(lse)
            return out, None
        gqa = nkv < nh
        # sdpa gets a boolean mask for sliding layers once the window is full, and for a static cache's
        # decode steps (the padding of the pre-allocated positions); with a mask, GQA repeats K/V
        mask = windowed or (self.static_decode and kv_len > q_len)
        if a < 4 and not mask and d <= 256 and d == dv:  # flash
            out = t.new(out_bytes)
            lse = t.new(b * nh * q_len * 4)
            t.free(lse)
            return out, None
        if a == 4 and gqa and not mask and d == dv and d <= 256:
            return self.math(att, q_len, kv_eff), None
        # transformers repeats K/V (no enable_gqa), torch takes the memory-efficient kernel
        reps = []
        if gqa:
            reps = [t.new(b * nh * kv_eff * d * a), t.new(b * nh * kv_eff * dv * a)]
        out = t.new(out_bytes)
        lse = t.new(b * nh * (-(-q_len // 32) * 32) * 4)
        t.free(lse, *reps)
        return out, None

    def math(self, att: AttentionSpec, q_len: int, kv_len: int):
        """sdpa's math kernel at fp32 with enable_gqa (``_scaled_dot_product_attention_math``)."""
        t, b = self.t, self.b
        nh, d = att.num_heads, att.head_dim
        dv = att.v_head_dim or d
        S = b * nh * q_len * kv_len * 4
        qs = t.new(b * nh * q_len * d * 4)  # query * sqrt(scale)
        mask = None
        if q_len > 1:  # is_causal: ones(L, S).tril() -> float mask
            ones = t.new(q_len * kv_len)
            tril = t.new(q_len * kv_len)
            t.free(ones)
            mask = t.new(q_len * kv_len * 4)
            t.free(tril)
        krep = t.new(b * nh * kv_len * d * 4)
        vrep = t.new(b * nh * kv_len * dv * 4)
        ks = t.new(b * nh * kv_len * d * 4)  # key * sqrt(scale)
        scores = t.new(S)
        t.free(ks)
        soft = t.new(S)  # _safe_softmax: softmax, eq(-inf) mask, masked rows zeroed in place
        boolm = t.new(S / 4)
        t.free(boolm, scores)
        o = t.new(b * nh * q_len * dv * 4)
        t.free(soft, vrep, krep, qs, mask)
        out = t.new(b * nh * q_len * dv * 4)  # transpose(1, 2).contiguous()
        t.free(o)
        return out

    def eager(self, att: AttentionSpec, q_len: int, kv_len: int, masks: dict):
        t, a, b = self.t, self.a, self.b
        nh, nkv, d = att.num_heads, att.num_kv_heads or att.num_heads, att.head_dim
        dv = att.v_head_dim or d
        S = b * nh * q_len * kv_len * a
        reps = []
        if nkv < nh:  # repeat_kv
            reps = [t.new(b * nh * kv_len * d * a), t.new(b * nh * kv_len * dv * a)]
        qc = t.new(b * nh * q_len * d * a) if q_len > 1 else None  # matmul's contiguous query
        s1 = t.new(S)
        t.free(qc)
        s2 = t.new(S)  # * scaling
        t.free(s1)
        if self.lay.attn_softcap:
            for _ in range(3):  # / cap, tanh, * cap
                s3 = t.new(S)
                t.free(s2)
                s2 = s3
        s3 = t.new(S)  # + mask
        t.free(s2)
        if self.lay.sinks:  # gpt-oss: cat(scores, sinks), minus the row max, softmax in the model dtype
            wide = S + b * nh * q_len * a
            cat = t.new(wide)
            centred = t.new(wide)
            t.free(cat)
            w = t.new(wide)  # probs[..., :-1] is a view: the whole storage stays
            t.free(centred, s3)
        elif a < 4 and self.lay.eager_fp32_softmax:
            f_in = t.new(S * 4 / a)  # softmax(dtype=float32) casts its input first
            f = t.new(S * 4 / a)
            t.free(f_in)
            w = t.new(S)  # .to(dtype)
            t.free(f, s3)
        else:
            w = t.new(S)
            t.free(s3)
        o = t.new(b * nh * q_len * dv * a)
        out = t.new(b * nh * q_len * dv * a)  # transpose(1, 2).contiguous()
        t.free(o, *reps)
        return out, w

    def mla(self, i: int, att: AttentionSpec, q_len: int, past: int, x, static_len, use_cache, masks):
        """DeepSeek V2/V3: cache the latent, expand K/V with kv_b_proj on every forward."""
        t, a, b = self.t, self.a, self.b
        T = b * q_len
        nh, qk, dv = att.num_heads, att.head_dim, att.v_head_dim
        rope, rank = att.qk_rope_head_dim, att.kv_lora_rank
        nope = qk - rope
        q_lora = self.cfg.get("q_lora_rank")
        if q_lora:
            qa = t.new(T * q_lora * a)
            qan = self.norm(T * q_lora)
            t.free(qa)
            q = t.new(T * nh * qk * a)
            t.free(qan)
        else:
            q = t.new(T * nh * qk * a)
        ckv = t.new(T * (rank + rope) * a)
        kvn = self.norm(T * rank)
        qr = self.rope(T * nh * rope)
        kr = self.rope(T * rope)
        if use_cache:
            total = self.cache_update(i, AttentionSpec("full"), T * rank * self.kv_b, T * rope * self.kv_b,
                                      q_len, past, static_len)
            t.free(kvn, kr)
            kvn = kr = None
        else:
            total = q_len
        qs = t.new(T * nh * qk * a)  # cat(q_pass, q_rot); q and q_rot stay referenced until the return
        kv_tokens = b * total
        kvb = t.new(kv_tokens * nh * (nope + dv) * a)  # kv_b_proj over the whole cache
        keys = t.new(kv_tokens * nh * qk * a)  # new_empty + copy_ of k_nope and k_rot
        out, w = self.core_attention(AttentionSpec("full", nh, nh, qk, dv), q_len, total, qs, masks)
        y = t.new(T * self.spec.hidden_size * a)
        t.free(out, qs, q, qr, keys, kvb, ckv, kvn, kr, x)
        return y, w

    def linear_mixer(self, i: int, att: AttentionSpec, q_len: int, x, use_cache: bool):
        """Qwen3-Next's gated delta-net (``Qwen3NextGatedDeltaNet``) with transformers' torch fallbacks:
        ``causal_conv1d_fn`` and ``torch_chunk_gated_delta_rule`` for a prompt (or a forward without
        cache), ``causal_conv1d_update`` and ``torch_recurrent_gated_delta_rule`` for a decode step. The
        caller frees nothing: ``x`` (the normed input) is freed here, the layer's output returned."""
        t, a, b = self.t, self.a, self.b
        T = b * q_len
        nv, nk = att.num_heads, att.num_kv_heads or att.num_heads
        dk, dv = att.head_dim, att.v_head_dim or att.head_dim
        kw, vw = nk * dk, nv * dv  # key_dim, value_dim
        conv_dim = 2 * kw + vw
        kernel = self.cfg.get("linear_conv_kernel_dim", 4)
        state_bytes = b * nv * dk * dv * 4  # the delta-rule state (fp32)
        entry = self.cache.get(i) if use_cache else None
        decode = entry is not None and q_len == 1  # use_precomputed_states and seq_len == 1

        proj = t.new(T * (2 * kw + 2 * vw) * a)  # in_proj_qkvz
        ba = t.new(T * 2 * nv * a)  # in_proj_ba
        # fix_query_key_value_ordering: value and z (then b, a) are reshaped out of a strided split: copies;
        # then query and key are reshaped to (b, s, key_dim): copies too
        vc = t.new(T * vw * a)
        z = t.new(T * vw * a)
        bc = t.new(T * nv * a)
        ac = t.new(T * nv * a)
        qc = t.new(T * kw * a)
        kc = t.new(T * kw * a)
        mixed = t.new(T * conv_dim * a)  # cat((query, key, value), -1)
        if decode:  # causal_conv1d_update: cat(conv_state, x), conv1d, silu, cast
            full = t.new(b * conv_dim * (kernel + 1) * a)
            conv = t.new(b * conv_dim * 2 * a)
            act = t.new(b * conv_dim * a)
            t.free(conv, full)
            t.free(mixed)
        else:
            length = q_len
            if use_cache and entry is None:  # update_conv_state: the conv state, zeros(b, conv_dim, kernel)
                entry = self.cache[i] = [None, t.new(b * conv_dim * kernel * a), 0]
            if use_cache and q_len < kernel:  # ... and pads a prompt shorter than the kernel
                padded = t.new(b * conv_dim * kernel * a)
                t.free(mixed)
                mixed, length = padded, kernel
            conv = t.new(b * conv_dim * (length + kernel - 1) * a)  # conv1d(padding=kernel - 1)
            act = t.new(b * conv_dim * length * a)  # silu of [..., :length]
            t.free(conv, mixed)
        t.free(qc, kc, vc)  # query, key, value = split(mixed_qkv): views of the convolution's output
        beta = t.new(T * nv * a)  # b.sigmoid()
        af = t.new(T * nv * 4)  # g = -A_log.float().exp() * softplus(a.float() + dt_bias)
        ad = t.new(T * nv * 4)
        t.free(af)
        sp = t.new(T * nv * 4)
        t.free(ad)
        g = t.new(T * nv * 4)
        t.free(sp)
        rq = rk = None
        if nv > nk:  # repeat_interleave to the value heads
            rq = t.new(T * nv * dk * a)
            rk = t.new(T * nv * dk * a)
        if decode:
            core, state = self._recurrent_delta_rule(T, nv, dk, dv, state_bytes)
        else:
            core, state = self._chunk_delta_rule(b, q_len, nv, dk, dv, state_bytes, keep_state=use_cache)
        if use_cache and entry[0] is None:  # update_recurrent_state: zeros_like at the first update, then copy_
            entry[0] = t.new(state_bytes)
        n = T * vw
        if a == 4 and not decode:  # core_attn_out.reshape(-1, dim) of the transposed fp32 view: a copy
            flat = core
            core = t.new(n * 4)
            t.free(flat)
        # Qwen3NextRMSNormGated(core, z): fp32 norm, weight * x in the model dtype, * silu(z.float()), cast
        rows = T * nv * 4  # the variance, one per head and token
        h32 = t.new(n * 4) if a < 4 else None  # the fp32 casts are no-ops at fp32
        p = t.new(n * 4)  # pow(2)
        var = t.new(rows)  # .mean(-1, keepdim=True)
        t.free(p)
        ve = t.new(rows)
        r = t.new(rows)  # rsqrt(variance + eps)
        t.free(ve)
        h = t.new(n * 4)
        t.free(r, h32)
        ha = t.new(n * a) if a < 4 else None
        w = t.new(n * a)  # weight * x
        t.free(ha, h)
        z32 = t.new(n * 4) if a < 4 else None
        s = t.new(n * 4)  # silu
        t.free(z32)
        m = t.new(n * 4)
        t.free(s, w)
        if a < 4:
            out = t.new(n * a)
            t.free(m, var)
        else:
            out = m
            t.free(var)
        t.free(core)
        y = t.new(T * self.spec.hidden_size * a)  # out_proj
        # the forward's locals, in the order the frame releases them
        t.free(proj, ba, rq, rk, z, bc, ac, act, beta, g, out, state, x)
        return y, None

    def _chunk_delta_rule(self, b: int, s: int, nv: int, dk: int, dv: int, state_bytes: int, keep_state: bool):
        """``torch_chunk_gated_delta_rule`` over ``s`` tokens (chunks of 64) with no initial state; returns
        (output in the model dtype, final state or None)."""
        t, a = self.t, self.a
        chunk = 64
        T = b * s
        S = -(-s // chunk) * chunk  # padded length
        N = S // chunk
        qk, vv = T * nv * dk * 4, T * nv * dv * 4  # fp32 (b, heads, s, dim)
        pqk, pvv = b * nv * S * dk * 4, b * nv * S * dv * 4  # the same, padded
        # transpose(1, 2).to(float32, memory_format=contiguous_format): a copy from a 16-bit dtype; from fp32
        # (the decay always) ``to`` aliases, since the transposed view's suggested format is contiguous
        q32, k32, v32, be32 = (t.new(n) if a < 4 else None for n in (qk, qk, vv, T * nv * 4))
        de32 = None
        normed = []
        for x32 in (q32, k32):  # l2norm: x * rsqrt((x * x).sum(-1) + eps)
            sq = t.new(qk)
            sm = t.new(T * nv * 4)
            t.free(sq)
            se = t.new(T * nv * 4)
            t.free(sm)
            r = t.new(T * nv * 4)
            t.free(se)
            xn = t.new(qk)
            t.free(r, x32)
            normed.append(xn)
        qn, kn = normed
        qs = t.new(qk)  # query * scaling
        t.free(qn)
        qp, kp, vp = t.new(pqk), t.new(pqk), t.new(pvv)  # F.pad to a multiple of the chunk
        t.free(qs, kn, v32)
        bp, dp = t.new(b * nv * S * 4), t.new(b * nv * S * 4)
        t.free(be32, de32)
        v_beta = t.new(pvv)
        k_beta = t.new(pqk)
        cum = t.new(b * nv * S * 4)  # decay.cumsum
        P = b * nv * N * chunk * chunk * 4  # pairwise decays, (b, heads, chunks, 64, 64)
        d1 = t.new(P)
        d2 = t.new(P)  # masked_fill
        t.free(d1)
        pair = t.new(P)  # exp
        t.free(d2)
        mm = t.new(P)
        ut = t.new(P)  # (k_beta @ key^T) * pairwise
        t.free(mm)
        mm = t.new(P)
        intra = t.new(P)  # (query @ key^T) * pairwise
        t.free(mm)
        e = t.new(b * nv * S * 4)
        dkb = t.new(pqk)  # k_beta * cum.exp()
        t.free(e)
        new_values = t.new(pvv)  # solve_triangular
        k_cum = t.new(pqk)
        state = t.new(state_bytes)  # zeros
        core = t.new(pvv)  # zeros_like(new_values)
        e = t.new(b * nv * S * 4)
        qd = t.new(pqk)  # query * cum.exp()
        t.free(e, qp)
        e1 = t.new(b * nv * S * 4)
        e2 = t.new(b * nv * S * 4)
        t.free(e1)
        kd = t.new(pqk)  # key * (cum[-1] - cum).exp()
        t.free(e2, kp)
        chunk_decay = t.new(b * nv * N * 4)
        c = b * nv * chunk * dv * 4  # one chunk's output
        # the sequential scan: one iteration per chunk; v_new and inter_chunk_attn live until reassigned
        carried = self._chunk_step(c, state_bytes, (state, None, None))
        if N > 1:
            carried = t.repeat(N - 1, lambda last: self._chunk_step(c, state_bytes, last), carried)
        state, v_new, inter = carried
        if not keep_state:
            t.free(state)
            state = None
        flat = t.new(pvv)  # core_attn_out.reshape(b, heads, -1, dim): zeros_like kept solve's strides, a copy
        t.free(core)
        if a < 4:  # [:, :, :s].transpose(1, 2).to(dtype, contiguous): a copy (at fp32 a view of ``flat``)
            out = t.new(T * nv * dv * a)
            t.free(flat)
        else:
            out = flat
        t.free(qd, kd, vp, bp, dp, v_beta, k_beta, cum, pair, ut, intra, dkb, new_values, k_cum, chunk_decay,
               v_new, inter)
        return out, state

    def _chunk_step(self, c: int, sb: int, carried: tuple) -> tuple:
        """One iteration of the chunk scan; ``carried`` is (state, v_new, inter_chunk_attn), returned anew."""
        t = self.t
        state, v_new, inter = carried
        m1 = t.new(c)  # k_cumdecay[:, :, i] @ state
        vn = t.new(c)  # new_values[:, :, i] - m1
        t.free(m1, v_new)
        ic = t.new(c)  # query[:, :, i] @ state
        t.free(inter)
        m2 = t.new(c)  # intra[:, :, i] @ v_new
        o = t.new(c)  # inter + m2, copied into core_attn_out
        t.free(m2, o)
        sd = t.new(sb)  # state * chunk_decay
        kv = t.new(sb)  # key[:, :, i]^T @ v_new
        ns = t.new(sb)
        t.free(sd, kv, state)
        return ns, vn, ic

    def _recurrent_delta_rule(self, T: int, nv: int, dk: int, dv: int, state_bytes: int):
        """``torch_recurrent_gated_delta_rule`` for one token with the cached state (used in place, no copy);
        returns (output in the model dtype, new state)."""
        t, a = self.t, self.a
        qk = T * nv * dk * 4
        # query, key, value, beta to fp32 (one token: the transposes are contiguous, so no copy at fp32)
        q32, k32, v32, be32 = (t.new(n) if a < 4 else None for n in (qk, qk, T * nv * dv * 4, T * nv * 4))
        normed = []
        for x32 in (q32, k32):  # l2norm
            sq = t.new(qk)
            sm = t.new(T * nv * 4)
            t.free(sq)
            se = t.new(T * nv * 4)
            t.free(sm)
            r = t.new(T * nv * 4)
            t.free(se)
            normed.append(t.new(qk))
            t.free(r, x32)
        qs = t.new(qk)  # query / sqrt(dk)
        t.free(normed[0])
        small = [qs, normed[1], v32, be32]
        core = t.new(T * nv * dv * 4)  # zeros_like(value)
        s1 = t.new(state_bytes)  # state * decay_t
        m = t.new(state_bytes)  # (state * k_t).sum(-2)
        t.free(m)
        o = t.new(state_bytes)  # k_t * delta
        s2 = t.new(state_bytes)
        t.free(o, s1)
        m = t.new(state_bytes)  # (state * q_t).sum(-2)
        t.free(m)
        if a < 4:  # transpose(1, 2).contiguous().to(dtype): one token, so only the cast copies
            out = t.new(T * nv * dv * a)
            t.free(core)
        else:
            out = core
        t.free(*small)
        return out, s2

    # ---- feed-forward ----------------------------------------------------------------------------
    def mlp(self, layer: LayerSpec, T: int, x):
        """The MLP on the normed input ``x`` (freed here); returns its output block."""
        t, a = self.t, self.a
        H = self.spec.hidden_size
        m = layer.mlp
        if m.kind == "none":
            t.free(x)
            return t.new(T * H * a)
        if m.kind == "moe":
            if self.lay.shared_expert_gate and m.shared_intermediate_size:
                # Qwen3-Next: shared expert, router + experts, sigmoid(shared_expert_gate(x)) * shared, add
                s = self.dense(m.shared_intermediate_size, True, T)
                y = self.moe_batched(m, T) if self.decoding else self.moe(m, T)
                gs = t.new(T * H * a)
                t.free(s)
                y2 = t.new(T * H * a)
                t.free(y, gs, x)
                return y2
            y = self.moe_batched(m, T) if self.decoding else self.moe(m, T)
            if m.shared_intermediate_size:
                s = self.dense(m.shared_intermediate_size, True, T)
                y2 = t.new(T * H * a)
                t.free(y, s)
                y = y2
            t.free(x)
            return y
        y = self.dense(m.intermediate_size, m.gated, T)
        t.free(x)
        return y

    def dense(self, width: int, gated: bool, T: int):
        t, a = self.t, self.a
        n = T * width
        if not gated:
            f = t.new(n * a)
            g = self.act(n, f)
            t.free(f)
            y = t.new(T * self.spec.hidden_size * a)
            t.free(g)
            return y
        if self.lay.fused_gate_up:
            gu = t.new(2 * n * a)
            g = self.act(n, gu)
            m = t.new(n * a)
            t.free(g)
            y = t.new(T * self.spec.hidden_size * a)
            t.free(m, gu)
            return y
        gate = t.new(n * a)
        if self.w.lora:  # LoRA hook
            gate = _lora.linear(self, "gate_proj", T, self.spec.hidden_size, width, gate)
        g = self.act(n, gate)
        t.free(gate)
        up = t.new(n * a)
        if self.w.lora:  # LoRA hook
            up = _lora.linear(self, "up_proj", T, self.spec.hidden_size, width, up)
        m = t.new(n * a)
        t.free(g, up)
        y = t.new(T * self.spec.hidden_size * a)
        if self.w.lora:  # LoRA hook
            y = _lora.linear(self, "down_proj", T, width, self.spec.hidden_size, y)
        t.free(m)
        return y

    def moe_batched(self, m, T: int):
        """``batched_mm_experts_forward``: generate switches to it for the decode steps on a GPU
        (``_optimize_model_for_decode``); it gathers each routed token's expert weights."""
        t, a = self.t, self.a
        H, E, k, n = self.spec.hidden_size, m.num_experts, m.top_k, m.intermediate_size
        R = T * k
        routing = self.router(m, T)
        hs = t.new(R * H * a)  # repeat_interleave
        ids = t.new(R * 8)  # clamp
        w_up = t.new(R * 2 * n * H * a)  # gate_up_proj[expert_ids]
        p = t.new(R * 2 * n * a)
        mm = self.glu(R * n, p)
        t.free(p)
        w_down = t.new(R * H * n * a)  # down_proj[expert_ids], made before the gathered gate_up goes
        t.free(w_up)
        d = t.new(R * H * a)
        t.free(mm)
        wa = 4 if self.lay.router_fp32 else a
        wo = t.new(R * H * wa)
        y = t.new(T * H * wa)
        if wa != a:
            y2 = t.new(T * H * a)
            t.free(y)
            y = y2
        t.free(wo, d, w_down, ids, hs, *routing)
        return y

    def glu(self, n: int, gate_up):
        """The experts' gating of the (rows, 2 x width) projection; returns the (rows, width) product."""
        t, a = self.t, self.a
        if self.lay.expert_glu == "gpt_oss":
            g = t.new(n * a)  # gate.clamp(max=limit)
            u = t.new(n * a)  # up.clamp(-limit, limit)
            ga = t.new(n * a)
            sg = t.new(n * a)  # sigmoid(gate * alpha)
            t.free(ga)
            glu = t.new(n * a)
            t.free(sg)
            u1 = t.new(n * a)  # up + 1
            out = t.new(n * a)
            t.free(u1, glu, g, u)
            return out
        g = self.act(n, gate_up)
        out = t.new(n * a)
        t.free(g)
        return out

    def router(self, m, T: int) -> list:
        """The top-k router; returns the blocks it leaves alive (logits, weights, indices)."""
        t, a = self.t, self.a
        H, E, k = self.spec.hidden_size, m.num_experts, m.top_k
        if self.lay.router_fp32:
            h32 = t.new(T * H * 4)
            logits = t.new(T * E * 4)
            t.free(h32)
        else:
            logits = t.new(T * E * a)
        probs = t.new(T * E * 4)
        top_v = t.new(T * k * 4)
        top_i = t.new(T * k * 8)
        top_va = t.new(T * k * a)
        t.free(top_v, probs)
        return [logits, top_va, top_i]

    def moe(self, m, T: int):
        """Router + ``grouped_mm_experts_forward`` (transformers' default experts implementation)."""
        t, a = self.t, self.a
        H, E, k, n = self.spec.hidden_size, m.num_experts, m.top_k, m.intermediate_size
        R = T * k  # routed rows
        routing = self.router(m, T)
        ids = t.new(R * 8)
        perm = t.new(R * 8)
        pk = t.new(R * 8)
        hg = t.new(R * H * a)  # hidden_states[perm // top_k]
        t.free(pk)
        swg = t.new(R * a)
        sentinel = t.new(R)
        bias = t.new(R * 2 * n * a) if self.lay.expert_bias else None  # gate_up_proj_bias[expert_ids]
        p1 = t.new(R * 2 * n * a)
        p2 = t.new(R * 2 * n * a)  # masked_fill (out of place)
        t.free(p1)
        mm = self.glu(R * n, p2)
        t.free(p2, bias)
        bias = t.new(R * H * a) if self.lay.expert_bias else None
        d1 = t.new(R * H * a)
        t.free(mm)
        d2 = t.new(R * H * a)
        t.free(d1, bias)
        wa = 4 if self.lay.router_fp32 else a  # fp32 routing weights promote the product to fp32
        wo = t.new(R * H * wa)  # * routing weights (proj_out stays referenced until the return)
        inv = t.new(R * 8)
        ar = t.new(R * 8)
        t.free(ar)
        wo2 = t.new(R * H * wa)  # weighted_out[inv_perm]
        t.free(wo)
        y = t.new(T * H * wa)  # view(T, k, H).sum(1)
        if wa != a:
            y2 = t.new(T * H * a)  # .to(hidden_states.dtype)
            t.free(y)
            y = y2
        t.free(wo2, d2, hg, swg, sentinel, inv, ids, perm, *routing)
        return y

    def _small_decode(self) -> bool:
        """True when a decode step's only tensors above the tracked size are the cache's and the logits':
        flash-attention paths (no repeated K/V, no scores) of dense layers with a small batch."""
        if getattr(self, "_small", None) is None:
            a, lay = self.a, self.lay
            ok = self.attn in ("sdpa", "flash_attention_2") and a < 4 and lay.sdpa
            widest = self.spec.hidden_size * 4  # the norms' fp32 copies, bytes per token
            for layer in self.spec.layers:
                att, m = layer.attention, layer.mlp
                ok = ok and att.kind in ("full", "sliding") and m.kind in ("dense", "none")
                ok = ok and att.head_dim <= 256 and att.head_dim == (att.v_head_dim or att.head_dim)
                nkv = att.num_kv_heads or att.num_heads
                qkv = (att.num_heads + 2 * nkv) * att.head_dim if lay.fused_qkv else att.num_heads * att.head_dim
                mlp = (2 if lay.fused_gate_up else 1) * m.intermediate_size
                widest = max(widest, qkv * a, mlp * a, (4 * att.num_heads * att.head_dim if lay.norm != "layer"
                                                        and self.spec.model_type in _QK_NORM else 0))
            self._small = ok and self.b * widest < self.t.min_bytes
        return self._small

    def cache_only_layer(self, i: int, att: AttentionSpec, past):
        """A decode step's layer reduced to what the allocator sees of it (``_small_decode``): the cache
        concatenation (new K, free old K, new V, free old V)."""
        nkv = att.num_kv_heads or att.num_heads
        self.cache_update(i, att, self.b * nkv * att.head_dim * self.kv_b,
                          self.b * nkv * (att.v_head_dim or att.head_dim) * self.kv_b, 1, past, None)

    def make_masks(self, q_len: int, kv: int) -> dict:
        """The 4D masks the base model builds before its layers (masking_utils), by layer kind.

        eager: a float (b, 1, q, kv) mask per layer kind (full, sliding). sdpa: none while the prompt
        has no padding, except a boolean one for sliding layers once kv reaches the window.
        """
        t, a, b = self.t, self.a, self.b
        kinds = {l.attention.kind for l in self.spec.layers}
        sliding = [l.attention.window for l in self.spec.layers if l.attention.kind == "sliding" and l.attention.window]
        masks = {}
        wanted = []
        if self.attn == "eager":
            if kinds & {"full", "mla"}:
                wanted.append(("full", a))
            if sliding:
                wanted.append(("sliding", a))
        elif self.attn == "sdpa" and sliding and kv >= min(sliding):
            wanted.append(("sliding", 1))
        for name, elem in wanted:
            b1 = t.new(b * q_len * kv)  # boolean pieces (causal, window, padding) combined
            b2 = t.new(b * q_len * kv)
            t.free(b1)
            if elem == 1:
                b3 = t.new(b * q_len * kv)
                m = t.new(b * q_len * kv)
                t.free(b3, b2)
            else:
                m = t.new(b * q_len * kv * elem)  # where(mask, 0, min_dtype)
                t.free(b2)
            masks[name] = m
        return masks

    # ---- one forward, in the two pieces the replay records: the frame and a layer -------------------
    def frame(self, q_len: int, past, logits_positions: int, use_cache: bool, static_len: int | None = None):
        """One model forward over ``q_len`` new tokens per sequence around its layers, which it records as
        one ``_Tape.layers`` op; returns the logits' slot."""
        t, a, b = self.t, self.a, self.b
        spec = self.spec
        H, V = spec.hidden_size, spec.vocab_size
        T = b * q_len
        if self.small_step(q_len, use_cache, static_len):  # each layer's cache concatenation, the logits
            t.layers(None, False)
            return t.new(b * V * a)
        emb = t.new(T * H * a)
        if self.lay.embed_scale:  # the scaled embedding module: embedding(ids) * embed_scale
            scaled = t.new(T * H * a)
            t.free(emb)
            emb = scaled
        keep = [emb]  # inputs_embeds stays referenced until the model's forward returns
        h = emb
        if self.lay.learned_positions:  # inputs_embeds + position_embeds; both stay referenced
            keep.append(t.new(T * H * a))
            h = t.new(T * H * a)
        rot = []
        if self.lay.rope != "none":  # cos, sin at the activation dtype, made from fp32 (b, q, head_dim)
            dh = max((l.attention.head_dim for l in spec.layers if l.attention.kind in ("full", "sliding")),
                     default=0) * self.rotary_fraction
            if any(l.attention.kind == "mla" for l in spec.layers):
                dh = max(l.attention.qk_rope_head_dim for l in spec.layers)
            freqs = t.new(T * dh / 2 * 4)
            embf = t.new(T * dh * 4)
            c32 = t.new(T * dh * 4)
            s32 = t.new(T * dh * 4)
            rot = [t.new(T * dh * a), t.new(T * dh * a)]
            t.free(freqs, embf, c32, s32)
        masks = self.make_masks(q_len, past + q_len)
        h = t.layers(h, h in keep)  # every decoder layer (``layer``), each freeing its input
        hn = self.norm(T * H)
        if h not in keep:
            t.free(h)
        # the base model's locals (embeddings, cos/sin, masks) go when it returns, before the head
        t.free(*rot, *keep, *masks.values())
        logits = t.new(b * logits_positions * V * a)
        if self.lay.final_softcap:
            for _ in range(3):
                l2 = t.new(b * logits_positions * V * a)
                t.free(logits)
                logits = l2
        t.free(hn)
        return logits

    def small_step(self, q_len: int, use_cache: bool, static_len: int | None) -> bool:
        return q_len == 1 and use_cache and static_len is None and self._small_decode()

    def layer(self, i: int, layer: LayerSpec, q_len: int, past, static_len: int | None, use_cache: bool,
              masks: dict, h_in, keep: list):
        """Decoder layer ``i`` on the hidden states ``h_in``; returns its output's slot."""
        t, a = self.t, self.a
        T, H = self.b * q_len, self.spec.hidden_size
        # the caller's ``hidden_states`` keeps the layer's input alive until the layer returns
        x = self.norm(T * H)
        y, weights = self.attention(i, layer, q_len, past, x, static_len, use_cache, masks)
        if self.lay.sandwich_norms:
            y2 = self.norm(T * H)
            t.free(y)
            y = y2
        h1 = t.new(T * H * a)
        t.free(y)
        x2 = self.norm(T * H)  # post_attention_layernorm (Gemma: pre_feedforward_layernorm)
        y = self.mlp(layer, T, x2)
        if self.lay.sandwich_norms:
            y2 = self.norm(T * H)
            t.free(y)
            y = y2
        h = t.new(T * H * a)
        t.free(y, h1, weights)
        if h_in not in keep:
            t.free(h_in)
        return h


_QK_NORM = ("qwen3", "qwen3_moe", "qwen3_next", "gemma3_text", "olmoe")


try:  # the optional C allocator (estimator/_replay.c); the Python one is the reference
    from estimator._replay import Allocator as _CAllocator
except ImportError:  # not built (no compiler at install): the Python replay answers, the same bytes
    _CAllocator = None
# False: always the Python replay (also ``VRAMCAL_PYTHON_REPLAY=1`` in the environment)
ACCELERATE = not os.environ.get("VRAMCAL_PYTHON_REPLAY")


def accelerated() -> bool:
    """Whether ``simulate`` runs on the C allocator by default (built and not switched off)."""
    return ACCELERATE and _CAllocator is not None


def simulate(spec: ModelSpec, workload, min_bytes: int = MIN_TRACKED_BYTES,
             accelerate: bool | None = None) -> dict[str, int]:
    """Peak bytes allocated and reserved above the weights for one run of ``workload`` on ``spec``.

    Returns ``{"sim_allocated_bytes", "sim_reserved_bytes", "sim_peak_step"}``: the peaks of
    ``torch.cuda.max_memory_allocated()`` / ``max_memory_reserved()`` minus the weights' bytes, as the
    harness measures them (reset after the weights are loaded and ``empty_cache()``), tensors under
    ``min_bytes`` left out.

    ``accelerate``: run on the C allocator (default: ``accelerated()``); the same answer as the Python
    one, which takes over, from the start, when a size passes 2**62 (the C one's OverflowError).
    """
    if accelerate is None:
        accelerate = accelerated()
    if accelerate and _CAllocator is not None:
        try:
            return _simulate(spec, workload, min_bytes, _CAllocator)
        except OverflowError:
            pass
    return _simulate(spec, workload, min_bytes, CachingAllocator)


def _simulate(spec: ModelSpec, workload, min_bytes: int, allocator) -> dict[str, int]:
    alloc = allocator.restore(_weights_state(spec, workload, min_bytes))
    base = alloc.allocated
    replay = _Replay(spec, workload, min_bytes, alloc)
    b, V = workload.batch, spec.vocab_size
    peak_step = 0

    def new(nbytes):
        return alloc.malloc(nbytes) if nbytes >= min_bytes else None

    if workload.workload == "forward":
        alloc.free(replay.forward(workload.context, 0, workload.context, use_cache=False))
    else:
        static = workload.cache_tokens if workload.cache == "static" else None
        prompt = workload.prompt_tokens
        eos = spec.config.get("eos_token_id") if spec.config else None
        scored = eos is not None and workload.new_tokens > 1
        copy = round_size(b * V * 4) if b * V * 4 >= min_bytes else 0  # a tracked fp32 copy of the logits
        past = 0
        prev_logits32 = prev_scores = None
        steps = max(workload.new_tokens, 1)
        step = 0
        seen: dict = {}  # allocator state at a decode step's start -> step, since sizes stopped growing
        valid_to = float("inf")  # the past up to which the pieces those steps ran hold
        grew = True  # the last step's sizes grew with the past (or it was the prompt): ``seen`` was reset
        while step < steps:
            q_len = prompt if step == 0 else 1
            replay.run.decoding = step > 0
            if step > 1 and not grew:
                # Decode steps whose pieces allocate the same sizes at any past (a static cache, a full
                # sliding window) and that bring the allocator back to a state it had p steps earlier
                # repeat those p steps exactly, up to where the pieces' recordings stop holding: skip whole
                # periods (their peaks were seen, so they set no new one). After a step that grew, the state
                # would be forgotten at the end of this one if it grows too, as it mostly does: not built
                # (a skip found one step later is the same skip).
                state = replay.state(prev_logits32, prev_scores)
                if state in seen:
                    period = step - seen[state]
                    skip = min(steps - step, replay.same_steps(past, valid_to)) // period * period
                    if skip > 0:
                        step += skip
                        past += skip
                        seen, valid_to = {}, float("inf")
                        continue
                seen[state] = step
            if step > 0 and grew and past > 0:  # growing decode steps, many in one call
                held = [prev_logits32, prev_scores]
                done = replay.fast_steps(past, steps - step, static, (copy, copy if scored else 0), held)
                if done is not None:
                    k, last = done
                    if last >= 0:
                        peak_step = step + last
                    prev_logits32, prev_scores = held
                    step += k
                    past += k
                    seen, valid_to = {}, float("inf")
                    continue
            replay.used = []
            before = alloc.peak_allocated
            logits = replay.forward(q_len, past, 1, use_cache=True, static_len=static)
            past += q_len
            logits32 = new(b * V * 4)  # logits[:, -1].to(float32, copy=True)
            alloc.free(prev_logits32)
            prev_logits32 = logits32
            if scored:  # min-length processor: clone, then where
                clone = new(b * V * 4)
                scores = new(b * V * 4)
                alloc.free(clone)
                alloc.free(prev_scores)
                prev_scores = scores
            alloc.free(logits)  # del outputs
            if alloc.peak_allocated > before:
                peak_step = step
            grew = step == 0 or any(t.sym for t in replay.used)
            if grew:
                seen, valid_to = {}, float("inf")
            else:
                valid_to = min([valid_to] + [t.hi for t in replay.used])
            step += 1
    return {
        "sim_allocated_bytes": alloc.peak_allocated - base,
        "sim_reserved_bytes": alloc.peak_reserved - base,
        "sim_peak_step": peak_step,
    }


class _Template:
    """A recorded piece of the program: ``ops`` on ``n`` slots, valid for past tokens in ``[lo, hi]``;
    ``sym``: some sizes are ``(a, b)``, i.e. ``a + b * past``. ``out``: what the piece hands back."""

    __slots__ = ("ops", "n", "lo", "hi", "sym", "out", "loop")

    def __init__(self, ops: list, n: int, lo, hi, sym: bool, out):
        self.ops, self.n, self.lo, self.hi, self.sym, self.out = ops, n, lo, hi, sym, out
        self.loop = None  # whether ``ops`` hold a loop (``_Repeat``), once ``_flatten`` asked


class _Step:
    """A decode step flattened (``_Replay._flatten``): its ops, the slots that take each layer's cache
    tensors in (``cache_in``: layer, slot, slot) and hand them out (``cache_out``: layer, slot, slot, tokens
    held), the logits' slot."""

    __slots__ = ("ops", "n", "lo", "hi", "sym", "cache_in", "cache_out", "logits", "fast")

    def __init__(self, tmpl: _Template, cache_in: list, cache_out: list, logits):
        self.ops, self.n, self.lo, self.hi, self.sym = tmpl.ops, tmpl.n, tmpl.lo, tmpl.hi, tmpl.sym
        self.cache_in, self.cache_out, self.logits = cache_in, cache_out, logits
        self.fast = None  # (glue, program for the allocator's ``decode``...): ``_Replay.fast_steps``


class _Replay:
    """Runs the program of ``_Run`` on the allocator model. Each piece (a forward's frame, one layer) is
    recorded once per shape and replayed for every layer and step it serves; a decode step's pieces are
    recorded with a symbolic past (``_Sym``), so one recording serves every step whose comparisons answer
    the same. The allocator sees exactly the requests the plain program makes, in the same order."""

    def __init__(self, spec: ModelSpec, workload, min_bytes: int, alloc: CachingAllocator):
        self.spec, self.min_bytes, self.alloc = spec, min_bytes, alloc
        self.run = _Run(spec, workload, min_bytes)
        self.cache: dict[int, list] = {}  # layer index -> [block, block, tokens held]
        self.templates: dict[tuple, list] = {}
        self.used: list = []  # the templates the current step ran
        kinds: dict = {}
        self._kind = [kinds.setdefault(layer, len(kinds)) for layer in spec.layers]  # a small key per layer

    def same_steps(self, past: int, valid_to: float) -> float:
        """How many decode steps from ``past`` on run the same pieces as the last ones, whose sizes do not
        depend on the past and whose recordings hold up to ``valid_to``: up to there, or to the past at
        which a cache's held tokens equal it (a layer's piece changes there)."""
        end = valid_to + 1
        for e in self.cache.values():
            if e[2] >= past:
                end = min(end, e[2])
        return end - past

    def state(self, *blocks) -> tuple:
        """What the next step's allocations depend on besides the past: the free blocks, the live ones."""
        live = [b for e in self.cache.values() for b in e[:2]] + list(blocks)
        return self.alloc.state(live), tuple(e[2] for e in self.cache.values())

    # ---- recording --------------------------------------------------------------------------------
    def _template(self, key: tuple, x: int, symbolic: bool, record) -> _Template:
        """The template for ``key`` valid at past ``x``, recorded if none is: ``record(past) -> out`` runs
        the piece on ``self.run.t`` (a fresh tape), with a symbolic past when ``symbolic``."""
        found = self.templates.get(key)
        if found:
            for tmpl in found:
                if tmpl.lo <= x <= tmpl.hi:
                    self.used.append(tmpl)
                    return tmpl
        tmpl = None
        if symbolic:
            conds: list = []
            try:
                tmpl = self._record(record, _Sym(0, 1, x, conds), x)
                tmpl.lo, tmpl.hi = _valid_range(conds, x)
            except _NotAffine:
                tmpl = None
        if tmpl is None:
            tmpl = self._record(record, x, x)
        self.templates.setdefault(key, []).append(tmpl)
        self.used.append(tmpl)
        return tmpl

    def _record(self, record, past, x: int) -> _Template:
        self.run.t = tape = _Tape(self.min_bytes)
        out = record(past)
        ops, sym = [], False
        for s, z in tape.ops:
            if s >= 0 and isinstance(z, _Sym):
                a, b = z.a, z.b
                if a != int(a) or b != int(b):
                    raise _NotAffine  # int() of a fractional size is not affine
                z = (int(a), int(b)) if b else int(a)
                sym = sym or bool(b)
            if s >= 0 and z.__class__ is int and z:
                z = -(-z // 512) * 512  # the allocator's round_size, done once
            ops.append((s, z))
        if isinstance(out, tuple) and any(isinstance(v, _Sym) for v in out):
            out = tuple((int(v.a), int(v.b)) if isinstance(v, _Sym) else v for v in out)
        return _Template(ops, tape.n, x, x, sym, out)

    # ---- running ----------------------------------------------------------------------------------
    def forward(self, q_len: int, past: int, logits_positions: int, use_cache: bool, static_len=None):
        """One forward (the prompt, a decode step or a whole forward pass); returns the logits' block."""
        run = self.run
        run.static_decode = static_len is not None and q_len == 1
        symbolic = q_len == 1 and past > 0
        if symbolic:
            return self._step(q_len, past, logits_positions, use_cache, static_len)
        frame = self._frame(q_len, past, logits_positions, use_cache, static_len, symbolic)
        loc = [None] * frame.n
        self._execute(frame.ops, loc, past, (q_len, static_len, use_cache, symbolic))
        return loc[frame.out[0]] if frame.out[0] is not None else None

    def _frame(self, q_len: int, x: int, logits_positions: int, use_cache: bool, static_len, symbolic: bool):
        run = self.run
        key = ("frame", q_len, logits_positions, use_cache, static_len, run.decoding, run.static_decode)

        def record(past):
            return (run.frame(q_len, past, logits_positions, use_cache, static_len), run.static_decode)

        return self._template(key, x, symbolic, record)

    def _desc(self, i: int, x: int):
        """What layer ``i``'s recording assumes of its cache: none, or which tensors are tracked and the
        tokens it holds (the past itself, or a fixed number)."""
        entry = self.cache.get(i)
        if entry is None:
            return None
        held = entry[2]
        return (entry[0] is not None, entry[1] is not None, "past" if held == x else held)

    def _layer_template(self, i: int, layer: LayerSpec, x: int, q_len: int, static_len, use_cache: bool,
                        symbolic: bool, small: bool, first: bool, desc) -> _Template:
        run = self.run
        key = ("layer", self._kind[i], small, q_len, static_len, use_cache, run.decoding, run.static_decode,
               first, desc)

        def record(past):
            t = run.t
            t.n = 3  # slots 0, 1, 2: the input hidden states, the cache's two tensors
            if desc is None:
                run.cache.pop(i, None)
            else:
                run.cache[i] = [1 if desc[0] else None, 2 if desc[1] else None,
                                past if desc[2] == "past" else desc[2]]
            if small:
                run.cache_only_layer(i, layer.attention, past)
                h_out = None
            else:
                # the masks are the frame's: a layer reads them and frees nothing of them
                h_out = run.layer(i, layer, q_len, past, static_len, use_cache, {}, 0, [0] if first else [])
            after = run.cache.get(i)
            if after is None:
                return (h_out, None, None, None)
            return (h_out, after[0], after[1], after[2])

        return self._template(key, x, symbolic, record)

    def _step_template(self, q_len: int, x: int, logits_positions: int, use_cache: bool, static_len):
        """The flattened decode step (``_Step``) valid at past ``x`` and its layers' descriptors, recorded if
        none is; None for a step with a loop in a piece."""
        run = self.run
        descs = tuple(self._desc(i, x) for i in range(len(self.spec.layers)))
        key = ("step", q_len, logits_positions, use_cache, static_len, run.decoding, run.static_decode, descs)
        for cand in self.templates.get(key, ()):
            if cand.lo <= x <= cand.hi:
                return cand, descs
        step = self._flatten(q_len, x, logits_positions, use_cache, static_len, descs)
        if step is not None:
            self.templates.setdefault(key, []).append(step)
        return step, descs

    def _step(self, q_len: int, x: int, logits_positions: int, use_cache: bool, static_len):
        """A decode step as one flat list of ops over every layer (``_Step``), built once and run for
        every step its pieces hold for: no per-layer bookkeeping between the allocator's requests."""
        step, _ = self._step_template(q_len, x, logits_positions, use_cache, static_len)
        if step is None:  # a piece with a loop in it: run it piece by piece
            frame = self._frame(q_len, x, logits_positions, use_cache, static_len, True)
            loc = [None] * frame.n
            self._execute(frame.ops, loc, x, (q_len, static_len, use_cache, True))
            return loc[frame.out[0]] if frame.out[0] is not None else None
        self.used.append(step)
        loc = [None] * step.n
        cache = self.cache
        for i, s0, s1 in step.cache_in:
            entry = cache[i]
            loc[s0], loc[s1] = entry[0], entry[1]
        self.alloc.run(step.ops, loc, 0, x)
        for i, s0, s1, held in step.cache_out:
            if held.__class__ is tuple:
                held = held[0] + held[1] * x
            cache[i] = [loc[s0] if s0 is not None else None, loc[s1] if s1 is not None else None, held]
        return loc[step.logits] if step.logits is not None else None

    def fast_steps(self, x: int, count: int, static_len, glue: tuple, held: list) -> tuple[int, int] | None:
        """Up to ``count`` whole decode steps from past ``x`` in one call of the allocator's ``decode`` (a
        loop in C on the C allocator), while one flattened step serves them all: its sizes grow with the past
        (a dynamic cache; the state does not repeat, so no step could be skipped), its recording holds and
        every layer's cache descriptor (``_desc``) stays the same. Each step is the step's ops, then
        ``glue`` (``simulate``'s logits copies) and the cache's hand-over, the same requests in the same
        order as ``_step`` and ``simulate``'s loop. ``held``: ``[logits32, scores]``, updated. Returns the
        steps run and the last of them (counted from 0) that raised the peak allocated, or -1; None
        (nothing run) when the steps do not qualify."""
        run = self.run
        run.static_decode = static_len is not None
        step, descs = self._step_template(1, x, 1, True, static_len)
        if step is None or not step.sym:
            return None
        k = min(count, step.hi - x + 1)
        for i, s0, s1, h in step.cache_out:
            d = descs[i]
            if d is None or (s0 is not None) != d[0] or (s1 is not None) != d[1]:
                return None
            if h.__class__ is tuple:  # the held tokens grow: "past" at every step only as x + 1
                if d[2] != "past" or h != (1, 1):
                    return None
            elif d[2] == "past" or h != d[2]:
                return None
            elif h is not None and h > x:  # a fixed count stays not "past" until the past reaches it
                k = min(k, h - x)
        if k < 2:
            return None
        if step.fast is None or step.fast[0] != glue:
            step.fast = (glue, *self._fast_program(step, glue))
        _, ops, n, keep, l32, sc = step.fast
        loc = [None] * n
        cache = self.cache
        for i, c0, c1 in step.cache_in:
            loc[c0], loc[c1] = cache[i][0], cache[i][1]
        loc[l32], loc[sc] = held
        last = self.alloc.decode(ops, loc, keep, x, k)
        x_end = x + k - 1
        for i, c0, c1 in step.cache_in:
            entry = cache[i]
            h = entry[2]
            cache[i] = [loc[c0], loc[c1], x_end + 1 if h == x else h]
        held[:] = [loc[l32], loc[sc]]
        self.used = [step]
        return k, last

    @staticmethod
    def _fast_program(step: "_Step", glue: tuple) -> tuple:
        """``step``'s ops and ``glue`` as one program for ``decode``: extra slots for the fp32 logits and
        scores that live from one step to the next; at its end, moves (``(-3, (dst, src))``) of them and of
        the cache into the slots the next step reads."""
        logits32, scores = glue  # rounded bytes of each copy, or 0 when it is not tracked (or not made)
        n = step.n
        l32, sc, t1, clone, t2 = n, n + 1, n + 2, n + 3, n + 4
        ops, moves = list(step.ops), []
        if logits32:  # logits32 = logits[:, -1].float(); free(prev_logits32)
            ops += [(t1, logits32), (l32, 0)]
            moves.append((-3, (l32, t1)))
        if scores:  # min-length processor: clone, then where
            ops += [(clone, scores), (t2, scores), (clone, 0), (sc, 0)]
            moves.append((-3, (sc, t2)))
        if step.logits is not None:
            ops.append((step.logits, 0))
        out = {i: (s0, s1) for i, s0, s1, _ in step.cache_out}
        keep = [l32, sc]
        for i, c0, c1 in step.cache_in:
            s0, s1 = out[i]
            moves += [(-3, (c0, -1 if s0 is None else s0)), (-3, (c1, -1 if s1 is None else s1))]
            keep += [c0, c1]
        return ops + moves, n + 5, keep, l32, sc

    def _flatten(self, q_len: int, x: int, logits_positions: int, use_cache: bool, static_len, descs):
        """The frame's ops with every layer's ops spliced in at its layers op, slots renumbered; None when
        a piece has a loop (``_Repeat``). Valid for the pasts every piece holds for."""
        run = self.run
        frame = self._frame(q_len, x, logits_positions, use_cache, static_len, True)
        small = run.small_step(q_len, use_cache, static_len)
        n = frame.n
        rename = {s: s for s in range(frame.n)}
        ops, lo, hi, sym = [], frame.lo, frame.hi, frame.sym
        cache_in, cache_out = [], []
        for s, z in frame.ops:
            if s == -1:
                return None
            if s >= 0:
                ops.append((rename[s], z))
                continue
            h, kept, out = z
            h = rename[h] if h is not None else None
            for i, layer in enumerate(self.spec.layers):
                desc = descs[i]
                tmpl = self._layer_template(i, layer, x, q_len, static_len, use_cache, True, small,
                                            kept and i == 0, desc)
                if tmpl.loop is None:
                    tmpl.loop = any(ts == -1 for ts, _ in tmpl.ops)
                if tmpl.loop:
                    return None
                lo, hi, sym = max(lo, tmpl.lo), min(hi, tmpl.hi), sym or tmpl.sym
                # the layer's slots: 0 the input (h), 1 and 2 its cache (n, n + 1), 3.. its own (base + slot)
                c = n
                if desc is not None:
                    cache_in.append((i, n, n + 1))
                    n += 2
                base = n - 3
                n += tmpl.n - 3

                def local(ts, h=h, c=c, base=base, cached=desc is not None):
                    if ts >= 3:
                        return base + ts
                    if ts == 0:
                        return h
                    return c + ts - 1 if cached else None

                t_ops = tmpl.ops
                if h is None:  # an untracked input: its frees go
                    t_ops = [op for op in t_ops if op[0] != 0]
                ops += [(ts + base if ts >= 3 else local(ts), tz) for ts, tz in t_ops]
                h_out, s0, s1, held = tmpl.out
                h = local(h_out) if h_out is not None else None
                if s0 is not None or s1 is not None or held is not None:
                    cache_out.append((i, local(s0) if s0 is not None else None,
                                      local(s1) if s1 is not None else None, held))
                else:
                    cache_out.append((i, None, None, None))
            rename[out] = h if h is not None else out
        logits = frame.out[0]
        return _Step(_Template(ops, n, lo, hi, sym, None), cache_in, cache_out,
                     rename[logits] if logits is not None else None)

    def _layers(self, h, kept: bool, x: int, q_len: int, static_len, use_cache: bool, symbolic: bool):
        small = self.run.small_step(q_len, use_cache, static_len)
        for i, layer in enumerate(self.spec.layers):
            entry = self.cache.get(i)
            tmpl = self._layer_template(i, layer, x, q_len, static_len, use_cache, symbolic, small,
                                        kept and i == 0, self._desc(i, x))
            lloc = [h, entry[0] if entry else None, entry[1] if entry else None] + [None] * (tmpl.n - 3)
            self._execute(tmpl.ops, lloc, x, None)
            h_out, s0, s1, held = tmpl.out
            h = lloc[h_out] if h_out is not None else None
            if s0 is None and s1 is None and held is None:
                self.cache.pop(i, None)
            else:
                if held.__class__ is tuple:
                    held = held[0] + held[1] * x
                self.cache[i] = [lloc[s0] if s0 is not None else None, lloc[s1] if s1 is not None else None, held]
        return h

    def _execute(self, ops: list, loc: list, x: int, frame) -> None:
        run, n, i = self.alloc.run, len(ops), 0
        while True:
            i = run(ops, loc, i, x)
            if i == n:
                return
            slot, arg = ops[i]
            if slot == -2:  # the layers
                h, kept, out = arg
                loc[out] = self._layers(loc[h] if h is not None else None, kept, x, *frame)
            else:
                self._repeat(arg, loc, x)
            i += 1

    def _repeat(self, rep: "_Repeat", loc: list, x: int) -> None:
        """``rep.count`` iterations of its body. The body allocates the same sizes each time and touches
        no block but its own and the loop-carried ones, so the allocator's state at an iteration's start
        (its free blocks, the carried blocks) decides everything after it. Once that state equals the
        state ``p`` iterations earlier, the iterations cycle with period ``p`` (a carried tensor is made
        before its predecessor is freed, so two places alternate: p = 2) and the peaks are already seen:
        skip whole periods, run the rest."""
        alloc = self.alloc
        seen: dict = {}
        left = rep.count
        while left:
            state = alloc.state([loc[i] for i, _ in rep.carry if loc[i] is not None])
            if state in seen:
                left %= seen[state] - left  # the period
                seen = {}
                if not left:
                    break
            else:
                seen[state] = left
            self._execute(rep.body, loc, x, None)
            for i, o in rep.carry:
                loc[i] = loc[o]
            left -= 1


_WEIGHTS: dict[int, tuple] = {}  # id(spec) -> (spec, {(dtype, min_bytes): allocator snapshot})


def _weights_state(spec: ModelSpec, workload, min_bytes: int) -> tuple:
    """The allocator after loading the weights (``parameter_bytes``), computed once per model and dtype."""
    entry = _WEIGHTS.get(id(spec))
    if entry is None or entry[0] is not spec:
        if len(_WEIGHTS) > 256:
            _WEIGHTS.clear()
        entry = _WEIGHTS[id(spec)] = (spec, {})
    lora = getattr(workload, "lora", None)
    key = (workload.dtype, min_bytes, lora)  # LoRA hook: the adapters' tensors are allocated after the model's
    snap = entry[1].get(key)
    if snap is None:
        alloc = CachingAllocator()
        for nbytes in parameter_bytes(spec, workload) + _lora.parameter_bytes(spec, lora, workload.dtype):
            if nbytes >= min_bytes:
                alloc.malloc(nbytes)
        snap = entry[1][key] = alloc.snapshot()
    return snap


def parameter_bytes(spec: ModelSpec, workload) -> list[int]:
    """Bytes of each parameter in the order transformers creates them (the allocator's starting state)."""
    w = dtype_bytes(workload.dtype)
    H, V = spec.hidden_size, spec.vocab_size
    lay = LAYOUTS.get(spec.model_type, DEFAULT_LAYOUT)
    out = [V * H * w]
    if lay.learned_positions:
        out.append((spec.max_position_embeddings or 0) * H * w)
    for layer in spec.layers:
        att, m = layer.attention, layer.mlp
        if att.kind in ("full", "sliding"):
            nh, nkv, d = att.num_heads, att.num_kv_heads or att.num_heads, att.head_dim
            dv = att.v_head_dim or d
            if lay.fused_qkv:
                out.append(H * (nh * d + nkv * (d + dv)) * w)
            else:
                q_width = nh * d * (2 if lay.gated_attention else 1)  # Qwen3-Next: query and gate
                out += [H * q_width * w, H * nkv * d * w, H * nkv * dv * w]
            out.append(nh * dv * H * w)
        elif att.kind == "mla":
            out += [H * (att.kv_lora_rank + att.qk_rope_head_dim) * w,
                    att.kv_lora_rank * att.num_heads * (att.head_dim - att.qk_rope_head_dim + att.v_head_dim) * w,
                    att.num_heads * att.v_head_dim * H * w, H * att.num_heads * att.head_dim * w]
        else:  # gated delta-net: in_proj_qkvz, in_proj_ba, out_proj
            key_width = (att.num_kv_heads or att.num_heads) * att.head_dim
            width = max(att.num_heads * (att.v_head_dim or att.head_dim), 1)
            out += [H * (2 * key_width + 2 * width) * w, H * 2 * att.num_heads * w, width * H * w]
        if m.kind == "dense":
            if lay.fused_gate_up:
                out += [2 * H * m.intermediate_size * w, m.intermediate_size * H * w]
            else:
                out += [H * m.intermediate_size * w] * (3 if m.gated else 2)
        elif m.kind == "moe":
            out += [m.num_experts * 2 * m.intermediate_size * H * w, m.num_experts * H * m.intermediate_size * w,
                    m.num_experts * H * w]
            if m.shared_intermediate_size:
                out += [H * m.shared_intermediate_size * w] * 3
    if not spec.tie_word_embeddings:
        out.append(V * H * w)
    return [int(x) for x in out]


def attention_used(model_type: str, attn: str) -> str:
    """The attention path transformers 5.17 takes for ``attn``: a family without an sdpa path (gpt-oss,
    whose sinks need eager) runs eager when asked for sdpa."""
    if attn == "sdpa" and not LAYOUTS.get(model_type, DEFAULT_LAYOUT).sdpa:
        return "eager"
    return attn
