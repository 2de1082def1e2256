"""Log-probabilities of completions under a model: what DPO and GRPO compare between policy and reference.

Batches are SFT-shaped: x and y (b, T) int64, y = x shifted by one, y = -100 (IGNORE_INDEX) wherever the
target is not part of the completion (prompt, padding). One forward per batch; lm_head and the softmax
run only at the completion positions (a small share of a batch), as FinetuneTrainer.loss does. Padding
never counts: its targets are -100, and the causal mask keeps right-padding from changing what the
earlier positions see, so a row's log-probs do not depend on how wide its batch is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # minillm.data.sft.IGNORE_INDEX (not imported: torch/ code reads one constant here)


def token_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(b, T) float32: log p(y[:, t] | x[:, :t + 1]) where y != -100, else 0.0.

    `model` is a Transformer (through `hidden` + `lm_head`: the head only where it is needed) or any
    module mapping x to (b, T, V) logits (a DDP / compiled wrapper)."""
    trained = y != IGNORE_INDEX  # (b, T)
    out = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    if hasattr(model, "hidden") and hasattr(model, "lm_head"):
        logits = model.lm_head(model.hidden(x)[trained])  # (n, V), n = completion tokens
    else:
        logits = model(x)[trained]  # (n, V)
    logp = F.log_softmax(logits.float(), dim=-1)  # float32 even under autocast: sums of many terms
    out[trained] = logp.gather(-1, y[trained].unsqueeze(-1)).squeeze(-1)
    return out


def sequence_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(b,) float32: the log-probability of each row's completion, summed over its tokens."""
    return token_logprobs(model, x, y).sum(dim=-1)
