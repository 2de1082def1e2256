"""The packed model: the model's weights laid out for inference, the fast path generation runs on.

Same mathematics as `Transformer.forward`, from the same functions of minillm.torch.layers
(tests compare the two to 1e-5), on another layout of the weights:
- Q, K and V are one fused matrix, SwiGLU's gate and up another: fewer, larger matrix products.
- Two weight layouts, one per way of running a decode step's matrix-vector products
  (minillm.torch.matvec). BLAS: [in, out], applied with `addmm` (on an AMD EPYC, MKL streams this
  layout ~1.5x faster than `F.linear` on [out, in]); eager, and compiled where MKL wins. Row
  dots: [out, in], each single-row product a row-wise dot product that torch.compile turns into
  one reduction loop; the tied head then is the embedding table itself. The compiled step takes
  whichever streams faster on this CPU (`matvec.row_dots_faster`: the row dots on an AMD EPYC, 3x
  MKL's `sgemv`; MKL on an Intel Xeon, 2x the row dots).
- A quantized model (minillm.torch.quantize) keeps its int8/int4 layers: fused like the float ones,
  they stay objects in place of the weight tensors, and the two `linear`s hand them x to multiply.
- Plain functions over tensors, no nn.Module call per layer (each costs microseconds, which is
  most of a tiny model's decode step).
- Keys/values are written into the caches at explicit slots (`index_copy_`) and attention runs
  over the whole preallocated buffer under a mask, so a decode step has the same shapes every
  time: exactly what `torch.compile` needs to compile it once.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from minillm.torch import layers
from minillm.torch.alibi import alibi_slopes
from minillm.torch.matvec import addmm_linear, row_dot_linear, row_dots_faster
from minillm.torch.quantize import QuantLinear, fuse

# model -> {compile: (fingerprint of its weights, PackedCopy)}
_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def write_cache(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Write x (B, K, T, hd) into cache (B, K, S, hd) in place, at slots (T,) shared by every row,
    or (B, T) row by row (continuous batching: each row of the batch is at its own length)."""
    if slots.dim() == 1:
        cache.index_copy_(2, slots, x)
    else:
        rows = torch.arange(x.size(0), device=x.device)[:, None]  # (B, 1)
        cache[rows, :, slots] = x.transpose(1, 2)  # advanced indices first: (B, T, K, hd)


