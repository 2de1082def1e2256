"""FSDP (minillm.torch.parallel) through torchrun: 2 gloo ranks with sharded parameters, gradients and
AdamW state take the same steps as one process on the same global batch; clear errors for what it
does not support (sharded checkpoints: tests/torch/test_sharded_checkpoint.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from minillm.config import ModelConfig, TrainConfig, load_train_config
from minillm.torch import train as torch_train
from minillm.torch.model import Transformer, next_token_loss
from minillm.torch.parallel import checkpoint_activations
from tests.conftest import prepare_char_data, train_cmd, train_losses

TEXT = "".join(f"{who}: the {what} of {where} doth {verb}.\n"
               for who in ("ROMEO", "JULIET", "LEAR") for what in ("crown", "night", "word")
               for where in ("Verona", "Denmark") for verb in ("bear", "speak", "keep"))

TOML = """
data_dir = "{data}"
out_dir = "{out}"
batch_size = 8
block_size = 16
grad_accum = 2
max_steps = 50
lr = 3e-3
min_lr = 3e-4
warmup_steps = 5
eval_interval = 25
checkpoint_interval = 10
eval_batches = 2
log_interval = 1
seed = 3
dtype = "float32"
[model]
max_seq_len = 16
d_model = 32
n_layers = 2
n_heads = 4
dropout = 0.0
"""


def torchrun(config, *extra: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "minillm.cli", "train", "--config", str(config), "--quiet", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the two ranks share the machine's cores


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_char_data(tmp_path_factory.mktemp("data"), TEXT)


def _config(tmp_path, data, out: str):
    p = tmp_path / f"{out}.toml"
    p.write_text(TOML.format(data=data, out=tmp_path / out))
    return p


def test_fsdp_two_ranks_match_one_process_for_50_steps(tmp_path, data_dir):
    """Same global batch, same init: the loss sequence and the final weights agree to fp32 reduction
    order. The FSDP run also checkpoints activations and shards its checkpoints on the way (every 10
    steps and at the evals), which must not change a single step."""
    subprocess.run(train_cmd(_config(tmp_path, data_dir, "single")), check=True, capture_output=True, env=ENV)
    res = subprocess.run(torchrun(_config(tmp_path, data_dir, "fsdp"), "--set", 'parallel="fsdp"',
                                  "--set", "activation_checkpointing=true"),
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = train_losses(tmp_path / "single"), train_losses(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == list(range(1, 51))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst < 2e-5, (worst, a, b)
    assert a[50] < a[1] - 0.5  # it trained: the comparison is not between two flat lines
    # model.safetensors of the FSDP run is consolidated from its shards, under the canonical names
    wa, wb = (load_file(tmp_path / run / "model.safetensors") for run in ("single", "fsdp"))
    assert sorted(wa) == sorted(wb)
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], atol=2e-5, err_msg=name)
    assert (tmp_path / "fsdp" / "sharded" / "latest").read_text() == "step-000050"
    assert not (tmp_path / "fsdp" / "trainer_state.safetensors").exists()  # the resume point is sharded


def test_parallel_must_be_ddp_or_fsdp():
    expected = r"TrainConfig.parallel must be one of \('ddp', 'fsdp'\), got 'zero3'"
    with pytest.raises(ValueError, match=expected):
        TrainConfig(parallel="zero3")


@pytest.mark.parametrize("override, named", [('optimizer="muon"', "optimizer='muon'"),
                                             ("compile=true", "compile=True")])
def test_fsdp_refuses_what_it_does_not_support(tmp_path, data_dir, monkeypatch, override, named):
    """Muon orthogonalises whole matrices (a shard is not one) and compile is untested with FSDP:
    a clear error before any process group is needed."""
    cfg = load_train_config(_config(tmp_path, data_dir, "run"), ['parallel="fsdp"', override])
    monkeypatch.setattr(torch_train, "setup_distributed", lambda: (0, 2))  # imported into train
    with pytest.raises(ValueError, match=f"parallel='fsdp' supports pretraining.*{named}.*parallel='ddp'"):
        torch_train.Trainer(cfg, quiet=True)


def test_activation_checkpointing_keeps_names_and_gradients():
    """Recomputing each block in backward gives the same gradients (the same maths, run twice) and
    keeps the canonical parameter names (no wrapper module in the path)."""
    cfg = ModelConfig(vocab_size=40, max_seq_len=16, d_model=32, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    plain, recomputed = Transformer(cfg), Transformer(cfg)
    recomputed.load_state_dict(plain.state_dict())
    for block in recomputed.blocks:
        checkpoint_activations(block)
    assert list(recomputed.state_dict()) == list(plain.state_dict())
    calls = {}
    for name, model in (("plain", plain), ("recomputed", recomputed)):
        calls[name] = 0
        count = lambda *_, name=name: calls.update({name: calls[name] + 1})  # noqa: E731
        model.blocks[0].mlp.register_forward_pre_hook(count)
    x, y = torch.randint(0, 40, (3, 16)), torch.randint(0, 40, (3, 16))
    for model in (plain, recomputed):
        next_token_loss(model(x), y).backward()
    assert calls == {"plain": 1, "recomputed": 2}  # the block ran again in backward
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
