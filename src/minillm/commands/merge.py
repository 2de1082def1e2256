"""`minillm merge`: fold a LoRA adapter into its base's weights, giving a plain run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from minillm.checkpoint import save_run
from minillm.finetune import record


def register(sub) -> None:
    p = sub.add_parser(
        "merge", help="fold a LoRA adapter into the base weights (a plain run directory)",
        description="Write config.json, tokenizer.json and model.safetensors of a LoRA run with its "
                    "adapter merged into the weights (W + alpha/r * B A): a run that every command, "
                    "the JAX backend and the transformers export read like any other.",
        epilog="example: minillm merge --run runs/tasks-lora --out runs/tasks-merged")
    p.add_argument("--run", required=True, metavar="DIR", help="a LoRA run, or a base run with --adapter")
    p.add_argument("--adapter", metavar="DIR", help="an adapter directory (ours or peft's) for a base run")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged run directory (must not exist)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillm.torch.model import model_params
    from minillm.torch.sft import load_for_inference

    out = Path(args.out)
    if out.exists():
        raise ValueError(f"{out} already exists; merge writes a new run directory")
    ft = record(args.run)
    if args.adapter is None and (ft is None or ft.method != "lora"):
        raise ValueError(f"{args.run} is not a LoRA run: nothing to merge (give --adapter DIR)")
    model, tokenizer = load_for_inference(args.run, args.adapter)  # merged, plain nn.Linear layers
    save_run(out, model.config, tokenizer, model_params(model),
             extra_config={"merged_from": {"run": str(args.run), "adapter": args.adapter}})
    print(f"merged run written to {out}")
    return 0
