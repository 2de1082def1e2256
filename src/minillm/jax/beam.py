"""Beam search: keep the num_beams most likely partial continuations instead of one.

At each step every live hypothesis ("beam") is extended by every token; the candidates are
ranked by their summed log-probability and the best num_beams that did not end become the next
beams. A candidate that ends (an eos token, or the length limit) is scored
sum_logprob / length ** length_penalty and joins the finished list, which keeps the best
num_beams. The search stops when no live beam can beat the worst finished one, or (with
early_stopping=True) as soon as num_beams hypotheses have finished.

This follows the conventions of Hugging Face `transformers` (tested token for token):
- twice num_beams candidates (more with several eos ids) are ranked, so enough survive even if
  the best ones all end;
- only candidates among the top num_beams may finish;
- the "can a live beam still win" test uses the current length (early_stopping=False) or the
  maximum length when early_stopping="never" and length_penalty > 0.

The twin of minillm/torch/beam.py: the model runs in one jitted step (reorder the cache rows to
the surviving beams, feed each its new token, return log-probabilities); the ranking and the
finished list are host-side numpy, in float32 as the torch side computes them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Sequence

import jax.numpy as jnp
import numpy as np

import jax
from minillm.config import ModelConfig
from minillm.jax.kv_cache import bucket_length, cache_length, make_cache, pad_prompts, reorder
from minillm.jax.model import Params, config_json, forward_cached
from minillm.jax.sampling import mask_padded_vocab

IMPOSSIBLE = -1.0e9  # the score of a hypothesis that must not be chosen


class Finished:
    """The best num_beams finished hypotheses, as (score, tokens), best first."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.items: list[tuple[float, list[int]]] = []

    @property
    def full(self) -> bool:
        return len(self.items) >= self.num_beams

    def worst(self) -> float:
        return self.items[-1][0]

    def add(self, logprob: float, tokens: list[int]) -> None:
        score = logprob / (len(tokens) ** self.length_penalty)
        self.items.append((score, tokens))
        self.items.sort(key=lambda item: -item[0])  # stable: earlier entries win ties
        del self.items[self.num_beams:]


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


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (ties: the lower index first)."""
    return np.argsort(-scores, kind="stable")[:k]


def beam_search(params: Params, config: ModelConfig, prompt: Sequence[int], max_new_tokens: int,
                num_beams: int = 4, *, length_penalty: float = 1.0, early_stopping: bool | str = False,
                eos_token_ids: Sequence[int] = (), vocab_size: int | None = None) -> list[int]:
    """The best continuation of `prompt` (new tokens only, ending with eos if it ended there).

    length_penalty: exponent of the length that divides a finished hypothesis' log-probability
    (> 0 favours longer outputs, < 0 shorter). early_stopping: True stops once num_beams
    hypotheses are finished; False stops when the best live beam, at its current length, cannot
    beat the worst finished one; "never" uses the most favourable length for that test.
    """
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError("num_beams and max_new_tokens must be >= 1")
    N, eos, T = num_beams, np.array(sorted(set(eos_token_ids)), dtype=np.int64), len(prompt)
    cache_len = bucket_length(cache_length(T, max_new_tokens, config.max_seq_len), config.max_seq_len)
    prefill, extend = _beam_steps(config_json(config), vocab_size)
    prompts = np.asarray([list(prompt)] * N, np.int32)  # (N, T), every row the same prompt
    logprobs, cache = prefill(params, make_cache(config, N, cache_len), pad_prompts(prompts, cache_len), T)
    n_candidates = max(2, 1 + len(eos)) * N
    running = np.full(N, IMPOSSIBLE, np.float32)
    running[0] = 0.0  # all beams start identical: extend only the first, or they would repeat it
    beams: list[list[int]] = [[] for _ in range(N)]
    finished, can_improve = Finished(N, length_penalty), True
    for step in range(1, max_new_tokens + 1):
        logprobs = np.asarray(logprobs)  # (N, V)
        flat_scores = (logprobs + running[:, None]).reshape(-1)
        flat = _top(flat_scores, n_candidates)  # best over all beams
        scores, rows, tokens = flat_scores[flat], flat // logprobs.shape[-1], flat % logprobs.shape[-1]
        ends = np.isin(tokens, eos) | (step == max_new_tokens)  # (n_candidates,)
        if can_improve and not (finished.full and early_stopping is True):
            for i in np.flatnonzero(ends[:N]).tolist():  # only the top N may finish
                finished.add(float(scores[i]), beams[rows[i]] + [int(tokens[i])])
        live = scores + ends.astype(np.float32) * np.float32(IMPOSSIBLE)  # an ended candidate stops here
        keep = _top(live, N)
        running, rows, tokens = live[keep], rows[keep], tokens[keep]
        beams = [beams[r] + [t] for r, t in zip(rows.tolist(), tokens.tolist())]
        if finished.full:
            best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step
            can_improve = can_improve and float(running[0]) / best_length ** length_penalty > finished.worst()
        if not can_improve or (finished.full and early_stopping is True) or bool(ends.all()):
            break
        logprobs, cache = extend(params, cache, jnp.asarray(rows, jnp.int32), jnp.asarray(tokens, jnp.int32),
                                 T + step - 1)
    return finished.items[0][1]
