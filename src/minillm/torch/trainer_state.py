"""The PyTorch trainer's resume point: weights, AdamW's moments and RNG states as the tensors of
minillm.checkpoint.write_trainer_state (which says what the files hold), read back exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm import checkpoint


def save_trainer_state(run_dir: str | Path, params: dict[str, np.ndarray], opt, names: list[str],
                       scalars: dict[str, Any]) -> None:
    """Write trainer_state.safetensors (atomic; the resume point) and its JSON mirror: `params` (the
    weights that train, as numpy), AdamW's moments by name and the RNG states."""
    tensors = {f"model.{name}": value for name, value in params.items()}
    opt_state = opt.state_dict()["state"]
    steps = {}
    for i, name in enumerate(names):
        if i in opt_state:
            tensors[f"adam.exp_avg.{name}"] = opt_state[i]["exp_avg"].float().cpu().numpy()
            tensors[f"adam.exp_avg_sq.{name}"] = opt_state[i]["exp_avg_sq"].float().cpu().numpy()
            steps[name] = float(opt_state[i]["step"])
    tensors["rng.torch"] = torch.get_rng_state().numpy()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s.numpy() for i, s in enumerate(torch.cuda.get_rng_state_all())})
    checkpoint.write_trainer_state(Path(run_dir), tensors, {**scalars, "adam_steps": steps}, model_file=False)


def state_weights(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `params` that save_trainer_state stored, by name."""
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def restore_optimizer(opt, names: list[str], tensors: dict[str, np.ndarray], scalars: dict,
                      device: torch.device) -> None:
    """Load the AdamW moments and RNG states saved by save_trainer_state."""
    state = {}
    for i, name in enumerate(names):
        if f"adam.exp_avg.{name}" in tensors:
            state[i] = {
                "step": torch.tensor(scalars["adam_steps"][name], dtype=torch.float32),
                "exp_avg": torch.from_numpy(tensors[f"adam.exp_avg.{name}"]).to(device),
                "exp_avg_sq": torch.from_numpy(tensors[f"adam.exp_avg_sq.{name}"]).to(device),
            }
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    if "rng.torch" in tensors:  # absent in a state written by the JAX trainer
        torch.set_rng_state(torch.from_numpy(tensors["rng.torch"]))
    cuda_states = [torch.from_numpy(tensors[f"rng.cuda.{i}"]) for i in range(torch.cuda.device_count())
                   if f"rng.cuda.{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
