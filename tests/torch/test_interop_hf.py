"""Whole-model parity with Hugging Face transformers on the same random weights."""

import pytest
import torch

from minillm.config import ModelConfig
from minillm.interop import hf
from minillm.torch.model import Transformer

transformers = pytest.importorskip("transformers")

GPT2_SHAPES = [
    dict(vocab_size=97, max_seq_len=32, d_model=48, n_layers=3, n_heads=4, tie_embeddings=True),
    dict(vocab_size=211, max_seq_len=64, d_model=64, n_layers=2, n_heads=8, d_ff=96, tie_embeddings=False),
    dict(vocab_size=50, max_seq_len=40, d_model=96, n_layers=5, n_heads=3, norm_eps=1e-6,
         tie_embeddings=True),
    dict(vocab_size=65, max_seq_len=24, d_model=32, n_layers=1, n_heads=2, mlp="gelu_exact",
         tie_embeddings=False),
]
LLAMA_SHAPES = [
    dict(vocab_size=97, max_seq_len=32, d_model=64, n_layers=3, n_heads=4, n_kv_heads=1, tie_embeddings=True),
    dict(vocab_size=128, max_seq_len=64, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=160,
         rope_theta=500000.0, tie_embeddings=False),
    dict(vocab_size=300, max_seq_len=48, d_model=96, n_layers=5, n_heads=6, n_kv_heads=6, norm_eps=1e-6,
         bias=True, tie_embeddings=False),
]
CONFIGS = [ModelConfig(**s, bias=True) for s in GPT2_SHAPES] + [
    ModelConfig(**s, norm="rmsnorm", positions="rope", mlp="swiglu") for s in LLAMA_SHAPES
]


def _randomised(cfg: ModelConfig) -> Transformer:
    """A model whose every weight (norm gains and biases too) is random, so no mapping hides."""
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        for name, p in model.named_parameters():
            if "norm.weight" in name:  # gains near 1 keep activations O(1), so 1e-5 means something
                p.add_(1.0)
    return model


def _config_id(c: ModelConfig) -> str:
    return f"{c.mlp}-L{c.n_layers}-kv{c.n_kv_heads}-tie{c.tie_embeddings}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
def test_logits_match_transformers(cfg):
    model = _randomised(cfg)
    hf_model = hf.to_transformers(model)
    expected = "GPT2LMHeadModel" if cfg.positions == "learned" else "LlamaForCausalLM"
    assert type(hf_model).__name__ == expected
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.max_seq_len))
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert model.num_parameters() == hf_model.num_parameters()
    if cfg.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mlp}-L{c.n_layers}")
def test_round_trip_is_exact(cfg):
    model = _randomised(cfg)
    cfg2, sd = hf.from_transformers(hf.to_transformers(model))
    assert cfg2 == cfg
    ours = model.state_dict()
    assert set(sd) == set(ours)
    assert all(torch.equal(sd[k], ours[k]) for k in ours)
    back = Transformer(cfg2)
    back.load_state_dict(sd)


def test_unrepresentable_config_is_refused():
    cfg = ModelConfig(positions="sinusoidal")
    with pytest.raises(ValueError, match="only GPT-2 style"):
        hf.to_transformers(Transformer(cfg))


def test_load_pretrained_from_local_directory(tmp_path):
    """Load a saved HF checkpoint from disk (hubs are unreachable; real loading code, local files)."""
    model = _randomised(CONFIGS[4])
    hf.to_transformers(model).save_pretrained(tmp_path, safe_serialization=True)
    loaded = hf.load_pretrained(str(tmp_path))
    tokens = torch.randint(0, CONFIGS[4].vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=1e-6, rtol=0)
