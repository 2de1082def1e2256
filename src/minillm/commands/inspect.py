"""`minillm inspect`: size a model before training it, on one process or on N ranks (DDP or FSDP)."""

from __future__ import annotations

import argparse
import json

from minillm.checkpoint import canonical_shapes
from minillm.config import ModelConfig, TrainConfig, load_train_config

MiB = 2**20


def register(sub) -> None:
    p = sub.add_parser("inspect", help="parameters, FLOPs per token and training memory of a config",
                       description="Print parameter count, FLOPs per token and an estimate of the memory "
                                   "training needs per rank, so a run can be sized before it starts.",
                       epilog="example: minillm inspect --config configs/nanogpt-cpu.toml --world-size 8 "
                              "--parallel fsdp")
    p.add_argument("--config", help="train/model TOML file (as for `minillm train`)")
    p.add_argument("--preset", help="a model preset instead of --config (e.g. gpt2-small, llama-tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.d_model=256 --set batch_size=32")
    p.add_argument("--world-size", type=int, default=1, metavar="N",
                   help="ranks (processes, GPUs) sharing the global batch (default 1)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="strategy to size (default: the config's `parallel`); with --config only")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the parameter count, FLOPs per token and, for a training config, memory per rank."""
    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    if args.preset:
        train, model = None, ModelConfig.preset(args.preset)
    elif args.config:
        train = load_train_config(args.config, args.overrides + ([f'parallel="{args.parallel}"']
                                                                 if args.parallel else []))
        model = train.model
    else:
        raise ValueError("give --config FILE or --preset NAME")
    import torch

    from minillm.torch.model import Transformer

    with torch.device("meta"):  # shapes only: no memory, no init
        net = Transformer(model)
    n_params = net.num_parameters()
    T = train.block_size if train else model.max_seq_len
    report = {"parameters": n_params, "flops_per_token": net.flops_per_token(T)}
    if train:
        memory = memory_per_rank(train, args.world_size)
        report.update(world_size=args.world_size, parallel=train.parallel,
                      tokens_per_step=train.batch_size * T, memory_per_rank=memory,
                      peak_memory_per_rank=peak(memory))
    print(json.dumps(report) if args.json else _text(report, T, train))
    return 0


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
    model, n = train.model, _n_params(train.model)
    block = sum(_numel(s) for name, s in canonical_shapes(model).items() if name.startswith("blocks.0."))
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


def _n_params(model: ModelConfig) -> int:
    return sum(_numel(shape) for shape in canonical_shapes(model).values())


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def _text(report: dict, T: int, train: TrainConfig | None) -> str:
    n = report["parameters"]
    lines = [f"parameters        {n:,} ({n / 1e6:.2f}M)",
             f"FLOPs per token   {report['flops_per_token']:,} (training: 6N + 12·L·D·T at T={T})",
             f"weights (fp32)    {n * 4 / MiB:,.1f} MiB"]
    if train:
        mem, world = report["memory_per_rank"], report["world_size"]
        micro = train.batch_size // (train.grad_accum * world)
        where = f"per rank of {world}, {train.parallel}" if world > 1 else "one process"
        lines += [f"training memory   ~{peak(mem) / MiB:,.1f} MiB at the peak, {where}, from "
                  f"(all but half the gradients are alive together):"]
        lines += [f"  {part:<15} {size / MiB:,.1f} MiB" for part, size in mem.items()]
        lines += [f"activations       micro-batch {micro} x {T} tokens per rank, fp32"
                  + (", checkpointed per block" if train.activation_checkpointing else ""),
                  f"tokens per step   {report['tokens_per_step']:,}"]
    return "\n".join(lines)
