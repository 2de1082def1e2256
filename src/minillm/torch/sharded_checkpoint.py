"""Sharded resume points for FSDP runs, with `torch.distributed.checkpoint` (DCP): every rank writes
its own shards of the weights and of AdamW's moments, no rank ever holds the whole state.

On disk (run_dir/sharded/), in DCP's Hugging Face layout: safetensors files whose header says where
each shard sits in the full tensor (JSON), so nothing here is pickled:
    step-000050/shard-0000{r+1}-model-00001-of-00001.safetensors   rank r's shards ("model.<name>",
                                                                   "optim.<exp_avg|...>.<name>")
    step-000050/trainer_state.json     the scalars (step, tokens, loader position, RNG of rank 0, ...)
    latest                             "step-000050": the resume point
Atomicity: the ranks write into .staging-step-N/; only when DCP's save has returned on every rank
does rank 0 add the scalars, rename the directory to step-N/ and then replace `latest` (an atomic
write). A crash at any moment leaves `latest` naming a complete checkpoint (or none); a half-written
directory is never read. DCP reshards on load, so a run saved on 2 ranks resumes on 1, 2 or 4.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from minillm import checkpoint
from minillm.config import ModelConfig
from minillm.files import atomic_write_json, atomic_write_text, read_json

SHARDED_DIR = "sharded"
LATEST = "latest"
SCALARS = "trainer_state.json"


class Staged(NamedTuple):
    """Shards every rank wrote for the checkpoint of `step`: their directory (staging, then
    committed) and whether all of them were finite."""

    step: int
    path: Path
    finite: bool


def stage(run_dir: str | Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Path:
    """Every rank writes its shards of weights and optimizer state into run_dir/sharded/.staging-step-N
    (a collective: all ranks call it together). Returns that directory; `commit` makes it the resume
    point."""
    staging = Path(run_dir) / SHARDED_DIR / f".staging-{_name(step)}"
    if _rank() == 0:  # a leftover of a crash at the same step: start clean
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    dcp.save(_flat(*get_state_dict(model, opt)),
             storage_writer=HuggingFaceStorageWriter(str(staging), save_distributed=dist.is_initialized()))
    return staging


def commit(staging: Path, scalars: dict[str, Any]) -> Path:
    """Rank 0, after `stage` returned: add the scalars, rename to step-N/, point `latest` at it, then
    delete older checkpoints and any other leftovers. Returns the committed directory."""
    root, final = staging.parent, staging.parent / staging.name.removeprefix(".staging-")
    atomic_write_json(staging / SCALARS, scalars)
    shutil.rmtree(final, ignore_errors=True)  # a committed step-N/ of an earlier, abandoned attempt
    staging.rename(final)
    atomic_write_text(root / LATEST, final.name)  # the switch: from here on, this is the resume point
    for other in root.iterdir():
        if other.is_dir() and other != final:
            shutil.rmtree(other, ignore_errors=True)
    return final


def latest(run_dir: str | Path) -> Path | None:
    """The committed resume point of run_dir, or None if it has none."""
    pointer = Path(run_dir) / SHARDED_DIR / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    if not (path / SCALARS).is_file():
        raise checkpoint.CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def resume_point(run_dir: str | Path) -> Path | None:
    """The committed sharded checkpoint if it is run_dir's newest resume point. Each kind of save
    deletes the other kind (trainer_state.safetensors); both exist only after a crash in between."""
    sharded, single = latest(run_dir), Path(run_dir) / checkpoint.STATE_FILE
    if sharded is None or not single.is_file():
        return sharded
    newer = read_scalars(sharded)["step"] > checkpoint.read_trainer_state(run_dir)[1]["step"]
    return sharded if newer else None


def read_scalars(path: Path) -> dict[str, Any]:
    return read_json(path / SCALARS, checkpoint.CheckpointError)


def load(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Read a committed checkpoint into the model and optimizer, resharded to this run's ranks (every
    rank calls it; in one process it reads all shards)."""
    model_sd, optim_sd = get_state_dict(model, opt)  # the shapes and shards this run wants
    flat = _flat(model_sd, optim_sd)
    _check_names(path, flat)
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path)))
    _unflat(flat, model_sd, optim_sd)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)


def consolidate(path: Path, config: ModelConfig) -> dict[str, np.ndarray]:
    """The full float32 weights of a sharded checkpoint, by canonical name, read in one process
    without a process group (what `minillm consolidate` and rank 0 write to model.safetensors)."""
    shapes = checkpoint.canonical_shapes(config)
    full = {f"model.{name}": torch.empty(shape, dtype=torch.float32) for name, shape in shapes.items()}
    _check_names(path, full)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(full, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
    return {name: full[f"model.{name}"].numpy() for name in shapes}


# --- DCP state dicts <-> one flat name -> tensor dict ------------------------------------------------
def _flat(model_sd: dict, optim_sd: dict) -> dict[str, torch.Tensor]:
    """{"model.<name>": weight, "optim.<key>.<name>": optimizer tensor}: flat tensors only, since the
    safetensors layout holds nothing else (param_groups come from the config, as in trainer_state)."""
    flat = {f"model.{name}": t for name, t in model_sd.items()}
    for name, state in optim_sd["state"].items():
        flat.update({f"optim.{key}.{name}": t for key, t in state.items()})
    return flat


def _unflat(flat: dict, model_sd: dict, optim_sd: dict) -> None:
    for name in model_sd:
        model_sd[name] = flat[f"model.{name}"]
    for name, state in optim_sd["state"].items():
        for key in state:
            state[key] = flat[f"optim.{key}.{name}"]


def _check_names(path: Path, wanted: dict[str, torch.Tensor]) -> None:
    """A clear error for a checkpoint of another architecture or optimizer (DCP's is a KeyError)."""
    saved: set[str] = set()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            saved.update(f.keys())
    missing = sorted(set(wanted) - saved)
    if missing:
        raise checkpoint.CheckpointError(f"{path} lacks {len(missing)} tensors this run needs, e.g. "
                                         f"{missing[:3]} (another model config or optimizer?)")


def remove(run_dir: str | Path) -> None:
    """Drop run_dir's sharded checkpoints (once a newer single-file resume point is written)."""
    shutil.rmtree(Path(run_dir) / SHARDED_DIR, ignore_errors=True)


def _name(step: int) -> str:
    return f"step-{step:06d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
