"""Two-device data parallelism (forced host devices on CPU), the state replicated ("ddp") or
sharded ("fsdp"), equals the one-device step. Runs in a subprocess: XLA_FLAGS must be set before
jax is imported. (Several processes: tests/jax/test_multiprocess.py.)"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from jax.sharding import PartitionSpec as P  # noqa: E402

from minillm.jax import parallel  # noqa: E402

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from minillm.config import ModelConfig, TrainConfig
    from minillm.jax import model as jm, parallel, optim as jo, step as js
    assert len(jax.devices()) == 2, jax.devices()
    config = ModelConfig(vocab_size=40, max_seq_len=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                         norm="rmsnorm", positions="rope", mlp="swiglu")
    cfg = TrainConfig(model=config, batch_size=8, block_size=16, grad_accum=2, lr=3e-3, warmup_steps=2,
                      max_steps=10, grad_clip=0.5)
    params = jm.init_params(config, jax.random.PRNGKey(0))
    optimizer = jo.make_optimizer(cfg, params)
    one = js.make_train_step(config, cfg, optimizer)
    mesh = parallel.make_mesh(2)
    two = parallel.make_parallel_train_step(config, cfg, optimizer, mesh)
    s1 = js.init_train_state(jax.tree.map(jnp.copy, params), optimizer)
    s2 = parallel.replicate(js.init_train_state(params, optimizer), mesh)
    shardings = parallel.state_shardings(s1, mesh, "fsdp")
    fsdp = parallel.make_parallel_train_step(config, cfg, optimizer, mesh, shardings=shardings)
    s3 = parallel.place(js.init_train_state(params, optimizer), shardings)
    rng = np.random.default_rng(0)
    for i in range(3):
        xs = rng.integers(0, 40, (2, 4, 16)).astype(np.int32)
        ys = np.roll(xs, -1, axis=-1)
        key = jax.random.PRNGKey(i)
        s1, m1 = one(s1, jnp.asarray(xs), jnp.asarray(ys), key)
        x2, y2 = parallel.shard_batch(xs, mesh), parallel.shard_batch(ys, mesh)
        assert len(x2.addressable_shards) == 2 and x2.addressable_shards[0].data.shape == (2, 2, 16)
        s2, m2 = two(s2, x2, y2, key)
        s3, m3 = fsdp(s3, x2, y2, key)
        for m in (m2, m3):
            assert abs(float(m1["loss"]) - float(m["loss"])) <= 1e-6, (m1, m)
            assert abs(float(m1["grad_norm"]) - float(m["grad_norm"])) <= 1e-5
    for s in (s2, s3):
        diff = max(float(jnp.abs(s1.params[k] - s.params[k]).max()) for k in params)
        assert diff <= 1e-6, diff
    assert s2.params["tok_emb.weight"].sharding.is_fully_replicated
    # fsdp: each device holds half of a weight and of its two AdamW moments, after the steps too
    up, adam = "blocks.0.mlp.up.weight", s3.opt_state[0]
    assert s3.params[up].shape == (64, 16)
    for a in (s3.params[up], adam.mu[up], adam.nu[up]):
        assert [x.data.shape for x in a.addressable_shards] == [(32, 16), (32, 16)]
    assert [x.data.shape for x in s3.params["blocks.0.attn.k.weight"].addressable_shards] == [(8, 8)] * 2
    assert s3.params["norm.weight"].sharding.is_fully_replicated
    host = parallel.gather(s3)  # whole again, as numpy, for a checkpoint
    assert isinstance(host.params[up], np.ndarray)
    assert np.array_equal(host.params[up], np.asarray(s3.params[up]))
    print("OK", diff)
""")


def test_two_device_step_equals_one_device_step():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_fsdp_spec_splits_the_largest_axis_when_it_divides():
    fsdp_spec = parallel.fsdp_spec
    assert fsdp_spec((40, 16), 2) == P("data", None)  # tok_emb (vocab, d): along vocab
    assert fsdp_spec((16, 64), 4) == P(None, "data")  # mlp.down (d, 4d): along 4d
    assert fsdp_spec((16, 16), 2) == P("data", None)  # square: the first axis
    assert fsdp_spec((30, 16), 4) == P()  # 30 rows do not split 4 ways: replicated
    assert fsdp_spec((16,), 2) == P() and fsdp_spec((), 2) == P()  # gains, biases, counters


def test_initialize_distributed_reads_the_environment(monkeypatch):
    for name in parallel.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    parallel.initialize_distributed()  # nothing set: one process, nothing to do
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    parallel.initialize_distributed()  # one process asked for: the same
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        parallel.initialize_distributed()
