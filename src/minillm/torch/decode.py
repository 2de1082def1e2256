"""The model's forward pass repacked for inference: the fast path that generation runs on.

Same mathematics as `Transformer.forward` (tests compare the two to 1e-5), arranged for speed:
- Q, K and V are one fused matrix, SwiGLU's gate and up are one fused matrix, so each layer does
  fewer, larger matrix products.
- Weight layout follows what runs the matrix-vector products of a decode step fastest:
  eager: [in, out], applied with `addmm` (MKL streams this layout ~1.5x faster than `F.linear`
  on [out, in]); compiled: [out, in], each product written as a row-wise dot product that
  Inductor turns into one vectorised reduction streaming the weights at ~40 GB/s, ~3x MKL's
  single-token `sgemv` here (BENCHMARKS.md). The tied head then is the embedding table itself.
- Plain functions over tensors, no nn.Module call per layer (each costs microseconds, which is
  most of a tiny model's decode step).
- Keys/values are written into the caches at explicit slots (`index_copy_`) and attention runs
  over the whole preallocated buffer under a mask, so a decode step has the same shapes every
  time: exactly what `torch.compile` needs to compile it once.

The packed weights share nothing with the model: rebuild (`PackedModel(model)`) after training.
"""

from __future__ import annotations

import math

import torch.nn.functional as F

import torch
from minillm.torch.layers import rotate_half
from torch import nn


def _fused(*linears: nn.Linear, out_in: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate linear layers along their outputs; weight as [out, in] or [in, out], bias (out,) or None."""
    w = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # (out, in)
    w = w.contiguous() if out_in else w.t().contiguous()
    b = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears]).contiguous()
    return w, b


def _norm(x: torch.Tensor, kind: str, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm or RMSNorm over the last axis (the same formulas as minillm.torch.layers)."""
    if kind == "rmsnorm":
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    return F.layer_norm(x, w.shape, w, b, eps)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out_in: bool) -> torch.Tensor:
    """x (N, in) times w -> (N, out); w is (out, in) when out_in, else (in, out)."""
    if not out_in:
        return torch.mm(x, w) if b is None else torch.addmm(b, x, w)
    if x.size(0) == 1 and torch.compiler.is_compiling():
        # One token: y[o] = sum_i w[o, i] x[i], written out so Inductor emits a single reduction
        # loop over contiguous rows of w (no (1, out, in) temporary is ever materialised).
        y = (x[:, None, :] * w).sum(-1)  # (1, out)
        return y if b is None else y + b
    return F.linear(x, w, b)


