"""The DPO / IPO losses (minillm.torch.dpo) against the papers' formulas in float64 and against trl's
DPOTrainer on the same log-probs; the failure modes users report (loss stuck at ln 2, padding
counted, chosen and rejected mixed up) as tests."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import DPOTrainer as TRLDPOTrainer

from minillm.torch.dpo import completion_logprobs, dpo_loss, pair_loss
from tests.conftest import make_model

G = torch.Generator().manual_seed(0)
PI_C, PI_R, REF_C, REF_R = (-torch.rand(6, generator=G, dtype=torch.float64) * 20 for _ in range(4))


def _dpo_float64(pi_c, pi_r, ref_c, ref_r, beta, eps=0.0):
    """Rafailov et al. 2023 eq. 7, with conservative DPO's eps, pair by pair in plain float64 maths."""
    out = []
    for a, b, c, d in zip(pi_c.tolist(), pi_r.tolist(), ref_c.tolist(), ref_r.tolist()):
        h = beta * ((a - c) - (b - d))
        log_sigmoid = lambda z: -math.log1p(math.exp(-z))  # noqa: E731
        out.append(-(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h))
    return sum(out) / len(out)


def _ipo_float64(pi_c, pi_r, ref_c, ref_r, tau):
    """Azar et al. 2023 eq. 17: (h - 1 / (2 tau))^2 with h the difference of log-ratios."""
    rows = zip(pi_c.tolist(), pi_r.tolist(), ref_c.tolist(), ref_r.tolist())
    hs = [(a - c) - (b - d) for a, b, c, d in rows]
    return sum((h - 1 / (2 * tau)) ** 2 for h in hs) / len(hs)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (1.0, 0.3)])
def test_dpo_loss_equals_the_paper_formula_in_float64(beta, eps):
    loss, m = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta, eps)
    assert loss.item() == pytest.approx(_dpo_float64(PI_C, PI_R, REF_C, REF_R, beta, eps), rel=1e-12)
    r_c, r_r = beta * (PI_C - REF_C), beta * (PI_R - REF_R)
    assert m["rewards/chosen"] == pytest.approx(r_c.mean().item())
    assert m["rewards/rejected"] == pytest.approx(r_r.mean().item())
    assert m["rewards/margins"] == pytest.approx((r_c - r_r).mean().item())
    assert m["rewards/accuracy"] == pytest.approx(sum(a > b for a, b in zip(r_c, r_r)) / 6)
    assert m["logps/chosen"] == pytest.approx(PI_C.mean().item())
    assert m["logps/rejected"] == pytest.approx(PI_R.mean().item())
    assert m["kl"] == pytest.approx((PI_C - REF_C).mean().item())


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ipo_loss_equals_the_paper_formula_in_float64(tau):
    loss, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, tau, kind="ipo")
    assert loss.item() == pytest.approx(_ipo_float64(PI_C, PI_R, REF_C, REF_R, tau), rel=1e-12)


