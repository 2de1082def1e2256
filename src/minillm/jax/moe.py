"""Mixture-of-experts MLP (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021; Mixtral,
Jiang et al. 2024), in JAX: the twin of minillm/torch/moe.py, as pure functions over the params.

- Router: a linear map D -> n_experts without bias; a token goes to the k experts with the largest
  logits, weighted by the softmax over the logits renormalised over those k (Mixtral's order:
  softmax over all experts, top-k, divide by the sum of the k, which equals the softmax over the
  k chosen logits), and the block's output is the weighted sum of their outputs.
- Load-balancing loss (Switch Transformer eq. 4-6, transformers' `load_balancing_loss_func`):
  n_experts * sum_e f_e * P_e over the tokens of every MoE layer together, with f_e the fraction
  of (token, choice) slots sent to expert e (the fractions sum to k) and P_e the mean router
  probability of e. minillm.jax.step adds router_aux_loss_coef times it to the next-token loss.

Unlike the PyTorch side, which runs each expert on its own tokens only, every expert runs on every
token here and the unchosen ones get weight 0: XLA needs static shapes, and a per-expert token count
is not one (a capacity-limited dispatch, as in Switch, is the way to scale this). The result is the
same; the cost is n_experts / k times the MLP's.

Canonical names (DESIGN.md): blocks.{i}.mlp.router.weight (n_experts, D) and
blocks.{i}.mlp.experts.{e}.gate/up/down.weight. Shapes: N tokens, D d_model, E n_experts, k.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from minillm.config import ModelConfig
from minillm.jax.layers import Params, linear, mlp


def route(router_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """router_logits (N, E) -> (weights (N, k) float32 summing to 1 per token, experts (N, k) ids)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # (N, E)
    top, experts = jax.lax.top_k(probs, k)  # (N, k) each, largest first
    return top / top.sum(axis=-1, keepdims=True), experts


def moe(params: Params, prefix: str, config: ModelConfig, x: jax.Array,
        router_logits: list | None = None) -> jax.Array:
    """The mixture-of-experts MLP, x (B, T, D) -> (B, T, D). router_logits: a list that collects
    this layer's router logits (N, E), for the load-balancing loss."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # (N, D)
    logits = linear(params, f"{prefix}.router", x)  # (N, E)
    if router_logits is not None:
        router_logits.append(logits)
    weights, chosen = route(logits, config.experts_per_token)  # (N, k) each
    gates = (jax.nn.one_hot(chosen, config.n_experts) * weights[..., None]).sum(1)  # (N, E), 0 = not chosen
    out = jnp.zeros_like(x)
    for e in range(config.n_experts):  # in expert order, as the PyTorch side adds them up
        y = mlp(params, f"{prefix}.experts.{e}", config, x) * gates[:, e, None]  # (N, D)
        out = out + y.astype(out.dtype)
    return out.reshape(shape)


def mlp_fn(config: ModelConfig, router_logits: list | None = None):
    """The block's MLP function (params, prefix, config, x) -> y: the mixture of experts when
    config.n_experts > 1 (collecting its router logits into `router_logits` when given), else dense."""
    return partial(moe, router_logits=router_logits) if config.n_experts > 1 else mlp


def load_balancing_loss(router_logits: list[jax.Array], k: int) -> jax.Array:
    """Switch Transformer's auxiliary loss as transformers computes it for Mixtral: every layer's
    router logits (N, E) together; n_experts * sum_e f_e * P_e (1 * k when perfectly balanced)."""
    logits = jnp.concatenate(router_logits).astype(jnp.float32)  # (L * N, E)
    E = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    _, chosen = jax.lax.top_k(probs, k)  # (L * N, k)
    f = jax.nn.one_hot(chosen, E).sum(1).mean(0)  # (E,) share of the slots per expert (sums to k)
    return E * (f * probs.mean(0)).sum()


def aux_loss(router_logits: list[jax.Array], config: ModelConfig) -> jax.Array | float:
    """router_aux_loss_coef * the load-balancing loss of these router logits; 0 without MoE."""
    if not router_logits:
        return 0.0
    return config.router_aux_loss_coef * load_balancing_loss(router_logits, config.experts_per_token)


def expert_usage(router_logits: list[jax.Array], config: ModelConfig) -> jax.Array:
    """(layers, n_experts): per MoE layer, the fraction of the tokens routed to each expert (each row
    sums to experts_per_token), the metric the PyTorch trainer logs as expert_usage."""
    k, E = config.experts_per_token, config.n_experts
    return jnp.stack([jax.nn.one_hot(route(logits, k)[1], E).sum(1).mean(0) for logits in router_logits])
