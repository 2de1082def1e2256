"""How the PyTorch trainer spreads one model over the ranks that torchrun starts.

"ddp"  (DistributedDataParallel): every rank holds the whole model, gradients and optimizer state;
       backward all-reduces the gradients. Memory per rank does not shrink with more ranks.
"fsdp" (FSDP2, `torch.distributed.fsdp.fully_shard`; Zhao et al. 2023): each block, then the root
       (embeddings, final norm, head), is cut into 1/world_size shards along dim 0. A block's
       full weights exist only while it runs (all-gather before its forward and backward), its
       gradients are reduce-scattered, and the optimizer updates the local shard only, so weights,
       gradients and AdamW's moments all take 1/world_size of the memory per rank.
Both use gloo on CPUs and NCCL on GPUs (setup_distributed below); the code is the same.

Activation checkpointing (Chen et al. 2016) keeps only each block's input for backward and runs
the block's forward again there: activation memory per layer drops to one (B, T, D) tensor for
~1/3 more compute. It works with or without the wrappers above.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from minillm.config import TrainConfig


def setup_distributed() -> tuple[int, int]:
    """(rank, world_size); initialises torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return int(os.environ.get("RANK", 0)), world


def finish_distributed() -> None:
    """After training under torchrun: wait until every rank is done (rank 0 may still be writing the
    last checkpoint), then close the process group. A rank that exits with the group still open can
    abort (SIGABRT) in gloo's threads while the others finish, failing the whole run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def wrap(model: torch.nn.Module, cfg: TrainConfig, world: int, dtype: torch.dtype) -> torch.nn.Module:
    """The module that training calls: the model itself (one process), DDP, or the model sharded in
    place by fully_shard (whose parameters become DTensor shards: build the optimizer after this).
    dtype: the trainer's compute dtype; on GPUs FSDP then gathers weights in it and reduces in fp32."""
    if cfg.activation_checkpointing:
        for block in model.blocks:
            checkpoint_activations(block)
    if world == 1:
        return model
    if cfg.parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    on_gpu = next(model.parameters()).device.type == "cuda"
    # On GPUs: all-gather and compute in bf16/fp16, reduce-scatter gradients in fp32 (the sharded
    # master weights stay fp32). On CPUs the trainer's autocast does the casting, as without FSDP.
    policy = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
              if on_gpu and dtype != torch.float32 else MixedPrecisionPolicy())
    for block in model.blocks:  # one communication unit per block: gathered just before it runs
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the rest: tok_emb (tied to the head), pos_emb, norm
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def checkpoint_activations(block: torch.nn.Module) -> None:
    """Recompute this block's forward in backward instead of keeping its activations. Patches the
    instance's forward (rather than wrapping the module) so parameter names stay canonical."""
    forward = block.forward

    @functools.wraps(forward)
    def recomputed(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and generation: nothing to save
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed


def no_grad_sync(module: torch.nn.Module, last_micro_step: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step of an optimizer
    step (the gradients accumulate locally and are synchronised once)."""
    if last_micro_step:
        return contextlib.nullcontext()
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return module.no_sync()
    if is_sharded(module):
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a plain tensor is its own)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank must call it); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
