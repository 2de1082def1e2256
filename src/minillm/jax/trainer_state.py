"""What a JAX training checkpoint holds, written in the PyTorch trainer's format.

`trainer_state.safetensors` holds the weights (`model.<name>`), AdamW's moments
(`adam.exp_avg.<name>`, `adam.exp_avg_sq.<name>`, the names torch.optim.AdamW uses) and the
PRNG key (`rng.jax`), with every scalar (step, tokens seen, data-loader position, best val
loss, Adam's step count per parameter) as JSON in its header; `trainer_state.json` mirrors the
scalars and `model.safetensors` holds the latest weights. All writes are atomic
(minillm.checkpoint), so a kill at any moment leaves the previous complete checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minillm import checkpoint
from minillm.checkpoint import STATE_FILE, CheckpointError
from minillm.jax.model import params_from_canonical, params_to_canonical
from minillm.jax.step import TrainState


def adam_moments(opt_state: optax.OptState) -> optax.ScaleByAdamState:
    """The (count, mu, nu) of make_optimizer's chain: scale_by_adam is its first link."""
    return opt_state[0]


def with_adam_moments(opt_state: optax.OptState, count: int, mu: dict, nu: dict) -> optax.OptState:
    """opt_state with Adam's moments and step count (and the schedule's count) replaced."""
    adam, decay, schedule = opt_state
    counter = lambda: jnp.asarray(count, jnp.int32)  # noqa: E731 - two buffers: a step donates each once
    return (adam._replace(count=counter(), mu=mu, nu=nu), decay, schedule._replace(count=counter()))


def save_trainer_state(run_dir: str | Path, state: TrainState, rng: jax.Array,
                       scalars: dict[str, Any]) -> None:
    """Write trainer_state.safetensors (the resume point), its JSON mirror and model.safetensors."""
    run_dir = Path(run_dir)
    params = params_to_canonical(state.params)
    adam = adam_moments(state.opt_state)
    tensors = {f"model.{k}": v for k, v in params.items()}
    tensors.update({f"adam.exp_avg.{k}": v for k, v in params_to_canonical(adam.mu).items()})
    tensors.update({f"adam.exp_avg_sq.{k}": v for k, v in params_to_canonical(adam.nu).items()})
    tensors["rng.jax"] = np.asarray(jax.random.key_data(rng))
    step = int(adam.count)
    scalars = {**scalars, "adam_steps": {k: float(step) for k in params}}
    checkpoint.write_trainer_state(run_dir, tensors, scalars)


def restore_trainer_state(state: TrainState, tensors: dict[str, np.ndarray], scalars: dict,
                          config) -> tuple[TrainState, jax.Array | None]:
    """(TrainState, PRNG key or None) from what save_trainer_state wrote. A state written by the
    PyTorch trainer restores too (same names); it has no JAX key, so None is returned for it."""
    section = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    params = params_from_canonical(section("model."), config)
    mu, nu = section("adam.exp_avg."), section("adam.exp_avg_sq.")
    if sorted(mu) != sorted(params) or sorted(nu) != sorted(params):
        raise CheckpointError(f"{STATE_FILE} lacks AdamW moments for some parameters")
    steps = set(scalars.get("adam_steps", {}).values()) or {0.0}
    count = int(max(steps))
    opt_state = with_adam_moments(state.opt_state, count, params_from_canonical(mu, config),
                                  params_from_canonical(nu, config))
    rng = jax.random.wrap_key_data(jnp.asarray(tensors["rng.jax"])) if "rng.jax" in tensors else None
    return TrainState(params, opt_state), rng
