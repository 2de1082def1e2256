"""Autoregressive generation with a KV cache: prefill the prompt once, then decode token by token.

    prefill:  the whole (left-padded) prompt in one forward pass (or in chunks) fills the caches
              and gives the logits of the first new token.
    decode:   one token per row per step; its keys/values join the caches, its logits pick the
              next token (minillm.torch.sampling: greedy, temperature, top-k, top-p, min-p, ...).

This module is the loop (the cache state is minillm.torch.kv_cache's BatchCache): `generate` returns
ids, `generate_stream` yields them one by one, `stream_text` yields text (minillm.tokenizer.stream).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Iterator, Sequence

import torch

from minillm.config import cache_length
from minillm.tokenizer.stream import StopChecker, text_pieces
from minillm.torch.beam import beam_search
from minillm.torch.kv_cache import BatchCache, EagerBatchCache
from minillm.torch.packed import packed_copy, packed_supports
from minillm.torch.sampling import SamplingConfig, mask_padded_vocab, sample_next


def _as_batch(prompt_ids) -> tuple[list[list[int]], bool]:
    """A prompt (list of ids / 1-D tensor) or a batch of them -> (list of lists, was_single)."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if len(prompt_ids) and not isinstance(prompt_ids[0], (list, tuple)):
        return [list(map(int, prompt_ids))], True
    return [list(map(int, p)) for p in prompt_ids], False


def _generators(seed, batch: int) -> list[torch.Generator] | None:
    """One RNG per row: seed int -> every row seeded alike (as if generated alone); list -> per row."""
    if seed is None:
        return None
    seeds = [seed] * batch if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} prompts")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.inference_mode()
def token_steps(model, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
                stop_token_ids: Sequence[int] = (), seed=None, vocab_size: int | None = None,
                context_overflow: str = "error", prefill_chunk_size: int | None = None,
                compile: bool = False) -> Iterator[list[int]]:
    """The core loop: yields the next token of every row (B ints) once per step. Stops after
    max_new_tokens steps or when every row has produced a stop token. (Finished rows keep
    running in the batch; callers drop what follows their stop token.)"""
    lengths = [len(p) for p in prompts]
    window = cache_length(lengths, max_new_tokens, model.config.max_seq_len, context_overflow)
    track_seen = sampling.repetition_penalty not in (None, 1.0)
    if packed_supports(model.config):
        cache = BatchCache(packed_copy(model, compile), window, model.config.vocab_size, track_seen)
    else:  # ALiBi, sliding window, linear attention, ...: the eager model and its own caches
        cache = EagerBatchCache(model, window, model.config.vocab_size, track_seen)
    generators = _generators(seed, len(prompts))
    stop, done = set(stop_token_ids), [False] * len(prompts)
    history = [p[-window:] for p in prompts]  # kept only for the sliding window
    logits = cache.prefill(history, prefill_chunk_size)
    for step in range(max_new_tokens):
        logits = mask_padded_vocab(logits, vocab_size)
        tokens = sample_next(logits, sampling, cache.seen, generators)  # (B,)
        ids = tokens.tolist()
        yield ids
        done = [d or t in stop for d, t in zip(done, ids)]
        if all(done) or step == max_new_tokens - 1:
            return
        if context_overflow == "slide":
            history = [(h + [t])[-window:] for h, t in zip(history, ids)]
        if cache.full:  # sliding window: re-encode the last max_seq_len tokens of every row
            logits = cache.prefill(history, prefill_chunk_size)
        else:
            logits = cache.decode(tokens)


def generate(model, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
             stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
             seed: int | Sequence[int] | None = None, vocab_size: int | None = None, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False, context_overflow: str = "error",
             prefill_chunk_size: int | None = None, compile: bool = False):
    """Generate up to max_new_tokens after a prompt (list[int] / 1-D tensor -> list[int]), or after
    each prompt of a batch (-> list[list[int]]): only the new tokens, each row ending with the stop
    token or the token that completed a stop string, when one came.

    temperature 0 is greedy; the filters are minillm.torch.sampling's. stop_strings need `tokenizer`.
    seed: an int seeds every row alike (row b equals that prompt generated alone), a list row by row.
    vocab_size (default: the tokenizer's, when smaller than the model's padded table): ids from it on
    are never generated. num_beams > 1: beam search. context_overflow: "error" past max_seq_len, or
    "slide" to condition on the last max_seq_len tokens. compile: torch.compile the decode step.
    """
    prompts, single = _as_batch(prompt_ids)
    model_vocab = model.config.vocab_size
    if vocab_size is None and getattr(tokenizer, "vocab_size", model_vocab) < model_vocab:
        vocab_size = tokenizer.vocab_size  # the model's table is padded: never emit the padding ids
    if num_beams > 1:
        out = [beam_search(model, p, max_new_tokens, num_beams, length_penalty=length_penalty,
                           early_stopping=early_stopping, eos_token_ids=stop_token_ids, vocab_size=vocab_size)
               for p in prompts]
        return out[0] if single else out
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    checkers = [StopChecker(tokenizer, stop_strings) for _ in prompts]
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for tokens in token_steps(model, prompts, max_new_tokens, sampling, stop_token_ids, seed, vocab_size,
                              context_overflow, prefill_chunk_size, compile):
        for b, t in enumerate(tokens):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop_token_ids or checkers[b].push(t)
        if all(done):
            break
    return out[0] if single else out


def generate_stream(model, prompt_ids, max_new_tokens: int, **kwargs) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are produced (same options as generate)."""
    stop_ids = kwargs.pop("stop_token_ids", ())
    checker = StopChecker(kwargs.pop("tokenizer", None), kwargs.pop("stop_strings", ()))
    names = [f.name for f in fields(SamplingConfig)]  # the sampling options; their defaults stay there
    sampling = SamplingConfig(**{n: kwargs.pop(n) for n in names if n in kwargs})
    prompts, _ = _as_batch(prompt_ids)
    for tokens in token_steps(model, prompts[:1], max_new_tokens, sampling, stop_ids, **kwargs):
        t = tokens[0]
        yield t
        if t in stop_ids or checker.push(t):
            return


def stream_text(model, tokenizer, prompt_ids, max_new_tokens: int, **kwargs) -> Iterator[str]:
    """Yield text pieces of one prompt's continuation as they are produced (see text_pieces)."""
    stop_strings = list(kwargs.pop("stop_strings", ()))
    tokens = generate_stream(model, prompt_ids, max_new_tokens, tokenizer=tokenizer,
                             stop_strings=stop_strings, **kwargs)
    return text_pieces(tokens, tokenizer, stop_strings, kwargs.get("stop_token_ids", ()))
