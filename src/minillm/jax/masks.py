"""Which keys each query may see, from positions: the causal rule, Mistral's sliding window, and
ALiBi's distance bias (minillm.jax.alibi), combined into the one mask attention takes.

The twin of minillm/torch/masks.py. Built once per forward from the query positions and the key
positions (the queries' own, or the fixed-size cache's slots: slot p holds position p), then
handed to every block. Configs with neither a window nor ALiBi keep the mask they were given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minillm.config import ModelConfig
from minillm.jax.alibi import alibi_bias, alibi_slopes


def window_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """True where query position i may attend key position j: j <= i (causal) and, with a window
    W, i - j < W: the last W keys, itself included (Mistral's sliding window). q_pos (T,) or (B, T),
    k_pos (S,) or (B, S) -> (T, S) or (B, T, S) bool."""
    distance = q_pos[..., :, None] - k_pos[..., None, :]  # (.., T, S): i - j
    allowed = distance >= 0
    return allowed if window is None else allowed & (distance < window)


def attention_mask(config: ModelConfig, q_pos: jax.Array, k_pos: jax.Array,
                   mask: jax.Array | None) -> jax.Array | None:
    """The mask every block's attention takes: bool (T, S) / (B, 1, T, S) for a window, or a float
    bias (1 or B, H, T, S) with ALiBi (-inf where not allowed); `mask` (bool) is and-ed in."""
    if config.attention != "softmax" or (config.positions != "alibi" and config.attention_window is None):
        return mask
    allowed = window_mask(q_pos, k_pos, config.attention_window)  # (T, S) or (B, T, S)
    if allowed.ndim == 3:
        allowed = allowed[:, None]  # (B, 1, T, S)
    if mask is not None:
        allowed = allowed & mask
    if config.positions != "alibi":
        return allowed
    bias = alibi_bias(alibi_slopes(config.n_heads), q_pos, k_pos)  # (1 or B, H, T, S)
    return jnp.where(allowed, bias, -jnp.inf)
