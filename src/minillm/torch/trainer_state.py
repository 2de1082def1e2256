"""The PyTorch trainer's resume point: weights, the optimizer's state (AdamW's moments, Muon's
momentum buffers) and RNG states as the tensors of minillm.checkpoint.write_trainer_state (which
says what the files hold), read back exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm import checkpoint
from minillm.torch.muon import MuonWithAdamW


def save_trainer_state(run_dir: str | Path, params: dict[str, np.ndarray], opt, names: list[str],
                       scalars: dict[str, Any]) -> None:
    """Write trainer_state.safetensors (atomic; the resume point) and its JSON mirror: `params` (the
    weights that train, as numpy), the optimizer's state by parameter name (`adam.exp_avg.<name>`,
    `adam.exp_avg_sq.<name>`, `muon.momentum.<name>`) and the RNG states."""
    tensors = {f"model.{name}": value for name, value in params.items()}
    opt_state = opt.state_dict()["state"]
    steps = {}
    for i, name in enumerate(names):
        if "exp_avg" in opt_state.get(i, {}):
            tensors[f"adam.exp_avg.{name}"] = opt_state[i]["exp_avg"].float().cpu().numpy()
            tensors[f"adam.exp_avg_sq.{name}"] = opt_state[i]["exp_avg_sq"].float().cpu().numpy()
            steps[name] = float(opt_state[i]["step"])
        if "momentum_buffer" in opt_state.get(i, {}):
            tensors[f"muon.momentum.{name}"] = opt_state[i]["momentum_buffer"].float().cpu().numpy()
    tensors["rng.torch"] = torch.get_rng_state().numpy()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s.numpy() for i, s in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {**scalars, "adam_steps": steps, "optimizer": optimizer_kind(opt)}
    checkpoint.write_trainer_state(Path(run_dir), tensors, scalars, model_file=False)


def optimizer_kind(opt) -> str:
    """TrainConfig.optimizer's name for an optimizer that make_optimizer built."""
    return "muon" if isinstance(opt, MuonWithAdamW) else "adamw"


def state_weights(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `params` that save_trainer_state stored, by name."""
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def restore_optimizer(opt, names: list[str], tensors: dict[str, np.ndarray], scalars: dict,
                      device: torch.device) -> None:
    """Load the optimizer state and RNG states saved by save_trainer_state. A state saved by the
    other optimizer is refused: its moments would silently start from zero."""
    saved = scalars.get("optimizer", "adamw")  # states from before Muon, and the JAX trainer's, are AdamW
    if saved != optimizer_kind(opt):
        raise checkpoint.CheckpointError(
            f"{checkpoint.STATE_FILE} was written with optimizer={saved!r}, the config asks for "
            f"optimizer={optimizer_kind(opt)!r}; resume with the optimizer the run started with")
    state = {}
    for i, name in enumerate(names):
        if f"adam.exp_avg.{name}" in tensors:
            state[i] = {
                "step": torch.tensor(scalars["adam_steps"][name], dtype=torch.float32),
                "exp_avg": torch.from_numpy(tensors[f"adam.exp_avg.{name}"]).to(device),
                "exp_avg_sq": torch.from_numpy(tensors[f"adam.exp_avg_sq.{name}"]).to(device),
            }
        if f"muon.momentum.{name}" in tensors:
            state[i] = {"momentum_buffer": torch.from_numpy(tensors[f"muon.momentum.{name}"]).to(device)}
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    if "rng.torch" in tensors:  # absent in a state written by the JAX trainer
        torch.set_rng_state(torch.from_numpy(tensors["rng.torch"]))
    cuda_states = [torch.from_numpy(tensors[f"rng.cuda.{i}"]) for i in range(torch.cuda.device_count())
                   if f"rng.cuda.{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
