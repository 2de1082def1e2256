"""Beam search in JAX: the model side of minillm/beam.py (which holds the search itself and its
conventions). The twin of minillm/torch/beam.py: the model runs in one jitted step (reorder the
cache rows to the surviving beams, feed each its new token, return float32 log-probabilities).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minillm import beam
from minillm.config import ModelConfig, cache_length
from minillm.jax.kv_cache import bucket_length, make_cache, pad_prompts, reorder
from minillm.jax.model import Params, config_json, forward_cached
from minillm.jax.sampling import mask_padded_vocab


@lru_cache(maxsize=32)
def _beam_steps(config_json: str, vocab_size: int | None):
    """(prefill, extend) jitted for one config: both return float32 log-probabilities (N, V)."""
    config = ModelConfig.from_dict(json.loads(config_json))

    def log_probs(logits: jax.Array) -> jax.Array:
        return jax.nn.log_softmax(mask_padded_vocab(logits, vocab_size).astype(jnp.float32), axis=-1)

    def prefill(params, cache, prompt, prompt_len):
        """prompt (N, Tp) right-padded -> (log-probs of the next token (N, V), cache)."""
        logits, cache = forward_cached(params, config, prompt, cache, 0)  # (N, Tp, V)
        return log_probs(jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)), cache

    def extend(params, cache, rows, tokens, position):
        """Beam b continues beam rows[b] with tokens[b] at `position` -> (log-probs (N, V), cache)."""
        logits, cache = forward_cached(params, config, tokens[:, None], reorder(cache, rows), position)
        return log_probs(logits[:, 0]), cache

    return jax.jit(prefill, donate_argnums=1), jax.jit(extend, donate_argnums=1)


def beam_search(params: Params, config: ModelConfig, prompt: Sequence[int], max_new_tokens: int,
                num_beams: int = 4, *, length_penalty: float = 1.0, early_stopping: bool | str = False,
                eos_token_ids: Sequence[int] = (), vocab_size: int | None = None) -> list[int]:
    """The best continuation of `prompt` (new tokens only); options as in minillm.beam.search."""
    beam.check_beam_args(num_beams, max_new_tokens)
    T = len(prompt)
    cache_len = bucket_length(cache_length([T], max_new_tokens, config.max_seq_len), config.max_seq_len)
    prefill, extend_step = _beam_steps(config_json(config), vocab_size)
    prompts = np.asarray([list(prompt)] * num_beams, np.int32)  # (N, T), every row the same prompt
    cache = make_cache(config, num_beams, cache_len)
    logprobs, cache = prefill(params, cache, pad_prompts(prompts, cache_len), T)
    position = T

    def extend(rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        nonlocal cache, position
        rows, tokens = jnp.asarray(rows, jnp.int32), jnp.asarray(tokens, jnp.int32)
        logprobs, cache = extend_step(params, cache, rows, tokens, position)
        position += 1
        return np.asarray(logprobs)

    return beam.search(np.asarray(logprobs), extend, max_new_tokens, length_penalty=length_penalty,
                       early_stopping=early_stopping, eos_token_ids=eos_token_ids)
