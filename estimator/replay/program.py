"""The transformers 5.17 inference program: the tensors one forward allocates and frees, in order.

``Program`` walks the decoder the way the transformers 5.17 modeling code runs it on a CUDA GPU (torch
2.11, sm90), composed of one module per subject: ``blocks`` (norms, rotary, MLP, MoE), ``attention``
(the cache, sdpa/eager/flash, MLA, masks) and ``linear_attention`` (Qwen3-Next's gated delta-net). It
writes onto a ``Tape`` (``estimator/replay/engine.py``) the requests a plain run makes; family quirks
come from the family record (``estimator/family.py``, through ``layouts.py``). Sizes in bytes.
"""

from __future__ import annotations

from estimator.dtypes import dtype_bytes
from estimator.errors import UserError
from estimator.replay.attention import Attention
from estimator.replay.blocks import Blocks
from estimator.replay.engine import Tape
from estimator.replay.layouts import layout, rotary_fraction
from estimator.replay.linear_attention import GatedDeltaNet
from estimator.replay.step import Step
from estimator.spec import AttentionSpec, LayerSpec, ModelSpec

# The transformers release whose modeling code this program mirrors (and the H100 records were measured with).
TRANSFORMERS_VERSION = "5.17"


# Families whose base model makes one (cos, sin) pair per layer type, all held through the layers
# (transformers 5.17 models/gemma3/modeling_gemma3.py ``Gemma3TextModel.forward``: ``for layer_type in
# set(self.config.layer_types): position_embeddings[layer_type] = self.rotary_emb(..., layer_type)``).
ROTARY_PER_LAYER_TYPE = frozenset({"gemma3_text"})


