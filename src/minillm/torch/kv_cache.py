"""The key/value cache: what attention has already computed for earlier tokens, kept for reuse.

During generation token t attends to the keys and values of tokens 0..t. They do not change once
computed (causal attention), so each layer stores them instead of recomputing the whole prefix:
one forward pass per new token instead of one per prefix.

One `KVCache` per layer, preallocated to the longest sequence this generation will need
(prompt + max_new_tokens, not the model's whole context). It stores n_kv_heads heads, not
n_heads: with grouped-query attention the cache is n_heads / n_kv_heads times smaller, which is
the point of GQA at inference time. K and V are two separate buffers (an Inductor-compiled step
writes each in place; one shared buffer gets copied whole every step).
"""

from __future__ import annotations

from typing import Sequence

import torch

from minillm.torch.packed import PackedCopy


class KVCache:
    """Keys and values of one attention layer: k, v (B, n_kv_heads, max_len, head_dim). `update` is
    the protocol `Attention.forward` uses, so `model(tokens, positions, kv_caches=[...])` decodes;
    the packed model (minillm.torch.packed) writes the buffers at explicit slots instead."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # slots 0 .. length-1 are filled

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, K, T, hd) for the next T slots -> all cached keys/values (B, K, length, hd)."""
        start, end, max_len = self.length, self.length + k.size(2), self.k.size(2)
        if end > max_len:
            raise ValueError(f"KV cache overflow: {end} tokens do not fit its {max_len} slots")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (B',) in that order, e.g. the surviving hypotheses of beam search."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)


def make_caches(config, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> list[KVCache]:
    """One KVCache per layer of a model with this ModelConfig."""
    return [KVCache(batch, config.n_kv_heads, max_len, config.head_dim, dtype, device)
            for _ in range(config.n_layers)]


class BatchCache:
    """The cache state of B rows generated together: per-layer K/V buffers of max_len slots,
    which slots hold real tokens (`valid`), each slot's position, and the decode step's mask.
    Row b is left-padded by pad[b] slots, which no query ever attends to, and its positions
    count from its first real token, so it computes exactly what it would compute alone.
    `seen` (with track_seen) marks the tokens of each row's context, for the repetition penalty."""

    def __init__(self, packed: PackedCopy, max_len: int, vocab_size: int, track_seen: bool = False):
        self.packed, self.max_len, self.vocab_size, self.track_seen = packed, max_len, vocab_size, track_seen
        self.seen: torch.Tensor | None = None  # (B, V) bool, with track_seen
        self.slots = torch.arange(max_len)  # (S,)

    def prefill(self, prompts: Sequence[list[int]], chunk_size: int | None = None) -> torch.Tensor:
        """(Re)start the caches with these prompts, left-padded. Returns next logits (B, V)."""
        B, L = len(prompts), max(len(p) for p in prompts)
        caches = make_caches(self.packed.model.config, B, self.max_len)
        self.k_caches, self.v_caches = [c.k for c in caches], [c.v for c in caches]
        pad = torch.tensor([L - len(p) for p in prompts])  # (B,)
        tokens = torch.tensor([[0] * (L - len(p)) + p for p in prompts])  # (B, L)
        self.valid = self.slots[None, :] >= pad[:, None]  # (B, S): not a pad slot
        self.positions = (self.slots[None, :] - pad[:, None]).clamp(min=0)  # (B, S) position per slot
        if self.track_seen:
            self.seen = torch.zeros(B, self.vocab_size, dtype=torch.bool)
            for b, p in enumerate(prompts):
                self.seen[b, p] = True
        step = chunk_size or L
        for start in range(0, L, step):  # the prompt in chunks of `step` tokens
            end = min(start + step, L)
            causal = self.slots[None, :] <= self.slots[start:end, None]  # (T, S), bottom-right aligned
            mask = (self.valid[:, None, :] & causal).unsqueeze(1)  # (B, 1, T, S)
            logits = self.packed(tokens[:, start:end], self.positions[:, start:end], self.slots[start:end],
                                 mask, self.k_caches, self.v_caches)
        self.length = L
        # (B, 1, 1, S) attention bias of a decode step: 0 on real tokens so far, -inf elsewhere
        attend = (self.valid & (self.slots < L))[:, None, None]
        self.bias = torch.zeros(B, 1, 1, self.max_len).masked_fill_(~attend, float("-inf"))
        return logits

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decode step: append one token per row, tokens (B,). Returns next logits (B, V)."""
        s = self.length
        if self.track_seen:
            self.seen[torch.arange(len(tokens)), tokens] = True
        self.bias[..., s] = 0.0  # slot s now holds a real token of every row
        logits = self.packed(tokens[:, None], self.positions[:, s:s + 1], self.slots[s:s + 1], self.bias,
                             self.k_caches, self.v_caches, decode_step=True)
        self.length = s + 1
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (B',) in that order (beam search: the hypotheses that survive a step)."""
        self.k_caches = [k.index_select(0, rows) for k in self.k_caches]
        self.v_caches = [v.index_select(0, rows) for v in self.v_caches]
        self.valid, self.positions, self.bias = self.valid[rows], self.positions[rows], self.bias[rows]
        if self.track_seen:
            self.seen = self.seen[rows]

    @property
    def full(self) -> bool:
        return self.length >= self.max_len
