"""The key/value cache: what attention has already computed for earlier tokens, kept for reuse.

During generation token t attends to the keys and values of tokens 0..t. They do not change once
computed (causal attention), so each layer stores them instead of recomputing the whole prefix:
one forward pass per new token instead of one per prefix.

The twin of minillm/torch/kv_cache.py, in JAX's fixed-shape style: one array per K and V for all
layers, (L, B, n_kv_heads, max_len, head_dim), preallocated to the longest sequence this
generation will need. It stores n_kv_heads heads, not n_heads: with grouped-query attention the
cache is n_heads / n_kv_heads times smaller, which is the point of GQA at inference time. New
keys/values are written at a traced slot with lax.dynamic_update_slice, so the shapes never
change and a jitted decode step compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from minillm.config import ModelConfig

Cache = dict  # {"k": (L, B, K, max_len, hd), "v": same}


def make_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    """Zeroed keys and values for every layer: {"k", "v"} each (L, B, K, max_len, hd)."""
    shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def write_slots(layer_cache: jax.Array, new: jax.Array, start: jax.Array | int) -> jax.Array:
    """One layer's cache (B, K, max_len, hd) with `new` (B, K, T, hd) written at slots
    start .. start + T - 1 (a traced start: no new shape, no recompilation)."""
    return jax.lax.dynamic_update_slice(layer_cache, new.astype(layer_cache.dtype), (0, 0, start, 0))


def reorder(cache: Cache, rows: jax.Array) -> Cache:
    """Keep batch rows `rows` (B',) in that order, e.g. the surviving hypotheses of beam search."""
    return {"k": cache["k"][:, rows], "v": cache["v"][:, rows]}


# --- cache shapes (how many slots: minillm.config.cache_length) ------------------------------------
def bucket_length(n: int, limit: int, smallest: int = 16) -> int:
    """The power of two >= n (at least `smallest`), capped at `limit`: few shapes, few compiles."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, limit)


def pad_prompts(prompts: np.ndarray, cache_len: int) -> jax.Array:
    """prompts (B, T) -> (B, Tp) right-padded with 0 to a bucket length Tp <= cache_len, so
    prefill compiles once per bucket. The pad slots are harmless: decoding at position p
    overwrites slot p before anything reads it, and the causal mask hides slots past p."""
    B, T = prompts.shape
    padded = np.zeros((B, bucket_length(T, cache_len)), np.int32)
    padded[:, :T] = prompts
    return jnp.asarray(padded)
