"""Completion log-probabilities (minillm.torch.logprobs) against a float64 log_softmax of the logits."""

import pytest
import torch

from minillm.torch.logprobs import sequence_logprobs, token_logprobs
from tests.conftest import make_model

B, T, V = 3, 12, 61


def _batch(width: int = T):
    """x (B, width), y = targets with -100 on a prompt of 3-5 tokens and right padding per row."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, width), generator=g)
    y = torch.randint(0, V, (B, width), generator=g)
    for row, (start, end) in enumerate([(3, T), (5, 9), (4, 7)]):
        y[row, :start] = -100
        y[row, end:] = -100
    return x, y


def _float64_reference(model, x, y) -> torch.Tensor:
    """log_softmax in float64 of model(x)'s logits (a float64 copy of the model), gathered at y."""
    logp = torch.log_softmax(model.double()(x), dim=-1)  # (B, T, V) float64
    out = torch.zeros(y.shape, dtype=torch.float64)
    for b in range(y.size(0)):
        for t in range(y.size(1)):
            if y[b, t] != -100:
                out[b, t] = logp[b, t, y[b, t]]
    return out


@pytest.mark.parametrize("style", ["gpt2", "llama-gqa"])
def test_token_logprobs_equal_a_float64_log_softmax_gather(style):
    model = make_model(style, scale=1.0)
    x, y = _batch()
    with torch.no_grad():
        got = token_logprobs(model, x, y)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    expected = _float64_reference(make_model(style, scale=1.0), x, y)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert (got[y == -100] == 0).all() and (got[y != -100] < 0).all()
    torch.testing.assert_close(sequence_logprobs(model, x, y).double(), expected.sum(-1),
                               rtol=1e-5, atol=1e-5)


def test_any_logits_module_gives_the_same_values():
    """A wrapper that only maps x to logits (DDP, torch.compile) goes through the full-logits path."""
    model = make_model("llama-gqa", scale=1.0)

    class LogitsOnly(torch.nn.Module):
        def forward(self, x):
            return model(x)

    x, y = _batch()
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(LogitsOnly(), x, y), token_logprobs(model, x, y))


@pytest.mark.parametrize("extra", [1, 7])
def test_padding_to_other_widths_leaves_them_unchanged(extra):
    model = make_model("llama-gqa", scale=1.0)
    x, y = _batch()
    wide_x = torch.cat([x, torch.zeros(B, extra, dtype=torch.long)], dim=1)  # pad id 0
    wide_y = torch.cat([y, torch.full((B, extra), -100)], dim=1)
    with torch.no_grad():
        narrow, wide = token_logprobs(model, x, y), token_logprobs(model, wide_x, wide_y)
    torch.testing.assert_close(wide[:, :T], narrow, rtol=1e-6, atol=1e-6)
    assert (wide[:, T:] == 0).all()
    torch.testing.assert_close(sequence_logprobs(model, wide_x, wide_y), sequence_logprobs(model, x, y))


def test_the_gradient_flows_and_prompt_targets_do_not_count():
    """Changing a prompt target (y = -100 there) changes nothing; the sum has a gradient."""
    model = make_model("gpt2", scale=1.0)
    x, y = _batch()
    other = y.clone()
    other[0, 0] = 5  # now a scored target: row 0 gains a term, the others are unchanged
    with torch.no_grad():
        a, b = sequence_logprobs(model, x, y), sequence_logprobs(model, x, other)
    assert a[0] != b[0] and torch.equal(a[1:], b[1:])
    sequence_logprobs(model, x, y).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.dim() == 2)
