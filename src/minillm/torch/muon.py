"""Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): SGD with Nesterov momentum
whose update for a 2-D weight matrix is replaced by (nearly) the closest semi-orthogonal matrix,
U V^T of the update's SVD U S V^T, computed by a quintic Newton-Schulz iteration. Every direction
of the update then moves by the same amount, however small its singular value was.

Muon is for the hidden matrices only; embeddings, an untied head, norm gains and biases stay with
AdamW (minillm.torch.optim.make_optimizer splits them). MuonWithAdamW steps both as one optimizer.
"""

from __future__ import annotations

import itertools

import torch

# The quintic's coefficients (modded-nanogpt): chosen for the largest slope at 0 (a), so small singular
# values grow fast, at the price of not converging to exactly 1: after five steps every singular value
# that was at least 5% of the Frobenius norm ends in [0.68, 1.14], none above 1.21, and tiny ones grow
# by up to a^5 ~ 490x (tests/torch/test_muon.py checks the band). The reference found that this trains
# as well as the exact U V^T.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def newton_schulz(G: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """G (m, n) -> an approximation of U V^T where G = U S V^T, in float32 (the reference runs it in
    bf16 on GPUs for speed; on CPUs bf16 is often emulated, and float32 keeps the update exact to test).

    Each step X <- a X + b (X X^T) X + c (X X^T)^2 X maps every singular value s of X to
    a s + b s^3 + c s^5 and keeps the singular vectors; dividing by the Frobenius norm first puts
    every s in [0, 1], where five steps push them all towards 1."""
    X = G.float()
    tall = X.size(0) > X.size(1)
    if tall:  # work on the wide orientation: X X^T is then the smaller (min(m, n))^2 Gram matrix
        X = X.T
    X = X / (X.norm() + 1e-7)  # ||X||_F >= the largest singular value
    a, b, c = NS_COEFFS
    for _ in range(steps):
        A = X @ X.T  # (k, k), k = min(m, n)
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D parameters. Per step, with g the gradient
    and mu the momentum (the reference's EMA form of Nesterov momentum):

        buf <- mu buf + (1 - mu) g                      momentum buffer ("momentum_buffer")
        u   <- (1 - mu) g + mu buf                      Nesterov: look one step ahead
        W   <- W (1 - lr wd) - lr sqrt(max(1, m/n)) NS(u)    W (m, n) = (out, in) as in nn.Linear

    sqrt(max(1, m/n)) is the reference's shape scale: an orthogonal (m, n) matrix with m > n has
    RMS entry sqrt(1/m), and the factor restores the step size of a square one for tall matrices.
    Weight decay is decoupled and scaled by lr, as in torch's AdamW (the reference speedrun uses 0)."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = newton_schulz(p.grad.lerp(buf, mu))
                p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


class MuonWithAdamW:
    """Several optimizers (AdamW for some parameters, Muon for the others) that Trainer steps as
    one: param_groups are theirs, in order (the same dicts, so setting group["lr"] reaches them),
    and state_dict numbers the parameters on through all of them, as one torch optimizer would."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        # read anew each time: torch's load_state_dict replaces an optimizer's group dicts
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self, closure=None) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """{"state": {index: state}, "param_groups": [...]}: each optimizer's own, its indices
        shifted past the parameters of the optimizers before it."""
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({i + offset: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """The inverse of state_dict: each optimizer gets its own groups and the state of their
        indices (torch matches saved indices to parameters by position, so the shift can stay)."""
        groups = iter(state_dict["param_groups"])
        for opt in self.optimizers:
            mine = list(itertools.islice(groups, len(opt.param_groups)))
            indices = {i for g in mine for i in g["params"]}
            opt.load_state_dict({"state": {i: s for i, s in state_dict["state"].items() if i in indices},
                                 "param_groups": mine})
