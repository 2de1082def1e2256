"""The parts of a Transformer, one small class or function each, in PyTorch.

Each part's maths is a plain function of tensors and weights, as in minillm/jax/layers.py; the
`nn.Module`s hold the canonical parameters and call those functions, and the packed inference
model (minillm.torch.packed) calls them on its own layout of the same weights.

Shapes: B batch, T query length, S key length (T plus any cached tokens), D d_model,
H query heads, K key/value heads, hd head_dim. Parameter names follow DESIGN.md.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minillm.config import ModelConfig
from minillm.torch.linear_attention import linear_attention

# (x, weight, bias) -> x Wᵀ + b in some weight layout; F.linear for the (out, in) of nn.Linear.
LinearFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# x -> x Wᵀ + b with the weights bound: an nn.Linear (so LoRA or quantization can swap it) or a packed one.
Linear = Callable[[torch.Tensor], torch.Tensor]


# --- normalisation ------------------------------------------------------------------------------
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm (Ba et al. 2016): (x - mean) / sqrt(var + eps) * weight (+ bias) over the last axis."""
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x²) + eps) * weight, over the last axis.
    Computed in float32 even under bf16 autocast (as LLaMA does): squares overflow fp16."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.type_as(x)


def norm(x: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
         eps: float) -> torch.Tensor:
    """The config's norm (config.norm: "rmsnorm" or "layernorm") with these weights."""
    return rms_norm(x, weight, eps) if kind == "rmsnorm" else layer_norm(x, weight, bias, eps)


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016) with an optional bias (GPT-2 has one; nanoGPT can drop it)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): rescale by the root mean square, no centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return LayerNorm(config.d_model, config.norm_eps, bias=config.bias)


# --- positions ----------------------------------------------------------------------------------
def sinusoidal_table(max_seq_len: int, d_model: int) -> torch.Tensor:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(same). (T, D)"""
    position = torch.arange(max_seq_len, dtype=torch.float64)[:, None]  # (T, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (D/2,)
    table = torch.zeros(max_seq_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return table.float()


def rope_tables(max_seq_len: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings (Su et al. 2021), rotate-half layout. (T, hd) each.
    Frequency i (of hd/2) rotates the pair (x[i], x[i + hd/2]) by angle p * theta^(-2i/hd). The
    original LLaMA release pairs neighbours (x[2i], x[2i+1]) instead: the same rotation once the
    head's dimensions are permuted, which Hugging Face's converter does on the q/k weights, so
    with the rotate-half layout HF LLaMA weights load unchanged."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd): frequency i at dims i and i + hd/2
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + hd/2]) pair: x (B, H, T, hd); cos/sin (T, hd) or (B, 1, T, hd)."""
    return x * cos + rotate_half(x) * sin


# --- attention ----------------------------------------------------------------------------------
def causal_mask(t: int, s: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) boolean mask, True = may attend. Bottom-right aligned: the T queries are the last T
    of the S keys, so query i sees keys 0 .. S - T + i (what a KV cache needs)."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ / sqrt(hd) + mask) v, written out; also returns the weights for plots.
    q (B, H, T, hd); k, v (B, H, S, hd); mask (T, S) or (B, 1, T, S): bool (True = attend), or
    float added to the scores (0 = attend, -inf = not), or None -> causal.
    Returns out (B, H, T, hd) and weights (B, H, T, S)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    if mask is None:
        mask = causal_mask(q.size(-2), k.size(-2), q.device)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores.float(), dim=-1).type_as(q)
    return F.dropout(weights, dropout_p) @ v if dropout_p else weights @ v, weights


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float,
         is_causal: bool) -> torch.Tensor:
    """F.scaled_dot_product_attention, the fused kernel. Under CPU bf16 autocast it runs in float32:
    there its bf16 backward is ~4x slower than the fp32 one (BENCHMARKS.md), while the matmuls
    around it keep bf16's 2x. q (B, H, T, hd); k, v (B, K, S, hd) -> (B, H, T, hd). K < H (GQA): the
    kernel shares each K/V head among H / K query heads itself, without repeat_interleave's copies."""
    gqa = k.size(1) != q.size(1)
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                  dropout_p=dropout_p, is_causal=is_causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          enable_gqa=gqa)


