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

import torch


class KVCache:
    """Keys and values of one attention layer: k, v (B, n_kv_heads, max_len, head_dim).

    `update(k, v)` appends a block of new keys/values and returns everything cached so far: the
    protocol `Attention.forward` uses, so `model(tokens, positions, kv_caches=[...])` decodes.
    The fast decoder (minillm.torch.decode) writes the buffers at explicit slots instead.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # slots 0 .. length-1 are filled

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, K, T, hd) for the next T slots -> all cached keys/values (B, K, length, hd)."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens do not fit its {self.max_len} slots")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (B',) in that order, e.g. the surviving hypotheses of beam search."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)

    def reset(self) -> None:
        self.length = 0


def make_caches(config, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> list[KVCache]:
    """One KVCache per layer of a model with this ModelConfig."""
    return [KVCache(batch, config.n_kv_heads, max_len, config.head_dim, dtype, device)
            for _ in range(config.n_layers)]
