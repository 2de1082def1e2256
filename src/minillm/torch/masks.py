"""Which keys each query may see, from positions: the causal rule, Mistral's sliding window, and
ALiBi's distance bias (minillm.torch.alibi), combined into the one mask attention takes.

Built once per forward from the query positions and the positions of the keys the caches will
hold after this step (all layers' caches are alike), then handed to every block. Configs with
neither a window nor ALiBi keep the mask they were given (None = causal, the fused kernel's fast path).
"""

from __future__ import annotations

import torch

from minillm.config import ModelConfig
from minillm.torch.alibi import alibi_bias, alibi_slopes


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where query position i may attend key position j: j <= i (causal) and, with a window
    W, i - j < W: the last W keys, itself included (Mistral's sliding window). q_pos (T,) or (B, T),
    k_pos (S,) or (B, S) -> (T, S) or (B, T, S) bool."""
    distance = q_pos[..., :, None] - k_pos[..., None, :]  # (.., T, S): i - j
    allowed = distance >= 0
    return allowed if window is None else allowed & (distance < window)


def key_positions(cache, q_pos: torch.Tensor) -> torch.Tensor:
    """Positions of the keys attention will see this step: the queries' own without a cache; a
    cache's held positions followed by the new ones (a KVCache holds position p at slot p)."""
    if cache is None:
        return q_pos
    if hasattr(cache, "key_positions"):  # RingKVCache: slots are reused, positions are tracked
        return cache.key_positions(q_pos.size(-1)).to(q_pos.device)
    return torch.arange(cache.length + q_pos.size(-1), device=q_pos.device)


def attention_mask(config: ModelConfig, T: int, positions: torch.Tensor | None, kv_caches: list | None,
                   mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The mask every block's attention takes: bool (T, S) / (B, 1, T, S) for a window, or a float
    bias (1 or B, H, T, S) with ALiBi (-inf where not allowed); `mask` (bool) is and-ed in."""
    if config.attention != "softmax" or (config.positions != "alibi" and config.attention_window is None):
        return mask
    q_pos = positions if positions is not None else torch.arange(T, device=device)
    k_pos = key_positions(kv_caches[0] if kv_caches else None, q_pos)
    allowed = window_mask(q_pos, k_pos, config.attention_window)  # (T, S) or (B, T, S)
    if allowed.dim() == 3:
        allowed = allowed[:, None]  # (B, 1, T, S)
    if mask is not None:
        allowed = allowed & mask
    if config.positions != "alibi":
        return allowed
    bias = alibi_bias(alibi_slopes(config.n_heads), q_pos, k_pos)  # (1 or B, H, T, S)
    return bias.masked_fill(~allowed, float("-inf"))