class Attention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads: MHA when K == H, GQA when 1 < K < H
    (Ainslie et al. 2023), MQA when K == 1 (Shazeer 2019). Each K/V head serves H / K query heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim  # q_dim is D unless
        self.q = nn.Linear(config.d_model, q_dim, bias=config.bias)                    # head_dim is set
        self.k = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.v = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.o = nn.Linear(q_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.linear = config.attention == "linear"  # Katharopoulos et al. 2020: kv_cache is then its state
        self.use_sdpa = True  # the fused kernel; False = the readable path that keeps weights
        self.last_weights: torch.Tensor | None = None  # (B, H, T, S) when keep_weights was asked

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, kv_cache=None,
                mask: torch.Tensor | None = None, keep_weights: bool = False) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). kv_cache: an object with update(k, v) -> (k_all, v_all) that
        appends this step's keys/values; mask: (T, S) or (B, 1, T, S) bool, None = causal."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.linear:  # no softmax, no mask: causal by construction (minillm.torch.linear_attention)
            return self.o(linear_attention(q, k, v, kv_cache).transpose(1, 2).reshape(B, T, -1))
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, K, S, hd)
        p = self.dropout if self.training else 0.0
        if self.use_sdpa and not keep_weights:
            causal = mask is None and k.size(2) == T  # is_causal is top-left aligned: only T == S
            if mask is None and not causal:
                mask = causal_mask(T, k.size(2), x.device)
            y = sdpa(q, k, v, mask, p, causal)  # shares each K/V head among H / K query heads itself
        else:
            if self.n_kv_heads != self.n_heads:  # each K/V head serves a group of query heads
                k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, S, hd)
                v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            y, weights = attention_math(q, k, v, mask, p)
            self.last_weights = weights.detach() if keep_weights else None
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.o(y)


# --- feed-forward -------------------------------------------------------------------------------
GELU_APPROXIMATE = {"gelu": "tanh", "gelu_exact": "none"}  # config.mlp -> F.gelu's `approximate`


def gelu_mlp(x: torch.Tensor, up: Linear, down: Linear, approximate: str = "tanh") -> torch.Tensor:
    """GPT-2's MLP (see GeluMLP): down(gelu(up(x))), x (..., D) -> (..., D). up, down: an nn.Linear
    or a packed weight applied by a function; approximate: "tanh" or "none" (F.gelu's)."""
    return down(F.gelu(up(x), approximate=approximate))


def swiglu(x: torch.Tensor, gate: Linear, up: Linear | None, down: Linear) -> torch.Tensor:
    """Shazeer 2020, as in LLaMA: down(silu(gate(x)) * up(x)), x (..., D) -> (..., D). up None when
    `gate` computes the gate and up projections fused ([gate | up]): one product instead of two."""
    g, u = gate(x).chunk(2, dim=-1) if up is None else (gate(x), up(x))  # (..., F) each
    return down(F.silu(g) * u)


class GeluMLP(nn.Module):
    """GPT-2's MLP: down(gelu(up(x))). mlp="gelu" uses GELU's tanh approximation (what GPT-2 was
    trained with, so its weights reproduce exactly); mlp="gelu_exact" the erf form x·Φ(x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.approximate = GELU_APPROXIMATE[config.mlp]
        self.up = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_mlp(x, self.up, self.down, self.approximate)


class SwiGLU(nn.Module):
    """Shazeer 2020, as in LLaMA: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate, self.up, self.down)


def make_mlp(config: ModelConfig) -> nn.Module:
    return SwiGLU(config) if config.mlp == "swiglu" else GeluMLP(config)


# --- the block ----------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, mlp: nn.Module | None = None):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config) if mlp is None else mlp  # e.g. a mixture of experts (torch/moe.py)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache=None, mask=None, keep_weights=False) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, kv_cache, mask, keep_weights))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))
