"""The JAX training step as pure functions: loss, gradients over grad_accum micro-batches,
global-norm clipping and AdamW (minillm.jax.optim), in one function that jax.jit compiles.
make_train_step jits it for one device, minillm.jax.parallel for several.

Mixed precision (dtype bfloat16): the master params and AdamW's moments stay float32; the loss
casts a bfloat16 copy of the params, so the forward and backward matmuls run in bfloat16, while
the softmax of attention, RMSNorm and the cross-entropy compute in float32 (jax/layers.py,
jax/model.py); the gradient arrives in float32 through the cast.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from minillm.config import ModelConfig, TrainConfig
from minillm.jax.model import Params, forward, next_token_loss
from minillm.jax.moe import aux_loss
from minillm.jax.optim import clip_by_global_norm


class TrainState(NamedTuple):
    """Everything a step changes: the canonical params and the optimizer state (step count inside)."""

    params: Params
    opt_state: optax.OptState


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(params, optimizer.init(params))


def loss_fn(params: Params, config: ModelConfig, x: jax.Array, y: jax.Array, key: jax.Array | None = None,
            dtype=jnp.float32) -> jax.Array:
    """Mean next-token cross-entropy of one batch: x, y (B, T) int; key turns dropout on;
    dtype: what the forward computes in (a cast copy of the float32 params). A mixture of experts
    adds its load-balancing loss (minillm.jax.moe), as the PyTorch Trainer does."""
    if dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(dtype), params)
    router_logits = []
    logits = forward(params, config, x, key=key, router_logits=router_logits)
    return next_token_loss(logits, y) + aux_loss(router_logits, config)


def accumulate_grads(params: Params, config: ModelConfig, xs: jax.Array, ys: jax.Array,
                     key: jax.Array | None = None, dtype=jnp.float32) -> tuple[jax.Array, Params]:
    """Loss and gradient averaged over micro-batches xs, ys (A, b, T): equal to one batch of A*b
    sequences. lax.scan keeps one micro-batch's activations alive at a time."""
    A = xs.shape[0]
    keys = jax.random.split(key, A) if key is not None else None
    grad_fn = jax.value_and_grad(loss_fn)

    def micro_step(carry, inputs):
        loss_sum, grad_sum = carry
        x, y, k = inputs
        loss, grads = grad_fn(params, config, x, y, k, dtype)
        return (loss_sum + loss / A, jax.tree.map(lambda s, g: s + g / A, grad_sum, grads)), None

    if A == 1:  # no scan for the common case: one micro-batch
        return grad_fn(params, config, xs[0], ys[0], keys[0] if keys is not None else None, dtype)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros), (xs, ys, keys))
    return loss, grads


def train_step_fn(config: ModelConfig, cfg: TrainConfig, optimizer: optax.GradientTransformation,
                  dtype=jnp.float32):
    """The step as a pure function step(state, xs, ys, key) -> (state, metrics), not yet jitted.
    xs, ys (grad_accum, b, T) int32; key: a PRNG key, used for dropout when config.dropout > 0;
    metrics = {"loss", "grad_norm"} (the norm before clipping). A step whose loss or gradient is
    not finite returns the state unchanged (the trainer then stops, as the PyTorch one does)."""
    use_dropout = config.dropout > 0

    def step(state: TrainState, xs: jax.Array, ys: jax.Array, key: jax.Array):
        loss, grads = accumulate_grads(state.params, config, xs, ys, key if use_dropout else None, dtype)
        grads, grad_norm = clip_by_global_norm(grads, cfg.grad_clip)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = TrainState(optax.apply_updates(state.params, updates), opt_state)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # a NaN/inf step leaves the state as it was
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        return new, {"loss": loss, "grad_norm": grad_norm}

    return step


def make_train_step(config: ModelConfig, cfg: TrainConfig, optimizer: optax.GradientTransformation,
                    dtype=jnp.float32):
    """train_step_fn jitted for one device. The state is donated: its buffers are updated in place."""
    return jax.jit(train_step_fn(config, cfg, optimizer, dtype), donate_argnums=0)


def make_eval_loss(config: ModelConfig, dtype=jnp.float32):
    """A jitted loss(params, x, y) -> mean loss of one batch, dropout off."""
    return jax.jit(lambda params, x, y: loss_fn(params, config, x, y, dtype=dtype))
