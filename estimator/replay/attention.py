"""The KV cache, self-attention (flash, sdpa's kernels, eager), MLA and the masks (transformers 5.17).

A mixin of ``Program`` (``estimator/replay/program.py``); ``self.cache`` holds each layer's cache tensors.
"""

from __future__ import annotations

from estimator import lora as _lora  # LoRA hook
from estimator.replay.step import Step
from estimator.spec import AttentionSpec, LayerSpec


class Attention:
    """The KV cache, self-attention (sdpa, eager, flash), MLA and the masks on ``self.t``."""

    def cache_update(self, i: int, att: AttentionSpec, k_bytes: float, v_bytes: float, step: Step):
        """Write this step's K/V (bytes for its q_len tokens) into layer i's cache; returns the cache's tokens."""
        t = self.t
        q_len, static_len = step.q_len, step.static_len
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

    def attention(self, i: int, layer: LayerSpec, step: Step, x, masks: dict):
        """Self-attention of layer i on the normed input ``x`` (freed here); returns its output block."""
        t, a, b = self.t, self.a, self.b
        q_len = step.q_len
        att = layer.attention
        T = b * q_len
        H = self.spec.hidden_size
        if att.kind == "linear":
            return self.linear_mixer(i, att, step, x)
        if att.kind == "mla":
            return self.mla(i, att, step, x, masks)
        nh, nkv, d = att.num_heads, att.num_kv_heads or att.num_heads, att.head_dim
        dv = att.v_head_dim or d
        q_n, k_n, v_n = T * nh * d, T * nkv * d, T * nkv * dv
        lay = self.lay
        if lay.fused_qkv:
            qkv = t.new((q_n + k_n + v_n) * a)
            q = k = v = None
        elif lay.qk_norm:  # q_norm(q_proj(x)), k_norm(k_proj(x)), v_proj(x)
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
        if not att.rope:  # a NoPE layer (SmolLM3): q and k go to the cache as they are
            qe, ke = q, k
        elif lay.rope == "partial":  # both rotations, then cat((rotated, pass), -1) for each
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
        if step.use_cache:
            kv_len = self.cache_update(i, att, k_n * self.kv_b, v_n * self.kv_b, step)
            if qe is not ke:
                t.free(ke)
            ke = None
            t.free(v)
            v = None
        else:
            kv_len = q_len
        out, weights = self.core_attention(att, step, kv_len, qe, masks)
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

    def core_attention(self, att: AttentionSpec, step: Step, kv_len: int, q, masks: dict):
        """The attention kernel on (b, heads, q_len, kv_len); returns (output, weights kept alive)."""
        t, a, b = self.t, self.a, self.b
        q_len = step.q_len
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
        mask = windowed or (step.static_decode and kv_len > q_len)
        if a < 4 and not mask and d <= 256 and d == dv:  # flash
            out = t.new(out_bytes)
            lse = t.new(b * nh * q_len * 4)
            t.free(lse)
            return out, None
        if a == 4 and gqa and not mask and d == dv and d <= 256:
            return self.math(att, q_len, kv_eff), None
        # transformers repeats K/V (no enable_gqa), torch takes the memory-efficient kernel. With one KV head
        # (MQA: gemma-3-1b) ``repeat_kv``'s expand(b, 1, n_rep, s, d).reshape(b, n_rep, s, d) is a view
        # (integrations/sdpa_attention.py): nothing is copied
        reps = []
        if gqa and nkv > 1:
            reps = [t.new(b * nh * kv_eff * d * a), t.new(b * nh * kv_eff * dv * a)]
        additive = self.additive_mask(q_len, kv_len) if mask else None
        out = t.new(out_bytes)
        lse = t.new(b * nh * (-(-q_len // 32) * 32) * 4)
        t.free(lse, additive, *reps)
        return out, None

    def additive_mask(self, q_len: int, kv_len):
        """The memory-efficient kernel's copy of a boolean (b, 1, q, kv) mask, made on every call.

        PyTorch ``aten/src/ATen/native/transformers/attention.cpp`` ``convert_boolean_attn_mask``:
        ``where(attn_mask.logical_not(), -inf, 0)`` in the query's dtype (a boolean temporary, then the
        additive mask); then ``sdp_utils`` ``preprocess_mask`` / ``pad_bias<8>``: a copy padded to a multiple
        of 8 keys when its rows are not aligned. At 32k tokens this is 2 GiB in bf16 on every sliding layer,
        next to the 1 GiB boolean mask the model holds (the trace's ``_efficient_sdpa``)."""
        t, a, b = self.t, self.a, self.b
        n = b * q_len * kv_len
        inverted = t.new(n)  # attn_mask.logical_not()
        additive = t.new(n * a)
        t.free(inverted)
        if isinstance(kv_len, int) and kv_len % 8:  # a decode step's kv may be symbolic: its mask is tiny
            padded = t.new(b * q_len * (kv_len + (-kv_len) % 8) * a)
            t.free(additive)
            additive = padded
        return additive

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
        if 1 < nkv < nh:  # repeat_kv; with one KV head a view (see core_attention)
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

    def mla(self, i: int, att: AttentionSpec, step: Step, x, masks: dict):
        """DeepSeek V2/V3: cache the latent, expand K/V with kv_b_proj on every forward."""
        t, a, b = self.t, self.a, self.b
        q_len = step.q_len
        T = b * q_len
        nh, qk, dv = att.num_heads, att.head_dim, att.v_head_dim
        rope, rank = att.qk_rope_head_dim, att.kv_lora_rank
        nope = qk - rope
        q_lora = att.q_lora_rank
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
        if step.use_cache:
            total = self.cache_update(i, AttentionSpec("full"), T * rank * self.kv_b, T * rope * self.kv_b, step)
            t.free(kvn, kr)
            kvn = kr = None
        else:
            total = q_len
        qs = t.new(T * nh * qk * a)  # cat(q_pass, q_rot); q and q_rot stay referenced until the return
        kv_tokens = b * total
        kvb = t.new(kv_tokens * nh * (nope + dv) * a)  # kv_b_proj over the whole cache
        keys = t.new(kv_tokens * nh * qk * a)  # new_empty + copy_ of k_nope and k_rot
        out, w = self.core_attention(AttentionSpec("full", nh, nh, qk, dv), step, total, qs, masks)
        y = t.new(T * self.spec.hidden_size * a)
        t.free(out, qs, q, qr, keys, kvb, ckv, kvn, kr, x)
        return y, w

    @staticmethod
    def _mask_kv(step: Step, window: int | None):
        """The key length of a layer's eager mask, as transformers 5.17's cache layers size it
        (``cache_utils``, ``get_mask_sizes``): a dynamic cache, past + q (the prompt has no past); a
        ``StaticLayer``, ``max_cache_len`` at every step; a ``StaticSlidingWindowLayer`` (its length the
        window, at most ``max_cache_len``), the window until the tokens pass it."""
        past, q = step.past, step.q_len
        if step.static_len is None:
            return past + q
        if window is None:
            return step.static_len
        w = min(window, step.static_len)
        if past >= w:  # already full
            return w + q - 1
        if past + q > w:  # becoming full on this update
            return past + q
        return w

    def make_masks(self, step: Step) -> dict:
        """The 4D masks the base model builds before its layers (masking_utils), by layer kind.

        eager: a float (b, 1, q, kv) mask per layer kind (full, sliding), kv from the cache layer's
        ``get_mask_sizes`` (``_mask_kv``). sdpa: none while the prompt has no padding, except a boolean
        (1, 1, q, kv) one, expanded over the batch, for sliding layers once kv reaches the window (each
        sliding layer's memory-efficient kernel then makes its full-size additive copy: ``additive_mask``).
        """
        t, a, b = self.t, self.a, self.b
        q_len, kv = step.q_len, step.past + step.q_len
        kinds = {l.attention.kind for l in self.spec.layers}
        sliding = [l.attention.window for l in self.spec.layers if l.attention.kind == "sliding" and l.attention.window]
        masks = {}
        wanted = []
        if self.attn == "eager":
            if kinds & {"full", "mla"}:
                wanted.append(("full", a, self._mask_kv(step, None)))
            if sliding:
                wanted.append(("sliding", a, self._mask_kv(step, min(sliding))))
        elif self.attn == "sdpa" and sliding and kv >= min(sliding):
            wanted.append(("sliding", 1, kv))
        for name, elem, kv in wanted:
            # boolean pieces (causal, window) combined: without padding the mask functions do not read the
            # batch index, so they are (1, 1, q, kv), and sdpa_mask's ``expand(batch_size, ...)`` is a view
            # (masking_utils.py ``sdpa_mask``, ``_non_vmap_expansion_sdpa``); eager_mask's where() is full size
            b1 = t.new(q_len * kv)
            b2 = t.new(q_len * kv)
            t.free(b1)
            if elem == 1:
                b3 = t.new(q_len * kv)
                m = t.new(q_len * kv)
                t.free(b3, b2)
            else:
                m = t.new(b * q_len * kv * elem)  # where(mask, 0, min_dtype)
                t.free(b2)
            masks[name] = m
        return masks
