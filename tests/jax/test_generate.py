"""KV-cached generation in JAX: the filters equal the PyTorch ones, greedy decoding equals a plain
no-cache argmax loop in PyTorch, and decoding compiles a bounded number of times."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402
from minillm.jax import generate as jg  # noqa: E402
from minillm.jax import model as jm  # noqa: E402
from minillm.torch import sampling as ts  # noqa: E402
from minillm.torch.model import model_params  # noqa: E402
from tests.conftest import perturbed_torch_model  # noqa: E402

LLAMA = ModelConfig(vocab_size=50, max_seq_len=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    norm="rmsnorm", positions="rope", mlp="swiglu")
GPT2 = ModelConfig(vocab_size=50, max_seq_len=64, d_model=32, n_layers=2, n_heads=4, bias=True)
TINY = ModelConfig(vocab_size=50, max_seq_len=64, d_model=16, n_layers=1, n_heads=2)


def _models(config: ModelConfig, scale: float = 0.3):
    """A torch model with large random weights (so greedy paths are not trivial) and its JAX params."""
    model = perturbed_torch_model(config, scale)
    return model, jm.params_from_canonical(model_params(model), config)


def torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference: recompute the whole sequence every step, no cache, argmax."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _logits(seed=0, shape=(3, 40)):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2
    x[0, :5] = x[0, 5]  # ties
    return x


@pytest.mark.parametrize("k", [1, 5, 6, 40])
def test_top_k_matches_torch(k):
    x = _logits()
    np.testing.assert_array_equal(np.asarray(jg.top_k_filter(jnp.asarray(x), k)),
                                  ts.top_k_filter(torch.from_numpy(x), k).numpy())


@pytest.mark.parametrize("p", [0.01, 0.5, 0.9, 1.0])
def test_top_p_matches_torch(p):
    x = _logits(1)
    np.testing.assert_array_equal(np.isinf(np.asarray(jg.top_p_filter(jnp.asarray(x), p))),
                                  np.isinf(ts.top_p_filter(torch.from_numpy(x), p).numpy()))


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_greedy_with_cache_equals_torch_without(config):
    model, params = _models(config)
    prompt = [3, 1, 4, 1, 5, 9]
    assert jg.generate(params, config, prompt, 20, temperature=0) == torch_greedy(model, prompt, 20)


def test_batch_rows_equal_single_prompts_and_stop_tokens():
    _, params = _models(LLAMA)
    prompts = [[1, 2, 3], [7, 8, 9]]
    singles = [jg.generate(params, LLAMA, p, 8, temperature=0) for p in prompts]
    assert jg.generate(params, LLAMA, prompts, 8, temperature=0) == singles
    stop = singles[0][3]
    first = singles[0].index(stop)
    assert jg.generate(params, LLAMA, prompts[0], 8, temperature=0, stop_token_ids=[stop]) == singles[0][:first + 1]
    assert list(jg.generate_stream(params, LLAMA, prompts[0], 8, temperature=0)) == singles[0]


def test_sampling_is_seeded_and_filters_hold():
    _, params = _models(TINY, scale=0.1)
    a = jg.generate(params, TINY, [1, 2], 30, temperature=1.0, top_k=3, seed=7)
    assert a == jg.generate(params, TINY, [1, 2], 30, temperature=1.0, top_k=3, seed=7)
    assert a != jg.generate(params, TINY, [1, 2], 30, temperature=1.0, top_k=3, seed=8)
    greedy = jg.generate(params, TINY, [1, 2], 10, temperature=0)
    assert jg.generate(params, TINY, [1, 2], 10, temperature=0.7, top_k=1, top_p=0.5, seed=1) == greedy
    assert max(jg.generate(params, TINY, [1, 2], 30, seed=2, vocab_size=10)) < 10  # padded vocabulary


def test_decode_compiles_once_whatever_the_length():
    config = ModelConfig(vocab_size=30, max_seq_len=64, d_model=8, n_layers=1, n_heads=2)  # a fresh jit cache
    params = jm.init_params(config, jax.random.PRNGKey(0))
    jg.TRACE_COUNTS.clear()
    jg.generate(params, config, [1, 2, 3], 4, temperature=0)
    after_short = dict(jg.TRACE_COUNTS)
    assert after_short == {"prefill": 1, "decode": 1}
    jg.generate(params, config, [4, 5, 6], 13, temperature=0)  # 3 + 13 fits the same cache bucket (16)
    assert dict(jg.TRACE_COUNTS) == after_short
    jg.generate(params, config, [4, 5, 6], 60, temperature=0)  # a bigger bucket: one more each, not 60
    assert dict(jg.TRACE_COUNTS) == {"prefill": 2, "decode": 2}


def test_errors_name_the_problem():
    _, params = _models(TINY)
    with pytest.raises(ValueError, match="max_seq_len"):
        jg.generate(params, TINY, [1] * 60, 10)
    with pytest.raises(ValueError, match="equal length"):
        jg.generate(params, TINY, [[1, 2], [3]], 2)
    with pytest.raises(ValueError, match="top_p"):
        jg.generate(params, TINY, [1], 2, top_p=0.0)
