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


# --- how long a cache to allocate -------------------------------------------------------------------
def cache_length(prompt_len: int, max_new_tokens: int, max_seq_len: int,
                 context_overflow: str = "error") -> int:
    """Slots a generation needs (prompt + new tokens); past max_seq_len a clear error, or with
    context_overflow="slide" the whole context, which then slides over the sequence."""
    if context_overflow not in ("error", "slide"):
        raise ValueError(f"context_overflow must be 'error' or 'slide', got {context_overflow!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_len == 0:
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's bos id)")
    if prompt_len + max_new_tokens <= max_seq_len:
        return prompt_len + max_new_tokens
    if context_overflow == "error":
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"max_seq_len={max_seq_len}; shorten the prompt, ask for fewer tokens, or use a sliding window "
            f"(context_overflow='slide' / --sliding-window)"
        )
    return max_seq_len


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