class PackedBlock(nn.Module):
    """One Transformer block's weights, fused and transposed. Buffers, so compile can freeze them."""

    def __init__(self, block, config, out_in: bool = False):
        super().__init__()
        self.norm_kind, self.eps, self.mlp_kind, self.out_in = config.norm, config.norm_eps, config.mlp, out_in
        for name in ("attn_norm", "mlp_norm"):
            norm = getattr(block, name)
            self.register_buffer(f"{name}_w", norm.weight.detach().clone())
            self.register_buffer(f"{name}_b", None if getattr(norm, "bias", None) is None else norm.bias.detach().clone())
        attn, mlp = block.attn, block.mlp
        up = (mlp.gate, mlp.up) if config.mlp == "swiglu" else (mlp.up,)
        for name, (w, b) in {"qkv": _fused(attn.q, attn.k, attn.v, out_in=out_in), "o": _fused(attn.o, out_in=out_in),
                             "up": _fused(*up, out_in=out_in), "down": _fused(mlp.down, out_in=out_in)}.items():
            self.register_buffer(f"{name}_w", w)
            self.register_buffer(f"{name}_b", b)

    def norm(self, x: torch.Tensor, which: str) -> torch.Tensor:
        return _norm(x, self.norm_kind, getattr(self, f"{which}_w"), getattr(self, f"{which}_b"), self.eps)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> (N, D)."""
        h = _linear(x, self.up_w, self.up_b, self.out_in)  # (N, F) or (N, 2F) = [gate | up]
        if self.mlp_kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.mlp_kind == "gelu" else "none")  # gelu | gelu_exact
        return _linear(h, self.down_w, self.down_b, self.out_in)


class PackedModel(nn.Module):
    """A Transformer's weights laid out for inference, and its cached forward pass.
    out_in: weights as [out, in], for a compiled decode step (see the module docstring)."""

    def __init__(self, model, out_in: bool = False):
        super().__init__()
        c = self.config = model.config
        self.out_in = out_in
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.register_buffer("tok_emb", model.tok_emb.weight.detach().clone())
        pos = {"learned": lambda: model.pos_emb.weight, "sinusoidal": lambda: model.sin_table}.get(c.positions)
        self.register_buffer("pos_table", None if pos is None else pos().detach().clone())
        rope = c.positions == "rope"
        self.register_buffer("rope_cos", model.rope_cos.clone() if rope else None)
        self.register_buffer("rope_sin", model.rope_sin.clone() if rope else None)
        self.blocks = nn.ModuleList(PackedBlock(b, c, out_in) for b in model.blocks)
        self.register_buffer("norm_w", model.norm.weight.detach().clone())
        self.register_buffer("norm_b", None if getattr(model.norm, "bias", None) is None else model.norm.bias.detach().clone())
        head = model.lm_head.weight.detach()  # (V, D)
        tied = c.tie_embeddings and out_in  # then the head is the embedding table itself
        self.register_buffer("head_w", self.tok_emb if tied else head.clone() if out_in else head.t().contiguous())

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], last_only: bool = True,
                manual_attention: bool = False) -> torch.Tensor:
        """One cached step over T new tokens per row.

        tokens, positions (B, T); slots (T,) cache slots the new keys/values go to; mask
        (B, 1, T, S) over all S cache slots: bool (True = attend) or float added to the scores
        (0 = attend, -inf = not); k_caches/v_caches: per layer (B, K, S, hd), written in place.
        Returns logits (B, V) for the last token, or (B, T, V) when not last_only.
        manual_attention: written-out softmax attention instead of SDPA (it fuses under compile).
        """
        B, T = tokens.shape
        x = self.tok_emb[tokens]  # (B, T, D)
        if self.pos_table is not None:
            x = x + self.pos_table[positions]
        rope = None
        if self.rope_cos is not None:
            rope = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, hd)
        bias = self.attention_bias(mask)  # (B, 1, G*T, S), computed once for all layers
        x = x.view(B * T, -1)  # (N, D): every linear layer sees a plain matrix
        for blk, k_cache, v_cache in zip(self.blocks, k_caches, v_caches):
            x = x + self.attention(blk, blk.norm(x, "attn_norm"), B, T, rope, slots, bias, k_cache, v_cache,
                                   manual_attention)
            x = x + blk.mlp(blk.norm(x, "mlp_norm"))
        if last_only:
            x = x.view(B, T, -1)[:, -1]  # (B, D)
        logits = _linear(_norm(x, self.config.norm, self.norm_w, self.norm_b, self.config.norm_eps), self.head_w, None,
                         self.out_in)  # (N', V)
        return logits if last_only else logits.view(B, T, -1)  # (B, V) or (B, T, V)

    def attention_bias(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, S) bool or float mask -> float bias (B, 1, G*T, S), one copy per query head
        of a group (grouped-query attention folds a group's heads into the query axis)."""
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=self.tok_emb.dtype).masked_fill_(~mask, float("-inf"))
        G = self.n_heads // self.n_kv_heads
        if G == 1:
            return mask
        return mask.unsqueeze(2).expand(-1, -1, G, -1, -1).reshape(mask.size(0), 1, G * mask.size(2), -1)

    def attention(self, blk: PackedBlock, x: torch.Tensor, B: int, T: int, rope, slots, bias,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, manual_attention: bool = False) -> torch.Tensor:
        """x (N, D) -> (N, D): fused QKV, RoPE, cache write, grouped-query attention, output projection."""
        H, K, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = _linear(x, blk.qkv_w, blk.qkv_b, self.out_in).view(B, T, H + 2 * K, hd).transpose(1, 2)  # (B, H+2K, T, hd)
        qk, v = qkv[:, :H + K], qkv[:, H + K:]
        if rope is not None:  # queries and keys are adjacent in the fused layout: rotate both at once
            cos, sin = rope
            qk = qk * cos + rotate_half(qk) * sin
        q, k = qk[:, :H], qk[:, H:]
        k_cache.index_copy_(2, slots, k)  # (B, K, S, hd)
        v_cache.index_copy_(2, slots, v)
        # Grouped-query attention without copying K/V: query heads j*G .. j*G+G-1 share K/V head j,
        # so fold each group into the query axis: (B, H, T, hd) -> (B, K, G*T, hd).
        q = q.reshape(B, K, H // K * T, hd)
        if manual_attention:
            scores = (q @ k_cache.transpose(-2, -1)) * (1.0 / math.sqrt(hd)) + bias  # (B, K, G*T, S)
            y = torch.softmax(scores, dim=-1) @ v_cache
        else:
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=bias)  # (B, K, G*T, hd)
        y = y.view(B, H, T, hd).transpose(1, 2).reshape(B * T, H * hd)  # (N, D)
        return _linear(y, blk.o_w, blk.o_b, self.out_in)
