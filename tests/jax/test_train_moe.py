"""The JAX trainer logs a mixture of experts' expert usage as the PyTorch trainer does: the same keys
in every train row, and on the same weights and batch the same numbers. Both frameworks resume one
PyTorch run (the trainer states share one format), so the steps after it start from equal weights
and read the same batches; the rows they log must then agree."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

from minillm.config import ModelConfig, TrainConfig  # noqa: E402
from minillm.jax.train import Trainer as JaxTrainer  # noqa: E402
from minillm.torch.train import Trainer as TorchTrainer  # noqa: E402
from minillm.train_loop import train  # noqa: E402
from tests.conftest import prepare_char_data  # noqa: E402

MOE = ModelConfig(vocab_size=65, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                  norm="rmsnorm", positions="rope", mlp="swiglu", tie_embeddings=False, n_experts=4,
                  experts_per_token=2)


def _config(data, out, max_steps: int) -> TrainConfig:
    # grad_accum 2: the usage is the last micro-batch's in both; log_interval 2: rows at even steps only
    return TrainConfig(data_dir=str(data), out_dir=str(out), model=MOE, batch_size=8, block_size=32,
                       grad_accum=2, max_steps=max_steps, lr=3e-2, warmup_steps=1, eval_interval=0,
                       eval_batches=1, log_interval=2, dtype="float32", threads=1, seed=4)


def _train_rows(run) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("train_loss") is not None}


def test_jax_rows_carry_torch_expert_usage_keys_and_values(tmp_path):
    data = prepare_char_data(tmp_path, "the quick brown fox jumps over the lazy dog.\n" * 60)
    train(TorchTrainer(_config(data, tmp_path / "base", 4), quiet=True))  # 4 steps: routers off their init
    for name in ("torch", "jax"):
        shutil.copytree(tmp_path / "base", tmp_path / name)
    train(TorchTrainer(_config(data, tmp_path / "torch", 8), resume=True, quiet=True))
    train(JaxTrainer(_config(data, tmp_path / "jax", 8), resume=True, quiet=True))
    torch_rows, jax_rows = _train_rows(tmp_path / "torch"), _train_rows(tmp_path / "jax")
    assert sorted(jax_rows) == sorted(torch_rows) == [1, 2, 4, 6, 8]
    for step in (6, 8):  # the steps each framework took from the shared resume point
        assert set(jax_rows[step]) == set(torch_rows[step])
        usage = np.array(jax_rows[step]["expert_usage"])  # (layers, experts): the share of tokens per expert
        assert usage.shape == (2, 4) and (usage >= 0).all()
        np.testing.assert_allclose(usage.sum(1), 2.0, atol=1e-3)  # each token picks experts_per_token = 2
        # one token routed differently would move a share by 1 / 128 (4 sequences x 32 tokens)
        np.testing.assert_allclose(usage, np.array(torch_rows[step]["expert_usage"]), atol=1e-4, rtol=0)
    assert jax_rows[6]["expert_usage"] != jax_rows[8]["expert_usage"]  # measured anew for each row


def test_a_dense_jax_run_logs_no_expert_usage(tmp_path):
    data = prepare_char_data(tmp_path, "the quick brown fox jumps over the lazy dog.\n" * 60)
    dense = dataclasses.replace(MOE, n_experts=0)
    cfg = dataclasses.replace(_config(data, tmp_path / "dense", 2), model=dense)
    train(JaxTrainer(cfg, quiet=True))
    assert all("expert_usage" not in row for row in _train_rows(tmp_path / "dense").values())
