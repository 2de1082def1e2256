"""`minillm inspect`: size a model before training it, on one process or on N ranks (DDP or FSDP)."""

from __future__ import annotations

import argparse
import json

from minillm.config import ModelConfig, TrainConfig, load_train_config
from minillm.memory import memory_per_rank, peak

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
