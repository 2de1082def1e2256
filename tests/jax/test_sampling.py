"""The JAX logits filters against their PyTorch twins (minillm.torch.sampling) on the same random
logits, plus exact boundary cases whose expected values are written out."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402

from minillm.jax import sampling as js  # noqa: E402
from minillm.torch import sampling as ts  # noqa: E402


def _logits(seed=0, shape=(3, 40)):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2
    x[0, :5] = x[0, 5]  # ties
    return x


def _seen(seed=0, shape=(3, 40)):
    return np.random.default_rng(seed + 100).random(shape) < 0.3


def _equal(jax_out, torch_out):
    """Same survivors (-inf pattern) and the same values where they survive."""
    a, b = np.asarray(jax_out), torch_out.numpy()
    np.testing.assert_array_equal(np.isinf(a), np.isinf(b))
    np.testing.assert_allclose(a[~np.isinf(a)], b[~np.isinf(b)], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_matches_torch(temperature):
    x = _logits()
    _equal(js.apply_temperature(jnp.asarray(x), temperature),
           ts.apply_temperature(torch.from_numpy(x), temperature))


@pytest.mark.parametrize("k", [0, 1, 5, 6, 40])
def test_top_k_matches_torch(k):
    x = _logits()
    np.testing.assert_array_equal(np.asarray(js.top_k_filter(jnp.asarray(x), k)),
                                  ts.top_k_filter(torch.from_numpy(x), k).numpy())


def test_top_k_keeps_ties_with_the_kth():
    x = np.array([[3.0, 1.0, 2.0, 2.0, 0.0]], np.float32)
    kept = ~np.isinf(np.asarray(js.top_k_filter(jnp.asarray(x), 2)))
    np.testing.assert_array_equal(kept, [[True, False, True, True, False]])


@pytest.mark.parametrize("p", [0.01, 0.5, 0.9, 1.0])
def test_top_p_matches_torch(p):
    x = _logits(1)
    np.testing.assert_array_equal(np.isinf(np.asarray(js.top_p_filter(jnp.asarray(x), p))),
                                  np.isinf(ts.top_p_filter(torch.from_numpy(x), p).numpy()))


@pytest.mark.parametrize("n,p,kept", [(4, 0.5, 2), (8, 0.25, 2), (8, 0.75, 6), (4, 0.25, 1), (4, 1.0, 4)])
def test_top_p_exact_boundary(n, p, kept):
    """Equal logits give probabilities exact in binary (1/n), so a set of tokens reaches mass p
    exactly: top-p keeps the smallest set whose mass reaches p, not one token more."""
    x = np.zeros((1, n), np.float32)
    assert int(np.isfinite(np.asarray(js.top_p_filter(jnp.asarray(x), p))).sum()) == kept
    assert int(np.isfinite(ts.top_p_filter(torch.from_numpy(x), p).numpy()).sum()) == kept


def test_top_p_matches_a_float64_formula():
    x = _logits(2, (4, 30))
    probs = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for p in (0.3, 0.8):
        expected = np.zeros_like(x, bool)
        for b in range(len(x)):
            order, mass = np.argsort(-probs[b]), 0.0
            for i in order:  # take tokens, most likely first, until the mass reaches p
                expected[b, i] = True
                mass += probs[b, i]
                if mass >= p:
                    break
        np.testing.assert_array_equal(np.isfinite(np.asarray(js.top_p_filter(jnp.asarray(x), p))), expected)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_matches_torch(min_p):
    x = _logits(3)
    _equal(js.min_p_filter(jnp.asarray(x), min_p), ts.min_p_filter(torch.from_numpy(x), min_p))


def test_min_p_literal():
    x = np.log(np.array([[0.5, 0.25, 0.125, 0.125]], np.float32))  # threshold 0.4 * 0.5 = 0.2
    kept = np.isfinite(np.asarray(js.min_p_filter(jnp.asarray(x), 0.4)))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_torch(penalty):
    x, seen = _logits(4), _seen(4)
    _equal(js.apply_repetition_penalty(jnp.asarray(x), jnp.asarray(seen), penalty),
           ts.apply_repetition_penalty(torch.from_numpy(x), torch.from_numpy(seen), penalty))


def test_repetition_penalty_literal():
    x = jnp.array([[2.0, -2.0, 2.0, -2.0]])
    seen = jnp.array([[True, True, False, False]])
    np.testing.assert_array_equal(np.asarray(js.apply_repetition_penalty(x, seen, 2.0)),
                                  [[1.0, -4.0, 2.0, -2.0]])


CONFIGS = [
    dict(temperature=0.0, repetition_penalty=1.5),
    dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    dict(temperature=1.3, top_p=0.6, min_p=0.2),
    dict(temperature=0.5, top_k=3, repetition_penalty=0.8),
]


@pytest.mark.parametrize("fields", CONFIGS)
def test_process_logits_in_torch_order(fields):
    """The whole chain (penalty -> temperature -> top-k -> top-p -> min-p) equals torch's."""
    x, seen = _logits(5, (4, 50)), _seen(5, (4, 50))
    out = js.process_logits(jnp.asarray(x), js.SamplingConfig(**fields), jnp.asarray(seen))
    _equal(out, ts.process_logits(torch.from_numpy(x), ts.SamplingConfig(**fields), torch.from_numpy(seen)))


def test_sample_next_greedy_and_draws_stay_among_survivors():
    x, seen = _logits(6, (4, 50)), _seen(6, (4, 50))
    greedy = dict(temperature=0.0, repetition_penalty=1.5)
    expected = ts.sample_next(torch.from_numpy(x), ts.SamplingConfig(**greedy), torch.from_numpy(seen))
    got = js.sample_next(jnp.asarray(x), js.SamplingConfig(**greedy), jnp.asarray(seen))
    np.testing.assert_array_equal(np.asarray(got), expected.numpy())
    cfg = js.SamplingConfig(temperature=1.0, top_k=4)
    allowed = np.isfinite(ts.top_k_filter(torch.from_numpy(x), 4).numpy())
    for seed in range(20):
        draw = np.asarray(js.sample_next(jnp.asarray(x), cfg, key=jax.random.PRNGKey(seed)))
        assert allowed[np.arange(4), draw].all()


def test_padded_vocab_and_bad_settings():
    x = jnp.zeros((2, 8))
    assert np.isinf(np.asarray(js.mask_padded_vocab(x, 5))[:, 5:]).all()
    assert np.isfinite(np.asarray(js.mask_padded_vocab(x, 5))[:, :5]).all()
    bad = [dict(top_p=0.0), dict(min_p=1.5), dict(temperature=-1), dict(repetition_penalty=0.0)]
    for fields in bad:
        with pytest.raises(ValueError, match=next(iter(fields))):
            js.SamplingConfig(**fields)
