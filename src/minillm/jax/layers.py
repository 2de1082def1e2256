"""The parts of a Transformer, one small pure function each, in JAX.

The twin of minillm/torch/layers.py: the same names, the same maths, but every function takes
the parameters explicitly. `params` is the flat dict of canonical names (DESIGN.md) -> arrays
in PyTorch shapes, and a layer finds its own tensors under a `prefix` ("blocks.0.attn").
Linear weights stay (out, in), so a linear layer is x @ Wᵀ (+ b).

Shapes: B batch, T query length, S key length (T plus any cached tokens), D d_model,
H query heads, K key/value heads, hd head_dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from minillm.config import ModelConfig
from minillm.jax.kv_cache import write_slots
from minillm.jax.linear_attention import parallel_form

Params = dict  # canonical name -> jax.Array


def linear(params: Params, prefix: str, x: jax.Array) -> jax.Array:
    """x (..., in) -> (..., out): x Wᵀ + b, W stored (out, in) as in PyTorch.
    The leading axes are flattened first: one 2-D matmul, whose gradient XLA on CPU computes
    markedly faster than a dot over (B, T) batch axes (benchmarks/jax_vs_torch.py)."""
    weight = params[f"{prefix}.weight"]  # (out, in)
    y = (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(*x.shape[:-1], weight.shape[0])
    bias = params.get(f"{prefix}.bias")
    return y if bias is None else y + bias


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout (Srivastava et al. 2014); the identity when rate is 0 or no key is given."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# --- normalisation ------------------------------------------------------------------------------
def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm (Ba et al. 2016): (x - mean) / sqrt(var + eps) * weight (+ bias), over the last axis.
    The statistics are computed in float32 whatever x's dtype (as torch's layer_norm under autocast)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)  # biased variance, as PyTorch
    y = ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * weight
    return y if bias is None else y + bias


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019): rescale by the root mean square. Computed in float32 even
    for bfloat16 x (as LLaMA does): squares lose precision in bfloat16 and overflow float16."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def norm(params: Params, prefix: str, config: ModelConfig, x: jax.Array) -> jax.Array:
    """The config's norm with the gains (and bias) stored under `prefix`."""
    if config.norm == "rmsnorm":
        return rms_norm(x, params[f"{prefix}.weight"], config.norm_eps)
    return layer_norm(x, params[f"{prefix}.weight"], params.get(f"{prefix}.bias"), config.norm_eps)


# --- positions ----------------------------------------------------------------------------------
def sinusoidal_table(max_seq_len: int, d_model: int) -> jax.Array:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(same). (T, D)
    Built in float64 with numpy (a constant, not a traced value), then cast to float32."""
    position = np.arange(max_seq_len, dtype=np.float64)[:, None]  # (T, 1)
    inv_freq = 10000.0 ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)  # (D/2,)
    table = np.zeros((max_seq_len, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(position * inv_freq)
    table[:, 1::2] = np.cos(position * inv_freq[: d_model // 2])
    return jnp.asarray(table, dtype=jnp.float32)


def rope_tables(max_seq_len: int, head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for rotary embeddings (Su et al. 2021), rotate-half layout. (T, hd) each.

    Frequency i (of hd/2) rotates the pair (x[i], x[i + hd/2]) by angle p * theta^(-2i/hd), the
    layout of Hugging Face's LLaMA (see minillm/torch/layers.py for the interleaved variant).
    Computed in float32 like the PyTorch side, so both hold the same angles."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponent)  # (hd/2,)
    angles = np.arange(max_seq_len, dtype=np.float32)[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = np.concatenate((angles, angles), axis=-1)  # (T, hd): frequency i at dims i and i + hd/2
    return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate((-x2, x1), axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate each (x[i], x[i + hd/2]) pair: x (B, H, T, hd); cos/sin (T, hd) or (B, 1, T, hd).
    The float32 tables are cast to x's dtype, so a bfloat16 forward stays in bfloat16."""
    return x * cos.astype(x.dtype) + rotate_half(x) * sin.astype(x.dtype)


# --- attention ----------------------------------------------------------------------------------
def causal_mask(t: int, s: int, offset: jax.Array | int | None = None) -> jax.Array:
    """(T, S) boolean mask, True = may attend. Query i sits at absolute position offset + i and
    sees keys 0 .. offset + i. offset defaults to S - T (bottom-right aligned: the T queries are
    the last T of the S keys). A fixed-size KV cache passes its write position instead."""
    offset = s - t if offset is None else offset
    query_pos = jnp.arange(t)[:, None] + offset  # (T, 1)
    return jnp.arange(s)[None, :] <= query_pos  # (T, S)


