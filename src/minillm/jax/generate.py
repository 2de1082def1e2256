"""Autoregressive generation with a preallocated KV cache, in JAX: prefill once, then decode.

    prefill:  the prompt (right-padded to a power of two) in one forward pass fills the cache
              slots 0 .. T-1 and gives the logits of the first new token.
    decode:   one token per row per step, written into the cache at its position with
              lax.dynamic_update_slice; its logits pick the next token.

The cache has a fixed shape (L, B, K, S_max, hd), chosen once per call from a few power-of-two
lengths, and the position is a traced value, so the jitted decode step compiles once and is
reused for every token (TRACE_COUNTS counts the traces; tests check it does not grow). Padded
prompt slots are harmless: decoding at position p overwrites slot p before anything reads it,
and the causal mask hides slots past p.

The logits filters are the same as minillm.torch.sampling: temperature (0 = greedy), top-k
(ties with the k-th kept), top-p (nucleus; the most likely token always survives).
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import jax.numpy as jnp
import numpy as np

import jax
from minillm.config import ModelConfig, check_sampling
from minillm.jax.model import Params, config_key, forward_cached
from minillm.tokenizer.stream import special_ids

TRACE_COUNTS: collections.Counter = collections.Counter()  # "prefill" / "decode" -> times traced


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token; frozen (hashable) because it is a compile-time constant."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# --- logits filters: (B, V) -> (B, V), ruled-out tokens at -inf -----------------------------------
def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits of each row (and anything tied with the k-th)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # (B, 1)
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus (Holtzman et al. 2020): drop every token whose more likely predecessors already
    reach probability mass p. The most likely token always survives."""
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)  # (B, V), most likely first
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
    drop_sorted = (mass_before >= p).at[..., 0].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)  # back to vocabulary order
    return jnp.where(drop, -jnp.inf, logits)


def sample_next(logits: jax.Array, sampling: SamplingConfig, key: jax.Array) -> jax.Array:
    """logits (B, V) -> next tokens (B,) int32: argmax when greedy, else a draw after the filters."""
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = apply_temperature(logits, sampling.temperature)
    if sampling.top_k:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p is not None:
        logits = top_p_filter(logits, sampling.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --- the cache and the two steps -------------------------------------------------------------------
def make_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Zeroed keys and values for every layer: {"k", "v"} each (L, B, K, max_len, hd)."""
    shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _mask_vocab(logits: jax.Array, vocab_size: int | None) -> jax.Array:
    """Rule out ids >= vocab_size (a model's vocabulary may be padded beyond the tokenizer's)."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) >= vocab_size, -jnp.inf, logits)


@lru_cache(maxsize=32)
def _steps(key: str, sampling: SamplingConfig, vocab_size: int | None):
    """(prefill, decode_step) jitted for one config and sampling setting."""
    config = ModelConfig.from_dict(json.loads(key))

    def prefill(params, cache, prompt, prompt_len, rng):
        """prompt (B, Tp) right-padded; prompt_len () -> (first new tokens (B,), cache)."""
        TRACE_COUNTS["prefill"] += 1
        logits, cache = forward_cached(params, config, prompt, cache, 0)  # (B, Tp, V)
        last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)  # (B, V)
        return sample_next(_mask_vocab(last, vocab_size), sampling, rng), cache

    def decode_step(params, cache, token, position, rng):
        """token (B,) at `position` -> (next tokens (B,), cache)."""
        TRACE_COUNTS["decode"] += 1
        logits, cache = forward_cached(params, config, token[:, None], cache, position)  # (B, 1, V)
        return sample_next(_mask_vocab(logits[:, 0], vocab_size), sampling, rng), cache

    return jax.jit(prefill, donate_argnums=1), jax.jit(decode_step, donate_argnums=1)


