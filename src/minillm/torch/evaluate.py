"""Perplexity of a model on a token array, over the windows of `minillm.data.loader.eval_batches`
(tail=True: every token after the first is predicted exactly once, from up to block_size tokens).
Loss is the mean next-token cross-entropy in nats; perplexity = exp(loss); bits = loss / ln 2.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from minillm.data.loader import eval_batches


def perplexity(model: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int = 8) -> dict:
    """Mean next-token loss of `model` over a 1-D array of ids (e.g. `read_tokens(path)`): returns
    {"tokens": ids predicted, "loss": nats per token, "perplexity", "bits_per_token"}."""
    if len(tokens) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, y in eval_batches(tokens, block_size, batch_size, tail=True):
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)  # (B, T) each
            logits = model(x)  # (B, T, V)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += y.numel()
    loss = total / count
    return {"tokens": count, "loss": loss, "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2)}