class Program(Blocks, Attention, GatedDeltaNet):
    """One model's forwards over the tape. Sizes in bytes; ``a`` is the activation dtype's bytes."""

    def __init__(self, spec: ModelSpec, workload, min_bytes: int):
        self.spec, self.w, self.t = spec, workload, Tape(min_bytes)
        self.lay = layout(spec.model_type)
        a = dtype_bytes(workload.dtype)
        if workload.quant and a < 2:
            a = 2.0
        self.a = a
        self.kv_b = dtype_bytes(workload.kv_dtype or workload.dtype)
        self.b = workload.batch
        self.attn = workload.attn
        if not self.lay.sdpa and self.attn == "sdpa":
            self.attn = "eager"
        self.cache: dict[int, list] = {}  # layer index -> cache tensors [k, v] (or latent, rope)
        # the resolved factor (rope_parameters / partial_rotary_factor / the class default: estimator/config.py)
        self.rotary_fraction = rotary_fraction(spec, self.lay)
        if any(l.attention.kind == "ssm" for l in spec.layers):  # Mamba-style mixers have no program here
            raise UserError(f"{spec.name}: the replay has no program for state-space (ssm) layers "
                            "(use --engine trace)")

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
                                                        and lay.qk_norm else 0))
            self._small = ok and self.b * widest < self.t.min_bytes
        return self._small

    def cache_only_layer(self, i: int, att: AttentionSpec, step: Step):
        """A decode step's layer reduced to what the allocator sees of it (``_small_decode``): the cache
        concatenation (new K, free old K, new V, free old V)."""
        nkv = att.num_kv_heads or att.num_heads
        self.cache_update(i, att, self.b * nkv * att.head_dim * self.kv_b,
                          self.b * nkv * (att.v_head_dim or att.head_dim) * self.kv_b, step)

    # ---- one forward, in the two pieces the replay records: the frame and a layer -------------------
    def frame(self, step: Step):
        """One model forward over ``q_len`` new tokens per sequence around its layers, which it records as
        one ``Tape.layers`` op; returns the logits' slot."""
        t, a, b = self.t, self.a, self.b
        spec = self.spec
        H, V = spec.hidden_size, spec.vocab_size
        q_len, logits_positions = step.q_len, step.logits_positions
        T = b * q_len
        if self.small_step(step):  # each layer's cache concatenation, the logits
            t.layers(None, False)
            return t.new(b * V * a)
        emb = t.new(T * H * a)
        if self.lay.embed_scale or self.lay.multipliers:  # Gemma's embed_scale; Granite's embedding_multiplier
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
            sets = 1
            if spec.model_type in ROTARY_PER_LAYER_TYPE:
                sets = len({l.attention.kind for l in spec.layers if l.attention.kind in ("full", "sliding")})
            for _ in range(sets):
                freqs = t.new(T * dh / 2 * 4)
                embf = t.new(T * dh * 4)
                c32 = t.new(T * dh * 4)
                s32 = t.new(T * dh * 4)
                rot += [t.new(T * dh * a), t.new(T * dh * a)]
                t.free(freqs, embf, c32, s32)
        masks = self.make_masks(step)
        h = t.layers(h, h in keep)  # every decoder layer (``layer``), each freeing its input
        hn = self.norm(T * H)
        if h not in keep:
            t.free(h)
        # the base model's locals (embeddings, cos/sin, masks) go when it returns, before the head
        t.free(*rot, *keep, *masks.values())
        logits = t.new(b * logits_positions * V * a)
        if self.lay.final_softcap or self.lay.multipliers:  # Gemma 2: / cap, tanh, * cap; Granite: / logits_scaling
            for _ in range(3 if self.lay.final_softcap else 1):
                l2 = t.new(b * logits_positions * V * a)
                t.free(logits)
                logits = l2
        t.free(hn)
        return logits

    def small_step(self, step: Step) -> bool:
        return step.q_len == 1 and step.use_cache and step.static_len is None and self._small_decode()

    def layer(self, i: int, layer: LayerSpec, step: Step, masks: dict, h_in, keep: list):
        """Decoder layer ``i`` on the hidden states ``h_in``; returns its output's slot."""
        t, a = self.t, self.a
        T, H = self.b * step.q_len, self.spec.hidden_size
        # the caller's ``hidden_states`` keeps the layer's input alive until the layer returns
        if self.lay.post_norms:
            return self.post_norm_layer(i, layer, step, masks, h_in, keep)
        x = self.norm(T * H)
        y, weights = self.attention(i, layer, step, x, masks)
        if self.lay.sandwich_norms:
            y2 = self.norm(T * H)
            t.free(y)
            y = y2
        if self.spec.parallel_residual:  # GPT-NeoX: mlp(ln2(h)) + attn + h, the sums left to right
            m = self.mlp(layer, step, self.norm(T * H))
            s = t.new(T * H * a)
            t.free(m, y)
            h = t.new(T * H * a)
            t.free(s, weights)
            if h_in not in keep:
                t.free(h_in)
            return h
        scaled = t.new(T * H * a) if self.lay.multipliers else None  # Granite: out * residual_multiplier
        h1 = t.new(T * H * a)
        t.free(scaled, y)
        x2 = self.norm(T * H)  # post_attention_layernorm (Gemma: pre_feedforward_layernorm)
        y = self.mlp(layer, step, x2)
        if self.lay.sandwich_norms:
            y2 = self.norm(T * H)
            t.free(y)
            y = y2
        scaled = t.new(T * H * a) if self.lay.multipliers else None
        h = t.new(T * H * a)
        t.free(scaled)
        t.free(y, h1, weights)
        if h_in not in keep:
            t.free(h_in)
        return h

    def post_norm_layer(self, i: int, layer: LayerSpec, step: Step, masks: dict, h_in, keep: list):
        """OLMo 2's ``Olmo2DecoderLayer``: h1 = h + norm(attn(h)); out = h1 + norm(mlp(h1)). The blocks read
        the residual itself, so they free no input (``None``)."""
        t, a = self.t, self.a
        T, H = self.b * step.q_len, self.spec.hidden_size
        y, weights = self.attention(i, layer, step, None, masks)
        yn = self.norm(T * H)  # post_attention_layernorm
        t.free(y)
        h1 = t.new(T * H * a)
        t.free(yn)
        y = self.mlp(layer, step, None)
        yn = self.norm(T * H)  # post_feedforward_layernorm
        t.free(y)
        h = t.new(T * H * a)
        t.free(yn, h1, weights)
        if h_in not in keep:
            t.free(h_in)
        return h
