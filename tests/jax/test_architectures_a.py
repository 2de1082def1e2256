"""Engineer A's architectures in JAX against PyTorch (issue 17): ALiBi, sliding-window attention
and linear attention: full-model logits, KV-cached decoding and greedy generation within 1e-5 /
token for token; the slopes, and the linear recurrence against its parallel form."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402
from minillm.jax import alibi as jax_alibi  # noqa: E402
from minillm.jax import generate as jax_generate  # noqa: E402
from minillm.jax import linear_attention as jax_linear  # noqa: E402
from minillm.jax import model as jm  # noqa: E402
from minillm.jax.kv_cache import make_cache  # noqa: E402
from minillm.torch import alibi as torch_alibi  # noqa: E402
from minillm.torch import linear_attention as torch_linear  # noqa: E402
from minillm.torch.generate import generate  # noqa: E402
from minillm.torch.model import model_params  # noqa: E402
from tests.conftest import perturbed_torch_model  # noqa: E402

LLAMA = dict(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_heads=2)
CONFIGS = {  # every part of engineer A's, and their mixes with GQA and odd head counts
    "alibi": dict(positions="alibi", n_heads=4),
    "alibi-6-heads-window": dict(positions="alibi", n_heads=6, d_model=48, n_kv_heads=3, attention_window=5),
    "window-llama": dict(LLAMA, n_heads=4, attention_window=4),
    "linear-llama": dict(LLAMA, n_heads=4, attention="linear"),
    "linear-none": dict(positions="none", n_heads=4, attention="linear"),
}


def pair(name: str):
    config = ModelConfig(**{**dict(vocab_size=41, max_seq_len=48, d_model=32, n_layers=2), **CONFIGS[name]})
    model = perturbed_torch_model(config)  # scale 0.1, as tests/jax/test_model.py
    return model, jm.params_from_canonical(model_params(model), config)


def ids(B: int, T: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 41, (B, T)).astype(np.int32)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_torch(name):
    model, params = pair(name)
    x = ids(2, 30)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).long()).numpy()
    ours = np.asarray(jm.jit_forward(model.config)(params, jnp.asarray(x)))
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("name", ["alibi-6-heads-window", "window-llama", "linear-llama"])
def test_cached_decoding_matches_torch(name):
    model, params = pair(name)
    x = ids(2, 24, seed=2)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).long()).numpy()
    step = jax.jit(lambda p, tokens, cache, start: jm.forward_cached(p, model.config, tokens, cache, start))
    cache = make_cache(model.config, 2, 32)  # prefill 9 tokens, then one at a time past the window
    logits, cache = step(params, jnp.asarray(x[:, :9]), cache, 0)
    steps = [np.asarray(logits)]
    for t in range(9, 24):
        logits, cache = step(params, jnp.asarray(x[:, t:t + 1]), cache, jnp.int32(t))
        steps.append(np.asarray(logits))
    assert np.abs(np.concatenate(steps, 1) - ref).max() <= 1e-5


@pytest.mark.parametrize("name", ["alibi-6-heads-window", "linear-llama"])
def test_greedy_generation_matches_torch(name):
    model, params = pair(name)
    prompt = ids(1, 5, seed=3)[0].tolist()
    expected = generate(model, prompt, 20, temperature=0)
    assert jax_generate.generate(params, model.config, prompt, 20, temperature=0.0) == expected


def test_alibi_slopes_and_bias_match_torch():
    for H in (1, 3, 4, 6, 8, 12):
        assert np.array_equal(np.asarray(jax_alibi.alibi_slopes(H)), torch_alibi.alibi_slopes(H).numpy())
    q, k = np.arange(3, 8), np.arange(0, 8)
    ours = jax_alibi.alibi_bias(jax_alibi.alibi_slopes(6), jnp.asarray(q), jnp.asarray(k))
    ref = torch_alibi.alibi_bias(torch_alibi.alibi_slopes(6), torch.from_numpy(q), torch.from_numpy(k))
    assert np.array_equal(np.asarray(ours), ref.numpy())


def test_alibi_runs_past_max_seq_len():
    model, params = pair("alibi")
    x = ids(1, 96, seed=4)  # twice max_seq_len
    with torch.no_grad():
        ref = model(torch.from_numpy(x).long()).numpy()
    ours = np.asarray(jm.jit_forward(model.config)(params, jnp.asarray(x)))
    assert np.isfinite(ours).all() and np.abs(ours - ref).max() <= 1e-5


def test_linear_recurrence_equals_parallel_form_and_torch():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 10, 4)).astype(np.float32) for _ in range(3))
    parallel = np.asarray(jax_linear.parallel_form(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    S, z = jnp.zeros((2, 3, 4, 4)), jnp.zeros((2, 3, 4))
    steps = []
    for t in range(10):
        y, S, z = jax_linear.recurrent_step(jnp.asarray(q[:, :, t]), jnp.asarray(k[:, :, t]),
                                            jnp.asarray(v[:, :, t]), S, z)
        steps.append(np.asarray(y))
    assert np.abs(np.stack(steps, 2) - parallel).max() <= 1e-5
    ref, _, _ = torch_linear.parallel_form(*(torch.from_numpy(a) for a in (q, k, v)))
    assert np.abs(parallel - ref.numpy()).max() <= 1e-5
