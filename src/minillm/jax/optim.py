"""AdamW for the JAX trainer: which parameters decay, the learning-rate schedule as a traceable
function, the optimizer (optax), and clipping by the global gradient norm.

The twin of minillm/torch/optim.py (same rule, same names where the concept is the same). The
update equals torch.optim.AdamW's after torch.nn.utils.clip_grad_norm_:
    g      = g * min(1, max_norm / (‖g‖ + 1e-6))                 (clip_grad_norm_'s formula)
    m, v   = β1 m + (1-β1) g,  β2 v + (1-β2) g²
    θ      = θ - lr_t (m̂ / (√v̂ + ε) + λ θ)      λ only where decay_mask (Loshchilov & Hutter 2019)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from minillm.config import TrainConfig
from minillm.jax.model import Params


def decay_mask(params: Params) -> dict[str, bool]:
    """True for parameters with weight decay: matrices (Q, K, V, O, MLP, an untied head); not
    embeddings, norm gains or biases. A tied embedding is one entry (tok_emb.weight)."""
    return {name: p.ndim >= 2 and name not in ("tok_emb.weight", "pos_emb.weight")
            for name, p in params.items()}


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """minillm.schedule.lr_at as a traceable function of the step (warmup, then cosine |
    constant | warmup-stable-decay); tests check the two agree at every step. The decay follows
    schedule_step under step and token budgets (tokens = step * batch_size * block_size here);
    a time budget is not known inside the compiled step, so under max_time it follows steps."""
    warmup, total, tokens_per_step = cfg.warmup_steps, cfg.max_steps, cfg.batch_size * cfg.block_size

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * (step + 1) / (warmup + 1)
        position = step  # where the decay stands: minillm.schedule.schedule_step
        if cfg.max_tokens:
            position = jnp.maximum(step, jnp.minimum(step * tokens_per_step / cfg.max_tokens, 1.0) * total)
        if cfg.schedule == "constant":
            after = jnp.asarray(cfg.lr, jnp.float32)
        elif cfg.schedule == "wsd":
            decay_start = total - cfg.decay_frac * total
            frac = jnp.clip((position - decay_start) / max(1e-9, total - decay_start), 0.0, 1.0)
            after = cfg.lr + frac * (cfg.min_lr - cfg.lr)
        else:  # cosine
            progress = jnp.minimum(1.0, (position - warmup) / max(1, total - warmup))
            after = cfg.min_lr + 0.5 * (1.0 + jnp.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
        return jnp.where(step < warmup, warm, after)

    return schedule


def make_optimizer(cfg: TrainConfig, params: Params) -> optax.GradientTransformation:
    """AdamW, spelled out as optax.adamw is (Adam moments, decoupled decay on decay_mask's
    parameters, times -lr_schedule), so its state has named moments the checkpoint can save."""
    return optax.chain(
        optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(params)),
        optax.scale_by_learning_rate(lr_schedule(cfg)),
    )


def clip_by_global_norm(grads: Params, max_norm: float) -> tuple[Params, jax.Array]:
    """Scale all gradients together so their global L2 norm is at most max_norm (0 = no clipping),
    with torch.nn.utils.clip_grad_norm_'s formula. Returns (grads, norm before clipping)."""
    norm = optax.tree.norm(grads)
    if max_norm <= 0:
        return grads, norm
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale, grads), norm
