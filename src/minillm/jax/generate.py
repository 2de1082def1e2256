"""Autoregressive generation with a preallocated KV cache, in JAX: prefill once, then decode.

    prefill:  the prompt (right-padded to a power of two) in one forward pass fills the cache
              slots 0 .. T-1 and gives the logits of the first new token.
    decode:   one token per row per step, written into the cache at its position; its logits
              pick the next token (minillm.jax.sampling: greedy, temperature, top-k, top-p,
              min-p, repetition penalty).

The twin of minillm/torch/generate.py. The cache has a fixed shape (minillm.jax.kv_cache), chosen
once per call from a few power-of-two lengths, the position is a traced value, and the tokens
seen so far (for the repetition penalty) are a fixed (B, V) bool array, so the jitted decode
step compiles once and is reused for every token (TRACE_COUNTS counts the traces; tests check it
does not grow). With context_overflow="slide" a full cache is refilled with the last max_seq_len
tokens of every row, as the torch side does. num_beams > 1 runs minillm.jax.beam.
"""

from __future__ import annotations

import collections
import json
import os
from functools import lru_cache
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minillm.config import ModelConfig, cache_length
from minillm.jax.beam import beam_search
from minillm.jax.kv_cache import bucket_length, make_cache, pad_prompts
from minillm.jax.model import Params, config_json, forward_cached, load_params
from minillm.jax.sampling import SamplingConfig, mask_padded_vocab, sample_next
from minillm.tokenizer.stream import StopChecker, special_ids

TRACE_COUNTS: collections.Counter = collections.Counter()  # "prefill" / "decode" -> times traced


# --- the two jitted steps ------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _steps(config_json: str, sampling: SamplingConfig, vocab_size: int | None):
    """(prefill, decode_step) jitted for one config and sampling setting."""
    config = ModelConfig.from_dict(json.loads(config_json))

    def prefill(params, cache, prompt, prompt_len, key):
        """prompt (B, Tp) right-padded, prompt_len () real tokens -> (next tokens (B,), seen, cache)."""
        TRACE_COUNTS["prefill"] += 1
        logits, cache = forward_cached(params, config, prompt, cache, 0)  # (B, Tp, V)
        last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)  # (B, V)
        # the prompt's tokens are seen (for the repetition penalty); pad slots point past the vocabulary
        real = jnp.where(jnp.arange(prompt.shape[1]) < prompt_len, prompt, config.vocab_size)  # (B, Tp)
        rows = jnp.arange(prompt.shape[0])[:, None]
        seen = jnp.zeros((prompt.shape[0], config.vocab_size), bool).at[rows, real].set(True, mode="drop")
        return sample_next(mask_padded_vocab(last, vocab_size), sampling, seen, key), seen, cache

    def decode_step(params, cache, seen, token, position, key):
        """token (B,) at `position`, seen (B, V) each row's tokens so far -> (next tokens, seen, cache)."""
        TRACE_COUNTS["decode"] += 1
        seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
        logits, cache = forward_cached(params, config, token[:, None], cache, position)  # (B, 1, V)
        return sample_next(mask_padded_vocab(logits[:, 0], vocab_size), sampling, seen, key), seen, cache

    return jax.jit(prefill, donate_argnums=1), jax.jit(decode_step, donate_argnums=(1, 2))


# --- the decoding loop ---------------------------------------------------------------------------
def _as_batch(prompt_ids) -> tuple[np.ndarray, bool]:
    """list[int] -> ((1, T), single=True); a list of equal-length lists -> ((B, T), False)."""
    single = len(prompt_ids) == 0 or np.ndim(prompt_ids[0]) == 0
    rows = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("the JAX generate batches prompts of equal length only; "
                         "generate the others one by one")
    if not rows[0]:
        raise ValueError("the prompt must hold at least one token")
    return np.asarray(rows, dtype=np.int32), single


def token_steps(params: Params, config: ModelConfig, prompts: np.ndarray, max_new_tokens: int,
                sampling: SamplingConfig, seed: int = 0, vocab_size: int | None = None,
                context_overflow: str = "error") -> Iterator[np.ndarray]:
    """The core loop: yields the next tokens (B,) as numpy, one step at a time, max_new_tokens
    times (callers stop early at their stop tokens)."""
    window = cache_length([prompts.shape[1]], max_new_tokens, config.max_seq_len, context_overflow)
    if max_new_tokens == 0:
        return
    prefill, decode_step = _steps(config_json(config), sampling, vocab_size)
    cache_len = bucket_length(window, config.max_seq_len)

    def restart(history: np.ndarray, key: jax.Array):  # prefill a fresh cache with these tokens
        cache = make_cache(config, len(history), cache_len)
        return prefill(params, cache, pad_prompts(history, cache_len), history.shape[1], key)

    key = jax.random.PRNGKey(seed)
    history = prompts[:, -window:]  # (B, <= window); kept up to date only for the sliding window
    key, sub = jax.random.split(key)
    token, seen, cache = restart(history, sub)
    length = history.shape[1]  # cache slots filled
    for step in range(max_new_tokens):
        ids = np.asarray(token)
        yield ids
        if step == max_new_tokens - 1:
            return
        if context_overflow == "slide":
            history = np.concatenate([history, ids[:, None]], axis=1)[:, -window:]
        key, sub = jax.random.split(key)
        if length >= window:  # sliding window: re-encode the last max_seq_len tokens of every row
            token, seen, cache = restart(history, sub)  # the cache stays full: so does every later step
        else:
            token, seen, cache = decode_step(params, cache, seen, token, length, sub)
            length += 1