def attention_math(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, dropout_p: float = 0.0,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """softmax(q kᵀ / sqrt(hd) + mask) v, written out; also returns the weights for plots.

    q (B, H, T, hd); k, v (B, H, S, hd); mask (T, S) or (B, 1, T, S) bool or None -> causal.
    Returns out (B, H, T, hd) and weights (B, H, T, S).
    """
    scores = q @ jnp.swapaxes(k, -2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is None:
        mask = causal_mask(q.shape[-2], k.shape[-2])
    scores = jnp.where(mask, scores, -jnp.inf) if mask.dtype == jnp.bool_ else scores + mask  # float: a bias
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    return dropout(weights, dropout_p, key) @ v, weights


def attention(
    params: Params, prefix: str, config: ModelConfig, x: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None = None, kv_cache: tuple | None = None,
    mask: jax.Array | None = None, key: jax.Array | None = None,
) -> tuple[jax.Array, tuple | None]:
    """Multi-head attention with n_kv_heads key/value heads: MHA when K == H, GQA when 1 < K < H
    (Ainslie et al. 2023), MQA when K == 1 (Shazeer 2019). x (B, T, D) -> (B, T, D).

    kv_cache: (k_cache, v_cache, start) with caches (B, K, S_max, hd) of fixed shape; this step's
    keys/values are written at slot `start` (minillm.jax.kv_cache.write_slots: no new shape, so no
    recompilation) and the queries attend to slots 0 .. start + i. Returns (y, (k_cache, v_cache))
    with the updated caches, or (y, None) without a cache.
    """
    B, T, _ = x.shape
    H, K, hd = config.n_heads, config.n_kv_heads, config.head_dim
    q = linear(params, f"{prefix}.q", x).reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    k = linear(params, f"{prefix}.k", x).reshape(B, T, K, hd).transpose(0, 2, 1, 3)  # (B, K, T, hd)
    v = linear(params, f"{prefix}.v", x).reshape(B, T, K, hd).transpose(0, 2, 1, 3)  # (B, K, T, hd)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    new_cache = None
    if kv_cache is not None:
        k_cache, v_cache, start = kv_cache
        k, v = write_slots(k_cache, k, start), write_slots(v_cache, v, start)  # (B, K, S_max, hd)
        new_cache = (k, v)
        if mask is None:  # slots past start + i are empty (or stale) and must not be seen
            mask = causal_mask(T, k.shape[2], start)
    if K != H:  # each K/V head serves a group of H / K query heads
        k = jnp.repeat(k, H // K, axis=1)  # (B, H, S, hd)
        v = jnp.repeat(v, H // K, axis=1)
    if config.attention == "linear":  # Katharopoulos et al. 2020 (minillm.jax.linear_attention)
        y = parallel_form(q, k, v, mask)
    else:
        y, _ = attention_math(q, k, v, mask, config.dropout, key)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, H * hd)  # (B, T, H * hd), H * hd == D unless head_dim is set
    return linear(params, f"{prefix}.o", y), new_cache


# --- feed-forward -------------------------------------------------------------------------------
def gelu_mlp(params: Params, prefix: str, x: jax.Array, approximate: bool = True) -> jax.Array:
    """GPT-2's MLP: down(gelu(up(x))); GELU's tanh approximation for mlp="gelu" (what GPT-2 was
    trained with), the erf form for mlp="gelu_exact"."""
    hidden = jax.nn.gelu(linear(params, f"{prefix}.up", x), approximate=approximate)
    return linear(params, f"{prefix}.down", hidden)


def swiglu(params: Params, prefix: str, x: jax.Array) -> jax.Array:
    """Shazeer 2020, as in LLaMA: down(silu(gate(x)) * up(x))."""
    hidden = jax.nn.silu(linear(params, f"{prefix}.gate", x)) * linear(params, f"{prefix}.up", x)
    return linear(params, f"{prefix}.down", hidden)


def mlp(params: Params, prefix: str, config: ModelConfig, x: jax.Array) -> jax.Array:
    if config.mlp == "swiglu":
        return swiglu(params, prefix, x)
    return gelu_mlp(params, prefix, x, approximate=config.mlp == "gelu")


# --- the block ----------------------------------------------------------------------------------
def block(
    params: Params, prefix: str, config: ModelConfig, x: jax.Array, rope=None, kv_cache=None,
    mask=None, key: jax.Array | None = None, mlp_fn=mlp,
) -> tuple[jax.Array, tuple | None]:
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). x (B, T, D).
    Returns (x, updated kv cache or None). key: dropout randomness (None = no dropout). mlp_fn: the
    MLP, as `mlp`'s signature (a mixture of experts: minillm.jax.moe.mlp_fn)."""
    keys = jax.random.split(key, 3) if key is not None else (None, None, None)
    h, new_cache = attention(params, f"{prefix}.attn", config, norm(params, f"{prefix}.attn_norm", config, x),
                             rope, kv_cache, mask, keys[0])
    x = x + dropout(h, config.dropout, keys[1])
    h = mlp_fn(params, f"{prefix}.mlp", config, norm(params, f"{prefix}.mlp_norm", config, x))
    return x + dropout(h, config.dropout, keys[2]), new_cache
