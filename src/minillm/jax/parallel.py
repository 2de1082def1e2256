"""Data parallelism with jax.sharding: one program, the batch split across devices.

A 1-D device mesh with axis "data". The parameters and optimizer state are replicated on every
device; the batch (grad_accum, b, T) is split along b. The step is the very function of
minillm.jax.step, jitted with these shardings: XLA's partitioner (GSPMD) runs each device on
its rows and inserts the all-reduce that averages the gradients, so the loss and the update are
those of the whole global batch, as on one device (DESIGN principle 6: the batch is global).

On a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N (set before importing jax) makes N
devices to try it on; on a GPU node every local GPU is a device. Several hosts add
jax.distributed.initialize() and the same code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minillm.config import ModelConfig, TrainConfig
from minillm.jax.step import train_step_fn

DATA_AXIS = "data"


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first n_devices devices (default: all of them)."""
    devices = jax.devices()[: n_devices or len(jax.devices())]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, PRNG keys)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(grad_accum, b, T) batches split along b: each device gets b / n_devices rows."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def shard_batch(xs: np.ndarray, mesh: Mesh) -> jax.Array:
    if xs.shape[1] % mesh.size:
        raise ValueError(f"micro-batch {xs.shape[1]} (batch_size / grad_accum) must be divisible by "
                         f"the number of devices ({mesh.size})")
    return jax.device_put(xs, batch_sharding(mesh))


def replicate(tree, mesh: Mesh):
    """Put a pytree (TrainState, params) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def make_parallel_train_step(config: ModelConfig, cfg: TrainConfig, optimizer: optax.GradientTransformation,
                             mesh: Mesh, dtype=jnp.float32):
    """step(state, xs, ys, key) -> (state, metrics) over the mesh; state replicated, xs/ys
    placed with shard_batch. Same results as minillm.jax.step.make_train_step on one device."""
    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(train_step_fn(config, cfg, optimizer, dtype), in_shardings=(rep, data, data, rep),
                   out_shardings=(rep, rep), donate_argnums=0)

