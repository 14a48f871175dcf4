"""Qwen3-Next's gated delta-net layers (``Qwen3NextGatedDeltaNet``) with transformers 5.17's torch fallbacks.

A mixin of ``Program`` (``estimator/replay/program.py``).
"""

from __future__ import annotations

from estimator.spec import AttentionSpec


class GatedDeltaNet:
    """Qwen3-Next's linear-attention layers on ``self.t``."""

    def linear_mixer(self, i: int, att: AttentionSpec, step, x):
        """Qwen3-Next's gated delta-net (``Qwen3NextGatedDeltaNet``) with transformers' torch fallbacks:
        ``causal_conv1d_fn`` and ``torch_chunk_gated_delta_rule`` for a prompt (or a forward without
        cache), ``causal_conv1d_update`` and ``torch_recurrent_gated_delta_rule`` for a decode step. The
        caller frees nothing: ``x`` (the normed input) is freed here, the layer's output returned."""
        t, a, b = self.t, self.a, self.b
        q_len, use_cache = step.q_len, step.use_cache
        T = b * q_len
        nv, nk = att.num_heads, att.num_kv_heads or att.num_heads
        dk, dv = att.head_dim, att.v_head_dim or att.head_dim
        kw, vw = nk * dk, nv * dv  # key_dim, value_dim
        conv_dim = 2 * kw + vw
        kernel = att.conv_state_elems // conv_dim  # linear_conv_kernel_dim (estimator/families.py)
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
        qn, kn = (self._l2norm(x32, qk, T * nv) for x32 in (q32, k32))
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
        normed = [self._l2norm(x32, qk, T * nv) for x32 in (q32, k32)]
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

    def _l2norm(self, x32, qk: int, rows: int):
        """``l2norm`` of a fp32 block of ``qk`` bytes over ``rows`` head rows: x * rsqrt((x * x).sum(-1) + eps);
        frees ``x32``, returns the normed block."""
        t = self.t
        sq = t.new(qk)
        sm = t.new(rows * 4)
        t.free(sq)
        se = t.new(rows * 4)
        t.free(sm)
        r = t.new(rows * 4)
        t.free(se)
        xn = t.new(qk)
        t.free(r, x32)
        return xn
