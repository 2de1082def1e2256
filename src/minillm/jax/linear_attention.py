"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): softmax(q kᵀ) replaced
by a kernel phi(q) phi(k)ᵀ with the feature map phi(x) = elu(x) + 1 (positive, so the normaliser
never vanishes). For query i:

    y_i = phi(q_i)ᵀ S_i / (phi(q_i)ᵀ z_i),   S_i = sum_{j<=i} phi(k_j) v_jᵀ,   z_i = sum_{j<=i} phi(k_j)

The twin of minillm/torch/linear_attention.py. Both forms of the same function:
- parallel (training, and decoding over JAX's fixed-shape KV cache): A = phi(Q) phi(K)ᵀ under the
  causal mask, y = A V / A 1. The mask is what lets right-padded prompts and stale cache slots
  through jit without touching the sums (a running state would have summed the padding in).
- recurrent: the state (S, z) updated with one phi(k) vᵀ per token; constant size.
No 1/sqrt(hd) scaling (the paper has none: the normaliser divides it out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def feature_map(x: jax.Array) -> jax.Array:
    """phi(x) = elu(x) + 1 > 0."""
    return jax.nn.elu(x) + 1.0


def parallel_form(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """q (B, H, T, hd); k, v (B, H, S, hd); mask (T, S) or (B, 1, T, S) bool, None -> causal with the
    T queries the last T of the S keys. Returns y (B, H, T, hd), computed in float32."""
    dtype, T, S = q.dtype, q.shape[-2], k.shape[-2]
    if mask is None:
        mask = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T)  # (T, S)
    phi_q, phi_k = feature_map(q.astype(jnp.float32)), feature_map(k.astype(jnp.float32))
    A = jnp.where(mask, phi_q @ jnp.swapaxes(phi_k, -2, -1), 0.0)  # (B, H, T, S): phi(q_i)·phi(k_j), j <= i
    y = (A @ v.astype(jnp.float32)) / A.sum(-1)[..., None]
    return y.astype(dtype)


def recurrent_step(q: jax.Array, k: jax.Array, v: jax.Array, S: jax.Array,
                   z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token: q, k, v (B, H, hd); S += phi(k) vᵀ, z += phi(k); y = phi(q)ᵀ S / phi(q)ᵀ z.
    Returns y (B, H, hd) and the new (S, z)."""
    phi_q, phi_k = feature_map(q), feature_map(k)
    S = S + phi_k[..., :, None] * v[..., None, :]  # (B, H, hd, hd)
    z = z + phi_k  # (B, H, hd)
    y = jnp.einsum("bhi,bhij->bhj", phi_q, S) / (phi_q * z).sum(-1, keepdims=True)
    return y, S, z
