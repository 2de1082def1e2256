"""Turning next-token logits into a token: the logits filters ("warpers") and the draw.

Every filter takes logits (B, V) and returns new logits (B, V) in which the tokens it rules out
are -inf, so filters compose and the survivors keep their relative probabilities. They are
applied in the order Hugging Face `transformers` uses, which is also the order that makes sense:

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> draw

Each filter's docstring names its paper and its rule; temperature 0 means greedy (argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minillm.config import check_sampling

NEG_INF = float("-inf")


@dataclass
class SamplingConfig:
    """How to pick each next token. temperature 0 is greedy decoding; None/0/1.0 switch a filter off."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Rule out ids >= vocab_size: a model's vocabulary may be padded (e.g. to a multiple of 64)
    beyond the tokenizer's, and those rows were never trained to mean anything."""
    if vocab_size is None or vocab_size >= logits.size(-1):
        return logits
    logits = logits.clone()
    logits[..., vocab_size:] = NEG_INF
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Keskar et al. 2019 (CTRL): a seen token's logit is divided by the penalty when positive and
    multiplied by it when negative. logits (B, V); seen (B, V) bool, True if in the row's context."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T: T < 1 sharpens the distribution, T > 1 flattens it."""
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k (Fan et al. 2018): keep the k largest logits of each row (and anything tied with the k-th)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p, nucleus (Holtzman et al. 2020): keep the smallest set of most likely tokens whose mass
    reaches p, i.e. drop every token whose more likely predecessors already do. The best survives."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly better tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024): drop tokens whose probability is below min_p * the best token's."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, NEG_INF)


def process_logits(logits: torch.Tensor, cfg: SamplingConfig,
                   seen: torch.Tensor | None = None) -> torch.Tensor:
    """All filters of `cfg` in order, on float32 logits (B, V). `seen` is needed for the penalty."""
    logits = logits.float()
    if cfg.repetition_penalty not in (None, 1.0) and seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits  # argmax ignores the rest
    logits = apply_temperature(logits, cfg.temperature)
    if cfg.top_k:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.min_p:
        logits = min_p_filter(logits, cfg.min_p)
    return logits


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None,
                generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,). Greedy when cfg.temperature == 0. Row b draws from
    generators[b] when given, so a row's tokens do not depend on the other rows in the batch."""
    logits = process_logits(logits, cfg, seen)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])
