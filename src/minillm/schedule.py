"""Learning-rate schedules as plain functions of the step (shared by the PyTorch and JAX trainers).

All three start with a linear warmup: lr * (step + 1) / (warmup + 1), so step 0 already learns
and step == warmup_steps is the peak. After warmup:
- cosine: half a cosine from lr down to min_lr at step == max_steps (Loshchilov & Hutter 2016);
- constant: lr;
- wsd (warmup-stable-decay, Hägele et al. 2024): lr until the last decay_frac of the steps,
  then linearly down to min_lr at step == max_steps.

Budgets drive the decay. A run ends at max_steps, max_tokens or max_time (training seconds),
whichever comes first; `schedule_step` turns how far the run is through the budget that binds
into a position on the max_steps axis, so with `max_time = 60` the decay takes the last part of
the 60 s and reaches min_lr when the time runs out, instead of being cut off mid-plateau.
"""

from __future__ import annotations

import math

from minillm.config import TrainConfig


def schedule_step(cfg: TrainConfig, step: int, tokens: int = 0, elapsed: float = 0.0) -> float:
    """Where the decay stands for optimizer step `step` (0-based): the fraction of the binding budget
    times max_steps. The fraction is the largest of step / max_steps, tokens / max_tokens (tokens
    trained before this step) and elapsed / max_time (pass the training seconds expected at the END
    of this step, so the last step a time budget allows is at the floor); capped at max_steps. Under
    a step budget it is `step` itself; a token budget is as exact on resume as a step budget."""
    fraction = step / cfg.max_steps
    if cfg.max_tokens:
        fraction = max(fraction, tokens / cfg.max_tokens)
    if cfg.max_time:
        fraction = max(fraction, elapsed / cfg.max_time)
    return min(fraction, 1.0) * cfg.max_steps


def lr_at(step: int, cfg: TrainConfig, position: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based) under cfg's schedule. Warmup counts real
    steps; the decay follows `position` (schedule_step; default: the step itself)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    step = step if position is None else position
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - cfg.decay_frac * cfg.max_steps
        if step < decay_start:
            return cfg.lr
        frac = min(1.0, (step - decay_start) / max(1e-9, cfg.max_steps - decay_start))
        return cfg.lr + frac * (cfg.min_lr - cfg.lr)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
