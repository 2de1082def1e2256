"""Muon (minillm.torch.muon): the Newton-Schulz iteration and a full update against float64 formulas
written here, the singular-value band, which parameters Muon takes, and a Muon run that learns and
resumes bitwise after SIGKILL."""

import copy
import json
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from minillm.config import ModelConfig, TrainConfig
from minillm.torch.model import Transformer
from minillm.torch.muon import Muon, MuonWithAdamW, newton_schulz
from minillm.torch.optim import make_optimizer, muon_split
from tests.conftest import kill_at_first_checkpoint, prepare_char_data, train_cmd, train_losses

A, B, C = 3.4445, -4.7750, 2.0315  # the reference's quintic, p(s) = A s + B s^3 + C s^5


def ns_reference(G: np.ndarray) -> np.ndarray:
    """Five Newton-Schulz steps in closed form, float64: each step maps every singular value s of
    G / ||G||_F through p and keeps the singular vectors, so the result is U p^5(S / ||G||_F) V^T."""
    U, S, Vt = np.linalg.svd(G.astype(np.float64), full_matrices=False)
    s = S / (np.linalg.norm(G) + 1e-7)
    for _ in range(5):
        s = A * s + B * s**3 + C * s**5
    return U @ np.diag(s) @ Vt


@pytest.mark.parametrize("shape", [(48, 48), (96, 32), (32, 96), (7, 130)])
def test_newton_schulz_equals_float64_closed_form(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3.0
    G[:, 0] *= 20  # one large direction: the small ones must still be pushed towards 1
    out = newton_schulz(G)
    assert out.dtype == torch.float32 and out.shape == G.shape
    np.testing.assert_allclose(out.double().numpy(), ns_reference(G.numpy()), atol=2e-5, rtol=0)


def test_orthogonalisation_band():
    """Singular values at least 5% of the Frobenius norm end in [0.68, 1.14] (muon.py's band): over
    the whole interval for the scalar map p^5, and for random rectangular matrices, whose singular
    values (Marchenko-Pastur) all lie in that range, however large G's scale."""
    s = np.linspace(0.05, 1.0, 200001)
    for _ in range(5):
        s = A * s + B * s**3 + C * s**5
    assert 0.68 <= s.min() and s.max() <= 1.14
    gen = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(24, 8, generator=gen))
    conditioned = U @ torch.diag(torch.logspace(0, -1, 8)) @ V.T  # singular values 1 ... 0.1
    cases = [torch.randn(64, 256, generator=gen) * 1e-3, torch.randn(256, 64, generator=gen),
             torch.randn(64, 320, generator=gen) * 50.0, conditioned]
    for G in cases:
        sv = torch.linalg.svdvals(G.double())
        assert sv.min() >= 0.05 * torch.linalg.norm(G.double())  # the precondition of the band
        out = torch.linalg.svdvals(newton_schulz(G).double())
        assert 0.68 <= out.min() and out.max() <= 1.14, (G.shape, out.min(), out.max())


def test_muon_steps_equal_float64_formulas():
    """Three Muon steps on a tall, a wide and a gradient-less matrix == momentum, Nesterov, the
    closed-form Newton-Schulz, decoupled weight decay and the sqrt(max(1, m/n)) scale in float64."""
    lr, mu, wd = 0.05, 0.9, 0.3
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(40, 16, generator=gen)),  # tall: scale sqrt(40/16)
              torch.nn.Parameter(torch.randn(16, 40, generator=gen)),  # wide: scale 1
              torch.nn.Parameter(torch.randn(8, 8, generator=gen))]  # no gradient: untouched
    opt = Muon(params[:2], lr=lr, momentum=mu, weight_decay=wd)
    frozen = Muon(params[2:], lr=lr, momentum=mu, weight_decay=wd)
    W = [p.detach().double().numpy().copy() for p in params[:2]]
    buf = [np.zeros_like(w) for w in W]
    untouched = params[2].detach().clone()
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params[:2]]
        for p, g in zip(params[:2], grads):
            p.grad = g.clone()
        opt.step()
        frozen.step()
        for i, g in enumerate(grads):
            g = g.double().numpy()
            buf[i] = mu * buf[i] + (1 - mu) * g
            u = (1 - mu) * g + mu * buf[i]
            m, n = W[i].shape
            W[i] = W[i] * (1 - lr * wd) - lr * np.sqrt(max(1.0, m / n)) * ns_reference(u)
    for p, w in zip(params[:2], W):
        np.testing.assert_allclose(p.detach().double().numpy(), w, atol=1e-5, rtol=0)
    assert torch.equal(params[2].detach(), untouched) and not frozen.state