def _fused(*linears: nn.Linear, row_dot: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate linear layers along their outputs: weight [out, in] (row_dot) or [in, out], bias (out,).
    Quantized layers fuse into one quantized layer, in its own layout."""
    b = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears]).contiguous()
    if isinstance(linears[0], QuantLinear):
        return fuse(*linears), b
    w = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # (out, in)
    w = w.contiguous() if row_dot else w.t().contiguous()
    return w, b


def register(module: nn.Module, name: str, w) -> None:
    """A weight tensor as a buffer, a quantized layer as a submodule (compile freezes both)."""
    if isinstance(w, QuantLinear):
        setattr(module, name, w)
    else:
        module.register_buffer(name, w)


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


class PackedBlock(nn.Module):
    """One Transformer block's weights, fused and laid out. Buffers, so compile can freeze them."""

    def __init__(self, block, config, row_dot: bool = False):
        super().__init__()
        self.norm_kind, self.eps, self.mlp_kind = config.norm, config.norm_eps, config.mlp
        for name in ("attn_norm", "mlp_norm"):
            self.register_buffer(f"{name}_w", _copy(getattr(block, name).weight))
            self.register_buffer(f"{name}_b", _copy(getattr(getattr(block, name), "bias", None)))
        attn, mlp = block.attn, block.mlp
        up = (mlp.gate, mlp.up) if config.mlp == "swiglu" else (mlp.up,)  # SwiGLU: [gate | up]
        for name, (w, b) in {"qkv": _fused(attn.q, attn.k, attn.v, row_dot=row_dot),
                             "o": _fused(attn.o, row_dot=row_dot), "up": _fused(*up, row_dot=row_dot),
                             "down": _fused(mlp.down, row_dot=row_dot)}.items():
            register(self, f"{name}_w", w)
            self.register_buffer(f"{name}_b", b)

    def norm(self, x: torch.Tensor, which: str) -> torch.Tensor:
        weight, bias = getattr(self, f"{which}_w"), getattr(self, f"{which}_b")
        return layers.norm(x, self.norm_kind, weight, bias, self.eps)

    def mlp(self, x: torch.Tensor, linear: layers.LinearFn) -> torch.Tensor:
        """x (N, D) -> (N, D)."""
        def up(h: torch.Tensor) -> torch.Tensor:
            return linear(h, self.up_w, self.up_b)

        def down(h: torch.Tensor) -> torch.Tensor:
            return linear(h, self.down_w, self.down_b)

        if self.mlp_kind == "swiglu":
            return layers.swiglu(x, up, None, down)  # up_w holds [gate | up]
        return layers.gelu_mlp(x, up, down, layers.GELU_APPROXIMATE[self.mlp_kind])


class PackedModel(nn.Module):
    """A Transformer's weights laid out for inference, and its cached forward pass.
    row_dot: weights as [out, in], for a compiled decode step (see the module docstring)."""

    def __init__(self, model, row_dot: bool = False):
        super().__init__()
        c = self.config = model.config
        self.linear = row_dot_linear if row_dot else addmm_linear
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.register_buffer("alibi_slopes", alibi_slopes(c.n_heads) if c.positions == "alibi" else None)
        self.register_buffer("tok_emb", _copy(model.tok_emb.weight))
        # the additive position table, learned or sinusoidal (None with RoPE)
        pos = model.pos_emb.weight if c.positions == "learned" else getattr(model, "sin_table", None)
        self.register_buffer("pos_table", _copy(pos))
        self.register_buffer("rope_cos", _copy(getattr(model, "rope_cos", None)))  # None unless RoPE
        self.register_buffer("rope_sin", _copy(getattr(model, "rope_sin", None)))
        self.blocks = nn.ModuleList(PackedBlock(b, c, row_dot) for b in model.blocks)
        self.register_buffer("norm_w", _copy(model.norm.weight))
        self.register_buffer("norm_b", _copy(getattr(model.norm, "bias", None)))
        head = model.lm_head.weight.detach()  # (V, D)
        tied = c.tie_embeddings and row_dot  # then the head is the embedding table itself
        head_w = self.tok_emb if tied else head.clone() if row_dot else head.t().contiguous()
        register(self, "head_w", model.lm_head if isinstance(model.lm_head, QuantLinear) else head_w)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], last_only: bool = True,
                manual_attention: bool = False) -> torch.Tensor:
        """One cached step over T new tokens per row (a prefill chunk, or T = 1: a decode step).
        tokens, positions (B, T); slots (T,) or (B, T) the cache slots the new keys/values go to; mask
        (B, 1, T, S) over all S slots, as in layers.attention_math; k_caches/v_caches: per layer
        (B, K, S, hd), written in place. Returns logits (B, V) for the last token, or (B, T, V)
        when not last_only. manual_attention: layers.attention_math instead of SDPA (it fuses
        under compile)."""
        B, T = tokens.shape
        x = self.tok_emb[tokens]  # (B, T, D)
        if self.pos_table is not None:
            x = x + self.pos_table[positions]
        rope = None
        if self.rope_cos is not None:
            rope = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B,1,T,hd)
        bias = self.attention_bias(mask, slots)  # (B, 1 or K, G*T, S), computed once for all layers
        x = x.view(B * T, -1)  # (N, D): every linear layer sees a plain matrix
        for blk, k_cache, v_cache in zip(self.blocks, k_caches, v_caches):
            x = x + self.attention(blk, blk.norm(x, "attn_norm"), B, T, rope, slots, bias, k_cache, v_cache,
                                   manual_attention)
            x = x + blk.mlp(blk.norm(x, "mlp_norm"), self.linear)
        if last_only:
            x = x.view(B, T, -1)[:, -1]  # (B, D)
        x = layers.norm(x, self.config.norm, self.norm_w, self.norm_b, self.config.norm_eps)
        logits = self.linear(x, self.head_w, None)  # (N', V)
        return logits if last_only else logits.view(B, T, -1)  # (B, V) or (B, T, V)

    def attention_bias(self, mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, S) bool or float mask -> float bias (B, 1, G*T, S), one copy per query head
        of a group (grouped-query attention folds a group's heads into the query axis). With ALiBi
        (B, K, G*T, S): each head's -m_h * distance added, the distance counted in cache slots (a
        row's slots and positions differ by its constant left padding)."""
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=self.tok_emb.dtype).masked_fill_(~mask, float("-inf"))
        if self.alibi_slopes is not None:  # (B, H, T, S): minillm.torch.alibi's bias over slots
            distance = slots[..., :, None] - torch.arange(mask.size(-1), device=mask.device)  # (.., T, S)
            distance = distance if distance.dim() == 3 else distance[None]  # (1 or B, T, S)
            mask = mask - self.alibi_slopes[:, None, None] * distance[:, None].to(mask.dtype)
        B, H, T, S = mask.shape  # H: 1, or n_heads with ALiBi
        G = self.n_heads // self.n_kv_heads
        if H > 1:  # query head j*G + g is row g*T + t of K/V head j's folded query axis
            return mask.reshape(B, self.n_kv_heads, G * T, S)
        if G == 1:
            return mask
        return mask.unsqueeze(2).expand(-1, -1, G, -1, -1).reshape(B, 1, G * T, S)

    def attention(self, blk: PackedBlock, x: torch.Tensor, B: int, T: int, rope, slots, bias,
                  k_cache: torch.Tensor, v_cache: torch.Tensor,
                  manual_attention: bool = False) -> torch.Tensor:
        """x (N, D) -> (N, D): fused QKV, RoPE, cache write, grouped-query attention, output projection."""
        H, K, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.linear(x, blk.qkv_w, blk.qkv_b)  # (N, (H + 2K) hd)
        qkv = qkv.view(B, T, H + 2 * K, hd).transpose(1, 2)  # (B, H + 2K, T, hd)
        qk, v = qkv[:, :H + K], qkv[:, H + K:]
        if rope is not None:  # queries and keys are adjacent in the fused layout: rotate both at once
            qk = layers.apply_rope(qk, *rope)
        q, k = qk[:, :H], qk[:, H:]
        write_cache(k_cache, slots, k)  # (B, K, S, hd)
        write_cache(v_cache, slots, v)
        # Grouped-query attention without copying K/V: query heads j*G .. j*G+G-1 share K/V head j,
        # so fold each group into the query axis: (B, H, T, hd) -> (B, K, G*T, hd).
        q = q.reshape(B, K, H // K * T, hd)
        if manual_attention:
            y = layers.attention_math(q, k_cache, v_cache, bias)[0]  # (B, K, G*T, hd)
        else:
            y = layers.sdpa(q, k_cache, v_cache, bias, 0.0, False)
        y = y.view(B, H, T, hd).transpose(1, 2).reshape(B * T, H * hd)  # (N, D)
        return self.linear(y, blk.o_w, blk.o_b)


# --- one packed copy per model and mode, compiled on demand ----------------------------------------
class PackedCopy:
    """A model's PackedModel and, with compile=True, its torch.compile'd decode step. Each mode
    packs its own copy: their weight layouts differ (see the module docstring)."""

    def __init__(self, model, compile: bool = False):
        self.model = PackedModel(model, row_dot=compile and row_dots_faster()).eval()
        self.compile = compile
        self.compiled_decode_step = None
        self.compiled_verify_step = None  # speculative decoding's T-token pass (minillm.torch.speculative)

    def __call__(self, *args, decode_step: bool = False) -> torch.Tensor:
        """PackedModel.forward(*args); the compiled version for decode steps when compiling."""
        if not (self.compile and decode_step):
            return self.model(*args)
        if self.compiled_decode_step is None:
            self.compiled_decode_step = compile_decode_step(self.model)
        return self.compiled_decode_step(*args)


def compile_decode_step(packed: PackedModel, autotune: bool = True, last_only: bool = True,
                        dynamic: bool | None = None):
    """torch.compile a decode step: one full graph, written-out attention (it fuses), and
    matrix-vector products as row-wise reductions (row_dot_linear) or BLAS calls, whichever the
    packing chose. For batched decoding (several rows per product) max-autotune picks between C++
    micro-GEMMs and MKL over frozen, prepacked weights (autotune=False skips that search: a quicker
    compile, for tests). Compiles on the first call, and again for each new batch size / cache
    length. last_only=False returns every position's logits (speculative decoding's verify pass,
    with dynamic=False: one static graph per number of tokens)."""
    import torch._inductor.config as inductor_config

    # Inductor inlines a cheap pointwise producer (the embedding lookup, the layer norm) into its
    # consumer, so each row of a row-dot reduction recomputed the normalised input: store it once
    # instead (gpt2-small, 2-core Xeon: int8 19.3 -> 14.2 ms a step, fp32 20.0 -> 16.9 ms).
    options = {"realize_cpu_opcount_threshold": 4}
    if autotune:
        options |= {"max_autotune": True, "coordinate_descent_tuning": True}
    compiled = torch.compile(packed, fullgraph=True, dynamic=dynamic, options=options)

    def step(*args) -> torch.Tensor:
        # Freezing is on for these calls only (it is not honoured as a compile option); left on
        # globally it would also freeze any other graph compiled later without gradients.
        before, inductor_config.freezing = inductor_config.freezing, True
        try:
            return compiled(*args, last_only=last_only, manual_attention=True)
        finally:
            inductor_config.freezing = before

    return step


def packed_supports(config) -> bool:
    """Whether the packed model computes this config: softmax attention over the full causal
    context (any positions, ALiBi included), a dense MLP, decoder-only. Others decode on the
    nn.Module itself (minillm.torch.kv_cache.EagerBatchCache, chosen by minillm.torch.generate;
    a sliding window there keeps its ring-buffer cache, bounded by the window)."""
    return (config.attention == "softmax" and config.attention_window is None
            and getattr(config, "n_experts", 0) <= 1 and getattr(config, "encoder_layers", 0) == 0)


def packed_copy(model, compile: bool = False) -> PackedCopy:
    """The PackedCopy of `model` for this mode: one per model and mode, sharing nothing with the
    model, rebuilt only when its weights changed (training, load_state_dict)."""
    if not packed_supports(model.config):  # it would silently compute another function
        c = model.config
        raise ValueError(f"the packed decoder cannot run this config (attention={c.attention!r}, "
                         f"attention_window={c.attention_window}, positions={c.positions!r}, n_experts="
                         f"{getattr(c, 'n_experts', 0)}); minillm.torch.generate decodes it on the model")
    tensors = list(model.parameters()) + list(model.buffers())
    fingerprint = tuple((t.data_ptr(), t._version) for t in tensors)
    cached = _COPIES.setdefault(model, {}).get(compile)
    if cached is None or cached[0] != fingerprint:
        with torch.inference_mode(False), torch.no_grad():
            cached = (fingerprint, PackedCopy(model, compile))
        _COPIES[model][compile] = cached
    return cached[1]
