"""Decoding with the encoder-decoder (minillm.torch.seq2seq): greedy for a batch, beam search for one.

The encoder runs once per source and each decoder block's cross-attention keys/values of its output
are computed once (`cross_kv`); each step then runs the decoder on the newest token only, its
self-attention keys/values kept in a KVCache per block (minillm.torch.kv_cache). Every output starts
from bos and ends at eos (excluded from the returned ids) or after max_new_tokens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from minillm import beam
from minillm.torch.kv_cache import make_caches
from minillm.torch.seq2seq import Seq2SeqTransformer


def pad_sources(sources: Sequence[Sequence[int]], pad_id: int = 0,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> ids (B, S) and mask (B, S) bool (True = a real token)."""
    if not sources or min(len(s) for s in sources) == 0:
        raise ValueError("every source needs at least one token")
    S = max(len(s) for s in sources)
    ids = torch.full((len(sources), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sources), S, dtype=torch.bool)
    for row, s in enumerate(sources):
        ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(list(s), dtype=torch.long), True
    return ids.to(device), mask.to(device)


def _check_length(model: Seq2SeqTransformer, sources: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    longest, limit = max(len(s) for s in sources), model.config.max_seq_len
    if longest > limit or not 1 <= max_new_tokens <= limit:
        raise ValueError(f"source length ({longest}) and max_new_tokens ({max_new_tokens}) must be within "
                         f"the model's max_seq_len={limit} (max_new_tokens >= 1)")


@torch.inference_mode()
def greedy(model: Seq2SeqTransformer, sources: Sequence[Sequence[int]], max_new_tokens: int, bos_id: int,
           eos_id: int, pad_id: int = 0) -> list[list[int]]:
    """The argmax output of each source (a list of token ids, eos excluded), decoded together."""
    _check_length(model, sources, max_new_tokens)
    device = model.tok_emb.weight.device
    source, source_mask = pad_sources(sources, pad_id, device)  # (B, S) each
    cross_kv = model.cross_kv(model.encode(source, source_mask))  # once per source
    caches = make_caches(model.config, len(sources), max_new_tokens, model.tok_emb.weight.dtype, device)
    token = torch.full((len(sources), 1), bos_id, dtype=torch.long, device=device)  # (B, 1)
    done = torch.zeros(len(sources), dtype=torch.bool, device=device)
    steps = []
    for t in range(max_new_tokens):
        positions = torch.tensor([t], device=device)
        token = model.decode(token, cross_kv, source_mask, positions, caches)[:, -1].argmax(-1, keepdim=True)
        steps.append(token[:, 0])
        done |= token[:, 0] == eos_id
        if bool(done.all()):
            break
    outputs = torch.stack(steps, dim=1).tolist()  # (B, steps)
    return [row[: row.index(eos_id)] if eos_id in row else row for row in outputs]


@torch.inference_mode()
def beam_search(model: Seq2SeqTransformer, source: Sequence[int], max_new_tokens: int, bos_id: int,
                eos_id: int, num_beams: int = 4, *, length_penalty: float = 1.0,
                early_stopping: bool | str = False) -> list[int]:
    """The best output for one source (eos excluded); options as in minillm.beam.search. The beams
    share one source, so the cross-attention keys/values are computed for one row and broadcast;
    only the self-attention caches follow the surviving beams."""
    beam.check_beam_args(num_beams, max_new_tokens)
    _check_length(model, [source], max_new_tokens)
    device = model.tok_emb.weight.device
    memory = model.encode(torch.tensor([list(source)], device=device))  # (1, S, D)
    cross_kv = [(k.expand(num_beams, -1, -1, -1), v.expand(num_beams, -1, -1, -1))
                for k, v in model.cross_kv(memory)]  # (N, K, S, hd), no copy
    caches = make_caches(model.config, num_beams, max_new_tokens, model.tok_emb.weight.dtype, device)

    def log_probs(tokens: torch.Tensor) -> np.ndarray:  # tokens (N,) -> (N, V) float32
        positions = torch.tensor([caches[0].length], device=device)
        logits = model.decode(tokens[:, None].to(device), cross_kv, None, positions, caches)[:, -1]
        return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()

    def extend(rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        for cache in caches:
            cache.reorder(torch.from_numpy(rows).to(device))
        return log_probs(torch.from_numpy(tokens))

    first = log_probs(torch.full((num_beams,), bos_id, dtype=torch.long))
    best = beam.search(first, extend, max_new_tokens, length_penalty=length_penalty,
                       early_stopping=early_stopping, eos_token_ids=[eos_id])
    return best[: best.index(eos_id)] if eos_id in best else best


def transform_texts(model: Seq2SeqTransformer, tokenizer, texts: Sequence[str], max_new_tokens: int,
                    num_beams: int = 1, batch_size: int = 8) -> list[str]:
    """Each text through the encoder-decoder, as `minillm sample` / `minillm eval --tasks` do: greedy
    decoding in batches of batch_size, or beam search one text at a time."""
    if batch_size < 1 or num_beams < 1:
        raise ValueError(f"batch_size and num_beams must be >= 1, got {batch_size}, {num_beams}")
    bos, eos, pad = (tokenizer.special_id(name) for name in ("bos", "eos", "pad"))
    sources = [tokenizer.encode(text) or [pad] for text in texts]  # an empty text: one masked-in pad
    if num_beams > 1:
        outputs = [beam_search(model, s, max_new_tokens, bos, eos, num_beams) for s in sources]
    else:
        outputs = [out for i in range(0, len(sources), batch_size)
                   for out in greedy(model, sources[i: i + batch_size], max_new_tokens, bos, eos, pad)]
    return [tokenizer.decode(out) for out in outputs]
