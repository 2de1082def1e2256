"""perplexity: every token after the first predicted once, checked against an independent float64
loop over the windows and against literal values for a uniform model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minillm.torch.evaluate import perplexity
from tests.conftest import make_model


def reference_loss(model: torch.nn.Module, ids: np.ndarray, block_size: int) -> tuple[float, int]:
    """Float64, one window at a time, log-softmax written out: (mean nats per token, tokens)."""
    model = model.double()
    x = torch.tensor(ids.astype(np.int64))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block_size):
            end = min(start + block_size, len(ids) - 1)  # predict tokens start+1 .. end
            logits = model(x[start:end][None])[0].double()  # (T, V)
            log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            targets = x[start + 1 : end + 1]
            total -= log_probs[torch.arange(len(targets)), targets].sum().item()
            count += len(targets)
    return total / count, count


@pytest.mark.parametrize(
    "n_tokens, block_size, batch_size", [(150, 32, 3), (129, 32, 2), (40, 48, 8), (2, 5, 1)]
)
@pytest.mark.parametrize("style", ["gpt2", "llama-gqa"])
def test_perplexity_matches_a_float64_loop(style, n_tokens, block_size, batch_size) -> None:
    model = make_model(style, scale=1.0)
    ids = np.random.default_rng(0).integers(0, 61, n_tokens).astype(np.uint16)
    result = perplexity(model, ids, block_size, batch_size)
    loss, count = reference_loss(make_model(style, scale=1.0), ids, block_size)
    assert result["tokens"] == count == n_tokens - 1
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["bits_per_token"] == pytest.approx(loss / math.log(2), rel=1e-5)


class Uniform(torch.nn.Module):
    """Equal logits for every id: the loss is exactly ln(vocab), the perplexity vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape, self.vocab)


def test_uniform_model_has_perplexity_vocab() -> None:
    result = perplexity(Uniform(50), np.arange(101, dtype=np.uint32) % 50, block_size=16, batch_size=4)
    assert result["tokens"] == 100
    assert result["loss"] == pytest.approx(math.log(50), rel=1e-6)
    assert result["perplexity"] == pytest.approx(50, rel=1e-6)
    assert result["bits_per_token"] == pytest.approx(math.log2(50), rel=1e-6)


def test_too_few_tokens_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(Uniform(5), np.array([1], dtype=np.uint16), block_size=4)


@pytest.mark.parametrize("positions", ["rope", "sinusoidal", "alibi"])
def test_extend_context_equals_a_model_built_for_the_longer_context(positions) -> None:
    """Past max_seq_len (length extrapolation): the same weights in a model made at the longer
    max_seq_len give the same logits; within the trained length nothing changes."""
    import dataclasses

    from minillm.torch.evaluate import extend_context
    from minillm.torch.model import Transformer

    model = make_model("llama-gqa", positions=positions, max_seq_len=16)
    longer = Transformer(dataclasses.replace(model.config, max_seq_len=40)).eval()
    longer.load_state_dict(model.state_dict())
    x = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        short = model(x[:, :16])
        extended = extend_context(model, 40)
        torch.testing.assert_close(extended(x[:, :16]), short)
        torch.testing.assert_close(extended(x), longer(x))
    assert extended.config.max_seq_len == 40


def test_extend_context_refuses_learned_positions() -> None:
    from minillm.torch.evaluate import extend_context

    model = make_model("gpt2", max_seq_len=16)
    with pytest.raises(ValueError, match="learned positions have no rows past max_seq_len 16"):
        extend_context(model, 32)
    assert extend_context(model, 16) is model
