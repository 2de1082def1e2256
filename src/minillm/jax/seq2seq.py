"""The encoder-decoder Transformer (Vaswani et al. 2017) in JAX: pure functions over the canonical params.

The twin of minillm/torch/seq2seq.py (and of its decoding, minillm/torch/seq2seq_generate.py): the
encoder's bidirectional self-attention blocks (padding masked) -> encoder_norm -> memory; the
decoder's causal self-attention + cross-attention over memory + MLP blocks -> norm -> lm_head.
Shared token embedding and positions; norm_placement "post" is norm(x + f(x)), "pre" x + f(norm(x)).
The params dict is exactly the PyTorch model's state_dict (minillm.checkpoint.canonical_shapes).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minillm import beam
from minillm.config import ModelConfig
from minillm.jax.kv_cache import make_cache, reorder
from minillm.jax.layers import Params, attention, attention_math, linear, mlp, norm
from minillm.jax.model import embed, lm_head

CrossKV = list[tuple[jax.Array, jax.Array]]  # per decoder block: memory's k, v (B, K, S, hd)


def memory_kv(params: Params, prefix: str, config: ModelConfig, memory: jax.Array) -> tuple[jax.Array, ...]:
    """memory (B, S, D) -> k, v (B, K, S, hd) of the cross-attention under `prefix`: once per source."""
    B, S, _ = memory.shape
    K, hd = config.n_kv_heads, config.head_dim
    k = linear(params, f"{prefix}.k", memory).reshape(B, S, K, hd).transpose(0, 2, 1, 3)
    v = linear(params, f"{prefix}.v", memory).reshape(B, S, K, hd).transpose(0, 2, 1, 3)
    return k, v


def cross_attention(params: Params, prefix: str, config: ModelConfig, x: jax.Array,
                    kv: tuple[jax.Array, jax.Array], mask: jax.Array | None) -> jax.Array:
    """Decoder queries x (B, T, D) over memory's k, v -> (B, T, D); mask (B, 1, 1, S) bool or None (all)."""
    B, T, _ = x.shape
    H, K, hd = config.n_heads, config.n_kv_heads, config.head_dim
    q = linear(params, f"{prefix}.q", x).reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    k, v = (jnp.repeat(a, H // K, axis=1) for a in kv) if K != H else kv  # (B, H, S, hd)
    if mask is None:
        mask = jnp.ones((1, 1, 1, k.shape[2]), bool)
    y, _ = attention_math(q, k, v, mask)
    return linear(params, f"{prefix}.o", y.transpose(0, 2, 1, 3).reshape(B, T, H * hd))


def residual(params: Params, prefix: str, config: ModelConfig, x: jax.Array, sublayer: Callable) -> jax.Array:
    """One residual sublayer, its norm under `prefix`: post-norm norm(x + f(x)) or pre-norm x + f(norm(x))."""
    if config.norm_placement == "post":
        return norm(params, prefix, config, x + sublayer(x))
    return x + sublayer(norm(params, prefix, config, x))


def encoder_block(params: Params, prefix: str, config: ModelConfig, x: jax.Array, mask: jax.Array):
    """x (B, S, D); mask (B, 1, 1, S) bool, True = a real token (every position sees those)."""
    x = residual(params, f"{prefix}.attn_norm", config, x,
                 lambda h: attention(params, f"{prefix}.attn", config, h, mask=mask)[0])
    return residual(params, f"{prefix}.mlp_norm", config, x,
                    lambda h: mlp(params, f"{prefix}.mlp", config, h))


def decoder_block(params: Params, prefix: str, config: ModelConfig, x: jax.Array, kv, mask,
                  kv_cache: tuple | None = None) -> tuple[jax.Array, tuple | None]:
    """Causal self-attention (kv_cache: (k_cache, v_cache, start) as in jax.layers.attention), then
    cross-attention over memory's kv, then the MLP. Returns (x, the updated self-attention cache)."""
    new_cache = []  # the self-attention sublayer hands its updated cache out through this list

    def self_attention(h):
        y, cache = attention(params, f"{prefix}.attn", config, h, kv_cache=kv_cache)
        new_cache.append(cache)
        return y

    x = residual(params, f"{prefix}.attn_norm", config, x, self_attention)
    x = residual(params, f"{prefix}.cross_attn_norm", config, x,
                 lambda h: cross_attention(params, f"{prefix}.cross_attn", config, h, kv, mask))
    x = residual(params, f"{prefix}.mlp_norm", config, x, lambda h: mlp(params, f"{prefix}.mlp", config, h))
    return x, new_cache[0]


def encode(params: Params, config: ModelConfig, source: jax.Array, source_mask: jax.Array | None = None):
    """source (B, S) ids, source_mask (B, S) bool (True = real, None = no padding) -> memory (B, S, D)."""
    if source_mask is None:
        source_mask = jnp.ones(source.shape, bool)
    x = embed(params, config, source, jnp.arange(source.shape[1]))
    for i in range(config.encoder_layers):
        x = encoder_block(params, f"encoder.{i}", config, x, source_mask[:, None, None, :])
    return norm(params, "encoder_norm", config, x)


def cross_kv(params: Params, config: ModelConfig, memory: jax.Array) -> CrossKV:
    """Each decoder block's keys and values of memory (B, S, D): computed once per source."""
    return [memory_kv(params, f"blocks.{i}.cross_attn", config, memory) for i in range(config.n_layers)]


def decode(params: Params, config: ModelConfig, target: jax.Array, kv: CrossKV,
           source_mask: jax.Array | None = None, cache: dict | None = None, start: int = 0):
    """target (B, T) ids at positions start .. start + T - 1 -> (logits (B, T, vocab), new cache).
    cache: {"k", "v"} (L, B, K, S_max, hd) (minillm.jax.kv_cache.make_cache) or None (no cache)."""
    mask = None if source_mask is None else source_mask[:, None, None, :]
    y = embed(params, config, target, start + jnp.arange(target.shape[1]))
    ks, vs = [], []
    for i in range(config.n_layers):
        layer_cache = None if cache is None else (cache["k"][i], cache["v"][i], start)
        y, new = decoder_block(params, f"blocks.{i}", config, y, kv[i], mask, layer_cache)
        if new is not None:
            ks.append(new[0])
            vs.append(new[1])
    logits = lm_head(params, norm(params, "norm", config, y))
    return logits, ({"k": jnp.stack(ks), "v": jnp.stack(vs)} if cache is not None else None)


def forward(params: Params, config: ModelConfig, source: jax.Array, target: jax.Array,
            source_mask: jax.Array | None = None) -> jax.Array:
    """Teacher forcing: source (B, S), target (B, T) (bos + answer) -> logits (B, T, vocab)."""
    memory = encode(params, config, source, source_mask)
    return decode(params, config, target, cross_kv(params, config, memory), source_mask)[0]


def greedy(params: Params, config: ModelConfig, sources: Sequence[Sequence[int]], max_new_tokens: int,
           bos_id: int, eos_id: int, pad_id: int = 0) -> list[list[int]]:
    """The argmax output of each source (eos excluded): encoder and cross keys/values once, then one
    cached decoder step per token (as minillm.torch.seq2seq_generate.greedy)."""
    S = max(len(s) for s in sources)
    ids = np.full((len(sources), S), pad_id, np.int32)
    for row, s in enumerate(sources):
        ids[row, : len(s)] = s
    source_mask = jnp.asarray(np.arange(S)[None, :] < np.array([len(s) for s in sources])[:, None])
    kv = jax.jit(lambda p, s, m: cross_kv(p, config, encode(p, config, s, m)))(params, jnp.asarray(ids),
                                                                                  source_mask)
    step = jax.jit(lambda p, token, kv, m, cache, t: decode(p, config, token, kv, m, cache, t))
    cache = make_cache(config, len(sources), max_new_tokens)
    token, steps = jnp.full((len(sources), 1), bos_id, jnp.int32), []
    for t in range(max_new_tokens):
        logits, cache = step(params, token, kv, source_mask, cache, jnp.asarray(t, jnp.int32))
        token = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        steps.append(np.asarray(token[:, 0]))
        if all(eos_id in col for col in np.stack(steps, 1).tolist()):
            break
    rows = np.stack(steps, axis=1).tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def beam_search(params: Params, config: ModelConfig, source: Sequence[int], max_new_tokens: int, bos_id: int,
                eos_id: int, num_beams: int = 4, *, length_penalty: float = 1.0,
                early_stopping: bool | str = False) -> list[int]:
    """The best output for one source (eos excluded), as minillm.torch.seq2seq_generate.beam_search:
    the beams share the source's cross keys/values; their self-attention caches follow the survivors."""
    beam.check_beam_args(num_beams, max_new_tokens)
    memory = encode(params, config, jnp.asarray([list(source)], jnp.int32))  # (1, S, D)
    kv = [tuple(jnp.broadcast_to(a, (num_beams, *a.shape[1:])) for a in pair)
          for pair in cross_kv(params, config, memory)]  # (N, K, S, hd) each
    step = jax.jit(lambda p, token, kv, cache, t: decode(p, config, token, kv, None, cache, t))
    state = {"cache": make_cache(config, num_beams, max_new_tokens), "t": 0}

    def log_probs(tokens: np.ndarray) -> np.ndarray:  # (N,) -> (N, V) float32
        logits, state["cache"] = step(params, jnp.asarray(tokens, jnp.int32)[:, None], kv, state["cache"],
                                      jnp.asarray(state["t"], jnp.int32))
        state["t"] += 1
        return np.asarray(jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1))

    def extend(rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        state["cache"] = reorder(state["cache"], jnp.asarray(rows))
        return log_probs(tokens)

    best = beam.search(log_probs(np.full(num_beams, bos_id)), extend, max_new_tokens,
                       length_penalty=length_penalty, early_stopping=early_stopping, eos_token_ids=[eos_id])
    return best[: best.index(eos_id)] if eos_id in best else best
