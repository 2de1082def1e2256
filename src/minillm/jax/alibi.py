"""ALiBi, Attention with Linear Biases (Press et al. 2022): no position embedding at all; instead
each head h adds -m_h * (i - j) to the score of query i for key j, a penalty growing linearly with
the distance, with a fixed slope per head. Nothing is learned and no table has a length, which is
why a model trained on short sequences still runs (and degrades gracefully) on longer ones.

Slopes: a geometric sequence m_h = 2^(-8h/H), h = 1..H (H = 8: 1/2, 1/4, ..., 1/256). When H is not
a power of two the paper takes the 2^floor(log2 H) slopes of the nearest smaller power of two and
fills the rest with every other slope of the next power of two (its reference code, get_slopes).
The twin of minillm/torch/alibi.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _geometric_slopes(n: int) -> list[float]:
    return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]  # m_h = 2^(-8h/n)


def alibi_slopes(n_heads: int) -> jax.Array:
    """The head slopes m_h, (H,) float32, as in the paper's reference code."""
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = _geometric_slopes(closest)
    if closest < n_heads:  # the odd-numbered slopes of 2 * closest heads fill the rest
        slopes += _geometric_slopes(2 * closest)[0::2][: n_heads - closest]
    return jnp.asarray(slopes, dtype=jnp.float32)


def alibi_bias(slopes: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """-m_h * (i - j) for query positions i and key positions j. slopes (H,); q_pos (T,) or (B, T);
    k_pos (S,) or (B, S). Returns (1, H, T, S) or (B, H, T, S), float32, to add to the scores.
    (Keys after the query get a positive bias here; the causal mask removes them.)"""
    distance = q_pos[..., :, None] - k_pos[..., None, :]  # (T, S) or (B, T, S): i - j
    bias = -slopes[:, None, None] * distance[..., None, :, :].astype(jnp.float32)  # (.., H, T, S)
    return bias if bias.ndim == 4 else bias[None]