def test_which_parameters_muon_takes_by_name():
    """Muon: every block's q, k, v, o and MLP gate, up, down matrix; AdamW: the embeddings, the
    untied head (with weight decay), norm gains and biases. Each parameter once; lr scales."""
    cfg = ModelConfig(vocab_size=50, max_seq_len=16, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                      mlp="swiglu", bias=True, tie_embeddings=False)
    model = Transformer(cfg)
    muon, adam = muon_split(model)
    expected = {f"blocks.{i}.{part}.weight" for i in range(2)
                for part in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")}
    assert set(muon) == expected
    assert {"tok_emb.weight", "pos_emb.weight", "lm_head.weight", "norm.weight",
            "blocks.0.attn.q.bias", "blocks.1.mlp_norm.weight"} <= set(adam)
    assert set(adam) == set(dict(model.named_parameters())) - expected
    train = TrainConfig(model=cfg, block_size=16, optimizer="muon", lr=2e-3, min_lr=0.0, muon_lr=0.05,
                        weight_decay=0.1)
    opt, names = make_optimizer(train, model)
    named = dict(model.named_parameters())
    groups = [(g, [n for n in names if any(named[n] is p for p in g["params"])]) for g in opt.param_groups]
    assert sorted(names) == sorted(named) and len(names) == len(set(names))
    in_order = [p for g in opt.param_groups for p in g["params"]]  # the order state_dict numbers them
    assert len(in_order) == len(names) and all(p is named[n] for p, n in zip(in_order, names))
    for group, members in groups:
        if set(members) <= expected:
            assert group["lr_scale"] == pytest.approx(0.05 / 2e-3) and group["momentum"] == 0.95
        else:
            assert group["lr_scale"] == 1.0 and not set(members) & expected
            assert (group["weight_decay"] > 0) == (members == ["lm_head.weight"])


def test_muon_with_adamw_state_round_trip():
    """A fresh MuonWithAdamW loaded from another's state_dict takes the same next step, with the
    learning rate set through its param_groups after loading (as Trainer does every step)."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(6, 10, generator=gen), torch.randn(10, generator=gen)]

    def build():
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = MuonWithAdamW(torch.optim.AdamW([params[1]], lr=1e-2), Muon([params[0]], lr=0.02))
        return params, opt

    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(3)]
    (a, opt_a), (b, opt_b) = build(), build()
    for g in grads[:2]:
        for p, gp in zip(a, g):
            p.grad = gp.clone()
        opt_a.step()
    with torch.no_grad():
        for p, q in zip(b, a):
            p.copy_(q)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert [len(o.state) for o in opt_b.optimizers] == [1, 1]
    for params, opt in ((a, opt_a), (b, opt_b)):
        for group in opt.param_groups:
            group["lr"] = 0.5 * group["lr"]
        for p, gp in zip(params, grads[2]):
            p.grad = gp.clone()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("bad, message", [
    (dict(optimizer="sgd"), "TrainConfig.optimizer must be one of"),
    (dict(optimizer="muon", backend="jax"), "optimizer='muon' needs backend='torch'"),
    (dict(optimizer="muon", muon_momentum=1.0), "muon_momentum must be in [0, 1)"),
    (dict(optimizer="muon", muon_lr=0.0), "muon_lr must be > 0"),
])
def test_bad_settings_are_one_line_errors(bad, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**bad)
    assert message in str(err.value) and "\n" not in str(err.value)


# --- end to end: a Muon run learns and resumes exactly -------------------------------------------
TEXT = "".join(f"{a} sees {b} by the {c}.\n" for a in ("Anne", "Bob", "Cleo") for b in ("sea", "hill", "moon")
               for c in ("gate", "tower", "river", "bridge")) * 3
TOML = """
data_dir = "{data}"
out_dir = "{out}"
optimizer = "muon"
batch_size = 8
block_size = 16
grad_accum = 2
max_steps = 30
lr = 1e-2
warmup_steps = 2
eval_interval = 0
checkpoint_interval = 3
eval_batches = 2
log_interval = 1
seed = 3
threads = 1
dtype = "float32"
[model]
max_seq_len = 16
d_model = 32
n_layers = 1
n_heads = 4
dropout = 0.1
"""


def test_muon_run_learns_and_resumes_bitwise_after_sigkill(tmp_path):
    """30 steps straight == k steps, SIGKILL, --resume, 30 - k steps: same losses, bitwise same weights
    (Muon's momentum buffers and AdamW's moments come back by name). Resuming as AdamW is refused."""
    data = prepare_char_data(tmp_path, TEXT)
    runs = {}
    for name in ("straight", "killed"):
        runs[name] = tmp_path / f"{name}.toml"
        runs[name].write_text(TOML.format(data=data, out=tmp_path / name))
    subprocess.run(train_cmd(runs["straight"]), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(train_cmd(runs["killed"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "trainer_state.json"
    kill_at_first_checkpoint({"run": proc}, {"run": state})
    k = json.loads(state.read_text())["step"]
    assert 0 < k < 30, f"the kill should land mid-run (checkpoint at step {k})"
    saved = load_file(tmp_path / "killed" / "trainer_state.safetensors")
    weights = {k_[len("model."):]: v for k_, v in saved.items() if k_.startswith("model.")}
    muon = {n for n in weights if n.startswith("blocks.") and weights[n].ndim == 2}
    named = {prefix: {k_[len(prefix):] for k_ in saved if k_.startswith(prefix)}
             for prefix in ("muon.momentum.", "adam.exp_avg.", "adam.exp_avg_sq.")}
    assert named["muon.momentum."] == muon
    assert named["adam.exp_avg."] == named["adam.exp_avg_sq."] == set(weights) - muon
    refused = subprocess.run(train_cmd(runs["killed"], "--resume", "--set", 'optimizer="adamw"'),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "optimizer='muon'" in refused.stderr, refused.stderr[-2000:]
    subprocess.run(train_cmd(runs["killed"], "--resume"), check=True, capture_output=True, timeout=300)
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert all(a[s] == b[s] for s in a), "loss sequences differ"
    assert np.mean([a[s] for s in range(26, 31)]) < np.mean([a[s] for s in range(1, 6)]) - 0.5  # it learns
    wa, wb = (load_file(tmp_path / name / "model.safetensors") for name in ("straight", "killed"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[n], wb[n]) for n in wa)
