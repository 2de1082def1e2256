"""KV-cached generation in JAX: greedy decoding equals a plain no-cache argmax loop in PyTorch, the
sampling options and the sliding window equal torch's generate, stop strings cut where they
complete, and decoding compiles a bounded number of times. (The filters: test_sampling.py.)"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

from minillm import checkpoint  # noqa: E402
from minillm.config import ModelConfig  # noqa: E402
from minillm.jax import generate as jg  # noqa: E402
from minillm.jax import model as jm  # noqa: E402
from minillm.tokenizer.char import CharTokenizer  # noqa: E402
from minillm.torch.generate import generate as torch_generate  # noqa: E402
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


def torch_greedy(model, prompt: list[int], n: int, window: int | None = None) -> list[int]:
    """The reference: recompute the whole sequence (its last `window` tokens) every step, no cache, argmax."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids[-window:] if window else ids]))[0, -1].argmax()))
    return ids[len(prompt):]


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
    stopped = jg.generate(params, LLAMA, prompts[0], 8, temperature=0, stop_token_ids=[stop])
    assert stopped == singles[0][:first + 1]
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
    with pytest.raises(ValueError, match="context_overflow"):
        jg.generate(params, TINY, [1], 2, context_overflow="wrap")
    with pytest.raises(ValueError, match="tokenizer"):
        jg.generate(params, TINY, [1], 2, stop_strings=["x"])


# --- what the torch side has: sliding window, min-p, repetition penalty, stop strings --------------
SHORT = ModelConfig(vocab_size=50, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    norm="rmsnorm", positions="rope", mlp="swiglu")


@pytest.mark.parametrize("prompt_len", [5, 20])  # a prompt that fits, and one longer than the context
def test_sliding_window_greedy_equals_torch(prompt_len):
    """Past max_seq_len both keep conditioning on the last max_seq_len tokens (re-encoded)."""
    model, params = _models(SHORT)
    prompt = np.random.default_rng(prompt_len).integers(0, 50, prompt_len).tolist()
    out = jg.generate(params, SHORT, prompt, 30, temperature=0, context_overflow="slide")
    assert out == torch_generate(model, prompt, 30, temperature=0, context_overflow="slide")
    assert out == torch_greedy(model, prompt, 30, window=SHORT.max_seq_len)


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_repetition_penalty_and_min_p_equal_torch(config):
    """Deterministic cases: greedy with a penalty; min_p=1 keeps only the most likely token, so
    sampling at any temperature is greedy."""
    model, params = _models(config)
    prompt = [3, 1, 4, 1, 5, 9]
    for penalty in (1.5, 0.8):
        expected = torch_generate(model, prompt, 20, temperature=0, repetition_penalty=penalty)
        assert jg.generate(params, config, prompt, 20, temperature=0, repetition_penalty=penalty) == expected
        assert jg.generate(params, config, prompt, 20, temperature=0.7, min_p=1.0, repetition_penalty=penalty,
                           seed=3) == expected
    assert expected != torch_generate(model, prompt, 20, temperature=0)  # the penalty changed the path
    sampled = jg.generate(params, config, prompt, 20, temperature=1.5, min_p=1.0, seed=4)
    assert sampled == torch_greedy(model, prompt, 20)


def test_repetition_penalty_counts_the_prompt_and_slides_with_the_window():
    model, params = _models(SHORT)
    prompt = [7, 7, 3, 2]
    for overflow, n in (("error", 10), ("slide", 25)):
        options = dict(temperature=0, repetition_penalty=3.0, context_overflow=overflow)
        assert jg.generate(params, SHORT, prompt, n, **options) == torch_generate(model, prompt, n, **options)


def test_stop_strings_cut_where_the_text_completes_them():
    _, params = _models(LLAMA)
    tok = CharTokenizer([chr(ord("A") + i) for i in range(50)])  # id i decodes to one letter
    free = jg.generate(params, LLAMA, [1, 2, 3], 30, temperature=0)
    text = tok.decode(free)
    stop = text[8:10]
    out = jg.generate(params, LLAMA, [1, 2, 3], 30, temperature=0, stop_strings=[stop], tokenizer=tok)
    assert out == free[: text.index(stop) + 2]  # up to and including the token that completed it
    streamed = list(jg.generate_stream(params, LLAMA, [1, 2, 3], 30, temperature=0, stop_strings=[stop],
                                       tokenizer=tok))
    assert streamed == out


def test_decode_compiles_once_with_every_option():
    config = ModelConfig(vocab_size=30, max_seq_len=16, d_model=8, n_layers=1, n_heads=2)  # a fresh jit cache
    params = jm.init_params(config, jax.random.PRNGKey(1))
    options = dict(temperature=0.9, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    jg.TRACE_COUNTS.clear()
    jg.generate(params, config, [1, 2, 3], 4, **options)
    assert dict(jg.TRACE_COUNTS) == {"prefill": 1, "decode": 1}
    jg.generate(params, config, [[4, 5, 6], [1, 1, 1]], 12, seed=5, **options)  # another batch size
    assert dict(jg.TRACE_COUNTS) == {"prefill": 2, "decode": 2}
    jg.generate(params, config, [4, 5, 6], 13, seed=6, **options)
    jg.generate(params, config, [4, 5, 6], 50, seed=7, context_overflow="slide", **options)  # 50 > 16: slides
    assert dict(jg.TRACE_COUNTS) == {"prefill": 2, "decode": 2}


def test_sample_texts_takes_every_torch_option(tmp_path):
    """What `minillm sample --backend jax` calls: beam search, sliding window, penalty, min-p."""
    model, _ = _models(SHORT)
    tok = CharTokenizer([chr(ord("A") + i) for i in range(50)])
    checkpoint.save_run(tmp_path, SHORT, tok, model_params(model))
    prompt = tok.decode([3, 1, 4, 1, 5])
    for n, options, torch_options in [
        (10, dict(num_beams=3, length_penalty=0.5), dict(num_beams=3, length_penalty=0.5)),
        (20, dict(temperature=0.9, min_p=1.0, repetition_penalty=1.4, context_overflow="slide"),
         dict(temperature=0, repetition_penalty=1.4, context_overflow="slide")),
    ]:
        expected = tok.decode(torch_generate(model, tok.encode(prompt), n, **torch_options))
        assert jg.sample_texts(tmp_path, prompt, 2, n, seed=1, **options) == [expected, expected]
