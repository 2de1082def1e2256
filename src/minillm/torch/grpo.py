"""GRPO (Shao et al. 2024, "DeepSeekMath", section 4.1): group-relative policy optimisation.

For each prompt q the current policy samples a group of G completions o_1..o_G; a reward r_i scores
each, and the group itself is the baseline (no value model):
    advantage    A_i = (r_i - mean(r)) / (std(r) + eps), the same for every token of o_i
    objective    J = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1 - eps_clip, 1 + eps_clip) A_i)
                                              - beta KL_it ]
                 rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | ...): the policy over the policy that sampled
                 KL_it  = pi_ref / pi - log(pi_ref / pi) - 1: the k3 estimator (Schulman 2020) of
                          KL(pi || pi_ref), unbiased, always >= 0, per token
and the loss is -J. This module is the maths (group_advantages, grpo_loss) and the sampling of
groups as training rows (sample_groups, collate); the trainer around them is torch/grpo_train.py.

A row is plain Python (JSON-able, so a trainer state can hold a sampled batch exactly):
{"ids": prompt + completion ids, "prompt": prompt length, "advantage": A_i, "old": [log pi_old per
completion token] or None, "ref": [log pi_ref per completion token]}.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from minillm.tokenizer import chat
from minillm.tokenizer.stream import text_pieces
from minillm.torch import lora
from minillm.torch.generate import generate
from minillm.torch.logprobs import IGNORE_INDEX

ADVANTAGE_EPS = 1e-4  # the eps in (r - mean) / (std + eps): a group of near-equal rewards stays finite


# --- the maths --------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): each reward normalised within its group (row).

    std is the population standard deviation (divide by G, not G - 1: `trl` divides by G - 1, its
    advantages are larger by sqrt(G / (G - 1))). A group whose rewards are all equal carries no
    signal: its advantages are exactly 0 (not round-off of r - mean(r))."""
    mean = rewards.mean(dim=-1, keepdim=True)  # (P, 1)
    std = rewards.std(dim=-1, keepdim=True, correction=0)  # (P, 1)
    advantages = (rewards - mean) / (std + eps)
    tied = (rewards == rewards[:, :1]).all(dim=-1, keepdim=True)  # (P, 1)
    return torch.where(tied, torch.zeros_like(advantages), advantages)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 (0 where equal)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, kl_coef: float) -> tuple[torch.Tensor, dict]:
    """-J (see the module docstring) and its diagnostics.

    logp, old_logp, ref_logp, mask: (N, T) per completion token (mask True on the completion's
    tokens; other positions are ignored whatever they hold); advantages: (N,). Each sequence's
    terms are averaged over its own tokens, then the sequences are averaged (the paper's
    1/G sum_i 1/|o_i| sum_t). Metrics (detached): "kl", the k3 KL averaged the same way, and
    "clip_fraction", the share of completion tokens where the clip binds (ratio above 1 + eps
    with A > 0, or below 1 - eps with A < 0: their gradient is zero)."""
    A = advantages[:, None]  # (N, 1): one advantage for every token of a completion
    ratio = torch.exp(logp - old_logp)  # (N, T)
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    kl = k3_kl(logp, ref_logp)  # (N, T)
    lengths = mask.sum(dim=-1).clamp(min=1)  # (N,)

    def sequence_mean(t: torch.Tensor) -> torch.Tensor:  # (N, T) -> scalar, padding never counted
        return (torch.where(mask, t, 0.0).sum(dim=-1) / lengths).mean()

    loss = -sequence_mean(surrogate - kl_coef * kl)
    clipped = ((ratio > 1 + clip_eps) & (A > 0)) | ((ratio < 1 - clip_eps) & (A < 0))
    metrics = {"kl": sequence_mean(kl).detach(),
               "clip_fraction": (clipped & mask).sum() / mask.sum().clamp(min=1)}
    return loss, metrics


