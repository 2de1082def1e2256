"""Two-device data parallelism (forced host devices on CPU) equals the one-device step. Runs in a
subprocess: XLA_FLAGS must be set before jax is imported."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

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
    rng = np.random.default_rng(0)
    for i in range(3):
        xs = rng.integers(0, 40, (2, 4, 16)).astype(np.int32)
        ys = np.roll(xs, -1, axis=-1)
        key = jax.random.PRNGKey(i)
        s1, m1 = one(s1, jnp.asarray(xs), jnp.asarray(ys), key)
        x2, y2 = parallel.shard_batch(xs, mesh), parallel.shard_batch(ys, mesh)
        assert len(x2.addressable_shards) == 2 and x2.addressable_shards[0].data.shape == (2, 2, 16)
        s2, m2 = two(s2, x2, y2, key)
        assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-6, (m1, m2)
        assert abs(float(m1["grad_norm"]) - float(m2["grad_norm"])) <= 1e-5
    diff = max(float(jnp.abs(s1.params[k] - s2.params[k]).max()) for k in params)
    assert diff <= 1e-6, diff
    assert s2.params["tok_emb.weight"].sharding.is_fully_replicated
    print("OK", diff)
""")


def test_two_device_step_equals_one_device_step():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
