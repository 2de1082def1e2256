"""LoRA (minillm.torch.lora) against the paper's formula in float64 and against the base model."""

import json

import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from minillm.checkpoint import CheckpointError
from minillm.torch import lora
from minillm.torch.model import next_token_loss
from tests.conftest import make_model

TOKENS = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))


def _randomise_adapter(model, seed: int, name: str | None = None) -> None:
    """Non-zero A and B (B starts at zero, which would hide every mistake in B's handling)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora.adapter_state_dict(model, name).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)  # moves logits by O(1)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def test_lora_linear_equals_the_float64_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = lora.LoRALinear(base)
    layer.add("default", lora.LoRAConfig(rank=3, alpha=5.0))
    layer.active = "default"
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (3, 12), (7, 3)
    with torch.no_grad():
        B.copy_(torch.randn(7, 3))
    x = torch.randn(4, 5, 12)
    W, b, X = base.weight.double(), base.bias.double(), x.double()
    expected = X @ W.T + b + (5.0 / 3) * (X @ A.double().T) @ B.double().T  # x Wᵀ + b + s (x Aᵀ) Bᵀ
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=0)
    assert layer.weight is base.weight and layer.bias is base.bias  # the base's own parameters


def test_a_is_kaiming_uniform_and_b_is_zero():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(400, 300))
    layer.add("default", lora.LoRAConfig(rank=64))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    bound = 1 / 400 ** 0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert A.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.02)
    assert torch.count_nonzero(B) == 0


@pytest.mark.parametrize("style, n_layers", [("llama-gqa", 14), ("gpt2", 12)])
def test_step_zero_equals_the_base_model(style, n_layers):
    model = make_model(style)
    before = _logits(model)
    keys = set(model.state_dict())
    assert lora.add_lora(model) == n_layers  # 7 (or 6 without SwiGLU's gate) per block, 2 blocks
    assert torch.equal(_logits(model), before)
    assert keys <= set(model.state_dict())  # canonical names kept: blocks.0.attn.q.weight ...
    assert "blocks.0.attn.q.lora_A.default.weight" in model.state_dict()


def test_one_step_trains_only_the_adapter():
    model = make_model("llama-gqa").train()
    lora.add_lora(model, rank=4, alpha=8)
    trainable = lora.freeze_base(model)
    D, kv, F = 32, 16, model.config.d_ff  # d_model, n_kv_heads * head_dim, d_ff
    per_block = 4 * ((D + D) + 2 * (D + kv) + (D + D) + 3 * (D + F))  # r (in + out): q, k, v, o, mlp
    assert trainable == 2 * per_block
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    next_token_loss(model(TOKENS[:, :-1]), TOKENS[:, 1:]).backward()
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif ".lora_A." in n:  # dL/dA = s Bᵀ (...) is exactly zero while B = 0
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, n
        else:
            assert p.grad is None, n
    opt.step()
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base weight {n} changed"
        else:
            assert torch.equal(p, adapter[n]) == (".lora_A." in n), n  # B moved, A not yet
    opt.zero_grad()
    next_token_loss(model(TOKENS[:, :-1]), TOKENS[:, 1:]).backward()  # now B != 0: A learns too
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_A." in n)


def test_trainable_summary_counts_optimizer_memory():
    model = make_model("gpt2")
    n_base = sum(p.numel() for p in model.parameters())
    lora.add_lora(model, rank=2, targets=("q", "v"))
    trainable = lora.freeze_base(model)
    assert trainable == 2 * 2 * 2 * (32 + 32)  # 2 blocks x 2 layers x r (in + out)
    summary = lora.trainable_summary(model)
    assert summary["base"] == n_base and summary["total"] == n_base + trainable
    assert summary["adamw_bytes_saved"] == 2 * 4 * (n_base - trainable)  # 2 fp32 values per parameter
    assert summary["grad_bytes_saved"] == 4 * (n_base - trainable)


@pytest.mark.parametrize("style", ["llama-gqa", "gpt2"])
def test_merge_matches_and_unmerge_restores_exactly(style):
    model = make_model(style)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_lora(model, rank=4, alpha=8)
    _randomise_adapter(model, seed=1)
    adapted = _logits(model)
    assert (adapted - _logits(make_model(style))).abs().max() > 0.1  # the adapter matters
    assert lora.merge(model) == len(lora.lora_layers(model))
    assert not torch.equal(model.blocks[0].attn.q.weight, original["blocks.0.attn.q.weight"])
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=0)
    assert lora.merge(model) == 0  # merging twice is a no-op, not a double update
    assert lora.unmerge(model) == len(lora.lora_layers(model))
    for k, v in original.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(_logits(model), adapted)


def test_strip_lora_gives_plain_linears():
    model = make_model("llama-gqa")
    lora.add_lora(model, rank=4)
    _randomise_adapter(model, seed=2)
    adapted = _logits(model)
    assert lora.strip_lora(model) == 14
    assert not lora.lora_layers(model) and type(model.blocks[1].mlp.gate) is nn.Linear
    assert set(model.state_dict()) == set(make_model("llama-gqa").state_dict())
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=0)
    base = make_model("llama-gqa")
    lora.add_lora(base)
    _randomise_adapter(base, seed=2)
    lora.strip_lora(base, merge_active=False)
    assert torch.equal(_logits(base), _logits(make_model("llama-gqa")))


def test_two_adapters_switch():
    model = make_model("llama-gqa")
    base = _logits(model)
    lora.add_lora(model, rank=4, targets=("q", "v"), name="a")
    _randomise_adapter(model, seed=3, name="a")
    lora.add_lora(model, rank=2, targets=("down",), name="b")
    _randomise_adapter(model, seed=4, name="b")
    # references: a fresh base with only one of the two adapters
    only = {}
    for name, rank, targets, seed in (("a", 4, ("q", "v"), 3), ("b", 2, ("down",), 4)):
        ref = make_model("llama-gqa")
        lora.add_lora(ref, rank=rank, targets=targets)
        _randomise_adapter(ref, seed=seed)
        only[name] = _logits(ref)
    assert lora.active_adapter(model) == "b"  # add_lora activates the new adapter
    assert torch.equal(_logits(model), only["b"])
    lora.set_adapter(model, "a")
    assert torch.equal(_logits(model), only["a"])
    lora.set_adapter(model, None)
    assert torch.equal(_logits(model), base)
    lora.set_adapter(model, "b")
    assert torch.equal(_logits(model), only["b"])
    with pytest.raises(ValueError, match="no LoRA adapter named 'c'"):
        lora.set_adapter(model, "c")
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'a'"):
        lora.add_lora(model, name="a")
    lora.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        lora.set_adapter(model, "a")


def test_bad_arguments():
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="'qkv'"):
        lora.add_lora(model, targets=("q", "qkv"))
    with pytest.raises(ValueError, match="no layer of this model matches"):
        lora.add_lora(model, targets=("gate",))  # GPT-2's MLP has no gate
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        lora.add_lora(model, rank=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        lora.add_lora(model, dropout=1.5)
    assert not lora.lora_layers(model)  # nothing was swapped by the failed calls


def test_save_load_round_trip(tmp_path):
    model = make_model("llama-gqa")
    lora.add_lora(model, rank=3, alpha=6, dropout=0.1, targets=("k", "o", "up"))
    _randomise_adapter(model, seed=5)
    adapted = _logits(model.eval())
    lora.save_adapter(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert config == dict(format="minillm-lora", version=1, rank=3, alpha=6, dropout=0.1,
                          targets=["k", "o", "up"])
    tensors = load_file(tmp_path / "ad" / "adapter.safetensors")
    assert len(tensors) == 2 * 3 * 2  # A and B, 3 layers, 2 blocks
    assert tensors["blocks.0.attn.k.lora_A.weight"].shape == (3, 32)  # (r, in)
    assert tensors["blocks.1.mlp.up.lora_B.weight"].shape == (model.config.d_ff, 3)  # (out, r)
    fresh = make_model("llama-gqa")
    config = lora.load_adapter(fresh, tmp_path / "ad", name="mine")
    assert config == lora.LoRAConfig(3, 6, 0.1, ("k", "o", "up"))
    assert lora.active_adapter(fresh) == "mine"
    assert torch.equal(_logits(fresh.eval()), adapted)


def _saved(tmp_path, **adapter):
    model = make_model("llama-gqa")
    lora.add_lora(model, **{"rank": 2, "targets": ("q", "v"), **adapter})
    lora.save_adapter(model, tmp_path)
    return tmp_path / "adapter.json", tmp_path / "adapter.safetensors"


def _edit_json(path, **fields):
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("damage, message", [
    (lambda cfg, st: cfg.unlink(), r"adapter.json not found"),
    (lambda cfg, st: cfg.write_text("{"), r"adapter.json is not valid JSON"),
    (lambda cfg, st: _edit_json(cfg, format="other"), r"adapter.json: not a minillm-lora version 1"),
    (lambda cfg, st: _edit_json(cfg, rank=-1), r"adapter.json: rank must be a positive integer, got -1"),
    (lambda cfg, st: _edit_json(cfg, targets=["q", "w"]), r"adapter.json: targets \['q', 'w'\] must"),
    (lambda cfg, st: _edit_json(cfg, targets="q"), r"adapter.json: targets must be a list"),
    (lambda cfg, st: _edit_json(cfg, rank=3), r"adapter.safetensors: tensor 'blocks.0.attn.q.lora_A.weight' "
                                              r"has shape \[2, 32\], the model needs \[3, 32\]"),
    (lambda cfg, st: _edit_json(cfg, targets=["q", "v", "k"]),
     r"adapter.safetensors: missing tensor 'blocks.0.attn.k.lora_A.weight'"),
    (lambda cfg, st: _edit_json(cfg, targets=["q"]),
     r"adapter.safetensors: unexpected tensor 'blocks.0.attn.v.lora_A.weight'"),
    (lambda cfg, st: st.write_bytes(st.read_bytes()[:-10]), r"adapter.safetensors is not a readable"),
])
def test_bad_adapter_files_give_one_line_errors(tmp_path, damage, message):
    cfg, st = _saved(tmp_path)
    damage(cfg, st)
    model = make_model("llama-gqa")
    with pytest.raises(CheckpointError, match=message) as err:
        lora.load_adapter(model, tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    assert not lora.lora_layers(model)  # a failed load leaves the model untouched


def test_adapter_for_another_architecture_is_refused(tmp_path):
    _saved(tmp_path)
    wider = make_model("llama-gqa", d_model=64)
    with pytest.raises(CheckpointError, match=r"'blocks.0.attn.q.lora_A.weight' has shape \[2, 32\], "
                                              r"the model needs \[2, 64\]"):
        lora.load_adapter(wider, tmp_path)
