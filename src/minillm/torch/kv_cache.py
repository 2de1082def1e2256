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

import copy
from typing import Sequence

import torch

from minillm.torch.linear_attention import LinearAttentionState
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


class RingKVCache:
    """Keys and values of one layer under a sliding window of W keys (Mistral): W slots reused as a
    ring, position p in slot p % W, so the memory stays W slots however long the output. update
    returns the held keys followed by the new ones (in slot order, not position order: attention
    does not care once the mask knows each key's position, minillm.torch.masks.key_positions), then
    keeps the last W of them. Same protocol as KVCache for Attention.forward."""

    def __init__(self, batch: int, n_kv_heads: int, window: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch, n_kv_heads, window, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.full((window,), -1, dtype=torch.long, device=device)  # slot -> position
        self.length = 0  # tokens seen so far: the next one sits at position `length`

    def key_positions(self, T: int) -> torch.Tensor:
        """(S,) positions of the keys `update` returns for the next T tokens."""
        held = self.positions[: min(self.length, self.k.size(2))]  # slots fill 0, 1, ... before wrapping
        return torch.cat((held, torch.arange(self.length, self.length + T, device=held.device)))

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, K, T, hd) -> (B, K, held + T, hd) keys/values to attend to; the ring keeps the last W."""
        W, T = self.k.size(2), k.size(2)
        held = min(self.length, W)
        k_all, v_all = torch.cat((self.k[:, :, :held], k), 2), torch.cat((self.v[:, :, :held], v), 2)
        n = min(T, W)  # a chunk longer than the window leaves only its last W keys
        new_positions = torch.arange(self.length + T - n, self.length + T, device=self.positions.device)
        slots = new_positions % W
        self.k.index_copy_(2, slots, k[:, :, T - n:])
        self.v.index_copy_(2, slots, v[:, :, T - n:])
        self.positions[slots] = new_positions
        self.length += T
        return k_all, v_all

    def reorder(self, rows: torch.Tensor) -> None:
        self.k, self.v = self.k.index_select(0, rows), self.v.index_select(0, rows)


def make_model_caches(config, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> list:
    """The per-layer decoding state Transformer.forward takes for this config: a LinearAttentionState
    (linear attention), a RingKVCache (a sliding window shorter than max_len) or a KVCache."""
    if config.attention == "linear":
        return [LinearAttentionState(batch, config.n_heads, config.head_dim, device)
                for _ in range(config.n_layers)]
    if config.attention_window is not None and config.attention_window < max_len:
        return [RingKVCache(batch, config.n_kv_heads, config.attention_window, config.head_dim, dtype, device)
                for _ in range(config.n_layers)]
    return make_caches(config, batch, max_len, dtype, device)


class EagerBatchCache:
    """BatchCache's interface (prefill, decode, reorder, full, seen) on the nn.Module itself
    (Transformer.forward with make_model_caches), for configs the packed decoder cannot run. Each
    row has its own batch-of-one caches: no padding, so each row computes what it would alone, at
    the price of B forward passes a step (a readable fallback, not the fast path)."""

    def __init__(self, model, max_len: int, vocab_size: int, track_seen: bool = False):
        self.model, self.max_len, self.vocab_size, self.track_seen = model, max_len, vocab_size, track_seen
        self.seen: torch.Tensor | None = None  # (B, V) bool, with track_seen
        self.dtype, self.device = model.tok_emb.weight.dtype, model.tok_emb.weight.device

    def _run(self, b: int, tokens: list[int]) -> torch.Tensor:
        """Row b's next tokens through the model from its caches: next logits (1, V)."""
        start = self.row_lengths[b]
        ids = torch.tensor([tokens], device=self.device)  # (1, T)
        positions = torch.arange(start, start + len(tokens), device=self.device)  # (T,)
        self.row_lengths[b] += len(tokens)
        return self.model(ids, positions, kv_caches=self.rows[b])[:, -1]

    def prefill(self, prompts: Sequence[list[int]], chunk_size: int | None = None) -> torch.Tensor:
        """(Re)start every row's caches with its prompt. Returns next logits (B, V)."""
        config = self.model.config
        self.rows = [make_model_caches(config, 1, self.max_len, self.dtype, self.device) for _ in prompts]
        self.row_lengths = [0] * len(prompts)
        if self.track_seen:
            self.seen = torch.zeros(len(prompts), self.vocab_size, dtype=torch.bool)
            for b, p in enumerate(prompts):
                self.seen[b, p] = True
        logits = []
        for b, p in enumerate(prompts):
            step = chunk_size or len(p)
            for start in range(0, len(p), step):
                row_logits = self._run(b, p[start:start + step])
            logits.append(row_logits)
        self.length = max(len(p) for p in prompts)
        return torch.cat(logits)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row, tokens (B,). Returns next logits (B, V)."""
        if self.track_seen:
            self.seen[torch.arange(len(tokens)), tokens] = True
        self.length += 1
        return torch.cat([self._run(b, [t]) for b, t in enumerate(tokens.tolist())])

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (B',) in that order; a row kept twice gets its own copy of the caches."""
        self.rows = [copy.deepcopy(self.rows[r]) for r in rows.tolist()]
        self.row_lengths = [self.row_lengths[r] for r in rows.tolist()]
        if self.track_seen:
            self.seen = self.seen[rows]

    @property
    def full(self) -> bool:
        return self.length >= self.max_len
