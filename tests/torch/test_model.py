"""The whole model: canonical names, causality, tied weights, parameter/FLOP counts, gradients."""

import pytest
import torch

from minillm.config import ModelConfig
from minillm.torch.model import Transformer, next_token_loss

GPT = dict(vocab_size=61, max_seq_len=24, d_model=32, n_layers=3, n_heads=4, bias=True)
LLAMA = dict(vocab_size=61, max_seq_len=24, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
             norm="rmsnorm", positions="rope", mlp="swiglu")
SINUS = dict(GPT, positions="sinusoidal", bias=False, n_kv_heads=1)
STYLES = {"gpt2": GPT, "llama": LLAMA, "sinusoidal": SINUS}


def _canonical_names(cfg: ModelConfig) -> set[str]:
    names = {"tok_emb.weight", "norm.weight"}
    if cfg.positions == "learned":
        names.add("pos_emb.weight")
    if not cfg.tie_embeddings:
        names.add("lm_head.weight")
    if cfg.norm == "layernorm" and cfg.bias:
        names.add("norm.bias")
    for i in range(cfg.n_layers):
        parts = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]
        parts += ["mlp.gate"] if cfg.mlp == "swiglu" else []
        for p in parts:
            names.add(f"blocks.{i}.{p}.weight")
            if cfg.bias:
                names.add(f"blocks.{i}.{p}.bias")
        for n in ("attn_norm", "mlp_norm"):
            names.add(f"blocks.{i}.{n}.weight")
            if cfg.norm == "layernorm" and cfg.bias:
                names.add(f"blocks.{i}.{n}.bias")
    return names


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("tie", [True, False])
def test_state_dict_keys_are_canonical_and_load_back(style, tie):
    cfg = ModelConfig(**STYLES[style], tie_embeddings=tie)
    model = Transformer(cfg)
    sd = model.state_dict()
    assert set(sd) == _canonical_names(cfg)
    other = Transformer(cfg)
    other.load_state_dict(sd)  # strict: the tied head is filled from tok_emb
    x = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(model(x), other(x), atol=0, rtol=0)
    if tie:
        assert model.lm_head.weight is model.tok_emb.weight
        assert other.lm_head.weight is other.tok_emb.weight


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("sdpa", [True, False])
def test_causality(style, sdpa):
    """Changing tokens after position t never changes logits at positions <= t."""
    torch.manual_seed(1)
    model = Transformer(ModelConfig(**STYLES[style])).eval()
    for b in model.blocks:
        b.attn.use_sdpa = sdpa
    x = torch.randint(0, 61, (1, 16))
    base = model(x)
    for t in (0, 5, 14):
        y = x.clone()
        y[0, t + 1:] = torch.randint(0, 61, (16 - t - 1,))
        torch.testing.assert_close(model(y)[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(model(y)[:, t + 1:], base[:, t + 1:])


def test_too_long_sequence_names_the_limit():
    model = Transformer(ModelConfig(**GPT))
    with pytest.raises(ValueError, match="max_seq_len 24"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_parameter_count_and_flops():
    cfg = ModelConfig.preset("gpt2-small")
    model = Transformer(cfg)
    assert model.num_parameters() == 124_439_808  # GPT-2 small as released (tied head)
    n_matmul = 124_439_808 - 1024 * 768  # minus position table; the tied table does the head matmul
    assert model.flops_per_token(1024) == 6 * n_matmul + 12 * 12 * 768 * 1024
    untied = Transformer(ModelConfig(**GPT, tie_embeddings=False))
    tied = Transformer(ModelConfig(**GPT, tie_embeddings=True))
    assert untied.num_parameters() - tied.num_parameters() == 61 * 32


def test_init_scales_residual_projections():
    cfg = ModelConfig(vocab_size=64, d_model=256, n_layers=8, n_heads=4, d_ff=1024)
    model = Transformer(cfg)

    def std(t):
        return t.float().std().item()

    assert abs(std(model.blocks[0].attn.q.weight) - 0.02) < 0.002
    assert abs(std(model.blocks[0].attn.o.weight) - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert abs(std(model.blocks[0].mlp.down.weight) - 0.02 / 4) < 0.001


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_overfits_one_batch(style):
    """Gradients reach every parameter: a tiny model memorises a fixed batch."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**STYLES[style]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = torch.randint(0, 61, (4, 17))
    x, y = data[:, :-1], data[:, 1:]
    loss0 = next_token_loss(model(x), y)
    assert abs(loss0.item() - torch.log(torch.tensor(61.0)).item()) < 0.2
    loss0.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    for _ in range(300):
        opt.zero_grad()
        loss = next_token_loss(model(x), y)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.1


def test_loss_ignores_masked_targets():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, -100], [0, -100, 4]])
    keep = targets != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(next_token_loss(logits, targets), ref)
