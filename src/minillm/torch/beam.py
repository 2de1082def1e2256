"""Beam search in PyTorch, the model side of minillm/beam.py (the search and its conventions):
the prompt fills num_beams cache rows; each step reorders them to the surviving beams and decodes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from minillm import beam
from minillm.config import cache_length
from minillm.torch.kv_cache import BatchCache, EagerBatchCache
from minillm.torch.packed import packed_copy, packed_supports
from minillm.torch.sampling import mask_padded_vocab


@torch.inference_mode()
def beam_search(model, prompt: Sequence[int], max_new_tokens: int, num_beams: int = 4, *,
                length_penalty: float = 1.0, early_stopping: bool | str = False,
                eos_token_ids: Sequence[int] = (), vocab_size: int | None = None) -> list[int]:
    """The best continuation of `prompt` (new tokens only); options as in minillm.beam.search."""
    beam.check_beam_args(num_beams, max_new_tokens)
    slots = cache_length([len(prompt)], max_new_tokens, model.config.max_seq_len)
    cache = (BatchCache(packed_copy(model), slots, model.config.vocab_size) if packed_supports(model.config)
             else EagerBatchCache(model, slots, model.config.vocab_size))  # a window, linear attention, MoE

    def log_probs(logits: torch.Tensor) -> np.ndarray:  # (N, V) float32
        return torch.log_softmax(mask_padded_vocab(logits, vocab_size).float(), dim=-1).numpy()

    def extend(rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        cache.reorder(torch.from_numpy(rows))
        return log_probs(cache.decode(torch.from_numpy(tokens)))

    first = log_probs(cache.prefill([list(prompt)] * num_beams))  # every row the same prompt
    return beam.search(first, extend, max_new_tokens, length_penalty=length_penalty,
                       early_stopping=early_stopping, eos_token_ids=eos_token_ids)
