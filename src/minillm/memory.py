"""How many bytes one rank needs to train a config, by part (DDP or FSDP), before training it.

`minillm inspect` prints it; benchmarks/scale_out.py measures the real peak against it; the docs'
scaling-out page draws it (memory-per-rank.png).
"""

from __future__ import annotations

import math

from minillm.checkpoint import canonical_shapes, parameter_count
from minillm.config import TrainConfig


def memory_per_rank(train: TrainConfig, world: int = 1) -> dict[str, int]:
    """Bytes one rank needs in a training step (fp32 weights, AdamW), by part; `peak` combines them.

    ddp:  every rank keeps weights (4 B/param), gradients (4) plus DDP's gradient buckets (4, the
          all-reduce's copy) and AdamW's two moments (8).
    fsdp: weights, gradients and moments are sharded, 16 B/param / world, plus what is gathered in
          full for the moment: the root (embeddings, final norm; kept through the step) and two
          blocks (the running one, the prefetched next), with their full gradients in backward.
    Activations (the same for both: FSDP shards state, not activations) are what autograd saves
    per token, counted from the layers (F.scaled_dot_product_attention saves no T x T scores):
    per block 8 D + 2 d_ff (4 d_ff for SwiGLU) + n_heads, plus 2 D and the logits' vocab. With
    activation checkpointing a block keeps only its input (D), and backward holds ~1.5 blocks'
    worth while it recomputes one block and takes its gradients (measured: benchmarks/scale_out.py).
    """
    model, n = train.model, parameter_count(train.model)
    block = sum(math.prod(s) for name, s in canonical_shapes(model).items() if name.startswith("blocks.0."))
    root = n - model.n_layers * block
    shard = world if train.parallel == "fsdp" and world > 1 else 1
    gathered = root + 2 * block if shard > 1 else 0
    if (train.batch_size // train.grad_accum) % world:
        raise ValueError(f"micro-batch {train.batch_size // train.grad_accum} (batch_size / grad_accum) "
                         f"must be divisible by the number of ranks ({world})")
    micro = train.batch_size // (train.grad_accum * world)  # sequences per rank and micro-step
    D = model.d_model
    layer = 8 * D + (4 if model.mlp == "swiglu" else 2) * model.d_ff + model.n_heads  # floats per token
    kept = model.n_layers * D + 3 * layer // 2 if train.activation_checkpointing else model.n_layers * layer
    return {"weights": 4 * (n // shard + gathered),
            "gradients": 4 * (n // shard + gathered) + (4 * n if world > 1 and shard == 1 else 0),
            "optimizer": 8 * n // shard,
            "activations": 4 * micro * train.block_size * (kept + 2 * D + model.vocab_size)}


def peak(memory: dict[str, int]) -> int:
    """Peak bytes of a step from memory_per_rank's parts. Backward releases each block's activations
    as it fills that block's gradients, so the two are never whole at once: the peak holds about all
    activations and half the gradients (within ~5% of the resident peak that benchmarks/scale_out.py
    measures, glibc's mmap threshold fixed)."""
    return memory["weights"] + memory["optimizer"] + memory["activations"] + memory["gradients"] // 2
