"""JAX beam search against the PyTorch one (minillm.torch.generate with num_beams, itself tested
token for token against Hugging Face transformers) on the same weights."""

import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

from minillm.config import ModelConfig  # noqa: E402
from minillm.jax import beam as jb  # noqa: E402
from minillm.jax import generate as jg  # noqa: E402
from minillm.jax import model as jm  # noqa: E402
from minillm.torch.generate import generate as torch_generate  # noqa: E402
from minillm.torch.model import model_params  # noqa: E402
from tests.conftest import perturbed_torch_model  # noqa: E402

LLAMA = ModelConfig(vocab_size=50, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    norm="rmsnorm", positions="rope", mlp="swiglu")
GPT2 = ModelConfig(vocab_size=50, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, bias=True)
PROMPT = [3, 1, 4, 1, 5, 9]


@pytest.fixture(scope="module", params=[GPT2, LLAMA], ids=["gpt2", "llama"])
def models(request):
    model = perturbed_torch_model(request.param, 0.3)
    return model, jm.params_from_canonical(model_params(model), request.param)


CASES = [  # (num_beams, length_penalty, early_stopping, which greedy tokens are eos)
    (2, 1.0, False, ()),
    (3, 1.0, False, (3,)),
    (3, 0.5, True, (3,)),
    (4, 2.0, "never", (2,)),
    (4, -1.0, False, (1, 4)),
    (5, 1.0, True, (0, 2)),
]


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,eos_at", CASES)
def test_beam_tokens_equal_torch(models, num_beams, length_penalty, early_stopping, eos_at):
    model, params = models
    greedy = torch_generate(model, PROMPT, 12, temperature=0)
    eos = [greedy[i] for i in eos_at]  # tokens the search will meet, so hypotheses do finish
    options = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                   stop_token_ids=eos)
    expected = torch_generate(model, PROMPT, 12, **options)
    assert jg.generate(params, model.config, PROMPT, 12, **options) == expected
    assert jg.generate(params, model.config, [PROMPT, PROMPT], 12, **options) == [expected, expected]


def test_one_beam_is_greedy_and_padded_ids_never_come(models):
    model, params = models
    greedy = torch_generate(model, PROMPT, 10, temperature=0)
    assert jb.beam_search(params, model.config, PROMPT, 10, 1) == greedy
    assert max(jb.beam_search(params, model.config, PROMPT, 10, 3, vocab_size=7)) < 7


def test_beam_errors(models):
    _, params = models
    with pytest.raises(ValueError, match="num_beams"):
        jb.beam_search(params, LLAMA, PROMPT, 10, 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        jb.beam_search(params, LLAMA, PROMPT, 40, 2)
