"""Learning-rate schedules as plain functions of the step (shared by the PyTorch and JAX trainers).

All three start with a linear warmup: lr * (step + 1) / (warmup + 1), so step 0 already learns
and step == warmup_steps is the peak. After warmup:
- cosine: half a cosine from lr down to min_lr at step == max_steps (Loshchilov & Hutter 2016);
- constant: lr;
- wsd (warmup-stable-decay, Hägele et al. 2024): lr until the last decay_frac of the steps,
  then linearly down to min_lr at step == max_steps.
"""

from __future__ import annotations

import math

from minillm.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) under cfg's schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
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
