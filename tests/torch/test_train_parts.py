"""Training parts that need no data: schedule endpoints, decay groups, gradient accumulation."""

import math

import pytest
import torch
import torch.nn.functional as F

from minillm.config import ModelConfig, TrainConfig
from minillm.schedule import lr_at
from minillm.torch import train as torch_train
from minillm.torch.layers import sdpa
from minillm.torch.model import Transformer, next_token_loss
from minillm.torch.optim import decay_split, make_optimizer


def _cfg(**kw):
    return TrainConfig(**{**dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100), **kw})


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_schedule_endpoints(schedule):
    cfg = _cfg(schedule=schedule)
    assert 0 < lr_at(0, cfg) < cfg.lr  # warmup begins above zero
    assert lr_at(10, cfg) == pytest.approx(cfg.lr)  # peak exactly at the end of warmup
    assert all(lr_at(s, cfg) < lr_at(s + 1, cfg) for s in range(10))  # warmup rises
    end = cfg.lr if schedule == "constant" else cfg.min_lr
    assert lr_at(100, cfg) == pytest.approx(end)  # floor at the end
    assert all(cfg.min_lr - 1e-12 <= lr_at(s, cfg) <= cfg.lr + 1e-12 for s in range(10, 101))


def test_cosine_midpoint_and_wsd_plateau():
    cfg = _cfg()
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # halfway through the cosine
    wsd = _cfg(schedule="wsd", decay_frac=0.2)
    assert lr_at(79, wsd) == pytest.approx(1e-3) and lr_at(90, wsd) == pytest.approx(5.5e-4)


def test_weight_decay_groups_and_tied_embedding_once():
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, bias=True,
                                    tie_embeddings=True))
    decay, no_decay = decay_split(model)
    assert "tok_emb.weight" in no_decay and "pos_emb.weight" in no_decay
    assert all(n.endswith(".weight") and "norm" not in n for n in decay)
    assert all(n.endswith(".bias") or "norm" in n or "emb" in n for n in no_decay)
    opt, names = make_optimizer(_cfg(weight_decay=0.1), model)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(names)
    assert sum(p is model.tok_emb.weight for p in params) == 1  # the tied table, once
    assert sum(p.numel() for p in params) == model.num_parameters()
    untied = Transformer(ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, tie_embeddings=False))
    assert "lm_head.weight" in decay_split(untied)[0]


def test_gradient_accumulation_equals_full_batch():
    """Batch B in one step == B/k in k micro-steps with the loss divided by k."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, max_seq_len=16, d_model=32, n_heads=4, n_layers=2)
    model = Transformer(cfg)
    data = torch.randint(0, 40, (8, 17))
    x, y = data[:, :-1], data[:, 1:]
    next_token_loss(model(x), y).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    k = 4
    for i in range(k):
        (next_token_loss(model(x[i * 2:(i + 1) * 2]), y[i * 2:(i + 1) * 2]) / k).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[n], atol=1e-6, rtol=1e-5)


def test_bad_train_config_names_field():
    with pytest.raises(ValueError, match="grad_accum"):
        _cfg(batch_size=10, grad_accum=3)
    with pytest.raises(ValueError, match="block_size"):
        _cfg(block_size=1000)
    with pytest.raises(ValueError, match="schedule"):
        _cfg(schedule="linear")
    assert math.isfinite(lr_at(0, _cfg(warmup_steps=0)))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_dtype_on_cpu_is_bf16_only_with_native_bf16(monkeypatch, native_bf16):
    monkeypatch.setattr(torch_train, "cpu_has_native_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    assert torch_train.resolve_dtype(cpu, "auto") == (torch.bfloat16 if native_bf16 else torch.float32)
    assert torch_train.resolve_dtype(cpu, "float32") == torch.float32  # an explicit choice wins


def test_attention_runs_in_fp32_under_cpu_autocast():
    """bf16 autocast would run SDPA in bf16 (slow backward on CPU); ours keeps it fp32, so output
    and gradients equal the fp32 kernel's exactly."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sdpa(q, k, v, None, 0.0, True)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    grads = [t.grad for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    ref.square().sum().backward()
    assert torch.equal(y, ref) and all(torch.equal(g, t.grad) for g, t in zip(grads, (q2, k2, v2)))