def _trl_loss(per_token, ref_c, ref_r, completion_mask, beta: float, loss_type: str) -> torch.Tensor:
    """trl 1.16's DPOTrainer._compute_loss on given per-token policy log-probs (2b, T) and reference
    sequence log-probs, with the least of a trainer it reads: a stand-in `self` and a model whose
    output is those log-probs (trl's fused LM head returns log_probs, entropy, mean_logits, is_top1)."""
    model = SimpleNamespace(training=True)
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t)
    self = SimpleNamespace(model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                           loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    n, T = per_token.shape
    # input_ids has one more column than the per-token log-probs (they score targets 1..T)
    mask = torch.cat([torch.zeros(n, 1, dtype=torch.long), completion_mask.long()], dim=1)  # (2b, T + 1)
    inputs = {"input_ids": torch.zeros(n, T + 1, dtype=torch.long), "attention_mask": torch.ones(n, T + 1),
              "completion_mask": mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return TRLDPOTrainer._compute_loss(self, lambda **kw: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize("kind,beta", [("sigmoid", 0.1), ("sigmoid", 0.7), ("ipo", 0.1), ("ipo", 0.5)])
def test_loss_equals_trl_on_the_same_log_probs(kind, beta):
    """Per-token log-probs of 4 pairs with completions of different lengths: our loss on their sums
    (DPO) or means (IPO, trl's convention) equals trl's on the per-token values."""
    b, T = 4, 9
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(2 * b, T, dtype=torch.bool)
    for row, (start, end) in enumerate([(2, 9), (4, 6), (3, 8), (1, 9), (5, 9), (2, 3), (3, 5), (6, 9)]):
        mask[row, start:end] = True
    per_token = torch.where(mask, -torch.rand(2 * b, T, generator=g, dtype=torch.float64) * 3, 0.0)
    ref = -torch.rand(2 * b, generator=g, dtype=torch.float64) * 10  # sequence-level (means for IPO)
    pi = per_token.sum(-1) / (mask.sum(-1) if kind == "ipo" else 1)
    ours, _ = dpo_loss(pi[:b], pi[b:], ref[:b], ref[b:], beta, kind=kind)
    # trl averages both policy and reference log-ratios for IPO: give it the reference sums
    ref_for_trl = ref * mask.sum(-1) if kind == "ipo" else ref
    theirs = _trl_loss(per_token, ref_for_trl[:b], ref_for_trl[b:], mask, beta, kind)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_policy_equal_to_reference_gives_ln2_and_a_gradient(kind):
    pi_c = PI_C.clone().requires_grad_()
    pi_r = PI_R.clone().requires_grad_()
    loss, m = dpo_loss(pi_c, pi_r, PI_C.clone(), PI_R.clone(), 0.1, kind=kind)
    expected = math.log(2) if kind == "sigmoid" else (1 / (2 * 0.1)) ** 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert m["rewards/margins"] == 0 and m["kl"] == 0
    loss.backward()
    per_pair = 0.1 / 2 / 6 if kind == "sigmoid" else 2 * (1 / (2 * 0.1)) / 6  # -dL/d(pi_c) of each pair
    torch.testing.assert_close(pi_c.grad, torch.full((6,), -per_pair, dtype=torch.float64))
    torch.testing.assert_close(pi_r.grad, torch.full((6,), per_pair, dtype=torch.float64))


def test_swapping_chosen_and_rejected_flips_the_margins():
    _, m = dpo_loss(PI_C, PI_R, REF_C, REF_R, 0.1)
    _, swapped = dpo_loss(PI_R, PI_C, REF_R, REF_C, 0.1)
    assert m["rewards/margins"] != 0 and swapped["rewards/margins"] == pytest.approx(-m["rewards/margins"])
    assert swapped["rewards/accuracy"] == pytest.approx(1 - m["rewards/accuracy"])  # no ties here


def _pairs_batch(width: int):
    """2 pairs as (4, width) rows: prompts of 3 and 5 tokens, completions of various lengths."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 61, (4, 24), generator=g)
    y = torch.randint(0, 61, (4, 24), generator=g)
    for row, (start, end) in enumerate([(2, 8), (4, 7), (2, 5), (4, 10)]):
        y[row, :start], y[row, end:] = -100, -100
        x[row, end:] = 0  # padding
    return x[:, :width], y[:, :width]


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_the_loss_is_unchanged_when_pairs_are_padded_wider(kind):
    policy, reference = make_model("llama-gqa", seed=0, scale=1.0), make_model("llama-gqa", seed=1, scale=1.0)
    losses = []
    for width in (10, 16, 24):
        x, y = _pairs_batch(width)
        with torch.no_grad():
            ref = completion_logprobs(reference, x, y, average=kind == "ipo")
            losses.append(pair_loss(policy, x, y, ref, 0.1, kind=kind)[0].item())
    assert losses[0] != pytest.approx(math.log(2))  # two different models: a real loss
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, 0.1, kind="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, 0.1, label_smoothing=0.1, kind="ipo")
