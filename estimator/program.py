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
- generate computes the last position's logits only, copies them to fp32 and, when the model has an
  EOS token and ``min_new_tokens`` is set (the harness's method), the min-length processor makes two
  more fp32 copies; the fp32 logits of a step live until the next step replaces them.

Tensors of at most 1 MiB are left out: they come from the allocator's small pool (2 MiB segments) and
change the peaks by a few MiB, which the ``workspace_bytes`` coefficient absorbs together with the
cuBLAS workspace.

Family quirks live in ``LAYOUTS`` (by ``model_type``); everything else follows from the ``ModelSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.allocator import SMALL_SIZE, CachingAllocator
from estimator.dtypes import dtype_bytes
from estimator.spec import AttentionSpec, LayerSpec, ModelSpec


@dataclass(frozen=True)
class Layout:
    """How a family's transformers code computes a layer, where it differs from Llama's."""

    norm: str = "rms"  # "rms" (Llama), "rms_gemma" (fp32 product, cast last), "layer" (LayerNorm kernel)
    fused_qkv: bool = False  # one qkv projection (Phi-3, GPT-2); q, k, v are views of it
    fused_gate_up: bool = False  # Phi-3: gate_up_proj, chunked
    rope: str = "half"  # "half": rotate_half; "half_cat": Phi-3's extra cat; "split": gpt-oss's halves and
    # cat; "complex": DeepSeek-V2's complex product; "none": learned positions
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
}
DEFAULT_LAYOUT = Layout()  # every other family follows Llama's code (qwen2/3, mistral, mixtral, olmoe...)
MIN_TRACKED_BYTES = SMALL_SIZE + 1


class _Tape:
    """Allocations of one run: tensors above the small-pool size go to the allocator model."""

    __slots__ = ("alloc", "min_bytes")

    def __init__(self, alloc: CachingAllocator, min_bytes: int):
        self.alloc, self.min_bytes = alloc, min_bytes

    def new(self, nbytes: float):
        nbytes = int(nbytes)
        if nbytes < self.min_bytes:
            return None
        return self.alloc.malloc(nbytes)

    def free(self, *blocks) -> None:
        for block in blocks:
            if block is not None:
                self.alloc.free(block)


class _Run:
    """One model's forwards over the tape. Sizes in bytes; ``a`` is the activation dtype's bytes."""

    def __init__(self, spec: ModelSpec, workload, tape: _Tape):
        self.spec, self.w, self.t = spec, workload, tape
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

    def rope(self, n: int):
        """``x * cos + rotate_half(x) * sin`` over ``n`` elements; the caller frees ``x``."""
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
        xc = t.new(n * a)
        neg = t.new(n * a / 2)
        cat = t.new(n * a)
        t.free(neg)
        xs = t.new(n * a)
        t.free(cat)
        out = t.new(n * a)
        t.free(xc, xs)
        if self.lay.rope == "half_cat":  # cat((rotated, pass), -1)
            whole = t.new(n * a)
            t.free(out)
            out = whole
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
            return self.linear_mixer(i, att, q_len, x)
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
            q0 = t.new(q_n * a)
            q = self.norm(q_n)
            t.free(q0)
            k0 = t.new(k_n * a)
            k = self.norm(k_n)
            t.free(k0)
            v = t.new(v_n * a)
        else:
            qkv = None
            q = t.new(q_n * a)
            k = t.new(k_n * a)
            v = t.new(v_n * a)
        if lay.rope != "none":
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
        y = t.new(T * H * a)  # o_proj; the attention's locals go when it returns
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

    def linear_mixer(self, i: int, att: AttentionSpec, q_len: int, x):
        """Gated delta-net / state-space layers: projections and a chunked recurrent kernel (approximate)."""
        t, a, b = self.t, self.a, self.b
        T = b * q_len
        if i not in self.cache:  # the fixed recurrent state, allocated at the first forward
            state = att.state_elems * (4 if att.state_dtype == "float32" else a) * b
            conv = getattr(att, "conv_state_elems", 0) * a * b
            self.cache[i] = [t.new(state), t.new(conv), 0]
        width = max(att.num_heads * (att.v_head_dim or att.head_dim), 1)
        kw = max((att.num_kv_heads or att.num_heads) * att.head_dim, 1)
        proj = t.new(T * (2 * kw + 2 * width) * a)  # in_proj_qkvz
        conv = t.new(T * (2 * kw + width) * a)
        core32 = t.new(T * (2 * kw + 2 * width) * 4)  # the kernel's fp32 working copies
        out = t.new(T * width * a)
        t.free(core32, conv)
        gated = t.new(T * width * a)
        t.free(out, proj)
        y = t.new(T * self.spec.hidden_size * a)
        t.free(gated, x)
        return y, None

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
        g = self.act(n, gate)
        t.free(gate)
        up = t.new(n * a)
        m = t.new(n * a)
        t.free(g, up)
        y = t.new(T * self.spec.hidden_size * a)
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

    def _decode_cache_only(self, past: int, logits_bytes: float):
        """A decode step reduced to what the allocator sees of it: each layer's cache concatenation
        (new K, free old K, new V, free old V), then the logits."""
        t = self.t
        for i, layer in enumerate(self.spec.layers):
            att = layer.attention
            nkv = att.num_kv_heads or att.num_heads
            self.cache_update(i, att, self.b * nkv * att.head_dim * self.kv_b,
                              self.b * nkv * (att.v_head_dim or att.head_dim) * self.kv_b, 1, past, None)
        return t.new(logits_bytes)

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

    # ---- one forward ---------------------------------------------------------------------------
    def forward(self, q_len: int, past: int, logits_positions: int, use_cache: bool,
                static_len: int | None = None):
        """One model forward over ``q_len`` new tokens per sequence; returns the logits block."""
        t, a, b = self.t, self.a, self.b
        spec = self.spec
        H, V = spec.hidden_size, spec.vocab_size
        T = b * q_len
        self.static_decode = static_len is not None and q_len == 1
        if q_len == 1 and use_cache and static_len is None and self._small_decode():
            return self._decode_cache_only(past, b * V * a)
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
            dh = max((l.attention.head_dim for l in spec.layers), default=0)
            if any(l.attention.kind == "mla" for l in spec.layers):
                dh = max(l.attention.qk_rope_head_dim for l in spec.layers)
            freqs = t.new(T * dh / 2 * 4)
            embf = t.new(T * dh * 4)
            c32 = t.new(T * dh * 4)
            s32 = t.new(T * dh * 4)
            rot = [t.new(T * dh * a), t.new(T * dh * a)]
            t.free(freqs, embf, c32, s32)
        masks = self.make_masks(q_len, past + q_len)
        for i, layer in enumerate(spec.layers):
            # the caller's ``hidden_states`` keeps the layer's input alive until the layer returns
            h_in = h
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


