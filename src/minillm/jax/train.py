"""Training in JAX. One optimizer step: loss, gradients over grad_accum micro-batches, global-norm
clipping and AdamW with the PyTorch side's decay mask and learning-rate schedule, all in one
jitted function.

The same update as minillm/torch/train.py (Trainer.train_step) with torch.optim.AdamW:
    g      = mean over micro-batches of ∇ loss                   (gradient accumulation)
    g      = g * min(1, max_norm / (‖g‖ + 1e-6))                 (clip_grad_norm_'s formula)
    m, v   = β1 m + (1-β1) g,  β2 v + (1-β2) g²
    θ      = θ - lr_t (m̂ / (√v̂ + ε) + λ θ)      λ only for matrices (Loshchilov & Hutter 2019)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from minillm.config import ModelConfig, TrainConfig
from minillm.jax.model import Params, forward, next_token_loss


class TrainState(NamedTuple):
    """Everything a step changes: the canonical params and the optimizer state (step count inside)."""

    params: Params
    opt_state: optax.OptState


def decay_mask(params: Params) -> dict[str, bool]:
    """True for parameters with weight decay: matrices (Q, K, V, O, MLP, an untied head); not
    embeddings, norm gains or biases. A tied embedding is one entry (tok_emb.weight)."""
    return {name: p.ndim >= 2 and name not in ("tok_emb.weight", "pos_emb.weight") for name, p in params.items()}


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """minillm.schedule.lr_at as a traceable function of the step (warmup, then cosine |
    constant | warmup-stable-decay); tests check the two agree at every step."""
    warmup, total = cfg.warmup_steps, cfg.max_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            after = jnp.asarray(cfg.lr, jnp.float32)
        elif cfg.schedule == "wsd":
            decay_start = total - cfg.decay_frac * total
            frac = jnp.clip((step - decay_start) / max(1e-9, total - decay_start), 0.0, 1.0)
            after = cfg.lr + frac * (cfg.min_lr - cfg.lr)
        else:  # cosine
            progress = jnp.minimum(1.0, (step - warmup) / max(1, total - warmup))
            after = cfg.min_lr + 0.5 * (1.0 + jnp.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
        return jnp.where(step < warmup, warm, after)

    return schedule


def make_optimizer(cfg: TrainConfig, params: Params) -> optax.GradientTransformation:
    """AdamW, spelled out as optax.adamw is (Adam moments, decoupled decay on the masked
    parameters, times -lr), so its state has named moments the checkpoint can save."""
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


def loss_fn(params: Params, config: ModelConfig, x: jax.Array, y: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy of one batch: x, y (B, T) int; key turns dropout on."""
    return next_token_loss(forward(params, config, x, key=key), y)


def accumulate_grads(params: Params, config: ModelConfig, xs: jax.Array, ys: jax.Array,
                     key: jax.Array | None = None) -> tuple[jax.Array, Params]:
    """Loss and gradient averaged over micro-batches xs, ys (A, b, T): equal to one batch of A*b
    sequences. lax.scan keeps one micro-batch's activations alive at a time."""
    A = xs.shape[0]
    keys = jax.random.split(key, A) if key is not None else None
    grad_fn = jax.value_and_grad(loss_fn)

    def micro_step(carry, inputs):
        loss_sum, grad_sum = carry
        x, y, k = inputs
        loss, grads = grad_fn(params, config, x, y, k)
        return (loss_sum + loss / A, jax.tree.map(lambda s, g: s + g / A, grad_sum, grads)), None

    if A == 1:  # no scan for the common case: one micro-batch
        return grad_fn(params, config, xs[0], ys[0], keys[0] if keys is not None else None)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros), (xs, ys, keys))
    return loss, grads


def train_step_fn(config: ModelConfig, cfg: TrainConfig, optimizer: optax.GradientTransformation):
    """The step as a pure function step(state, xs, ys, key) -> (state, metrics), not yet jitted
    (make_train_step jits it for one device, minillm.jax.parallel for several).
    xs, ys (grad_accum, b, T) int32; key: a PRNG key, used for dropout when config.dropout > 0;
    metrics = {"loss", "grad_norm"} (the norm before clipping)."""
    use_dropout = config.dropout > 0

    def step(state: TrainState, xs: jax.Array, ys: jax.Array, key: jax.Array):
        loss, grads = accumulate_grads(state.params, config, xs, ys, key if use_dropout else None)
        grads, grad_norm = clip_by_global_norm(grads, cfg.grad_clip)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state), {"loss": loss, "grad_norm": grad_norm}

    return step


def make_train_step(config: ModelConfig, cfg: TrainConfig, optimizer: optax.GradientTransformation):
    """train_step_fn jitted for one device. The state is donated: its buffers are updated in place."""
    return jax.jit(train_step_fn(config, cfg, optimizer), donate_argnums=0)


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(params, optimizer.init(params))


def make_eval_loss(config: ModelConfig):
    """A jitted loss(params, x, y) -> mean loss of one batch, dropout off."""
    return jax.jit(lambda params, x, y: loss_fn(params, config, x, y))
