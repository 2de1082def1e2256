"""Data parallelism with jax.sharding: one program over a mesh of devices, on one or many processes.

A 1-D device mesh with axis "data" spans every device of every process. The batch
(grad_accum, b, T) is split along b; each process loads only its own rows (the loader shards by
rank, as under torchrun) and jax.make_array_from_process_local_data joins them into one global
array. The step is the very function of minillm.jax.step, jitted with these shardings: XLA's
partitioner (GSPMD) runs each device on its rows and inserts the collectives, so the loss and the
update are those of the whole global batch, as on one device (DESIGN principle 6).

Where the parameters live (TrainConfig.parallel):
- "ddp": replicated; every device holds the parameters and AdamW's moments; the gradients are
  all-reduced (averaged) before the update.
- "fsdp": sharded (ZeRO-3 / FSDP style): each 2-D weight, and its two AdamW moments, is split
  along its largest axis when that axis divides by the number of devices; norms, biases and odd
  shapes stay replicated. GSPMD all-gathers a weight where the forward needs it whole and
  reduce-scatters its gradient, so each device keeps 1/n of the state between steps.

Several processes (one per host or per GPU): initialize_distributed() reads the launcher's
environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) before any device is
touched. On a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices per process.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minillm.config import ModelConfig, TrainConfig
from minillm.jax.step import loss_fn, train_step_fn

DATA_AXIS = "data"
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed() -> None:
    """jax.distributed.initialize from the environment, once, before anything touches a device.

    JAX_COORDINATOR_ADDRESS=host:port (process 0's host; every process gives the same),
    JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=0..N-1. Nothing set (or N = 1): one process, nothing to do.
    Under SLURM or Open MPI, JAX_COORDINATOR_ADDRESS alone is enough: jax reads the rest from them.
    """
    env = {name: os.environ.get(name) or None for name in ENV_VARS}
    if jax.distributed.is_initialized() or not any(env.values()):
        return
    num_processes, process_id = (_env_int(name, env[name]) for name in ENV_VARS[1:])
    if num_processes == 1:
        return
    try:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes, process_id)
    except ValueError as e:  # e.g. no coordinator given and no cluster (SLURM, MPI) to ask
        given = ", ".join(f"{k}={v}" for k, v in env.items() if v)
        raise ValueError(f"jax.distributed.initialize with {given}: {e}") from None


def _env_int(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first n_devices devices (default: all, of every process), ordered by
    process, so that process p's devices hold rows [p b / n_processes, (p + 1) b / n_processes)
    of a batch: the rows its loader reads."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices[: n_devices or len(devices)]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, PRNG keys, "ddp" parameters)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """Batches split along their batch axis b, the second to last: (grad_accum, b, T) or (b, T)."""
    return NamedSharding(mesh, P(*[None] * (ndim - 2), DATA_AXIS))


def fsdp_spec(shape: tuple[int, ...], n_devices: int) -> P:
    """A 2-D weight split along its largest axis (the first of equals) when it divides by
    n_devices: e.g. tok_emb (V, d) along V, mlp.up (4d, d) along 4d. Anything else: replicated."""
    if len(shape) != 2:
        return P()
    axis = int(shape[1] > shape[0])
    if shape[axis] % n_devices:
        return P()
    return P(*(DATA_AXIS if i == axis else None for i in range(2)))


def state_shardings(tree, mesh: Mesh, parallel: str = "ddp"):
    """A NamedSharding per leaf of a pytree (TrainState, params): replicated for "ddp"; for "fsdp"
    by fsdp_spec. The spec depends on the shape only, so AdamW's moments land with their weight."""
    if parallel == "fsdp":
        return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(leaf.shape, mesh.size)), tree)
    return jax.tree.map(lambda leaf: replicated(mesh), tree)


def place(tree, shardings):
    """Put a pytree, identical in every process (same seed, same checkpoint), on the mesh: each
    device keeps its part. Through host numpy, which every process can offer for any sharding."""
    return jax.device_put(jax.tree.map(np.asarray, tree), shardings)


def replicate(tree, mesh: Mesh):
    """Put a pytree (TrainState, params) on every device of the mesh."""
    return place(tree, state_shardings(tree, mesh))


def shard_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows of a batch ((grad_accum, b / n_processes, T) or (b / n_processes, T))
    -> the global array (..., b, T) split across the mesh's devices."""
    rows = local.shape[-2] * jax.process_count()
    if rows % mesh.size:
        raise ValueError(f"micro-batch {rows} (batch_size / grad_accum) must be divisible by "
                         f"the number of devices ({mesh.size})")
    shape = (*local.shape[:-2], rows, local.shape[-1])
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local, shape)


def gather(tree):
    """The pytree as host numpy arrays, whole. With several processes, a collective: every process
    must call it at the same point, and each gets the full arrays (for process 0 to save)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def make_parallel_train_step(config: ModelConfig, cfg: TrainConfig, optimizer: optax.GradientTransformation,
                             mesh: Mesh, dtype=jnp.float32, shardings=None):
    """step(state, xs, ys, key) -> (state, metrics) over the mesh; the state placed with `shardings`
    (state_shardings; None: replicated), xs/ys with shard_batch. The same results as
    minillm.jax.step.make_train_step on one device, up to the order of the reductions."""
    rep, data = replicated(mesh), batch_sharding(mesh)
    state = rep if shardings is None else shardings
    return jax.jit(train_step_fn(config, cfg, optimizer, dtype), in_shardings=(state, data, data, rep),
                   out_shardings=(state, rep), donate_argnums=0)


def make_parallel_eval_loss(config: ModelConfig, mesh: Mesh, param_shardings, dtype=jnp.float32):
    """loss(params, x, y) -> the mean loss of a (b, T) batch placed with shard_batch, replicated
    (so every process can read it)."""
    data = batch_sharding(mesh, 2)
    return jax.jit(lambda params, x, y: loss_fn(params, config, x, y, dtype=dtype),
                   in_shardings=(param_shardings, data, data), out_shardings=replicated(mesh))
