"""Linear attention (Katharopoulos et al. 2020, phi = elu + 1): the parallel form against a float64
loop over the paper's formula, the recurrent (constant-state) decoding against the parallel form,
and the model with attention="linear" decoding through its recurrent state."""

import pytest
import torch

from minillm.config import ModelConfig
from minillm.torch import linear_attention as la
from minillm.torch.generate import generate
from minillm.torch.kv_cache import EagerBatchCache, make_model_caches
from tests.conftest import make_model, random_prompt


def formula(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """y_i = sum_{j<=i} phi(q_i)·phi(k_j) v_j / sum_{j<=i} phi(q_i)·phi(k_j), one (b, h, i) at a time,
    with phi(x) = x + 1 for x > 0 and exp(x) otherwise (elu(x) + 1 written out). float64."""
    phi = lambda x: torch.where(x > 0, x + 1, torch.exp(x))  # noqa: E731
    y = torch.zeros_like(q)
    B, H, T, _ = q.shape
    for b in range(B):
        for h in range(H):
            for i in range(T):
                sims = [float(phi(q[b, h, i]) @ phi(k[b, h, j])) for j in range(i + 1)]
                y[b, h, i] = sum(s * v[b, h, j] for j, s in enumerate(sims)) / sum(sims)
    return y


def test_parallel_form_equals_the_formula_in_float64():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 4, dtype=torch.float64) for _ in range(3))
    expected = formula(q, k, v)
    y, S, z = la.parallel_form(q, k, v)
    assert (y - expected).abs().max().item() < 1e-12
    # the float32 path the model takes, with 3 query heads sharing one K/V head (GQA)
    y32 = la.linear_attention(q.float(), k[:, :1].float(), v[:, :1].float())
    assert (y32.double() - formula(q, k[:, :1].expand_as(k), v[:, :1].expand_as(v))).abs().max().item() < 1e-5


def test_recurrent_decoding_equals_the_parallel_form():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 12, 4, dtype=torch.float64) for _ in range(3))
    parallel, S_end, z_end = la.parallel_form(q, k, v)
    S, z = torch.zeros(2, 3, 4, 4, dtype=torch.float64), torch.zeros(2, 3, 4, dtype=torch.float64)
    steps = []
    for t in range(12):  # one token at a time, the state never grows
        y, S, z = la.recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], S, z)
        steps.append(y)
    assert (torch.stack(steps, 2) - parallel).abs().max().item() < 1e-12
    assert (S - S_end).abs().max().item() < 1e-12 and (z - z_end).abs().max().item() < 1e-12
    # a prefix in parallel, then the rest from its state
    head, S5, z5 = la.parallel_form(q[:, :, :5], k[:, :, :5], v[:, :, :5])
    tail, _, _ = la.parallel_form(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], S5, z5)
    assert (torch.cat((head, tail), 2) - parallel).abs().max().item() < 1e-12


@pytest.mark.parametrize("style", ["llama-gqa", "gpt2"])
def test_model_decoding_with_the_state_equals_the_full_forward(style):
    model = make_model(style, attention="linear", positions="none" if style == "gpt2" else "rope")
    x = torch.tensor([random_prompt(40, seed=1), random_prompt(40, seed=2)])
    with torch.no_grad():
        full = model(x)
        states = make_model_caches(model.config, 2, 48)
        assert all(isinstance(s, la.LinearAttentionState) for s in states)
        steps = [model(x[:, :7], torch.arange(7), kv_caches=states)]
        steps += [model(x[:, t:t + 1], torch.arange(t, t + 1), kv_caches=states) for t in range(7, 40)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


def test_decode_state_is_constant_size():
    model = make_model("gpt2", attention="linear", positions="none", max_seq_len=512)
    cache = EagerBatchCache(model, 512, 61)
    sizes = []
    with torch.no_grad():
        cache.prefill([random_prompt(5)])
        for t in range(100):
            cache.decode(torch.tensor([t % 61]))
            sizes.append(sum(s.S.nbytes + s.z.nbytes for s in cache.rows[0]))
    c = model.config
    assert set(sizes) == {c.n_layers * c.n_heads * (c.head_dim ** 2 + c.head_dim) * 4}  # S and z, float32


def test_generate_runs_on_the_eager_path_and_is_deterministic():
    model = make_model("gpt2", attention="linear", positions="none")
    prompts = [random_prompt(5, seed=3), random_prompt(9, seed=4)]
    batch = generate(model, prompts, 12, temperature=0)
    assert batch == [generate(model, p, 12, temperature=0) for p in prompts]  # each row as if alone
    with torch.no_grad():  # greedy by the full forward, token by token
        ids = list(prompts[0])
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert batch[0] == ids[5:]


def test_config_names_the_field():
    with pytest.raises(ValueError, match="ModelConfig.attention must be one of"):
        ModelConfig(attention="performer")
    assert ModelConfig(attention="linear").to_dict()["attention"] == "linear"
    assert "attention" not in ModelConfig().to_dict()
