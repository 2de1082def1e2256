"""Mixture-of-experts MLP (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021; Mixtral,
Jiang et al. 2024), in PyTorch: config.n_experts copies of the block's MLP, of which a router picks
config.experts_per_token for each token.

- Router: a linear map D -> n_experts without bias; a token goes to the k experts with the largest
  logits, weighted by the softmax over the logits renormalised over those k (Mixtral's order:
  softmax over all experts, top-k, divide by the sum of the k, which equals the softmax over the
  k chosen logits), and the block's output is the weighted sum of their outputs.
- Load-balancing loss (Switch Transformer eq. 4-6, transformers' `load_balancing_loss_func`):
  n_experts * sum_e f_e * P_e over the tokens of every MoE layer together, with f_e the fraction
  of (token, choice) slots sent to expert e (the fractions sum to k) and P_e the mean router
  probability of e. The Trainer adds router_aux_loss_coef times it to the next-token loss.

Canonical names (DESIGN.md): blocks.{i}.mlp.router.weight (n_experts, D) and
blocks.{i}.mlp.experts.{e}.gate/up/down.weight, the shapes of the dense MLP's. Shapes: N tokens
(B * T flattened), D d_model, E n_experts, k experts_per_token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillm.config import ModelConfig
from minillm.torch.layers import make_mlp


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits (N, E) -> (weights (N, k) float32 summing to 1 per token, experts (N, k) ids)."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E)
    top, experts = probs.topk(k, dim=-1)  # (N, k) each, largest first
    return top / top.sum(dim=-1, keepdim=True), experts


def mixture(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, experts) -> torch.Tensor:
    """sum over the k chosen experts of weight * expert(x): x (N, D), weights and chosen (N, k).
    Each expert runs once, on the tokens routed to it (a sparse dispatch: the compute per token is
    k MLPs, not E)."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = torch.where(chosen == e)  # (n_e,) each: the tokens sent to e, and in which slot
        if token.numel():
            y = expert(x[token]) * weights[token, slot, None]  # (n_e, D), in float32 like the weights
            out.index_add_(0, token, y.to(out.dtype))
    return out


class MoE(nn.Module):
    """The mixture-of-experts MLP: router + n_experts MLPs (SwiGLU or GELU, as config.mlp). Keeps the
    router logits of its last forward (N, E) in `router_logits`, for the load-balancing loss and the
    expert-usage statistics."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.k, self.aux_loss_coef = config.experts_per_token, config.router_aux_loss_coef
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList(make_mlp(config) for _ in range(config.n_experts))
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        self.router_logits = self.router(x)  # (N, E)
        weights, chosen = route(self.router_logits, self.k)  # (N, k) each
        return mixture(x, weights, chosen, self.experts).view(shape)


def make_moe(config: ModelConfig) -> MoE | None:
    """The block's MLP when config.n_experts > 1; None = the dense MLP (layers.Block's default)."""
    return MoE(config) if config.n_experts > 1 else None


def idle_parameters(model: nn.Module) -> int:
    """The expert parameters a token does not use: (n_experts - k) experts' worth per MoE layer
    (what FLOP counts leave out: a token's compute is the active parameters')."""
    return sum((len(m.experts) - m.k) * sum(p.numel() for p in m.experts[0].parameters())
               for m in model.modules() if isinstance(m, MoE))


def load_balancing_loss(router_logits: list[torch.Tensor], k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as transformers computes it for Mixtral: every layer's
    router logits (N, E) together; n_experts * sum_e f_e * P_e (1 * k when perfectly balanced)."""
    logits = torch.cat(router_logits).float()  # (L * N, E)
    E = logits.size(-1)
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.topk(k, dim=-1).indices  # (L * N, k)
    f = F.one_hot(chosen, E).sum(1).float().mean(0)  # (E,) share of the slots per expert (sums to k)
    return E * (f * probs.mean(0)).sum()


def _moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE) and m.router_logits is not None]


def aux_loss(model: nn.Module) -> torch.Tensor | float:
    """router_aux_loss_coef * the load-balancing loss of the model's last forward; 0 without MoE."""
    layers = _moe_layers(model)
    if not layers:
        return 0.0
    return layers[0].aux_loss_coef * load_balancing_loss([m.router_logits for m in layers], layers[0].k)


@torch.no_grad()
def expert_usage(model: nn.Module) -> dict[str, list[list[float]]]:
    """{"expert_usage": per MoE layer, the fraction of the last forward's tokens routed to each
    expert} (each row sums to experts_per_token), for the train rows of metrics.jsonl; {} without MoE."""
    rows = []
    for m in _moe_layers(model):
        _, chosen = route(m.router_logits, m.k)  # (N, k)
        share = torch.bincount(chosen.flatten(), minlength=m.router.out_features) / chosen.size(0)
        rows.append([round(v, 4) for v in share.tolist()])
    return {"expert_usage": rows} if rows else {}
