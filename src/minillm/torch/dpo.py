"""The DPO and IPO losses: pure functions of the completions' log-probabilities under policy and reference.

DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7): with the implicit reward
r(x, y) = beta * log(pi(y | x) / ref(y | x)),
    L_DPO = -log sigmoid(r(x, y_w) - r(x, y_l))            y_w chosen, y_l rejected
Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences") assumes a share eps of
the labels is flipped: L = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h), h = r_w - r_l.
IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences", eq. 17): a squared loss that pulls the log-ratio gap to 1 / (2 tau) instead of
pushing it to infinity,
    L_IPO = (log(pi(y_w) / ref(y_w)) - log(pi(y_l) / ref(y_l)) - 1 / (2 tau))^2
with tau = `beta`. Following trl (checked with the IPO authors, see trl's DPOTrainer), IPO is fed
per-token *averaged* log-probs (`completion_logprobs(..., average=True)`), so tau means the same
for short and long completions; DPO is fed sums, as in the paper.

With policy == reference every log-ratio is 0: L_DPO = ln 2 and its gradient -beta / 2 * d(h) is
not zero; a DPO loss stuck at ln 2 *during training* means the policy never moves off the
reference (a wrong reference, or chosen and rejected masks that are the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minillm.torch.logprobs import IGNORE_INDEX, token_logprobs

KINDS = ("sigmoid", "ipo")


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             kind: str = "sigmoid") -> tuple[torch.Tensor, dict[str, float]]:
    """(mean loss over the b pairs, metrics) from (b,) log-probs of the chosen / rejected completions.

    Metrics (means over the pairs): rewards/chosen and rewards/rejected = beta * (pi - ref),
    rewards/margins = their difference, rewards/accuracy = how often the chosen reward is higher,
    logps/chosen and logps/rejected (the policy's), and kl = mean(pi - ref) on the chosen completions:
    the sequence-level log-ratio, an estimate of KL(pi || ref) (exact in expectation when the chosen
    completions are samples of pi; here they come from data, so read it as a drift gauge)."""
    if kind not in KINDS:
        raise ValueError(f"dpo_loss kind must be one of {KINDS}, got {kind!r}")
    chosen_logratio = pi_chosen - ref_chosen  # (b,)
    rejected_logratio = pi_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio  # (b,)
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        if label_smoothing:
            raise ValueError("label_smoothing applies to the DPO (sigmoid) loss, not to IPO")
        losses = (h - 1 / (2 * beta)) ** 2
    with torch.no_grad():
        r_chosen, r_rejected = beta * chosen_logratio.float(), beta * rejected_logratio.float()
        metrics = {"rewards/chosen": r_chosen.mean(), "rewards/rejected": r_rejected.mean(),
                   "rewards/margins": (r_chosen - r_rejected).mean(),
                   "rewards/accuracy": (r_chosen > r_rejected).float().mean(),
                   "logps/chosen": pi_chosen.float().mean(), "logps/rejected": pi_rejected.float().mean(),
                   "kl": chosen_logratio.float().mean()}
    return losses.mean(), {k: v.item() for k, v in metrics.items()}


def completion_logprobs(model, x: torch.Tensor, y: torch.Tensor, average: bool = False) -> torch.Tensor:
    """(b,) log-probability of each row's completion (the targets y != -100): summed over its tokens,
    or with `average` their mean (IPO's convention, see the module docstring)."""
    logps = token_logprobs(model, x, y).sum(dim=-1)  # (b,)
    if not average:
        return logps
    return logps / (y != IGNORE_INDEX).sum(dim=-1).clamp(min=1)


def pair_loss(policy, x: torch.Tensor, y: torch.Tensor, ref_logps: torch.Tensor, beta: float,
              label_smoothing: float = 0.0, kind: str = "sigmoid") -> tuple[torch.Tensor, dict[str, float]]:
    """dpo_loss of a batch of pairs: x, y (2b, T), chosen rows first, rejected rows b..2b-1
    (minillm.data.prefs); ref_logps (2b,): the reference's completion_logprobs of the same rows
    (averaged for IPO), computed under no_grad or precomputed."""
    b = x.size(0) // 2
    pi = completion_logprobs(policy, x, y, average=kind == "ipo")  # (2b,)
    return dpo_loss(pi[:b], pi[b:], ref_logps[:b], ref_logps[b:], beta, label_smoothing, kind)