_QK_NORM = ("qwen3", "qwen3_moe", "qwen3_next", "gemma3_text", "olmoe")


def simulate(spec: ModelSpec, workload, min_bytes: int = MIN_TRACKED_BYTES) -> dict[str, int]:
    """Peak bytes allocated and reserved above the weights for one run of ``workload`` on ``spec``.

    Returns ``{"sim_allocated_bytes", "sim_reserved_bytes", "sim_peak_step"}``: the peaks of
    ``torch.cuda.max_memory_allocated()`` / ``max_memory_reserved()`` minus the weights' bytes, as the
    harness measures them (reset after the weights are loaded and ``empty_cache()``), tensors under
    ``min_bytes`` left out.
    """
    alloc = CachingAllocator()
    tape = _Tape(alloc, min_bytes)
    for nbytes in parameter_bytes(spec, workload):
        tape.new(nbytes)
    base = alloc.allocated
    alloc.reset_peak()
    run = _Run(spec, workload, tape)
    b, V = workload.batch, spec.vocab_size
    peak_step = 0
    if workload.workload == "forward":
        logits = run.forward(workload.context, 0, workload.context, use_cache=False)
        tape.free(logits)
    else:
        static = workload.cache_tokens if workload.cache == "static" else None
        prompt = workload.prompt_tokens
        eos = spec.config.get("eos_token_id") if spec.config else None
        past = 0
        prev_logits32 = prev_scores = None
        for step in range(max(workload.new_tokens, 1)):
            q_len = prompt if step == 0 else 1
            run.decoding = step > 0
            before = alloc.peak_allocated
            logits = run.forward(q_len, past, 1, use_cache=True, static_len=static)
            past += q_len
            logits32 = tape.new(b * V * 4)  # logits[:, -1].to(float32, copy=True)
            tape.free(prev_logits32)
            prev_logits32 = logits32
            if eos is not None and workload.new_tokens > 1:  # min-length processor: clone, then where
                clone = tape.new(b * V * 4)
                scores = tape.new(b * V * 4)
                tape.free(clone, prev_scores)
                prev_scores = scores
            tape.free(logits)  # del outputs
            if alloc.peak_allocated > before:
                peak_step = step
    return {
        "sim_allocated_bytes": alloc.peak_allocated - base,
        "sim_reserved_bytes": alloc.peak_reserved - base,
        "sim_peak_step": peak_step,
    }


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
                out += [H * nh * d * w, H * nkv * d * w, H * nkv * dv * w]
            out.append(nh * dv * H * w)
        elif att.kind == "mla":
            out += [H * (att.kv_lora_rank + att.qk_rope_head_dim) * w,
                    att.kv_lora_rank * att.num_heads * (att.head_dim - att.qk_rope_head_dim + att.v_head_dim) * w,
                    att.num_heads * att.v_head_dim * H * w, H * att.num_heads * att.head_dim * w]
        else:
            width = max(att.num_heads * (att.v_head_dim or att.head_dim), 1)
            out += [H * 3 * width * w, width * H * w]
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
