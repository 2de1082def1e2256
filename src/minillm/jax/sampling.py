"""Turning next-token logits into a token: the logits filters ("warpers") and the draw.

Every filter takes logits (B, V) and returns new logits (B, V) in which the tokens it rules out
are -inf, so filters compose and the survivors keep their relative probabilities. They are
applied in the order Hugging Face `transformers` uses, which is also the order that makes sense:

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> draw

- repetition penalty (Keskar et al. 2019, CTRL): a logit of an already-seen token is divided by
  the penalty when positive and multiplied by it when negative, so the token gets less likely.
- temperature: logits / T. T < 1 sharpens, T > 1 flattens; T = 0 means greedy (argmax).
- top-k (Fan et al. 2018): keep the k largest logits (ties with the k-th are kept).
- top-p, nucleus (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
  probability mass reaches p.
- min-p (Nguyen et al. 2024): keep tokens whose probability is at least min_p times the
  probability of the most likely token.

The twin of minillm/torch/sampling.py. Every function here is traced inside the jitted decode
step, so shapes stay fixed: the set of seen tokens is a (B, V) bool array, not a list.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from minillm.config import check_sampling

NEG_INF = -jnp.inf


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token. temperature 0 is greedy decoding; None/0/1.0 switch a filter off.
    Frozen (hashable): it is a compile-time constant of the jitted steps."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def mask_padded_vocab(logits: jax.Array, vocab_size: int | None) -> jax.Array:
    """Rule out ids >= vocab_size: a model's vocabulary may be padded (e.g. to a multiple of 64)
    beyond the tokenizer's, and those rows were never trained to mean anything."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) >= vocab_size, NEG_INF, logits)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """logits (B, V); seen (B, V) bool, True for every token already in the row's context."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits of each row (and anything tied with the k-th)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # (B, 1)
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus: sort by probability, drop every token whose more likely predecessors already
    reach mass p. The most likely token always survives."""
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)  # (B, V), most likely first
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
    drop_sorted = (mass_before >= p).at[..., 0].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)  # back to vocabulary order
    return jnp.where(drop, NEG_INF, logits)


def min_p_filter(logits: jax.Array, min_p: float) -> jax.Array:
    """Drop tokens whose probability is below min_p * (probability of the best token)."""
    if min_p <= 0.0:
        return logits
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = min_p * probs.max(axis=-1, keepdims=True)  # (B, 1)
    return jnp.where(probs < threshold, NEG_INF, logits)


def process_logits(logits: jax.Array, cfg: SamplingConfig, seen: jax.Array | None = None) -> jax.Array:
    """All filters of `cfg` in order, on float32 logits (B, V). `seen` is needed for the penalty."""
    logits = logits.astype(jnp.float32)
    if cfg.repetition_penalty not in (None, 1.0) and seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits  # argmax ignores the rest
    logits = apply_temperature(logits, cfg.temperature)
    if cfg.top_k:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.min_p:
        logits = min_p_filter(logits, cfg.min_p)
    return logits


def sample_next(logits: jax.Array, cfg: SamplingConfig, seen: jax.Array | None = None,
                key: jax.Array | None = None) -> jax.Array:
    """logits (B, V) -> next tokens (B,) int32. Greedy when cfg.temperature == 0; otherwise a
    draw with the PRNG key `key` (JAX's explicit randomness: the same key, the same tokens)."""
    logits = process_logits(logits, cfg, seen)
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
