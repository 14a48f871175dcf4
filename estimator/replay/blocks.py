"""Norms, rotary embeddings, activations, dense MLPs and mixtures of experts (transformers 5.17).

A mixin of ``Program`` (``estimator/replay/program.py``): the methods write onto ``self.t`` and read
``self.a`` (activation bytes), ``self.lay`` (the family's ``Layout``) and ``self.spec``.
"""

from __future__ import annotations

from estimator import lora as _lora  # LoRA hook

from estimator.spec import LayerSpec


class Blocks:
    """Norms, rotary embeddings, activations, MLPs and mixtures of experts on ``self.t``."""

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
        if self.lay.rope in ("partial", "half_cat"):  # x[..., :rotary_dim] rotated, the rest passed through
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

    def mlp(self, layer: LayerSpec, step, x):
        """The MLP on the normed input ``x`` (freed here) at ``step`` (a ``Step``); returns its output block."""
        t, a = self.t, self.a
        T = self.b * step.q_len
        H = self.spec.hidden_size
        m = layer.mlp
        if m.kind == "none":
            t.free(x)
            return t.new(T * H * a)
        if m.kind == "moe":
            if self.lay.shared_expert_gate and m.shared_intermediate_size:
                # Qwen3-Next: shared expert, router + experts, sigmoid(shared_expert_gate(x)) * shared, add
                s = self.dense(m.shared_intermediate_size, True, T)
                y = self.moe_batched(m, T) if step.decoding else self.moe(m, T)
                gs = t.new(T * H * a)
                t.free(s)
                y2 = t.new(T * H * a)
                t.free(y, gs, x)
                return y2
            y = self.moe_batched(m, T) if step.decoding else self.moe(m, T)
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
        H, k, n = self.spec.hidden_size, m.top_k, m.intermediate_size
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
        H, k, n = self.spec.hidden_size, m.top_k, m.intermediate_size
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