def _bucket(n: int, limit: int, smallest: int = 16) -> int:
    """The power of two >= n (at least `smallest`), capped at `limit`: few shapes, few compiles."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, limit)


def _as_batch(prompt_ids) -> tuple[np.ndarray, bool]:
    """list[int] -> ((1, T), single=True); a list of equal-length lists -> ((B, T), False)."""
    single = len(prompt_ids) == 0 or np.ndim(prompt_ids[0]) == 0
    rows = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("the JAX generate batches prompts of equal length only; generate the others one by one")
    if not rows[0]:
        raise ValueError("the prompt must hold at least one token")
    return np.asarray(rows, dtype=np.int32), single


def token_steps(params: Params, config: ModelConfig, prompts: np.ndarray, max_new_tokens: int,
                sampling: SamplingConfig, seed: int = 0, vocab_size: int | None = None):
    """Yield the next tokens (B,) as numpy, one step at a time: prefill, then decode steps."""
    B, T = prompts.shape
    if T + max_new_tokens > config.max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len {config.max_seq_len}")
    if max_new_tokens <= 0:
        return
    prefill, decode_step = _steps(config_key(config), sampling, vocab_size)
    cache_len = _bucket(T + max_new_tokens, config.max_seq_len)
    padded = np.zeros((B, _bucket(T, cache_len)), np.int32)  # (B, Tp), Tp <= cache_len
    padded[:, :T] = prompts
    rng = jax.random.PRNGKey(seed)
    rng, sub = jax.random.split(rng)
    token, cache = prefill(params, make_cache(config, B, cache_len), jnp.asarray(padded), T, sub)
    yield np.asarray(token)
    for position in range(T, T + max_new_tokens - 1):
        rng, sub = jax.random.split(rng)
        token, cache = decode_step(params, cache, token, position, sub)
        yield np.asarray(token)


def generate(params: Params, config: ModelConfig, prompt_ids, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_token_ids: Sequence[int] = (), seed: int = 0, vocab_size: int | None = None):
    """Generate up to max_new_tokens after a prompt, or after each prompt of an equal-length batch.

    params: the canonical dict (minillm.jax.model.params_from_canonical). prompt_ids: list[int]
    -> returns list[int]; a list of prompts -> list[list[int]] (only the new tokens; a row ends
    with its stop token when one came). temperature 0 is greedy; top_k / top_p filter as in
    minillm.torch.sampling. seed: the PRNG seed of the draws. vocab_size: the tokenizer's
    vocabulary when the model's is padded.
    """
    prompts, single = _as_batch(prompt_ids)
    sampling = SamplingConfig(float(temperature), top_k, top_p)
    out: list[list[int]] = [[] for _ in range(len(prompts))]
    done = [False] * len(prompts)
    for tokens in token_steps(params, config, prompts, max_new_tokens, sampling, seed, vocab_size):
        for b, t in enumerate(tokens.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop_token_ids
        if all(done):
            break
    return out[0] if single else out


def generate_stream(params: Params, config: ModelConfig, prompt_ids: Sequence[int], max_new_tokens: int, *,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    stop_token_ids: Sequence[int] = (), seed: int = 0, vocab_size: int | None = None):
    """Like `generate` for one prompt, yielding each new token id as soon as it is chosen."""
    prompts, _ = _as_batch(list(prompt_ids))
    sampling = SamplingConfig(float(temperature), top_k, top_p)
    for tokens in token_steps(params, config, prompts, max_new_tokens, sampling, seed, vocab_size):
        t = int(tokens[0])
        yield t
        if t in stop_token_ids:
            return


# --- a run directory in, text out (what `minillm sample --backend jax` prints) ----------------------
def sample_texts(run_dir, prompt: str, num_samples: int = 1, max_new_tokens: int = 200, *,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop_strings: Sequence[str] = ()) -> list[str]:
    """Continue `prompt` num_samples times with the model of a run directory (written by either
    framework); returns the continuations as text, each cut at eos or the first stop string.
    An empty prompt starts from the tokenizer's bos token, as the PyTorch `minillm sample` does."""
    from minillm.jax.model import load_model

    config, params, tokenizer = load_model(run_dir)
    if tokenizer is None:
        raise ValueError(f"run directory {run_dir} has no tokenizer.json; text generation needs one")
    ids = tokenizer.encode(prompt) if prompt else []
    ids = ids or special_ids(tokenizer, "bos")
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer has no bos token; give a prompt")
    eos = special_ids(tokenizer, "eos")
    vocab = tokenizer.vocab_size if tokenizer.vocab_size < config.vocab_size else None
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    outs = generate(params, config, [ids] * num_samples, max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, stop_token_ids=eos, seed=seed, vocab_size=vocab)
    texts = []
    for out in outs:
        text = tokenizer.decode(out[:-1] if out and out[-1] in eos else out)
        cuts = [text.index(s) for s in stop_strings if s in text]
        texts.append(text[: min(cuts)] if cuts else text)
    return texts
