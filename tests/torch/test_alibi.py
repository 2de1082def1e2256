"""ALiBi (Press et al. 2022): the head slopes (the paper's values), the bias matrix and attention
with it against float64 references, cached decoding, and length extrapolation: a model trained at
length T runs at 2T with a finite loss, where learned positions cannot run at all."""

import dataclasses
import math

import pytest
import torch

from minillm.config import ModelConfig
from minillm.torch.alibi import alibi_slopes
from minillm.torch.kv_cache import BatchCache, EagerBatchCache, make_model_caches
from minillm.torch.layers import attention_math, sdpa
from minillm.torch.masks import attention_mask
from minillm.torch.model import Transformer, next_token_loss
from minillm.torch.packed import packed_copy, packed_supports
from tests.conftest import make_model, random_prompt
from tests.torch.conftest import CORPUS

CPU = torch.device("cpu")


def test_slopes_are_the_papers():
    assert alibi_slopes(8).tolist() == [1 / 2 ** h for h in range(1, 9)]  # 2^(-8h/8)
    assert alibi_slopes(4).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256]  # 2^(-8h/4)
    # H = 6: the 4 slopes of H = 4, then every other slope of H = 8 (1/2, 1/8)
    assert alibi_slopes(6).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]


def test_bias_matrix_equals_a_float64_reference():
    H, T = 6, 7
    bias = attention_mask(ModelConfig(positions="alibi", n_heads=H, d_model=48), T, None, None, None, CPU)
    m = [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]
    expected = torch.tensor([[[-m[h] * (i - j) if j <= i else -math.inf for j in range(T)] for i in range(T)]
                             for h in range(H)], dtype=torch.float64)[None]  # (1, H, T, T)
    assert bias.shape == (1, H, T, T)
    assert torch.equal(torch.isinf(bias), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    assert (bias.double()[finite] - expected[finite]).abs().max().item() < 1e-7


def test_attention_with_alibi_equals_a_float64_loop():
    torch.manual_seed(0)
    H, T, hd = 4, 9, 8
    q, k, v = (torch.randn(2, H, T, hd, dtype=torch.float64) for _ in range(3))
    bias = attention_mask(ModelConfig(positions="alibi", n_heads=H, d_model=H * hd), T, None, None, None, CPU)
    expected = torch.zeros_like(q)
    for h in range(H):
        m = 2.0 ** (-8 * (h + 1) / H)
        for i in range(T):
            scores = torch.stack([(q[:, h, i] * k[:, h, j]).sum(-1) for j in range(i + 1)], -1)  # (2, i+1)
            scores = scores / math.sqrt(hd) - m * (i - torch.arange(i + 1, dtype=torch.float64))  # (2, i+1)
            weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
            expected[:, h, i] = (weights[..., None] * v[:, h, : i + 1]).sum(-2)
    fused = sdpa(q.float(), k.float(), v.float(), bias, 0.0, False)
    plain, _ = attention_math(q.float(), k.float(), v.float(), bias)
    assert (fused.double() - expected).abs().max().item() < 1e-5
    assert (plain.double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("window", [None, 5])
def test_cached_decoding_equals_the_full_forward(window):
    model = make_model("gpt2", positions="alibi", n_kv_heads=2, attention_window=window)
    x = torch.tensor([random_prompt(30)] * 2)
    with torch.no_grad():
        full = model(x)
        caches = make_model_caches(model.config, 2, 48)
        steps = [model(x[:, :12], torch.arange(12), kv_caches=caches)]
        steps += [model(x[:, t:t + 1], torch.arange(t, t + 1), kv_caches=caches) for t in range(12, 30)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
    assert "pos_emb.weight" not in model.state_dict()  # no position parameters at all


def _train(config: ModelConfig, data: torch.Tensor, T: int, steps: int = 60) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (8,), generator=g)
        x = torch.stack([data[s:s + T + 1] for s in starts])
        loss = next_token_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_length_extrapolation_a_model_trained_at_t_runs_at_2t():
    chars = sorted(set(CORPUS))
    data = torch.tensor([chars.index(c) for c in CORPUS])
    T = 32
    shape = dict(vocab_size=len(chars), max_seq_len=T, d_model=32, n_layers=2, n_heads=4)
    alibi = _train(ModelConfig(**shape, positions="alibi"), data, T)
    x = data[: 4 * T + 1].view(1, -1)
    with torch.no_grad():
        at_t = next_token_loss(alibi(x[:, :T]), x[:, 1:T + 1]).item()
        at_2t = next_token_loss(alibi(x[:, :2 * T]), x[:, 1:2 * T + 1]).item()
    assert math.isfinite(at_2t) and at_2t < 0.5 * math.log(len(chars))  # far better than uniform
    assert at_2t < at_t + 0.5  # the second T tokens are predicted about as well as the first
    learned = Transformer(ModelConfig(**shape))  # learned positions have no row for position T
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        learned(x[:, :2 * T])



@pytest.mark.parametrize("positions", ["alibi", "rope", "sinusoidal"])
def test_a_longer_max_seq_len_changes_nothing_within_the_trained_one(positions):
    """How benchmarks/alibi_extrapolation.py evaluates past max_seq_len T: the weights loaded into the
    config with max_seq_len 4T. For ALiBi max_seq_len holds nothing (the same logits at any length);
    RoPE's and the sinusoids' longer tables agree with the trained ones on positions < T."""
    model = make_model("gpt2", positions=positions, max_seq_len=16)
    longer = Transformer(dataclasses.replace(model.config, max_seq_len=64)).eval()
    longer.load_state_dict(model.state_dict())
    x = torch.tensor([random_prompt(32)])
    with torch.no_grad():
        assert torch.equal(longer(x[:, :16]), model(x[:, :16]))
        if positions == "alibi":  # past T too: the bias is a function of the distance alone
            assert torch.equal(longer(x), model(x))

@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_the_packed_decoder_equals_the_model(n_kv_heads):
    """The fast decoder's ALiBi (distances in cache slots, left-padded rows, prompt in chunks, query
    heads folded per K/V head) against the model itself (EagerBatchCache: one row at a time)."""
    model = make_model("gpt2", positions="alibi", n_kv_heads=n_kv_heads)
    assert packed_supports(model.config)
    prompts = [random_prompt(9, seed=1), random_prompt(4, seed=2)]
    packed, eager = BatchCache(packed_copy(model), 40, 61), EagerBatchCache(model, 40, 61)
    with torch.no_grad():
        assert (packed.prefill(prompts, chunk_size=3) - eager.prefill(prompts)).abs().max().item() < 1e-5
        for t in range(20):
            tokens = torch.tensor([t, t + 1])
            assert (packed.decode(tokens) - eager.decode(tokens)).abs().max().item() < 1e-5