# --- sampling groups ------------------------------------------------------------------------------
@contextlib.contextmanager
def plain_weights(model: torch.nn.Module):
    """The active LoRA adapter folded into the weights for the duration (generation's packed
    decoder reads the base weights only); unmerged after, bit for bit. A no-op without LoRA."""
    merged = lora.merge(model)
    try:
        yield model
    finally:
        if merged:
            lora.unmerge(model)


def prompt_ids(tokenizer, example: dict[str, Any], room: int) -> list[int]:
    """The template render of the conversation before the answer, ready for the reply; a prompt
    longer than `room` keeps its end (as minillm.torch.evaluate.answer_tasks does)."""
    return chat.render(tokenizer, example["messages"][:-1], add_generation_prompt=True)[-room:]


@torch.no_grad()
def sample_groups(model, tokenizer, examples: list[dict], group_size: int, max_new_tokens: int,
                  temperature: float, seeds: list[int], reward: Callable[[str, dict], float]):
    """G = group_size completions of each example's prompt, in one batched, KV-cached generate.

    seeds: one per completion (P * G, row p * G + g), so a row's sample does not depend on its
    batch. Returns (rows without advantage/old/ref: {"ids", "prompt"}, rewards (P, G) float64,
    completion texts). A completion ends with the stop token when the model produced one; one cut
    at max_new_tokens has none and trains without it."""
    room = model.config.max_seq_len - max_new_tokens
    prompts = [prompt_ids(tokenizer, e, room) for e in examples for _ in range(group_size)]  # (P * G)
    stops = chat.stop_strings(tokenizer), chat.stop_token_ids(tokenizer)
    with plain_weights(model):
        outs = generate(model, prompts, max_new_tokens, temperature=temperature, stop_token_ids=stops[1],
                        stop_strings=stops[0], tokenizer=tokenizer, seed=seeds)
    texts = ["".join(text_pieces(out, tokenizer, *stops)) for out in outs]
    scores = [float(reward(text, examples[i // group_size])) for i, text in enumerate(texts)]
    rows = [{"ids": p + out, "prompt": len(p)} for p, out in zip(prompts, outs)]
    return rows, torch.tensor(scores, dtype=torch.float64).view(len(examples), group_size), texts


def collate(rows: list[dict], device: torch.device) -> dict[str, torch.Tensor | None]:
    """Rows -> right-padded tensors: "x", "y" (N, T) long, y = x shifted by one and -100 outside the
    completions (prompt, padding); "advantages" (N,); "old_logp" / "ref_logp" (N, T) float32
    (0.0 outside the completions; None when the rows carry none: before they are computed, and
    "old_logp" when the batch serves one step only)."""
    T = max(len(r["ids"]) for r in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    per_token = {k: torch.zeros(len(rows), T) if rows[0].get(k) is not None else None for k in ("old", "ref")}
    for i, r in enumerate(rows):
        ids, start, end = r["ids"], r["prompt"] - 1, len(r["ids"]) - 1  # y[start:end]: the completion
        x[i, :end] = torch.tensor(ids[:-1])
        y[i, start:end] = torch.tensor(ids[r["prompt"]:])
        for k, t in per_token.items():
            if t is not None:
                t[i, start:end] = torch.tensor(r[k], dtype=torch.float32)
    advantages = torch.tensor([r.get("advantage", 0.0) for r in rows], dtype=torch.float32)
    old, ref = (None if t is None else t.to(device) for t in per_token.values())
    return {"x": x.to(device), "y": y.to(device), "advantages": advantages.to(device),
            "old_logp": old, "ref_logp": ref}


def completion_logprobs(logp: torch.Tensor, rows: list[dict]) -> list[list[float]]:
    """token_logprobs (N, T) of collated rows -> each row's completion log-probs as Python floats
    (float32 values, exact through JSON)."""
    return [logp[i, r["prompt"] - 1:len(r["ids"]) - 1].tolist() for i, r in enumerate(rows)]
