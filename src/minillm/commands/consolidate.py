"""`minillm consolidate`: the full model.safetensors of an FSDP run's sharded checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from minillm import checkpoint
from minillm.files import atomic_write_text


def register(sub) -> None:
    p = sub.add_parser(
        "consolidate", help="write model.safetensors from an FSDP run's sharded checkpoint",
        description="Read the latest committed sharded checkpoint of a run (run/sharded/, written by "
                    "`minillm train --set parallel=\"fsdp\"` under torchrun) in one process and write "
                    "the ordinary model.safetensors, which sample, chat, eval and the exporters read.",
        epilog="example: minillm consolidate --run runs/big --out runs/big-final")
    p.add_argument("--run", required=True, help="run directory with a sharded/ checkpoint")
    p.add_argument("--out", help="write a self-contained run directory here (config, tokenizer, "
                                 "weights) instead of model.safetensors in --run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillm.torch import sharded_checkpoint

    run_dir = Path(args.run)
    point = sharded_checkpoint.latest(run_dir)
    if point is None:
        pointer = run_dir / sharded_checkpoint.SHARDED_DIR / sharded_checkpoint.LATEST
        raise checkpoint.CheckpointError(f"{pointer} not found: {run_dir} has no sharded checkpoint")
    config = checkpoint.load_config(run_dir)
    params = sharded_checkpoint.consolidate(point, config)
    out = Path(args.out) if args.out else run_dir
    if out != run_dir:
        out.mkdir(parents=True, exist_ok=True)
        for name in (checkpoint.CONFIG_FILE, checkpoint.TOKENIZER_FILE):
            if (run_dir / name).is_file():
                atomic_write_text(out / name, (run_dir / name).read_text(encoding="utf-8"))
    step = sharded_checkpoint.read_scalars(point)["step"]
    checkpoint.save_tensors(out / checkpoint.MODEL_FILE, params,
                            metadata={"format": "minillm-1", "step": str(step)})
    print(f"consolidated {point} (step {step}, {len(params)} tensors) into {out / checkpoint.MODEL_FILE}")
    return 0