def generate(params: Params, config: ModelConfig, prompt_ids, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None,
             stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
             seed: int = 0, vocab_size: int | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, context_overflow: str = "error"):
    """Generate up to max_new_tokens after a prompt, or after each prompt of an equal-length batch.

    params: the canonical dict (minillm.jax.model.params_from_canonical). prompt_ids: list[int]
    -> returns list[int]; a list of prompts -> list[list[int]] (only the new tokens; a row ends
    with the stop token or the token that completed a stop string, when one came). temperature 0
    is greedy; top_k / top_p / min_p / repetition_penalty filter as in minillm.jax.sampling.
    stop_strings need `tokenizer`. seed: the PRNG seed of the draws. vocab_size: the tokenizer's
    vocabulary when the model's is padded (default: the tokenizer's, when one is given).
    num_beams > 1: beam search (minillm.jax.beam). context_overflow: "error" past max_seq_len,
    or "slide" to keep conditioning on the last max_seq_len tokens.
    """
    prompts, single = _as_batch(prompt_ids)
    if vocab_size is None and getattr(tokenizer, "vocab_size", config.vocab_size) < config.vocab_size:
        vocab_size = tokenizer.vocab_size  # the model's table is padded: never emit the padding ids
    if num_beams > 1:
        out = [beam_search(params, config, p, max_new_tokens, num_beams, length_penalty=length_penalty,
                           early_stopping=early_stopping, eos_token_ids=stop_token_ids, vocab_size=vocab_size)
               for p in prompts.tolist()]
        return out[0] if single else out
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    checkers = [StopChecker(tokenizer, stop_strings) for _ in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for tokens in token_steps(params, config, prompts, max_new_tokens, sampling, seed, vocab_size,
                              context_overflow):
        for b, t in enumerate(tokens.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop_token_ids or checkers[b].push(t)
        if all(done):
            break
    return out[0] if single else out


def generate_stream(params: Params, config: ModelConfig, prompt_ids: Sequence[int], max_new_tokens: int, *,
                    stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
                    seed: int = 0, vocab_size: int | None = None, context_overflow: str = "error",
                    **sampling) -> Iterator[int]:
    """Like `generate` for one prompt, yielding each new token id as soon as it is chosen.
    **sampling: the fields of SamplingConfig (temperature, top_k, top_p, min_p, repetition_penalty)."""
    prompts, _ = _as_batch(list(prompt_ids))
    checker = StopChecker(tokenizer, stop_strings)
    for tokens in token_steps(params, config, prompts, max_new_tokens, SamplingConfig(**sampling), seed,
                              vocab_size, context_overflow):
        t = int(tokens[0])
        yield t
        if t in stop_token_ids or checker.push(t):
            return


# --- a run directory in, text out (what `minillm sample --backend jax` prints) ----------------------
def sample_texts(run_dir, prompt: str, num_samples: int = 1, max_new_tokens: int = 200, *,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None, num_beams: int = 1,
                 length_penalty: float = 1.0, context_overflow: str = "error", seed: int | None = None,
                 stop_strings: Sequence[str] = ()) -> list[str]:
    """Continue `prompt` num_samples times with the model of a run directory (written by either
    framework); returns the continuations as text, each cut at eos or the first stop string.
    An empty prompt starts from the tokenizer's bos token, as the PyTorch `minillm sample` does.
    Beam search is deterministic: its one result is repeated num_samples times."""
    config, params, tokenizer = load_params(run_dir)
    if tokenizer is None:
        raise ValueError(f"run directory {run_dir} has no tokenizer.json; text generation needs one")
    ids = tokenizer.encode(prompt) if prompt else []
    ids = ids or special_ids(tokenizer, "bos")
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer has no bos token; give a prompt")
    eos = special_ids(tokenizer, "eos")
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    rows = 1 if num_beams > 1 else num_samples
    outs = generate(params, config, [ids] * rows, max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, stop_token_ids=eos,
                    stop_strings=stop_strings, tokenizer=tokenizer, seed=seed, num_beams=num_beams,
                    length_penalty=length_penalty, context_overflow=context_overflow)
    texts = []
    for out in outs * (num_samples // rows):
        text = tokenizer.decode(out[:-1] if out and out[-1] in eos else out)
        cuts = [text.index(s) for s in stop_strings if s in text]
        texts.append(text[: min(cuts)] if cuts else text)
    return texts
