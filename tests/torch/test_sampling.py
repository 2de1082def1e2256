"""Logits filters against transformers' logits processors and float64 references; the draw.

Only the tests that compare with transformers take the `lp` fixture, and only they skip when
transformers is missing."""

import math

import pytest
import torch

from minillm.torch.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    mask_padded_vocab,
    min_p_filter,
    process_logits,
    sample_next,
    top_k_filter,
    top_p_filter,
)


@pytest.fixture
def lp():
    """transformers' logits processors (the test skips without transformers)."""
    pytest.importorskip("transformers")
    from transformers.generation import logits_process

    return logits_process


def _logits(seed: int, B: int = 4, V: int = 97, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


def _same_support(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(ours)
    torch.testing.assert_close(ours[finite], theirs[finite], atol=0, rtol=0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 5, 40, 97, 200])
def test_top_k_matches_transformers(seed, k, lp):
    x = _logits(seed)
    _same_support(top_k_filter(x, k), lp.TopKLogitsWarper(top_k=k)(None, x.clone()))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.99])
def test_top_p_matches_transformers(seed, p, lp):
    x = _logits(seed).double()  # float64: the cumulative sums of both orders agree at the boundary
    _same_support(top_p_filter(x, p), lp.TopPLogitsWarper(top_p=p)(None, x.clone()))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(seed, min_p, lp):
    x = _logits(seed)
    _same_support(min_p_filter(x, min_p), lp.MinPLogitsWarper(min_p=min_p)(None, x.clone()))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(seed, penalty, lp):
    x = _logits(seed)
    g = torch.Generator().manual_seed(100 + seed)
    context = torch.randint(0, x.size(1), (x.size(0), 12), generator=g)
    seen = torch.zeros_like(x, dtype=torch.bool).scatter(1, context, True)
    theirs = lp.RepetitionPenaltyLogitsProcessor(penalty=penalty)(context, x.clone())
    torch.testing.assert_close(apply_repetition_penalty(x, seen, penalty), theirs, atol=0, rtol=0)


def test_full_chain_matches_transformers_chain(lp):
    x = _logits(7)
    context = torch.randint(0, x.size(1), (x.size(0), 8), generator=torch.Generator().manual_seed(3))
    seen = torch.zeros_like(x, dtype=torch.bool).scatter(1, context, True)
    cfg = SamplingConfig(temperature=0.7, top_k=30, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    chain = lp.LogitsProcessorList([
        lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(30),
        lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.05),
    ])
    ours, theirs = process_logits(x, cfg, seen), chain(context, x.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_top_p_float64_reference():
    """The nucleus is the smallest prefix of the sorted distribution whose mass reaches p."""
    x = _logits(11, B=1, V=50).double()
    p = 0.8
    probs = torch.softmax(x[0], -1)
    order = probs.argsort(descending=True)
    mass, keep = 0.0, set()
    for i in order.tolist():
        keep.add(i)
        mass += probs[i].item()
        if mass >= p:
            break
    kept = set(torch.nonzero(~torch.isinf(top_p_filter(x, p)[0])).flatten().tolist())
    assert kept == keep


# Probabilities exact in binary, listed out of order: softmax and cumsum compute them exactly
# (float32), so the mass before each token, 0 / 0.5 / 0.75 / 0.875 / 0.9375, hits p exactly.
EXACT_PROBS = [0.125, 0.5, 0.0625, 0.25, 0.0625]


@pytest.mark.parametrize("p, kept", [(0.5, {1}), (0.75, {1, 3}), (0.875, {1, 3, 0}), (0.95, {1, 3, 0, 2, 4}),
                                     (0.25, {1})])
def test_top_p_keeps_nothing_past_mass_exactly_p(p, kept):
    """A token whose more likely predecessors reach exactly p is dropped: the nucleus is the
    smallest set with mass >= p (Holtzman et al. 2020), so at p = 0.75 the 0.5 and 0.25 tokens."""
    logits = torch.tensor([[math.log(q) for q in EXACT_PROBS]])
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(probs, torch.tensor([EXACT_PROBS]))  # the premise: exact in float32
    assert set(torch.nonzero(~torch.isinf(top_p_filter(logits, p)[0])).flatten().tolist()) == kept


def test_mask_padded_vocab_never_samples_padding():
    x = torch.zeros(3, 70)
    x[:, 65:] = 100.0  # padding ids would win every draw
    masked = mask_padded_vocab(x, 65)
    assert torch.isinf(masked[:, 65:]).all() and (masked[:, :65] == 0).all()
    tokens = sample_next(masked, SamplingConfig(temperature=1.0))
    assert (tokens < 65).all()


def test_greedy_is_argmax_and_seeded_draw_is_reproducible():
    x = _logits(5)
    assert torch.equal(sample_next(x, SamplingConfig(temperature=0)), x.argmax(-1))
    cfg = SamplingConfig(temperature=1.0, top_k=10)
    gens = lambda: [torch.Generator().manual_seed(42) for _ in range(x.size(0))]  # noqa: E731
    assert torch.equal(sample_next(x, cfg, generators=gens()), sample_next(x, cfg, generators=gens()))


def test_draw_follows_the_filtered_distribution():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = SamplingConfig(temperature=1.0, top_k=2)
    g = [torch.Generator().manual_seed(0)]
    counts = torch.bincount(torch.cat([sample_next(x, cfg, generators=g) for _ in range(4000)]), minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0].item() / 4000 - 0.625) < 0.03  # 0.5 / (0.5 + 0.3)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0),
                                 dict(repetition_penalty=0.0), dict(top_k=-3)])
def test_bad_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)
